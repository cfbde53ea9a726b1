"""Prometheus metrics of the mount processes, served by the node server for all of them.

A mount process counts what it does; it serves nothing. The node server starts each one
with PROMETHEUS_MULTIPROC_DIR set to a directory of its state dir: prometheus-client then
keeps every value in a memory-mapped file there (no thread, no socket, a dict update per
increment), and the node server's /metrics sums the files of all mount processes, so a
node has one scrape port however many volumes it mounts. ``pail mount`` by hand has no
such directory: its values stay in its memory, unserved.

Every series has the CSI ``volume`` (empty for ``pail mount`` by hand).
"""

from __future__ import annotations

import errno as errno_codes
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

from driver.log import VOLUME_ID_ENV
from driver.s3.api import ObjectClientError

# Read at the first count, not at import: the node server's launcher imports this module
# before it forks a mount process and gives it its volume's environment.
_volume: str | None = None


def _volume_label() -> str:
    global _volume
    if _volume is None:
        _volume = os.environ.get(VOLUME_ID_ENV, "")
    return _volume


S3_REQUESTS = Counter("pail_s3_requests", "S3 requests sent (retries by the HTTP client count once)",
                      ["volume", "operation", "status"])
S3_SECONDS = Histogram("pail_s3_request_duration_seconds", "Time from sending an S3 request to its end",
                       ["volume", "operation"],
                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
BYTES_READ = Counter("pail_read_bytes", "Bytes returned to reads of the mount", ["volume"])
BYTES_WRITTEN = Counter("pail_written_bytes", "Bytes written to files of the mount", ["volume"])
PREFETCH_READS = Counter("pail_prefetch_reads", "Reads by where their bytes were: hit (fetched already), "
                         "wait (requested ahead, not arrived yet), miss (requested for this read), "
                         "fill (in a block being fetched whole around random reads)",
                         ["volume", "result"])
BLOCK_FILLS = Counter("pail_block_fills", "Blocks fetched whole around random reads and given to the kernel's "
                      "page cache", ["volume"])
FUSE_OPERATIONS = Counter("pail_fuse_operations", "File system operations answered, by errno (OK: none)",
                          ["volume", "operation", "errno"])
CACHE_BLOCKS = Counter("pail_cache_blocks", "Blocks of 1 MiB wanted from the --cache: hit (read from disk), "
                       "miss (fetched from S3), invalid (failed its check, fetched again)", ["volume", "result"])
CACHE_BYTES = Gauge("pail_cache_bytes", "Disk space the --cache uses", ["volume"], multiprocess_mode="livesum")
OPEN_HANDLES = Gauge("pail_open_handles", "Open files and directories", ["volume"], multiprocess_mode="livesum")


@contextmanager
def timed_s3_request(operation: str) -> Iterator[list[int]]:
    """Count one request: the caller puts its HTTP status in the yielded list, or raises
    an ObjectClientError, whose status counts; neither: 'error' (no answer)."""
    status: list[int] = []
    started = time.monotonic()
    try:
        yield status
    except ObjectClientError as exc:
        if not status and exc.status is not None:
            status.append(exc.status)
        raise
    finally:
        S3_REQUESTS.labels(_volume_label(), operation, str(status[0]) if status else "error").inc()
        S3_SECONDS.labels(_volume_label(), operation).observe(time.monotonic() - started)


def fuse_operation(operation: str, error: int | None = None) -> None:
    name = "OK" if error is None else errno_codes.errorcode.get(error, str(error))
    FUSE_OPERATIONS.labels(_volume_label(), operation, name).inc()


def read_bytes(n: int) -> None:
    BYTES_READ.labels(_volume_label()).inc(n)


def written_bytes(n: int) -> None:
    BYTES_WRITTEN.labels(_volume_label()).inc(n)


def prefetch_read(result: str) -> None:
    PREFETCH_READS.labels(_volume_label(), result).inc()


def block_fill() -> None:
    BLOCK_FILLS.labels(_volume_label()).inc()


def handles(delta: int) -> None:
    OPEN_HANDLES.labels(_volume_label()).inc(delta)


def cache_bytes(n: int) -> None:
    CACHE_BYTES.labels(_volume_label()).set(n)


def cache_block(result: str, count: int = 1) -> None:
    if count:
        CACHE_BLOCKS.labels(_volume_label(), result).inc(count)
