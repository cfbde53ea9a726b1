"""Whole blocks around random reads that keep coming back, stored in the kernel's page cache.

A read away from where its handle last read fetches just what it asks for (``Prefetcher``),
so a program sampling records all over an object (a training job's shuffled reads, fio)
pays a round trip per read, where s3fs fetches megabytes around each miss and keeps them on
disk. Here, per object version, random reads are counted per aligned block (the
prefetcher's largest request: 8 MiB, or the largest equal piece of the object's part up to
that). At its ``FILL_AFTER_READS``-th read, if its reads have taken ``1/FILL_AFTER_FRACTION``
of it, a block is fetched whole, once, and handed to the kernel's page cache (``store``,
FUSE's notify_store). The reads that follow in it are answered by the kernel without a
request to the mount; reads that arrive while the block is in flight wait for it instead
of asking S3 themselves.

Once an eighth of the object's recent random reads have landed in blocks read before
(``comes_back``), a block is filled at its first read: that reader will likely come back
to it too. A reader that touches each block once (reads spread thin over a large object)
never gets there, and never fetches 32 times the bytes it reads, which filling every block
at its first read, as s3fs does, would cost it. One that reads 1/64 to 1/32 of an object
does get there, and fetches up to 19 times what it reads (up to 2.6 times a quarter's; a
denser reader the same as with a quarter, 25 % faster): ``python -m bench.blockfill_model``.

Only where every recent random read waited long on S3 (``ReadWaits``: the shortest
``SLOW_READ`` or more, as against S3 itself, ten milliseconds or more to a first byte):
there a block costs one round trip and its transfer, in the background, against a round
trip for each read it saves. Through a relay adding 30 ms per response (bench, 2026-12-02)
random 256 KiB reads went from 7.7 to 12.5 MB/s with one thread and from 35 to 140 MB/s
with four. Against a server on the same host, answering in a few milliseconds, the bytes
cost more than the requests: fills there took one random reader of the 2-core development
machine from 105 to 58 MB/s, four from about 230 to 165.

A block's bytes are held, charged to the mount's memory budget and only within its first
half (prefetch for sequential readers comes first), until the kernel has them; the page
cache is the kernel's, reclaimed under memory pressure like any file's. A block is filled
once per version: one the kernel has dropped since is read as before.

Pages of an old version must never reach the kernel after it has been told that the
object changed (an open that does not keep the cache): ``stop`` ends the fills of a version
and waits for a store in progress before such an open is answered.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

import structlog
import trio

from driver.fs.prefetch import Chunk, MemoryBudget, cancel, fetch
from driver.s3.api import ObjectClient

log = structlog.get_logger("pail.blockfill")

FILL_AFTER_READS = 2
FILL_AFTER_FRACTION = 32  # and at least 1/32 of the block read: 256 KiB of 8 MiB
# From a block's first read, once an eighth of the object's random reads (of at least 16)
# landed in blocks read before: such a reader will likely come back to this one too.
FIRST_READ_RETURNS = 8
FIRST_READ_AFTER = 16
# Both counts halved at this many reads: the share is of about the last hundred, so a
# reader that turns sparse stops filling at first reads within about as many.
RETURNS_WINDOW = 128
SLOW_READ = 0.008  # seconds the quickest recent random read waited on S3, for fills to pay
# Blocks with reads counted, per object version; past it the counts start again, so a
# reader of a huge object costs a bounded map, not one entry per block it ever touched.
MAX_COUNTED_BLOCKS = 65536

# (inode number, offset, bytes): give the bytes to the kernel's page cache.
PageStore = Callable[[int, int, memoryview], Awaitable[None]]


class ReadWaits:
    """How long the mount's last random reads waited on their own requests. The shortest of
    them is the store's own latency: an average also counts the queueing that fills
    themselves cause, and on the local server four random readers' average passed
    ``SLOW_READ`` once fills ran, and kept them running (220 -> 165 MB/s)."""

    WINDOW = 32
    AT_LEAST = 4  # waits known before deciding

    def __init__(self) -> None:
        self._recent: deque[float] = deque(maxlen=self.WINDOW)

    def note(self, seconds: float) -> None:
        self._recent.append(seconds)

    @property
    def shortest(self) -> float | None:
        return min(self._recent) if self._recent else None

    @property
    def slow(self) -> bool:
        return len(self._recent) >= self.AT_LEAST and min(self._recent) >= SLOW_READ


class BlockFill:
    """The filled and filling blocks of one version of one object."""

    def __init__(self, client: ObjectClient, *, ino: int, key: str, etag: str, size: int, block: int,
                 budget: MemoryBudget, nursery: trio.Nursery, store: PageStore, waits: ReadWaits) -> None:
        self.etag = etag
        self.waits = waits
        self._client = client
        self._ino = ino
        self._key = key
        self._size = size
        self._block = block
        self._budget = budget
        self._nursery = nursery
        self._store = store
        self._copies = client.copies_in_flight
        self._counts: dict[int, list[int]] = {}  # block index -> [reads, bytes read]
        self._filling: dict[int, Chunk] = {}
        self._filled: set[int] = set()
        self._reads = self._returns = 0  # random reads; those in a block read before
        self._storing = trio.Lock()
        self.stopped = False

    def read(self, offset: int, end: int) -> Chunk | None:
        """A random read of [offset, end): the fill in flight (or just done) that holds it,
        to wait on; else None, the read counted toward filling its block."""
        index = offset // self._block
        chunk = self._filling.get(index)
        self._reads += 1
        if chunk is not None or index in self._filled or index in self._counts:
            self._returns += 1
        if self._reads >= RETURNS_WINDOW:
            self._reads //= 2
            self._returns //= 2
        if chunk is not None and chunk.start <= offset and end <= chunk.end and not chunk.cancelled:
            return chunk
        if self.stopped or chunk is not None or index in self._filled:
            return None
        if len(self._counts) >= MAX_COUNTED_BLOCKS:
            self._counts.clear()
        count = self._counts.setdefault(index, [0, 0])
        count[0] += 1
        count[1] += end - offset
        if ((count[0] >= FILL_AFTER_READS or self.comes_back) and count[1] * FILL_AFTER_FRACTION >= self._block
                and self.waits.slow):
            self._start(index)
        return None

    @property
    def comes_back(self) -> bool:
        """Whether enough of this object's random reads land in blocks read before for a
        block's first read to start its fill."""
        return self._reads >= FIRST_READ_AFTER and self._returns * FIRST_READ_RETURNS >= self._reads

    def _start(self, index: int) -> None:
        start = index * self._block
        end = min(start + self._block, self._size)
        charge = self._copies * (end - start)
        if self._budget.used + charge > self._budget.limit // 2 or not self._budget.try_reserve(charge):
            return  # counted again at the next read
        del self._counts[index]
        chunk = Chunk(start, end, reserved=charge, speculative=True)  # a failure is no reader's error
        self._filling[index] = chunk
        self._nursery.start_soon(self._fill, index, chunk)

    async def _fill(self, index: int, chunk: Chunk) -> None:
        try:
            await fetch(chunk, self._client, self._key, self.etag, self._budget)
            if chunk.error is None and not chunk.cancelled and not self.stopped:
                async with self._storing:
                    if not self.stopped:
                        await self._store(self._ino, chunk.start, chunk.data)
        finally:
            self._filling.pop(index, None)
            self._filled.add(index)
            self._budget.release(chunk.reserved)
            chunk.reserved = 0

    async def stop(self) -> None:
        """No more pages of this version for the kernel; returns once none is being stored."""
        self.stopped = True
        for chunk in list(self._filling.values()):
            if not chunk.waiters:
                cancel(chunk, self._budget)
        async with self._storing:
            pass
