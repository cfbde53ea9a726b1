"""Read one file sequentially to the end with fixed-size reads; print what happened as JSON.

Run as a child process by the benchmarks (``python -m bench.readfile PATH``), so that a
read stuck in a FUSE mount can be bounded by a timeout and killed, and so that the
reader's CPU is its own, not the benchmark's.

    --read-size N     bytes per read(2) (default 1 MiB)
    --verify BLOCK    compare every byte with the file BLOCK repeated; the comparison runs
                      inside the read loop, so use it only for untimed passes

Output (one JSON object on stdout): bytes, seconds (open to end of file), MB/s, the
longest single read, the number of reads slower than 0.25 s, bytes per 0.5 s interval,
the reader's own CPU seconds, and the CLOCK_MONOTONIC instants of open and end of file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SLOW_READ = 0.25
INTERVAL = 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readfile")
    parser.add_argument("path")
    parser.add_argument("--read-size", type=int, default=1024 * 1024)
    parser.add_argument("--verify", metavar="BLOCK")
    args = parser.parse_args(argv)

    block = b""
    if args.verify:
        with open(args.verify, "rb") as f:
            block = f.read()
    buf = bytearray(args.read_size)
    view = memoryview(buf)
    total = 0
    longest = 0.0
    slow = 0
    timeline: list[int] = []
    mismatch: int | None = None
    cpu0 = os.times()
    opened_at = time.monotonic()
    start = time.perf_counter()
    fd = os.open(args.path, os.O_RDONLY)
    try:
        while True:
            t0 = time.perf_counter()
            n = os.readv(fd, [view])
            t1 = time.perf_counter()
            if n == 0:
                break
            longest = max(longest, t1 - t0)
            if t1 - t0 > SLOW_READ:
                slow += 1
            slot = int((t1 - start) / INTERVAL)
            while len(timeline) <= slot:
                timeline.append(0)
            timeline[slot] += n
            if block and mismatch is None and not _same(view[:n], block, total):
                mismatch = total
            total += n
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    ended_at = time.monotonic()
    cpu1 = os.times()
    json.dump({
        "bytes": total,
        "seconds": seconds,
        "mb_s": total / seconds / 1e6 if seconds > 0 else 0.0,
        "read_size": args.read_size,
        "longest_read_s": longest,
        "slow_reads": slow,
        "slow_read_threshold_s": SLOW_READ,
        "interval_s": INTERVAL,
        "bytes_per_interval": timeline,
        "reader_cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
        "verified": bool(block) and mismatch is None,
        # CLOCK_MONOTONIC instants of open and end of file, to time readers that run at once
        "opened_at": opened_at,
        "ended_at": ended_at,
        "first_mismatch_at": mismatch,
    }, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _same(data: memoryview, block: bytes, offset: int) -> bool:
    """Is ``data`` what ``block`` repeated holds at ``offset``?"""
    pos = 0
    while pos < len(data):
        at = (offset + pos) % len(block)
        n = min(len(data) - pos, len(block) - at)
        if data[pos:pos + n] != block[at:at + n]:
            return False
        pos += n
    return True


if __name__ == "__main__":
    sys.exit(main())
