"""The mount process: build the S3 client, check the bucket, serve the mount.

The same function runs for ``pail mount --foreground``, in the process plain ``pail
mount`` forks, and in the process the node server starts; ``ready_fd`` is how such a
parent learns that the mount answers, or why it does not.
"""

from __future__ import annotations

import ctypes
import os
from urllib.parse import urlsplit

import structlog
import trio

from driver import readiness
from driver.log import VOLUME_ID_ENV
from driver.config import MountConfig
from driver.fs.cache import BlockStore, CachingObjectClient
from driver.fuse.session import serve
from driver.s3.client import S3ObjectClient

log = structlog.get_logger("pail.mount")


class _Parent:
    """Tells the starting process 'ready' or 'error KIND: message' exactly once."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def say(self, line: str) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.write(fd, (line + "\n").encode())
        except OSError:
            pass  # the parent gave up waiting; the mount carries on
        finally:
            os.close(fd)


def run_mount(config: MountConfig, region: str, session=None, *, ready_fd: int | None = None,
              cache: BlockStore | None = None) -> int:
    parent = _Parent(ready_fd)
    _reuse_freed_buffers()
    volume = {"volume_id": os.environ[VOLUME_ID_ENV]} if os.environ.get(VOLUME_ID_ENV) else {}
    structlog.contextvars.bind_contextvars(**volume, bucket=config.s3.bucket, prefix=config.fs.prefix)
    log.info("starting", mountpoint=config.mountpoint, region=region,
             endpoint=_without_userinfo(config.s3.endpoint_url), read_only=config.fs.read_only,
             metadata_ttl=config.fs.metadata_ttl, cache=config.fs.cache_dir,
             max_cache_size=config.fs.max_cache_size if cache else None, direct_io=config.fs.direct_io,
             block_fill=config.fs.block_fill and not config.fs.direct_io)

    async def main() -> None:
        # The bucket was checked just before (cli._check_before_mount).
        client = S3ObjectClient(config.s3, region, session=session)
        if cache is not None:
            client = CachingObjectClient(client, cache)
        await serve(config, client, on_ready=lambda: parent.say(readiness.READY))

    try:
        trio.run(main)
    except RuntimeError as exc:  # pyfuse3.init: the kernel refused the mount
        log.error("mount failed", reason=str(exc))
        parent.say(readiness.error_line(readiness.MOUNT_FAILED, f"mounting {config.mountpoint} failed: {exc}"))
        return 1
    except BaseException as exc:
        parent.say(readiness.error_line(readiness.INTERNAL, f"{type(exc).__name__}: {exc}"))
        raise
    return 0


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Object data arrives in bodies of up to 8 MiB (FsSettings.max_request). glibc would give
# each its own fresh mmap and unmap it when freed, so every byte read was first a page
# fault and a zeroed page: a fifth of the mount's CPU reading 1 GiB. Served from the heap
# and kept there once freed, the same memory is reused by the next body. What the heap
# keeps is bounded by what the prefetch budget lets it hold at once (--max-memory).
_HEAP_BODY_LIMIT = 32 * 1024 * 1024  # glibc's largest allowed mmap threshold
_HEAP_KEEP = 128 * 1024 * 1024


def _reuse_freed_buffers() -> None:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # not glibc: its allocator decides
    mallopt(_M_MMAP_THRESHOLD, _HEAP_BODY_LIMIT)
    mallopt(_M_TRIM_THRESHOLD, _HEAP_KEEP)


def _without_userinfo(url: str | None) -> str | None:
    """An endpoint URL as it may be logged: never with a user:password part."""
    if not url:
        return url
    parts = urlsplit(url)
    return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl()
