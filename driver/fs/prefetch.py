"""Reading an object through ranged GETs: prefetch for sequential readers, little waste
for random ones, and one memory budget for all the open files of a mount.

A reader that keeps reading where it left off gets requests ahead of it: each new request
twice the size of the one before, from ``min_request`` up to ``max_request`` or the
largest equal piece of the object's part below it (one HTTP request each), at most
``max_ahead`` of them outstanding (up to ``max_depth`` for a reader that keeps waiting on
them: ``_deepen``), each ending on a multiple of its size within the part
(``_aligned_end``; the part size comes from the ETag, ``driver.fs.parts``; unknown, the
grid is multiples of the request size). A read elsewhere cancels what was fetched ahead
(but what another read of the handle waits on: ``_let_go``) and fetches just what it
needs (about ``min_request``). Every request
carries If-Match with the ETag the file was opened with, so a handle never returns bytes
of two versions of an object.

A handle may also start with a request made before it was opened (``driver.fs.nextfiles``
fetches the next files of a directory read in order): ``speculative`` chunks that failed
are not errors of the reader, whose read fetches the bytes itself.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
import trio

from driver import metrics
from driver.fs.errors import FsError, from_store, unexpected
from driver.fs.parts import part_size, request_unit
from driver.s3.api import ObjectClient, ObjectClientError

if TYPE_CHECKING:
    from driver.fs.blockfill import BlockFill

log = structlog.get_logger("pail.prefetch")

# When a read fails, the kernel at once reads the page it needed again, on its own: a
# second request that would wait out a whole --request-timeout more before the program
# sees the error. Bytes that just failed fail again at once for this long.
FAILED_RANGE_HOLD = 1.0


class MemoryBudget:
    """Bytes of fetched object data that all open files of a mount may hold."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0

    def try_reserve(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self._take(n)
        return True

    def reserve_anyway(self, n: int) -> None:
        """For the bytes a read needs now: waiting could deadlock, and it is bounded by the
        number of concurrent reads times the request size."""
        self._take(n)

    def release(self, n: int) -> None:
        self.used -= n
        assert self.used >= 0, "memory budget released more than reserved"

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)


@dataclass(eq=False)
class Chunk:
    start: int
    end: int
    done: trio.Event = field(default_factory=trio.Event)
    data: memoryview = memoryview(b"")
    error: FsError | None = None
    cancelled: bool = False
    reserved: int = 0  # bytes of the memory budget this chunk holds
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    speculative: bool = False  # fetched before anyone asked for it
    waiters: int = 0  # reads waiting on it now
    detached: bool = False  # out of the handle's window, still fetched for its waiters


async def fetch(chunk: Chunk, client: ObjectClient, key: str, etag: str, budget: MemoryBudget) -> None:
    """Fill ``chunk`` with bytes [start, end) of the version ``etag`` of ``key``; of its
    budget it keeps what was delivered."""
    with chunk.scope:
        try:
            chunk.data = memoryview(await client.get_range(key, chunk.start, chunk.end - chunk.start, etag=etag))
        except ObjectClientError as exc:
            chunk.error = from_store(exc, during="read")
            log.log(logging.INFO if chunk.speculative else logging.WARNING, "read failed", op="read", key=key,
                    start=chunk.start, end=chunk.end, errno=chunk.error.errno, speculative=chunk.speculative,
                    **exc.log_fields())
        except Exception as exc:
            chunk.error = unexpected(exc, during="read", key=key, start=chunk.start, end=chunk.end)
    if not chunk.cancelled:
        delivered = len(chunk.data)
        budget.release(chunk.reserved - delivered)
        chunk.reserved = delivered
    chunk.done.set()


def cancel(chunk: Chunk, budget: MemoryBudget) -> None:
    """Stop ``chunk``'s request if running and give its memory back."""
    chunk.cancelled = True
    chunk.scope.cancel()
    chunk.done.set()
    budget.release(chunk.reserved)
    chunk.reserved = 0


def _aligned_end(start: int, size: int, part: int | None, needed_end: int | None = None) -> int:
    """Where a request of about ``size`` bytes from ``start`` ends: on the last multiple of
    ``size`` (counted from the start of the object's part, when the part size is known) or
    part end before ``start + size``.

    Multipart objects are stored in parts, and a range across two parts costs the server
    both: against SeaweedFS, 8 MiB requests ending 256 KiB past each 8 MiB part boundary
    made it move 19 % more bytes and spend 19 % more CPU per GiB than part-aligned ones.
    Doubling requests from offset 0 become 256 KiB, 256 KiB, 512 KiB, ..., each ending on
    a multiple of its size. A prefetch request always ends there, short if it must: from
    then on the reader's requests are aligned (with a fixed size, ending at ``start +
    size`` would stay as misaligned as it started). A request for the bytes a read needs
    now (``needed_end``) ends there only if that keeps at least half of it and those
    bytes; otherwise it is exactly ``size``, so random reads fetch what they ask for."""
    nominal = start + size
    if part is None:
        end = nominal - nominal % size
    else:
        part_start = nominal - nominal % part
        end = part_start + (nominal - part_start) // size * size
    if needed_end is None or (2 * (end - start) >= size and end >= needed_end):
        return end
    return nominal


@dataclass(frozen=True)
class PrefetchConfig:
    min_request: int
    max_request: int
    max_ahead: int
    max_depth: int = 16  # requests ahead a reader that keeps waiting may grow to
    # A read this far before the reader's position still counts as sequential: the kernel
    # sends concurrent readahead requests that may arrive slightly out of order.
    behind_slack: int = 1024 * 1024


class Prefetcher:
    """The reads of one open file handle."""

    def __init__(
        self,
        client: ObjectClient,
        key: str,
        etag: str,
        size: int,
        *,
        config: PrefetchConfig,
        budget: MemoryBudget,
        nursery: trio.Nursery,
        fetched: Chunk | None = None,
        fill: BlockFill | None = None,
    ) -> None:
        self._client = client
        self._key = key
        self._etag = etag
        self._size = size
        self._config = config
        self._budget = budget
        self._nursery = nursery
        self._copies = client.copies_in_flight
        self._chunks: list[Chunk] = [fetched] if fetched is not None else []  # contiguous, in offset order
        self._fill = fill  # whole blocks for random reads that come back (driver.fs.blockfill)
        self._part = part_size(etag, size)
        self._max_request = request_unit(self._part, config.max_request)
        self._next_size = config.min_request
        self._depth = config.max_ahead  # requests kept ahead; grows while the reader waits (_deepen)
        self._position = 0  # end of the last read: where a sequential reader reads next
        self._stale: FsError | None = None
        self._failed: tuple[int, int, FsError, float] | None = None  # start, end, error, until
        self._closed = False

    async def read(self, offset: int, length: int) -> bytes | memoryview:
        """Bytes [offset, offset + length) of the object, short at its end. A read within
        one fetched request is a view of it, not a copy: pyfuse3 replies from any buffer."""
        if self._stale is not None:
            raise self._stale
        if self._closed:
            raise FsError(errno.EBADF, "read after release")
        end = min(offset + length, self._size)
        if offset >= end:
            return b""
        self._fail_again(offset, end)
        sequential = self._is_sequential(offset)
        if sequential or self._fill is None:
            return await self._gather(self._plan(offset, end, sequential)[0], offset, end)
        filled = await self._from_fill(offset, end)
        if filled is not None:
            return filled
        started = trio.current_time()
        needed, outcome = self._plan(offset, end, sequential)
        data = await self._gather(needed, offset, end)
        if outcome == "miss":  # how long S3 took for a random read: when block fills pay
            self._fill.waits.note(trio.current_time() - started)
        return data

    def _plan(self, offset: int, end: int, sequential: bool) -> tuple[list[Chunk], str]:
        """The chunks that hold [offset, end), requested now if need be, and the requests
        ahead; with whether the bytes were there (hit), on their way (wait) or not (miss)."""
        if not sequential:
            self._reset()
        self._drop_behind(offset)
        fetched_before = len(self._chunks)
        self._cover(offset, end)
        needed = [c for c in self._chunks if c.start < end and c.end > offset]
        outcome = ("miss" if len(self._chunks) > fetched_before
                   else "hit" if all(c.done.is_set() for c in needed) else "wait")
        metrics.prefetch_read(outcome)
        if outcome == "wait" and sequential:
            self._deepen()
        self._position = max(self._position, end) if sequential else end
        if sequential:
            self._prefetch_ahead()
        return needed, outcome

    async def _gather(self, needed: list[Chunk], offset: int, end: int) -> bytes | memoryview:
        parts: list[bytes | memoryview] = []
        pos = offset
        for chunk in needed:
            chunk.waiters += 1
        try:
            for chunk in needed:
                await chunk.done.wait()
                if chunk.cancelled:
                    break  # the handle was closed under this read: fetch the rest itself
                if chunk.error is not None:
                    if chunk.speculative:
                        self._discard(chunk)
                        break  # fetched before this handle was opened: read the bytes afresh
                    self._failed_now(chunk.start, chunk.end, chunk.error)
                    self._discard(chunk)
                    raise chunk.error
                piece = chunk.data[pos - chunk.start : end - chunk.start]
                parts.append(piece)
                pos += len(piece)
                if pos < min(end, chunk.end):
                    return b"".join(parts)  # the object is shorter than its size said: EOF here
        finally:
            for chunk in needed:
                chunk.waiters -= 1
                if chunk.detached and not chunk.waiters:
                    self._cancel(chunk)  # its last reader has its bytes (or gave up): free them
        if pos < end:
            parts.append(await self._fetch_direct(pos, end))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _from_fill(self, offset: int, end: int) -> memoryview | None:
        """The bytes from a block being filled around random reads, or None (then counted
        toward filling its block) for the reader to fetch them itself."""
        assert self._fill is not None
        chunk = self._fill.read(offset, end)
        if chunk is None:
            return None
        metrics.prefetch_read("fill")
        chunk.waiters += 1
        try:
            await chunk.done.wait()
        finally:
            chunk.waiters -= 1
        if chunk.error is not None or chunk.cancelled:
            return None
        self._reset()
        self._position = end
        return chunk.data[offset - chunk.start : end - chunk.start]

    async def _fetch_direct(self, start: int, end: int) -> bytes:
        try:
            return await self._client.get_range(self._key, start, end - start, etag=self._etag)
        except ObjectClientError as exc:
            error = from_store(exc, during="read")
            self._failed_now(start, end, error)
            raise error from None

    def _failed_now(self, start: int, end: int, error: FsError) -> None:
        if error.errno == errno.ESTALE:
            self._stale = error  # for good: the object changed
        else:
            self._failed = (start, end, error, time.monotonic() + FAILED_RANGE_HOLD)

    def _fail_again(self, offset: int, end: int) -> None:
        if self._failed is None:
            return
        start, stop, error, until = self._failed
        if time.monotonic() >= until:
            self._failed = None
        elif offset < stop and end > start:
            raise error

    def close(self) -> None:
        self._closed = True
        for chunk in self._chunks:
            self._cancel(chunk)
        self._chunks.clear()

    # -- window bookkeeping -------------------------------------------------------------

    def _is_sequential(self, offset: int) -> bool:
        if not self._chunks:
            return offset == self._position and offset > 0
        first, last = self._chunks[0].start, self._chunks[-1].end
        # Within what is fetched, or a little past it: the kernel's concurrent readahead
        # requests may arrive slightly out of order.
        return first <= offset <= last + self._config.min_request

    def _reset(self) -> None:
        for chunk in self._chunks:
            self._let_go(chunk)
        self._chunks.clear()
        self._next_size = self._config.min_request
        self._depth = self._config.max_ahead

    def _deepen(self) -> None:
        """The reader caught up with requests of full size still in flight: against a
        distant store (a first byte after tens of milliseconds, each connection at
        ~100 MB/s) ``max_ahead`` requests are too few to keep it busy. Twice as many, up
        to ``max_depth``; those past ``max_ahead`` only from the first half of the mount's
        budget (``_prefetch_ahead``), so other readers keep theirs."""
        if self._next_size == self._max_request:
            self._depth = min(2 * self._depth, self._config.max_depth)

    def _drop_behind(self, offset: int) -> None:
        keep_from = offset - self._config.behind_slack
        while self._chunks and self._chunks[0].end <= keep_from:
            self._let_go(self._chunks.pop(0))

    def _cover(self, offset: int, end: int) -> None:
        """Make sure chunks cover [offset, end): the bytes this read needs, fetched now."""
        if not self._chunks:
            self._issue(offset, self._forced_size(offset, end), forced=True, needed_end=end)
            return
        while self._chunks[-1].end < end:
            self._issue(self._chunks[-1].end, self._forced_size(self._chunks[-1].end, end), forced=True,
                        needed_end=end)

    def _forced_size(self, start: int, end: int) -> int:
        """The grown request size while the budget allows it; past the budget, only what
        the read needs: sixteen readers each forcing 8 MiB requests took a 64 MiB budget
        to 350 MiB."""
        size = self._grow(at_least=end - start)
        if self._budget.used + self._copies * size > self._budget.limit:
            size = max(self._config.min_request, end - start)
        return size

    def _prefetch_ahead(self) -> None:
        last = self._chunks[-1]
        ahead = sum(1 for c in self._chunks if c.end > self._position)
        while ahead < self._depth and last.end < self._size:
            size = self._grow()
            within = self._budget.limit // 2 if ahead >= self._config.max_ahead else None
            if not self._issue(last.end, size, forced=False, within=within):
                break  # the mount's budget is spent: read on without prefetching
            last = self._chunks[-1]
            ahead += 1

    def _grow(self, at_least: int = 0) -> int:
        """The size of the next request; each is twice the one before, up to the cap."""
        size = max(self._next_size, at_least)
        self._next_size = min(size * 2, self._max_request)
        return size

    def _issue(self, start: int, size: int, *, forced: bool, needed_end: int | None = None,
               within: int | None = None) -> bool:
        """Fetch about ``size`` bytes from ``start``: always if ``forced``, else if the
        budget has room (and would stay within ``within`` bytes used, when given)."""
        end = min(_aligned_end(start, size, self._part, needed_end), self._size)
        if end <= start:
            return False
        # While a request is in flight its bytes may exist twice: in the HTTP client's
        # receive buffer and in the copy it hands over. Once delivered, only the copy remains.
        charge = self._copies * (end - start)
        if forced:
            self._budget.reserve_anyway(charge)
        elif within is not None and self._budget.used + charge > within:
            return False
        elif not self._budget.try_reserve(charge):
            return False
        chunk = Chunk(start, end, reserved=charge)
        self._chunks.append(chunk)
        self._nursery.start_soon(fetch, chunk, self._client, self._key, self._etag, self._budget)
        return True

    def _cancel(self, chunk: Chunk) -> None:
        cancel(chunk, self._budget)

    def _let_go(self, chunk: Chunk) -> None:
        """Out of the window: cancelled, unless reads wait on it. Several threads reading one
        descriptor at random places (a Parquet reader's thread pool) each move the window;
        cancelling what the others wait for made them fetch it all again, on new connections."""
        if chunk.waiters:
            chunk.detached = True
        else:
            self._cancel(chunk)

    def _discard(self, chunk: Chunk) -> None:
        if chunk in self._chunks:
            self._chunks.remove(chunk)
        self._release(chunk)

    def _release(self, chunk: Chunk) -> None:
        self._budget.release(chunk.reserved)
        chunk.reserved = 0
