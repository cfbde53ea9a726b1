"""What the block-fill rule (driver/fs/blockfill.py) costs and buys, in a model.

One reader makes random reads, uniform over an object, through the mount's own core
(``Prefetcher`` and ``BlockFill``) against the in-memory store answering each request after
30 ms at 100 MB/s (driver.s3.memory, on trio's MockClock: deterministic, no network, no
FUSE; the kernel's page cache is a set of filled blocks). For each rule — a block filled
at its second read only, or also at its first once 1/4 or 1/8 of the recent reads came
back — and each reader (R reads over an object of N blocks), it prints the bytes fetched
per byte read and the model's MB/s.

    python -m bench.blockfill_model [--blocks 128] [--reads-per-block 0.25,0.5,1,3]

The benchmark's distant random reads (``compare --latency-ms 30 --connection-mbs 100``)
are the row N=128, R=400 (3.1 reads per block). Smaller blocks keep the object small:
``--block-kib 1024 --read-kib 32 --blocks 1024`` is the same shape at an eighth of the size.
"""

from __future__ import annotations

import argparse
import random

import trio
from trio.testing import MockClock

from driver.fs import blockfill
from driver.fs.blockfill import BlockFill, ReadWaits
from driver.fs.prefetch import MemoryBudget, PrefetchConfig, Prefetcher
from driver.s3.memory import MemoryClient

KiB, MiB = 1024, 1024 * 1024
RULES = {"second read": None, "1/4 came back": 4, "1/8 came back": 8}


def model(blocks: int, reads: int, rule: int | None, *, block: int, read: int, seed: int = 1) -> tuple[float, float]:
    """(bytes fetched / bytes read, MB/s) of one reader under ``rule``."""
    client = MemoryClient(latency=0.03, rate=100e6)
    info = client.put("obj", bytes(blocks * block))
    rng = random.Random(seed)
    offsets = [rng.randrange(blocks * block // read) * read for _ in range(reads)]
    filled: set[int] = set()

    async def store(ino: int, offset: int, data: memoryview) -> None:
        filled.add(offset // block)

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            budget = MemoryBudget(256 * MiB)
            fill = BlockFill(client, ino=1, key="obj", etag=info.etag, size=info.size, block=block,
                             budget=budget, nursery=nursery, store=store, waits=ReadWaits())
            reader = Prefetcher(client, "obj", info.etag, info.size, budget=budget, nursery=nursery, fill=fill,
                                config=PrefetchConfig(min_request=read, max_request=block, max_ahead=4))
            started = trio.current_time()
            for offset in offsets:
                if offset // block not in filled:  # else the kernel answers it
                    await reader.read(offset, read)
            seconds = trio.current_time() - started
            reader.close()
            await fill.stop()
            nursery.cancel_scope.cancel()
            return seconds

    saved = blockfill.FIRST_READ_RETURNS
    blockfill.FIRST_READ_RETURNS = rule if rule is not None else 0  # returns × 0 never reach the reads
    try:
        seconds = trio.run(main, clock=MockClock(autojump_threshold=0))
    finally:
        blockfill.FIRST_READ_RETURNS = saved
    fetched = sum(call.length for call in client.calls if call.operation == "GetObject")
    return fetched / (reads * read), reads * read / seconds / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.blockfill_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=128, help="N: blocks in the object (default 128: 1 GiB)")
    parser.add_argument("--block-kib", type=int, default=8192, help="block size (default 8192: the mount's)")
    parser.add_argument("--read-kib", type=int, default=256, help="read size (default 256)")
    parser.add_argument("--reads-per-block", default="0.25,0.5,1,3.125",
                        help="R/N values, comma-separated (default 0.25,0.5,1,3.125)")
    args = parser.parse_args()
    block, read = args.block_kib * KiB, args.read_kib * KiB
    print(f"N={args.blocks} blocks of {args.block_kib} KiB, reads of {args.read_kib} KiB; "
          "bytes fetched per byte read, model MB/s")
    print("| R/N | R | " + " | ".join(RULES) + " |")
    print("|---:|---:|" + "---|" * len(RULES))
    for ratio in (float(value) for value in args.reads_per_block.split(",")):
        reads = max(1, round(ratio * args.blocks))
        cells = [model(args.blocks, reads, rule, block=block, read=read) for rule in RULES.values()]
        print(f"| {ratio:g} | {reads} | " + " | ".join(f"{t:.1f}× {mbs:.1f}" for t, mbs in cells) + " |")


if __name__ == "__main__":
    main()
