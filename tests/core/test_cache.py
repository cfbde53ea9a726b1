"""The local data cache (driver.fs.cache) over S3 in memory: the bytes of any range are
the object's, no range read before is fetched again, a miss fetches what it needs, and the
least recently used go first."""

from __future__ import annotations

import random

import pytest
import trio

from driver.fs.cache import BLOCK_SIZE, MAX_RANGES_PER_BLOCK, BlockStore, CacheDirError, CachingObjectClient
from driver.s3.api import PreconditionFailed
from driver.s3.memory import MemoryClient

MiB = 1024 * 1024


def gets(client):
    return [(c.start, c.length) for c in client.calls if c.operation == "GetObject"]


def cached_client(tmp_path, max_size=64 * MiB):
    memory = MemoryClient()
    return memory, CachingObjectClient(memory, BlockStore.open(str(tmp_path / "cache"), max_size))


def files(tmp_path) -> list:
    return [p for p in (tmp_path / "cache" / "pail-cache").rglob("*") if p.is_file()]


async def settle(cached):
    """Wait (bounded) until the writer thread has put every block on disk."""
    with trio.fail_after(10):
        while cached._pending:
            await trio.sleep(0.01)


def checked_reads(cached, data, etag):
    """A read of the cached client that checks its bytes against ``data`` and waits for
    the blocks it fetched to be on disk."""
    async def read(start, length):
        assert bytes(await cached.get_range("k", start, length, etag=etag)) == data[start:start + length]
        await settle(cached)
    return read


def test_any_range_reads_the_objects_bytes_and_none_is_fetched_twice(tmp_path):
    memory, cached = cached_client(tmp_path)
    data = random.Random(1).randbytes(5 * BLOCK_SIZE + 777)
    etag = memory.put("k", data).etag
    rng = random.Random(2)
    ranges = [(0, 1), (BLOCK_SIZE - 1, 2), (len(data) - 10, 10), (len(data) - 10, 4096), (3, 3 * BLOCK_SIZE)]
    ranges += [(s := rng.randrange(len(data)), rng.randrange(1, 3 * BLOCK_SIZE)) for _ in range(100)]

    async def main():
        for start, length in ranges:
            assert bytes(await cached.get_range("k", start, length, etag=etag)) == data[start:start + length]
            await settle(cached)
        memory.calls.clear()
        for start, length in reversed(ranges):
            assert bytes(await cached.get_range("k", start, length, etag=etag)) == data[start:start + length]
        assert gets(memory) == [], "every range read before comes from the disk"
        await cached.aclose()

    trio.run(main)
    assert not (tmp_path / "cache" / "pail-cache").exists()


def test_a_miss_fetches_what_it_needs_and_a_wider_range_replaces_those_it_covers(tmp_path):
    memory, cached = cached_client(tmp_path)
    data = random.Random(7).randbytes(2 * BLOCK_SIZE + 777)
    etag = memory.put("k", data).etag
    read = checked_reads(cached, data, etag)

    async def main():
        await read(100, 1000)
        await read(5000, 100)
        await read(300, 50)  # within the first range
        await read(900, 4200)  # across the first, the gap and the second, which it replaces
        await read(2 * BLOCK_SIZE + 700, 4096)  # past the end: the object ends in the block
        await read(2 * BLOCK_SIZE + 770, 100)  # so these bytes are there, to the end
        assert len(files(tmp_path)) == 3
        await read(0, BLOCK_SIZE + 10)  # block 0 whole: its two ranges go
        assert sorted(f.name.rsplit(".", 1)[1] for f in files(tmp_path)) == ["0", "0", "700"]
        await read(10, 20)
        await cached.aclose()

    trio.run(main)
    assert gets(memory) == [(100, 1000), (5000, 100), (900, 4200), (2 * BLOCK_SIZE + 700, 4096),
                            (0, BLOCK_SIZE + 10)]


def test_a_read_across_ranges_fetched_side_by_side_comes_from_the_disk(tmp_path):
    memory, cached = cached_client(tmp_path)
    data = random.Random(9).randbytes(2 * BLOCK_SIZE + 300)
    etag = memory.put("k", data).etag
    read = checked_reads(cached, data, etag)

    async def main():
        # As a direct read cuts them: requests that do not start on a block.
        for start in range(48, len(data), 700_000):
            await read(start, 700_000)
        await read(0, 48)
        fetched = len(gets(memory))
        await read(0, len(data))  # across every range of every block
        await read(690_000, 20_000)  # two ranges that overlap
        await read(BLOCK_SIZE - 5, 2 * BLOCK_SIZE)  # to past the end
        assert len(gets(memory)) == fetched, "no byte read before is fetched again"
        await cached.aclose()

    trio.run(main)


def test_a_gap_between_cached_ranges_is_fetched(tmp_path):
    memory, cached = cached_client(tmp_path)
    data = random.Random(10).randbytes(BLOCK_SIZE)
    etag = memory.put("k", data).etag

    read = checked_reads(cached, data, etag)

    async def main():
        for start, length in [(0, 1000), (1001, 1000), (0, 2001)]:
            await read(start, length)
        await cached.aclose()

    trio.run(main)
    assert gets(memory) == [(0, 1000), (1001, 1000), (0, 2001)]


def test_a_block_keeps_a_bounded_number_of_ranges(tmp_path):
    memory, cached = cached_client(tmp_path)
    data = random.Random(8).randbytes(BLOCK_SIZE)
    etag = memory.put("k", data).etag
    starts = [n * 100_000 for n in range(MAX_RANGES_PER_BLOCK + 2)]

    async def main():
        for start in starts:
            assert bytes(await cached.get_range("k", start, 1000, etag=etag)) == data[start:start + 1000]
            await settle(cached)
        assert len(files(tmp_path)) == MAX_RANGES_PER_BLOCK
        memory.calls.clear()
        for start in starts[2:]:  # the newest stay
            await cached.get_range("k", start, 1000, etag=etag)
        assert gets(memory) == []
        await cached.aclose()

    trio.run(main)


def test_least_recently_used_blocks_are_evicted_first(tmp_path):
    memory, cached = cached_client(tmp_path, max_size=4 * (BLOCK_SIZE + 64))  # 4 blocks and their headers, not 5
    data = random.Random(3).randbytes(8 * BLOCK_SIZE)
    etag = memory.put("k", data).etag

    async def read_block(index):
        await cached.get_range("k", index * BLOCK_SIZE, BLOCK_SIZE, etag=etag)
        await settle(cached)

    async def main():
        for index in (0, 1, 2, 3):
            await read_block(index)
        await read_block(0)  # used again: now 1 is the least recently used
        await read_block(4)
        memory.calls.clear()
        for index in (0, 2, 3, 4):
            await read_block(index)
        assert gets(memory) == []
        await read_block(1)
        assert gets(memory) == [(BLOCK_SIZE, BLOCK_SIZE)]

    trio.run(main)


def test_blocks_answer_only_for_their_version(tmp_path):
    memory, cached = cached_client(tmp_path)
    old = memory.put("k", b"a" * BLOCK_SIZE)
    new = memory.put("k", b"b" * BLOCK_SIZE)

    async def main():
        assert bytes(await cached.get_range("k", 0, 10, etag=new.etag)) == b"b" * 10
        await settle(cached)
        memory.calls.clear()
        with pytest.raises(PreconditionFailed):
            await cached.get_range("k", 0, 10, etag=old.etag)  # not the cached block of the new one

    trio.run(main)


def test_a_directory_is_the_cache_of_one_mount_at_a_time(tmp_path):
    first = BlockStore.open(str(tmp_path / "c"), 16 * MiB)
    with pytest.raises(CacheDirError, match="cache of another mount"):
        BlockStore.open(str(tmp_path / "c"), 16 * MiB)
    first.close()
    BlockStore.open(str(tmp_path / "c"), 16 * MiB).close()
