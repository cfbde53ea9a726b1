"""What bench.compare times through a mount: one function per workload, each given the
mount's directory and the Dataset, each doing its work in a child process (a shell tool
or a small Python reader) under a timeout, and checking what it got.

WORKLOADS describes every workload: what is timed, its metric, which clients run it, and
which of them do the work a second time on the same mount (reread's epoch 2, the random
reads' second pass; bench.compare drops the page cache in between). The raw-client
counterparts are in bench/raw.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.dataset import LIST_PREFIX, SMALL_FILE_SIZE, Dataset, mb_s
from bench.mounts import read_file
from bench.system import BenchError, MiB

ROOT = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT = 300.0
VISIBLE_TIMEOUT = 60.0
MOUNTS = ("pail", "s3fs", "rclone")
# pail-crt (asked for by name) where Pail's own small GETs can matter, and pail-dio
# (--direct-io, which changes only reads): reads.
READERS = (*MOUNTS, "pail-dio", "pail-crt", "raw")
# Pail with --cache runs only where a cache can matter: data read again.
CACHED_READERS = ("pail", "pail-cache", "pail-dio", "pail-crt", "s3fs", "rclone", "raw")


@dataclass(frozen=True)
class Workload:
    label: str  # {size} is the large object's size, {list} and {small} the object counts
    metric: str  # the field of a run that is compared: mb_s, seconds or ms
    unit: str
    better: str  # "higher" or "lower"
    clients: tuple[str, ...]
    raw: str = ""  # what the raw client does instead
    # Clients that do the same work a second time on the same mount (or raw client), after
    # the page cache was dropped and the server's files read back into it (an epoch 2);
    # its metric is the run's "pass2_" + metric, in a row labelled second_label.
    second_pass: tuple[str, ...] = ()
    second_label: str = ""


WORKLOADS = {
    "mount": Workload("mount to live (cold page cache)", "seconds", "s", "lower", MOUNTS),
    "publish": Workload("NodePublishVolume to live mount (cold page cache)", "seconds", "s", "lower", ("pail",)),
    "ttfb": Workload("time to first byte, {size} object", "ms", "ms", "lower", READERS,
                     "awscrt GET_OBJECT, first on_body callback"),
    "seq_read": Workload("sequential read, {size} object", "mb_s", "MB/s", "higher", READERS,
                         "awscrt GET_OBJECT (8 MiB parts in parallel)"),
    "parallel_read": Workload("4 parallel readers, 4 × {size} objects", "mb_s", "MB/s", "higher", READERS,
                              "4 awscrt GET_OBJECTs at once"),
    "reread": Workload("reread {size} object: epoch 1", "mb_s", "MB/s", "higher", CACHED_READERS,
                       "awscrt GET_OBJECT, twice", second_pass=CACHED_READERS,
                       second_label="reread {size} object: epoch 2 (page cache dropped)"),
    "rand_read_1t": Workload("random 256 KiB reads, {size} object, 1 thread", "mb_s", "MB/s", "higher",
                             CACHED_READERS, "awscrt ranged GETs, one in flight, same offsets",
                             second_pass=("pail", "pail-cache"),
                             second_label="random 256 KiB reads, {size} object, 1 thread: second pass "
                                          "(same offsets, page cache dropped)"),
    "rand_read_4t": Workload("random 256 KiB reads, {size} object, 4 threads", "mb_s", "MB/s", "higher",
                             CACHED_READERS, "awscrt ranged GETs from 4 threads, one in flight each, same offsets",
                             second_pass=("pail", "pail-cache"),
                             second_label="random 256 KiB reads, {size} object, 4 threads: second pass "
                                          "(same offsets, page cache dropped)"),
    "rand_read_shared": Workload("random 256 KiB reads, {size} object, 4 threads sharing one descriptor", "mb_s",
                                 "MB/s", "higher", READERS,
                                 "awscrt ranged GETs from 4 threads, one in flight each, same offsets"),
    "list": Workload("ls -l of {list} objects", "seconds", "s", "lower", (*MOUNTS, "rclone-modtime", "raw"),
                     "boto3 ListObjectsV2 walk (1,000 keys a page)"),
    "cat_small": Workload("cat of {small} files of 64 KiB", "seconds", "s", "lower", READERS,
                          "boto3 GetObject of each, one after the other"),
    "seq_write": Workload("sequential write {size}, dd bs=1M conv=fsync", "mb_s", "MB/s", "higher", (*MOUNTS, "raw"),
                          "awscrt PUT_OBJECT (multipart, 8 MiB parts)"),
}


def _child(args: list[str], timeout: float = CHILD_TIMEOUT) -> dict:
    try:
        result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                                cwd=ROOT, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{args[0]} {args[1]} did not finish within {timeout:.0f} s") from None
    if result.returncode != 0:
        raise BenchError(f"{args[0]} {args[1]} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout)


# ------------------------------------------------------------------ reads
def seq_read(directory: str, data: Dataset) -> dict:
    read = read_file(os.path.join(directory, data.big_key))
    if read["bytes"] != data.size:
        raise BenchError(f"read {read['bytes']} bytes, expected {data.size}")
    return {"bytes": read["bytes"], "seconds": read["seconds"], "mb_s": read["mb_s"],
            "longest_read_s": round(read["longest_read_s"], 3), "slow_reads": read["slow_reads"],
            "reader_cpu_s": round(read["reader_cpu_s"], 2)}


def parallel_read(directory: str, data: Dataset) -> dict:
    """One bench.readfile process per object, all started at once; timed from the first
    open to the last end of file (the readers' own CLOCK_MONOTONIC stamps)."""
    readers = [subprocess.Popen([sys.executable, "-m", "bench.readfile", os.path.join(directory, key)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                stdin=subprocess.DEVNULL) for key in data.parallel_keys]
    outputs = []
    try:
        for reader in readers:
            out, err = reader.communicate(timeout=CHILD_TIMEOUT)
            if reader.returncode != 0:
                raise BenchError(f"a parallel reader failed: {err.strip()[-2000:]}")
            outputs.append(json.loads(out))
    except subprocess.TimeoutExpired:
        raise BenchError(f"parallel readers did not finish within {CHILD_TIMEOUT:.0f} s") from None
    finally:
        for reader in readers:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
    total = sum(o["bytes"] for o in outputs)
    if total != data.size * len(data.parallel_keys):
        raise BenchError(f"parallel readers read {total} bytes, expected {data.size * len(data.parallel_keys)}")
    seconds = max(o["ended_at"] for o in outputs) - min(o["opened_at"] for o in outputs)
    return {"bytes": total, "seconds": seconds, "mb_s": mb_s(total, seconds),
            "per_reader_mb_s": [round(o["mb_s"], 1) for o in outputs]}


def rand_read(directory: str, data: Dataset, threads: int, reads: int, *, shared: bool = False) -> dict:
    out = _child(["bench.randread", os.path.join(directory, data.big_key), "--size", str(data.size),
                  "--threads", str(threads), "--reads", str(reads), "--verify", str(data.block_file),
                  *(["--shared-descriptor"] if shared else [])])
    if out["bytes"] != threads * reads * out["read_size"] and data.size >= out["read_size"]:
        raise BenchError(f"random reads got {out['bytes']} bytes, expected {threads * reads * out['read_size']}")
    return out


def ttfb(directory: str, data: Dataset) -> dict:
    out = _child(["bench.firstbyte", os.path.join(directory, data.big_key), "--verify", str(data.block_file)])
    return {**out, "ms": out["seconds"] * 1e3}


# ---------------------------------------------------------------- metadata
def list_dir(directory: str, data: Dataset) -> dict:
    """``ls -l`` of the directory (C locale, output to a pipe); every object must be there."""
    path = os.path.join(directory, LIST_PREFIX)
    t0 = time.perf_counter()
    try:
        result = subprocess.run(["ls", "-l", path], capture_output=True, timeout=CHILD_TIMEOUT,
                                env={**os.environ, "LC_ALL": "C"}, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"ls -l did not finish within {CHILD_TIMEOUT:.0f} s") from None
    seconds = time.perf_counter() - t0
    if result.returncode != 0:
        raise BenchError(f"ls -l failed: {result.stderr.decode(errors='replace').strip()[-1000:]}")
    entries = [line for line in result.stdout.decode(errors="replace").splitlines() if line.startswith("-")]
    if len(entries) != data.list_objects:
        raise BenchError(f"ls -l showed {len(entries)} files, expected {data.list_objects}")
    return {"entries": len(entries), "seconds": seconds}


def cat_small(directory: str, data: Dataset) -> dict:
    """One ``cat`` of every file by name, in order: each one looked up, opened, read and
    closed one after the other. The output goes through a pipe and is counted."""
    paths = [os.path.join(directory, key) for key in data.small_keys]
    buf = bytearray(1 * MiB)
    total = 0
    t0 = time.perf_counter()
    with subprocess.Popen(["cat", *paths], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL) as cat:
        deadline = time.monotonic() + CHILD_TIMEOUT
        while n := cat.stdout.readinto(buf):
            total += n
            if time.monotonic() > deadline:
                cat.kill()
                raise BenchError(f"cat did not finish within {CHILD_TIMEOUT:.0f} s")
        err = cat.stderr.read()
        code = cat.wait(60)
    seconds = time.perf_counter() - t0
    if code != 0 or total != data.small_files * SMALL_FILE_SIZE:
        raise BenchError(f"cat exited {code} after {total} bytes (expected {data.small_files * SMALL_FILE_SIZE}): "
                         f"{err.decode(errors='replace').strip()[-1000:]}")
    return {"bytes": total, "files": data.small_files, "seconds": seconds,
            "files_per_s": data.small_files / seconds}


# ------------------------------------------------------------------- write
def write_source(data: Dataset, directory: Path) -> Path:
    """What dd copies: the block repeated to the object's size, in tmpfs (/dev/shm), so
    dropping the page cache does not send dd to a disk."""
    path = directory / "write-source.bin"
    with open(path, "wb") as f:
        left = data.size
        while left > 0:
            f.write(data.block[:min(left, len(data.block))])
            left -= min(left, len(data.block))
    return path


def seq_write(directory: str, data: Dataset, key: str, source: Path, head) -> dict:
    """``dd if=SOURCE of=DIR/KEY bs=1M conv=fsync``, timed until it returns and the object
    is complete in S3 (``head(key)`` gives its size or None). A client that completes the
    object only after dd returned is charged the extra wait, which is recorded."""
    t0 = time.perf_counter()
    try:
        result = subprocess.run(["dd", f"if={source}", f"of={os.path.join(directory, key)}", "bs=1M",
                                 "conv=fsync", "status=none"], capture_output=True, text=True,
                                timeout=CHILD_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"dd did not finish within {CHILD_TIMEOUT:.0f} s") from None
    dd_seconds = time.perf_counter() - t0
    if result.returncode != 0:
        raise BenchError(f"dd failed: {result.stderr.strip()[-1000:]}")
    visible_at_return = head(key) == data.size
    while not visible_at_return and head(key) != data.size:
        if time.perf_counter() - t0 > dd_seconds + VISIBLE_TIMEOUT:
            raise BenchError(f"{key} not complete in S3 {VISIBLE_TIMEOUT:.0f} s after dd returned")
        time.sleep(0.05)
    seconds = time.perf_counter() - t0 if not visible_at_return else dd_seconds
    return {"bytes": data.size, "seconds": seconds, "mb_s": mb_s(data.size, seconds), "dd_seconds": dd_seconds,
            "visible_at_return": visible_at_return, "key": key}
