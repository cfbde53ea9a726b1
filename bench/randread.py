"""Random reads of one file, fio-style; print what happened as JSON.

Run as a child process by bench.compare (``python -m bench.randread PATH --size N``), so
that a read stuck in a FUSE mount can be bounded by a timeout and killed. Like
``fio --rw=randread --bs=256k --ioengine=psync --numjobs=T --number_ios=R``: T threads,
each with its own descriptor (one for all with --shared-descriptor), each doing R
pread(2) calls of --read-size bytes at aligned offsets drawn from a seeded generator
(offsets(): the raw client reads the same ones). Each descriptor is advised
POSIX_FADV_RANDOM, as fio does by default for a random workload (``fadvise_hint=1``):
without it the kernel takes a read whose preceding pages are cached (by other threads'
reads) for a stream and reads ahead, through every client that uses the page cache
(before 2026-12-03: with four threads, 1.10-1.14x the raw client's bytes through Pail).
pread releases the GIL, so the threads' reads really overlap. Timed from the moment every
thread has opened the file to the end of the last read. Every read is checked against
--verify BLOCK repeated (a comparison in memory, microseconds against a network read).

Output: bytes, seconds, MB/s, IOPS, read latency percentiles, whether every byte was right.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time

READ_SIZE = 256 * 1024
READS_PER_THREAD = 400
SEED = 7


def offsets(size: int, read_size: int, reads: int, thread: int, seed: int = SEED) -> list[int]:
    """The aligned offsets thread ``thread`` reads, the same on every run and for every client."""
    rng = random.Random(seed * 1000 + thread)
    slots = max(1, size // read_size)
    return [rng.randrange(slots) * read_size for _ in range(reads)]


def expected(block: bytes, offset: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        at = (offset + len(out)) % len(block)
        out += block[at:at + n - len(out)]
    return bytes(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.randread")
    parser.add_argument("path")
    parser.add_argument("--size", type=int, required=True, help="the file's size in bytes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reads", type=int, default=READS_PER_THREAD, help="reads per thread")
    parser.add_argument("--read-size", type=int, default=READ_SIZE)
    parser.add_argument("--verify", metavar="BLOCK", required=True)
    parser.add_argument("--shared-descriptor", action="store_true",
                        help="all threads read through one descriptor, as a Parquet reader's thread pool does")
    args = parser.parse_args(argv)
    with open(args.verify, "rb") as f:
        block = f.read()

    ready = threading.Barrier(args.threads + 1)
    latencies: list[list[float]] = [[] for _ in range(args.threads)]
    errors: list[str] = []
    got = [0] * args.threads

    def open_random() -> int:
        fd = os.open(args.path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    shared = open_random() if args.shared_descriptor else None

    def run(thread: int) -> None:
        fd = shared if shared is not None else open_random()
        try:
            ready.wait()
            for offset in offsets(args.size, args.read_size, args.reads, thread):
                t0 = time.perf_counter()
                data = os.pread(fd, args.read_size, offset)
                latencies[thread].append(time.perf_counter() - t0)
                want = min(args.read_size, args.size - offset)
                if len(data) != want or data != expected(block, offset, want):
                    errors.append(f"thread {thread}: wrong bytes at {offset} ({len(data)} of {want})")
                    return
                got[thread] += len(data)
        except OSError as exc:
            errors.append(f"thread {thread}: {exc}")
        finally:
            if shared is None:
                os.close(fd)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(args.threads)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if shared is not None:
        os.close(shared)
    if errors:
        print("; ".join(errors[:5]), file=sys.stderr)
        return 1
    all_latencies = sorted(x for per in latencies for x in per)
    total = sum(got)

    def pct(p: float) -> float:
        return all_latencies[min(len(all_latencies) - 1, int(p * len(all_latencies)))]

    json.dump({
        "bytes": total, "reads": len(all_latencies), "threads": args.threads, "read_size": args.read_size,
        "shared_descriptor": args.shared_descriptor,
        "seconds": seconds, "mb_s": total / seconds / 1e6, "iops": len(all_latencies) / seconds,
        "latency_ms": {"median": statistics.median(all_latencies) * 1e3, "p90": pct(0.90) * 1e3,
                       "p99": pct(0.99) * 1e3, "max": all_latencies[-1] * 1e3},
        "verified": True,
    }, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
