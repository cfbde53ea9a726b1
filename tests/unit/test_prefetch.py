"""The prefetcher against the in-memory store: request sizes, waste, memory, staleness."""

from __future__ import annotations

import errno
import os

import pytest
import trio
from trio.testing import MockClock

from driver.fs.errors import FsError
from driver.fs.prefetch import MemoryBudget, PrefetchConfig, Prefetcher
from driver.s3.memory import MemoryClient

KiB, MiB = 1024, 1024 * 1024
CONFIG = PrefetchConfig(min_request=256 * KiB, max_request=8 * MiB, max_ahead=4)


def run_in_store_time(main):
    """Run ``main`` on a clock that moves only when every task waits: the store's latency
    and transfer time pass as told, and the reader's own work takes none. On real time, a
    busy CI machine made the reader slower than the store it was meant to outrun."""
    return trio.run(main, clock=MockClock(autojump_threshold=0))


def run_reads(data: bytes, reads, *, config=CONFIG, budget=None, latency=0.001, between=None, parts=0):
    """Read ``reads`` [(offset, length)] through one handle; return (bytes read, client, budget).
    With ``parts``, the object has the ETag of a multipart upload of that many parts."""
    client = MemoryClient(latency=latency)
    info = client.put("obj", data, parts=parts)
    budget = budget or MemoryBudget(512 * MiB)
    out = []

    async def main():
        async with trio.open_nursery() as nursery:
            reader = Prefetcher(client, "obj", info.etag, info.size, config=config, budget=budget,
                                nursery=nursery)
            for i, (offset, length) in enumerate(reads):
                out.append(await reader.read(offset, length))
                if between:
                    between(i, client)
            reader.close()
            nursery.cancel_scope.cancel()

    run_in_store_time(main)
    return out, client, budget


def test_sequential_reads_grow_requests_geometrically_to_the_cap():
    data = os.urandom(64 * MiB)
    reads = [(off, 128 * KiB) for off in range(0, len(data), 128 * KiB)]
    out, client, budget = run_reads(data, reads)
    assert b"".join(out) == data
    # In offset order: trio starts concurrent tasks in no particular order.
    gets = sorted((c for c in client.calls if c.operation == "GetObject"), key=lambda c: c.start)
    sizes = [c.length for c in gets]
    # The first read asked for less; then each request doubles the one before, up to the
    # cap, and ends on a multiple of its size: 256 KiB, 256 KiB, 512 KiB, ... 8 MiB at 8 MiB.
    assert sizes[:7] == [256 * KiB, 256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB]
    assert all(s == CONFIG.max_request for s in sizes[6:])
    assert [c.start + c.length for c in gets[:7]] == [256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB,
                                                      16 * MiB]
    assert sum(sizes) == len(data), "every byte fetched exactly once"
    assert budget.used == 0


def read_sequentially(data: bytes, *, latency: float, rate: float | None = None, pause: float = 0.0,
                      budget: MemoryBudget, copies_in_flight: int = 2):
    """Read all of ``data`` in 1 MiB reads, ``pause`` seconds apart; return the client."""
    client = MemoryClient(latency=latency, rate=rate, copies_in_flight=copies_in_flight)
    info = client.put("obj", data)

    async def main():
        async with trio.open_nursery() as nursery:
            reader = Prefetcher(client, "obj", info.etag, info.size, config=CONFIG, budget=budget,
                                nursery=nursery)
            for offset in range(0, len(data), MiB):
                assert await reader.read(offset, MiB) == data[offset:offset + MiB]
                await trio.sleep(pause)
            reader.close()
            nursery.cancel_scope.cancel()

    run_in_store_time(main)
    assert budget.used == 0
    return client


def test_a_reader_waiting_on_a_distant_store_gets_more_requests_in_flight():
    """A first byte after 20 ms, then 200 MB/s per request, as from a remote S3: four 8 MiB
    requests ahead leave the reader waiting, so it gets up to sixteen."""
    client = read_sequentially(os.urandom(160 * MiB), latency=0.02, rate=200e6, budget=MemoryBudget(512 * MiB))
    assert CONFIG.max_ahead + 1 < client.max_in_flight <= CONFIG.max_depth + 1


def test_a_reader_slower_than_the_store_keeps_max_ahead():
    # Long enough for sixteen 8 MiB requests ahead, had the reader been given them.
    client = read_sequentially(os.urandom(160 * MiB), latency=0.001, pause=0.005, budget=MemoryBudget(512 * MiB))
    assert client.max_in_flight <= CONFIG.max_ahead + 1


def test_more_requests_in_flight_only_while_half_the_budget_is_free():
    # Four 8 MiB requests in flight already hold 64 MiB (twice their size): half of 128 MiB.
    client = read_sequentially(os.urandom(96 * MiB), latency=0.02, rate=200e6, budget=MemoryBudget(128 * MiB))
    assert client.max_in_flight <= CONFIG.max_ahead + 1


def test_a_client_receiving_into_the_body_gets_twice_the_requests_from_the_same_budget():
    # Pail's own sockets hold a body once while it comes: four 8 MiB requests hold 32 MiB of
    # 128, and more may follow until half of it is used.
    budget = MemoryBudget(128 * MiB)
    client = read_sequentially(os.urandom(96 * MiB), latency=0.02, rate=200e6, budget=budget, copies_in_flight=1)
    assert CONFIG.max_ahead + 1 < client.max_in_flight <= 8 + 1
    assert budget.peak <= budget.limit


def _gets(client, since: int = 0):
    return sorted((c for c in client.calls if c.operation == "GetObject" and c.start >= since),
                  key=lambda c: c.start)


# 220 KiB in: before, requests from there stayed 8 MiB long and 219 KiB short of every part
# boundary to the end of the object (each doubling kept the offset, and ending on a
# boundary would have kept less than half of the request).
@pytest.mark.parametrize("first", [5 * MiB + 100 * KiB + 17, 225018], ids=["5MiB+100KiB+17", "220KiB"])
def test_a_sequential_reader_from_anywhere_soon_fetches_whole_8_mib_parts(first):
    """Objects are uploaded in 8 MiB parts by most tools: a range across two costs the
    server both. A reader starting at an odd offset gets requests that end on part
    boundaries after its first few, every byte once."""
    data = os.urandom(48 * MiB)
    reads = [(off, 128 * KiB) for off in range(first, len(data), 128 * KiB)]
    out, client, _ = run_reads(data, [(first - 4096, 4096)] + reads)  # a read elsewhere, then from `first`
    assert out[1:] == [data[o:o + n] for o, n in reads]
    gets = _gets(client, since=first)
    assert [c.start for c in gets[1:]] == [c.start + c.length for c in gets[:-1]], "every byte once"
    parts = [c for c in gets if c.start >= 16 * MiB]
    assert parts and all(c.start % (8 * MiB) == 0 and c.length == 8 * MiB for c in parts[:-1])


@pytest.mark.parametrize("part_mib, unit_mib", [(5, 5), (10, 5), (6, 6), (8, 8)])
def test_a_sequential_reader_follows_the_parts_its_etag_tells(part_mib, unit_mib):
    """An object uploaded in 5 MiB parts (rclone, the Go SDK) or 10 MiB parts (s3fs): its
    ETag ends in -<parts>, which with its size gives the part size. No request crosses a
    part boundary, and past the first part each is an equal piece of one."""
    part, unit = part_mib * MiB, unit_mib * MiB
    data = os.urandom(11 * part + 3 * MiB)  # 12 parts: few parts fit several part sizes
    reads = [(off, 128 * KiB) for off in range(0, len(data), 128 * KiB)]
    out, client, _ = run_reads(data, reads, parts=12)
    assert b"".join(out) == data
    gets = _gets(client)
    assert [c.start for c in gets[1:]] == [c.start + c.length for c in gets[:-1]], "every byte once"
    assert all(c.start // part == (c.start + c.length - 1) // part for c in gets), \
        [(c.start / MiB, c.length / MiB) for c in gets]
    later = [c for c in gets if c.start >= part]
    assert all(c.start % unit == 0 and c.length == unit for c in later[:-1]), \
        [(c.start / MiB, c.length / MiB) for c in later]


def test_a_reader_from_an_odd_offset_lines_up_with_10_mib_parts():
    part = 10 * MiB
    data = os.urandom(12 * part)
    first = 13 * MiB + 300 * KiB + 5
    reads = [(off, 128 * KiB) for off in range(first, len(data), 128 * KiB)]
    out, client, _ = run_reads(data, [(first - 4096, 4096)] + reads, parts=12)
    assert out[1:] == [data[o:o + n] for o, n in reads]
    later = [c for c in _gets(client, since=first) if c.start >= 30 * MiB]
    assert later and all(c.start % (5 * MiB) == 0 and c.length == 5 * MiB for c in later[:-1])


def test_random_small_reads_fetch_little_more_than_asked():
    data = os.urandom(64 * MiB)
    rng = __import__("random").Random(7)
    reads = [(rng.randrange(0, len(data) - 4096), 4096) for _ in range(100)]
    out, client, _ = run_reads(data, reads)
    assert out == [data[o:o + n] for o, n in reads]
    fetched = sum(c.length for c in client.calls if c.operation == "GetObject")
    assert fetched <= 100 * 2 * CONFIG.min_request


def test_backward_seek_then_sequential_again():
    data = os.urandom(16 * MiB)
    reads = ([(off, 128 * KiB) for off in range(0, 4 * MiB, 128 * KiB)]
             + [(0, 128 * KiB)]
             + [(off, 128 * KiB) for off in range(128 * KiB, 2 * MiB, 128 * KiB)])
    out, _, budget = run_reads(data, reads)
    assert out == [data[o:o + n] for o, n in reads]
    assert budget.used == 0


def test_memory_budget_limits_prefetch_but_never_blocks_a_read():
    data = os.urandom(32 * MiB)
    budget = MemoryBudget(8 * MiB)
    peaks = []
    reads = [(off, 128 * KiB) for off in range(0, len(data), 128 * KiB)]
    out, _, budget = run_reads(data, reads, budget=budget,
                               between=lambda i, c: peaks.append(budget.used))
    assert b"".join(out) == data
    # Prefetch stays within the budget; a read's own request may go past it by one request.
    assert max(peaks) <= budget.limit + CONFIG.max_request
    assert budget.used == 0


def test_object_replaced_mid_read_is_estale_never_mixed():
    data = os.urandom(4 * MiB)

    def replace_after_first(i, client):
        if i == 0:
            client.put("obj", b"new" * 10)

    config = PrefetchConfig(min_request=128 * KiB, max_request=128 * KiB, max_ahead=1)
    reads = [(off, 128 * KiB) for off in range(0, 2 * MiB, 128 * KiB)]
    with pytest.raises(ExceptionGroup) as group:
        run_reads(data, reads, config=config, between=replace_after_first)
    error = group.value.exceptions[0]
    assert isinstance(error, FsError) and error.errno == errno.ESTALE


def concurrent_reads(data: bytes, plans: list[list[int]], length: int, *, latency: float):
    """Tasks reading one handle at once, each its plan's offsets in turn; returns the
    (offset, bytes) read, the client and the budget."""
    client = MemoryClient(latency=latency)
    info = client.put("obj", data)
    budget = MemoryBudget(64 * MiB)
    results = []

    async def main():
        async with trio.open_nursery() as nursery:
            reader = Prefetcher(client, "obj", info.etag, info.size, config=CONFIG, budget=budget,
                                nursery=nursery)

            async def read_all(offsets):
                for off in offsets:
                    results.append((off, await reader.read(off, length)))

            async with trio.open_nursery() as readers:
                for offsets in plans:
                    readers.start_soon(read_all, offsets)
            reader.close()
            nursery.cancel_scope.cancel()

    run_in_store_time(main)
    return results, client, budget


def test_concurrent_reads_on_one_handle_return_their_own_bytes():
    data = os.urandom(8 * MiB)
    offsets = [5 * MiB, 0, 3 * MiB, 128 * KiB, 7 * MiB, 256 * KiB]
    results, _, budget = concurrent_reads(data, [[o] for o in offsets], 128 * KiB, latency=0.002)
    assert sorted(o for o, _ in results) == sorted(offsets)
    assert all(got == data[o:o + 128 * KiB] for o, got in results)
    assert budget.used == 0


def test_concurrent_random_reads_on_one_handle_do_not_refetch_each_others_bytes():
    # Threads reading one descriptor at random places (a Parquet reader's pool): each read
    # moves the handle's window, which must not cancel the requests the others wait on.
    data = os.urandom(128 * MiB)
    # Distinct places, never next to each other: no read continues another's (that would
    # rightly prefetch), so each needs exactly its own GET.
    places = __import__("random").Random(3).sample(range(0, 512, 3), 100)
    plans = [[p * 256 * KiB for p in places[i::4]] for i in range(4)]
    results, client, budget = concurrent_reads(data, plans, 256 * KiB, latency=0.005)
    assert len(results) == 100 and all(got == data[off:off + 256 * KiB] for off, got in results)
    gets = [c for c in client.calls if c.operation == "GetObject"]
    assert len(gets) == 100, "one GET per read"
    assert budget.used == 0
