"""Blocks fetched whole around random reads that come back, for the kernel's page cache:
when a fill starts, what it fetches and stores, and that an old version's pages never
arrive after ``stop``. Against the in-memory store; through a real mount in
tests/mount/test_prefetch.py."""

from __future__ import annotations

import os

import trio
from trio.testing import MockClock

from driver.fs import blockfill
from driver.fs.blockfill import BlockFill, ReadWaits
from driver.fs.prefetch import MemoryBudget, PrefetchConfig, Prefetcher
from driver.s3.memory import MemoryClient

KiB, MiB = 1024, 1024 * 1024
BLOCK = 8 * MiB
CONFIG = PrefetchConfig(min_request=256 * KiB, max_request=BLOCK, max_ahead=4)
READS = blockfill.FILL_AFTER_READS


class PageCache:
    """What the kernel was given: (inode, offset, bytes) per store."""

    def __init__(self) -> None:
        self.stores: list[tuple[int, int, bytes]] = []
        self.let_through = trio.Event()
        self.let_through.set()

    async def store(self, ino: int, offset: int, data: memoryview) -> None:
        await self.let_through.wait()
        self.stores.append((ino, offset, bytes(data)))


def reader_and_fill(client, info, nursery, pages, budget):
    fill = BlockFill(client, ino=7, key="obj", etag=info.etag, size=info.size, block=BLOCK, budget=budget,
                     nursery=nursery, store=pages.store, waits=ReadWaits())
    reader = Prefetcher(client, "obj", info.etag, info.size, config=CONFIG, budget=budget, nursery=nursery,
                        fill=fill)
    return reader, fill


WARM_UP = ReadWaits.AT_LEAST  # blocks past the test's data, read once each first


def run(data: bytes, body, *, budget: MemoryBudget | None = None, latency: float = 0.03):
    """``body(reader, fill, client, pages)`` against ``data`` on a clock that moves only
    when every task waits; returns (client, pages, budget). The store answers after
    ``latency`` (30 ms: S3 from an EC2 instance) at 100 MB/s per request. First the reader
    reads once in each of ``WARM_UP`` blocks past ``data``, as a reader that has been at
    it a while: fills wait until the mount has seen that many random reads wait on S3."""
    client = MemoryClient(latency=latency, rate=100e6)
    info = client.put("obj", data + os.urandom(WARM_UP * BLOCK))
    pages = PageCache()
    budget = budget or MemoryBudget(256 * MiB)

    async def main():
        async with trio.open_nursery() as nursery:
            reader, fill = reader_and_fill(client, info, nursery, pages, budget)
            for block in reversed(range(WARM_UP)):
                await reader.read(len(data) + block * BLOCK + MiB, 256 * KiB)
            client.calls.clear()
            await body(reader, fill, client, pages)
            reader.close()
            await fill.stop()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=MockClock(autojump_threshold=0))
    return client, pages, budget


def gets(client):
    return [(c.start, c.length) for c in client.calls if c.operation == "GetObject"]


def places_in_block(block: int, count: int, length: int = 256 * KiB) -> list[int]:
    """Offsets in ``block``, each before the one read last: never taken for a sequential reader."""
    step = BLOCK // count // length * length
    assert step >= length
    return [block * BLOCK + i * step for i in reversed(range(count))]


def test_random_reads_that_come_back_to_a_block_fill_it_once_and_then_wait_on_it():
    data = os.urandom(6 * BLOCK)
    offsets = places_in_block(2, READS + 4)
    out = []

    async def body(reader, fill, client, pages):
        for offset in offsets[:READS]:
            out.append((offset, await reader.read(offset, 256 * KiB)))
        # The block is in flight: reads in it now wait for it, from several threads at once.
        async with trio.open_nursery() as readers:
            for offset in offsets[READS:]:
                async def read(offset=offset):
                    out.append((offset, await reader.read(offset, 256 * KiB)))
                readers.start_soon(read)

    client, pages, budget = run(data, body)
    assert all(got == data[offset:offset + 256 * KiB] for offset, got in out) and len(out) == len(offsets)
    assert sorted(gets(client)) == sorted([(offset, 256 * KiB) for offset in offsets[:READS]] + [(2 * BLOCK, BLOCK)])
    assert pages.stores == [(7, 2 * BLOCK, data[2 * BLOCK:3 * BLOCK])]
    assert budget.used == 0


def test_against_a_store_that_answers_at_once_reads_fetch_only_what_they_ask():
    """A server on the same host: a block would cost more than the requests it saves."""
    data = os.urandom(2 * BLOCK)

    async def body(reader, fill, client, pages):
        for offset in places_in_block(0, 12):
            await reader.read(offset, 256 * KiB)
        assert fill.waits.shortest < blockfill.SLOW_READ

    client, pages, _ = run(data, body, latency=0.002)
    assert pages.stores == [] and all(length == 256 * KiB for _, length in gets(client))


def test_reads_that_never_come_back_to_a_block_fill_nothing():
    data = os.urandom(16 * BLOCK)

    async def body(reader, fill, client, pages):
        for block in range(16):
            for offset in places_in_block(block, READS - 1):
                await reader.read(offset, 256 * KiB)

    client, pages, _ = run(data, body)
    assert pages.stores == []
    assert all(length == 256 * KiB for _, length in gets(client))


def test_small_reads_fill_only_once_they_have_taken_a_part_of_the_block():
    data = os.urandom(2 * BLOCK)
    few = BLOCK // blockfill.FILL_AFTER_FRACTION // (4 * KiB) - 1  # 4 KiB reads short of the share

    async def body(reader, fill, client, pages):
        for offset in places_in_block(0, few, length=4 * KiB):
            await reader.read(offset, 4 * KiB)
        assert pages.stores == [] and all(length < BLOCK for _, length in gets(client))
        for offset in places_in_block(1, few + 1, length=4 * KiB):
            await reader.read(offset, 4 * KiB)
        await trio.sleep(1)

    _, pages, _ = run(data, body)
    assert [(offset, len(got)) for _, offset, got in pages.stores] == [(BLOCK, BLOCK)]


def test_a_sequential_reader_fills_nothing():
    data = os.urandom(4 * BLOCK)

    async def body(reader, fill, client, pages):
        for offset in range(0, len(data), 128 * KiB):
            await reader.read(offset, 128 * KiB)

    client, pages, _ = run(data, body)
    assert pages.stores == []
    assert sum(length for start, length in gets(client) if start < len(data)) == len(data)


def test_fills_use_only_the_first_half_of_the_budget():
    data = os.urandom(2 * BLOCK)
    budget = MemoryBudget(64 * MiB)
    budget.reserve_anyway(30 * MiB)  # other readers' prefetch: a block more would pass half

    async def body(reader, fill, client, pages):
        for offset in places_in_block(0, READS + 2):
            await reader.read(offset, 256 * KiB)

    client, pages, budget = run(data, body, budget=budget)
    assert pages.stores == [] and all(length == 256 * KiB for _, length in gets(client))
    assert budget.used == 30 * MiB


def test_after_stop_no_page_of_the_old_version_reaches_the_kernel():
    data = os.urandom(2 * BLOCK)

    async def body(reader, fill, client, pages):
        pages.let_through = trio.Event()  # the kernel takes its time with the first store
        for offset in places_in_block(0, READS):
            await reader.read(offset, 256 * KiB)
        await trio.sleep(1)  # the block arrived; its store is under way
        for offset in places_in_block(1, READS):
            await reader.read(offset, 256 * KiB)  # the second block is in flight
        stopped = trio.Event()

        async def stop():
            await fill.stop()
            stopped.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop)
            await trio.sleep(1)
            assert not stopped.is_set(), "stop returned while a store was under way"
            pages.let_through.set()
        await trio.sleep(1)
        assert [offset for _, offset, _ in pages.stores] == [0]
        await reader.read(BLOCK + 100 * KiB, 256 * KiB)  # the fill is over: no more blocks
        await trio.sleep(1)

    _, pages, budget = run(data, body)
    assert [offset for _, offset, _ in pages.stores] == [0]
    assert budget.used == 0


def test_once_an_eighth_of_the_reads_come_back_a_block_fills_at_its_first_read():
    data = os.urandom(10 * BLOCK)
    first, second, third = zip(*(places_in_block(block, 3) for block in range(4)))
    # With the warm-up: 4 blocks read twice (filled at the second), 2 once, 2 again: 6 of 16
    # reads came back.
    steps = [*reversed(first), *reversed(second), places_in_block(5, 1)[0], places_in_block(4, 1)[0],
             third[1], third[0]]

    async def body(reader, fill, client, pages):
        for offset in steps:
            await reader.read(offset, 256 * KiB)
        assert fill.comes_back
        await reader.read(8 * BLOCK + MiB, 256 * KiB)
        await trio.sleep(1)

    client, pages, _ = run(data, body)
    assert sorted(offset // BLOCK for _, offset, _ in pages.stores) == [0, 1, 2, 3, 8]
    assert (8 * BLOCK, BLOCK) in gets(client)


def test_a_reader_that_rarely_comes_back_fills_only_at_second_reads():
    data = os.urandom(24 * BLOCK)
    # 20 blocks read once, 2 of them again: 2 of 24 reads came back.
    once = [places_in_block(block, 2)[0] for block in reversed(range(20))]
    again = [places_in_block(block, 2)[1] for block in (3, 7)]

    async def body(reader, fill, client, pages):
        for offset in once + again:
            await reader.read(offset, 256 * KiB)
        await reader.read(22 * BLOCK + MiB, 256 * KiB)
        await trio.sleep(1)
        assert not fill.comes_back

    client, pages, _ = run(data, body)
    assert sorted(offset // BLOCK for _, offset, _ in pages.stores) == [3, 7]


def test_a_reader_that_turns_sparse_stops_filling_at_first_reads():
    """The share of reads that came back is of the recent ones: after a dense start, a few
    hundred reads that never come back end the fills at first reads."""
    async def main():
        async with trio.open_nursery() as nursery:
            client = MemoryClient()
            fill = BlockFill(client, ino=7, key="obj", etag="e", size=1000 * BLOCK, block=BLOCK,
                             budget=MemoryBudget(256 * MiB), nursery=nursery, store=PageCache().store,
                             waits=ReadWaits())  # no waits known: counts only, no fill starts
            for n in range(200):
                fill.read(n % 10 * BLOCK, n % 10 * BLOCK + 4 * KiB)
            assert fill.comes_back
            for block in range(10, 210):
                fill.read(block * BLOCK, block * BLOCK + 4 * KiB)
            assert not fill.comes_back
            nursery.cancel_scope.cancel()

    trio.run(main)
