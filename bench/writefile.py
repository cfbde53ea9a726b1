"""Write one new file front to back with fixed-size writes, then close it; print what
happened as JSON.

Run as a child process by the write benchmark (``python -m bench.writefile PATH --size N
--block BLOCK``), so that a write stuck in a FUSE mount can be bounded by a timeout and
killed, and so that the writer's CPU is its own, not the benchmark's. Like ``dd
bs=1M``: open(O_WRONLY|O_CREAT|O_TRUNC), write(2) calls of --write-size bytes (the file
BLOCK repeated, held in memory before the file is opened), close(2). On a Pail mount the
object is complete when close returns, so the time runs from open to the end of close.

Output (one JSON object on stdout): bytes, seconds (open to end of close), MB/s, the time
spent in close, the CLOCK_MONOTONIC instants of open, close and its end (to compare with
the recording proxy's timestamps), the longest single write, the number of writes slower
than 0.25 s, bytes per 0.5 s interval, and the writer's own CPU seconds. A failed write or
close exits 1 with the error on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SLOW_WRITE = 0.25
INTERVAL = 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.writefile")
    parser.add_argument("path")
    parser.add_argument("--size", type=int, required=True, help="bytes to write")
    parser.add_argument("--block", required=True, help="file whose bytes, repeated, are written")
    parser.add_argument("--write-size", type=int, default=1024 * 1024)
    args = parser.parse_args(argv)

    with open(args.block, "rb") as f:
        block = f.read()
    if not block:
        parser.error("empty --block")
    # write(2) takes slices of the block as they are: a doubled block lets a write of any
    # size start anywhere in it without copying
    doubled = memoryview(block * 2) if args.write_size <= len(block) else None
    longest = 0.0
    slow = 0
    timeline: list[int] = []
    total = 0
    cpu0 = os.times()
    opened_at = time.monotonic()
    start = time.perf_counter()
    try:
        fd = os.open(args.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        print(f"open {args.path}: {exc}", file=sys.stderr)
        return 1
    try:
        while total < args.size:
            n = min(args.write_size, args.size - total)
            at = total % len(block)
            data = doubled[at:at + n] if doubled is not None else _piece(block, total, n)
            t0 = time.perf_counter()
            written = os.write(fd, data)
            t1 = time.perf_counter()
            if written <= 0:
                raise OSError(f"write returned {written}")
            longest = max(longest, t1 - t0)
            if t1 - t0 > SLOW_WRITE:
                slow += 1
            slot = int((t1 - start) / INTERVAL)
            while len(timeline) <= slot:
                timeline.append(0)
            timeline[slot] += written
            total += written
    except OSError as exc:
        print(f"write at {total}: {exc}", file=sys.stderr)
        os.close(fd)
        return 1
    close_started_at = time.monotonic()
    close_t0 = time.perf_counter()
    try:
        os.close(fd)
    except OSError as exc:
        print(f"close: {exc}", file=sys.stderr)
        return 1
    end = time.perf_counter()
    closed_at = time.monotonic()
    cpu1 = os.times()
    json.dump({
        "bytes": total,
        "seconds": end - start,
        "mb_s": total / (end - start) / 1e6 if end > start else 0.0,
        "write_size": args.write_size,
        "close_s": end - close_t0,
        "opened_at": opened_at,
        "close_started_at": close_started_at,
        "closed_at": closed_at,
        "longest_write_s": longest,
        "slow_writes": slow,
        "slow_write_threshold_s": SLOW_WRITE,
        "interval_s": INTERVAL,
        "bytes_per_interval": timeline,
        "writer_cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
    }, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _piece(block: bytes, offset: int, n: int) -> bytes:
    """``n`` bytes of ``block`` repeated, from ``offset`` (writes larger than the block)."""
    out = bytearray()
    while len(out) < n:
        at = (offset + len(out)) % len(block)
        out += block[at:at + n - len(out)]
    return bytes(out)


if __name__ == "__main__":
    sys.exit(main())
