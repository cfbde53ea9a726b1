"""A local disk cache of object data (``--cache DIR``), for programs that read the same
data again: training jobs reading their dataset every epoch, tools that reread a file.

Object data is kept in blocks of 1 MiB. A block holds the ranges of its MiB that reads
have fetched, one file each (up to ``MAX_RANGES_PER_BLOCK``; a range replaces those it
covers), the least recently used evicted past ``--max-cache-size``: a read that misses
fetches what it needs, so a random read costs the bytes it asks for (not its whole MiB)
and the next read of the same bytes comes from the disk, also when they are in ranges
side by side. A block is named by the object's key, its ETag and the block's number, so
it only ever answers for the version a handle was opened with: a replaced object has
another ETag and is fetched afresh. Every range's file carries a CRC32C of its block's
name, the range and its bytes, checked at each read: a file that does not check out (a
disk error, a file changed by someone else) is dropped and the bytes come from S3.

The cache lives as long as the mount: emptied when the mount starts and when it ends,
and locked, so two mounts never share one directory (each would empty the other's).
Blocks are written by one thread off the FUSE loop; a reader never waits for the disk
to take a block, and when writing falls behind, blocks are simply not cached.
"""

from __future__ import annotations

import concurrent.futures
import errno
import fcntl
import hashlib
import math
import os
import shutil
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import awscrt.checksums
import structlog
import trio

from driver import metrics
from driver.s3.api import ObjectClient

log = structlog.get_logger("pail.cache")

BLOCK_SIZE = 1024 * 1024
# Bytes handed to the writer thread and not yet on disk. They are views of bodies the
# prefetcher holds anyway, but a body stays in memory until its blocks are written.
MAX_PENDING_WRITES = 32 * 1024 * 1024
# Ranges one block may hold at once, each a file: random reads land anywhere in a block.
MAX_RANGES_PER_BLOCK = 8
# magic, CRC32C of the block's name, range and bytes, where the bytes start in the block,
# how many, whether the object ends with them
_HEADER = struct.Struct("<4sIIII")
_FIELDS = struct.Struct("<III")  # the header after magic and CRC32C, which it covers
_MAGIC = b"PLB2"
_ENDS_OBJECT = 1
_WRITE_ERROR_LOG_INTERVAL = 60.0


class CacheDirError(Exception):
    """The cache directory cannot be used; the message says why."""


@dataclass(frozen=True)
class Span:
    """Bytes [start, end) of a block; ``ends_object``: the object ends at ``end``."""

    start: int
    end: int
    ends_object: bool = False

    def covers(self, start: int, end: int) -> bool:
        return self.start <= start and (end <= self.end or self.ends_object)


class BlockStore:
    """Blocks on disk with a size cap; thread-safe."""

    def __init__(self, directory: Path, max_size: int, lock_file: Any) -> None:
        self.directory = directory
        self.max_size = max_size
        self.used = 0
        self._lock_file = lock_file
        # A block's ranges are files of their own, named by the block and where the range
        # starts: file -> its size, its block, its range; least recently used first.
        self._files: OrderedDict[str, tuple[int, str, Span]] = OrderedDict()
        self._ranges: dict[str, list[str]] = {}  # block -> its files, oldest first
        self._mutex = threading.Lock()

    @classmethod
    def open(cls, directory: str, max_size: int) -> BlockStore:
        """Lock ``directory`` for this mount and empty what an earlier mount left in it."""
        base = Path(directory)
        try:
            base.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock_file = open(base / "pail-cache.lock", "a")  # noqa: SIM115 (held until close())
        except OSError as exc:
            raise CacheDirError(f"{directory}: {exc.strerror}") from None
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise CacheDirError(f"{directory} is the cache of another mount") from None
        root = base / "pail-cache"
        try:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(mode=0o700)
            for prefix in range(256):  # blocks spread by the first byte of their name
                (root / f"{prefix:02x}").mkdir(mode=0o700)
        except OSError as exc:
            lock_file.close()
            raise CacheDirError(f"{root}: {exc.strerror}") from None
        return cls(root, max_size, lock_file)

    def covering(self, name: str, start: int, end: int) -> list[str] | None:
        """Files of ranges of block ``name`` that together hold bytes [start, end) of it,
        or None. Several when a read spans ranges that earlier reads fetched side by side
        (a direct read's requests seldom start on a block)."""
        with self._mutex:
            spans = [(self._files[file][2], file) for file in self._ranges.get(name, ())]
        chosen: list[str] = []
        reached = start
        while reached < end:
            # Of the ranges that start by where the bytes so far reach, the one reaching furthest.
            reach, file = max(((math.inf if span.ends_object else span.end, file)
                               for span, file in spans if span.start <= reached), default=(0, ""))
            if reach <= reached:
                return None
            chosen.append(file)
            reached = reach
        return chosen

    def read_into(self, file: str, identity: bytes, block: memoryview) -> Span | None:
        """Read a range's bytes into ``block`` (room for a whole block) where they lie in
        it; the range, or None when it is not cached or does not check out."""
        with self._mutex:
            if file not in self._files:
                return None
            self._files.move_to_end(file)
        header = bytearray(_HEADER.size)
        span = None
        try:
            fd = os.open(self._path(file), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if os.preadv(fd, [header], 0) == _HEADER.size:
                    magic, crc, start, length, flags = _HEADER.unpack(header)
                    if magic == _MAGIC and start + length <= BLOCK_SIZE:
                        data = block[start:start + length]
                        if os.preadv(fd, [data], _HEADER.size) == length and crc == _range_checksum(
                                identity, start, length, flags, data):
                            span = Span(start, start + length, bool(flags & _ENDS_OBJECT))
            finally:
                os.close(fd)
        except OSError:
            self.drop(file)  # evicted meanwhile, or unreadable
            return None
        if span is None:
            log.warning("cache block failed its check; reading it from S3", op="read", block=file)
            metrics.cache_block("invalid")
            self.drop(file)
        return span

    def write(self, name: str, identity: bytes, span: Span, data: memoryview) -> None:
        """Keep a range of block ``name``, in place of the block's ranges it covers, evicting
        the least recently used to stay within the cap.

        Few calls, each releasing the GIL: this thread competes with the FUSE loop for it,
        and every extra step is another wait (5 ms at worst) for the loop to let go."""
        size = _HEADER.size + len(data)
        file = f"{name}.{span.start}"
        with self._mutex:
            ranges = self._ranges.get(name, [])
            if any(self._files[f][2].covers(span.start, span.end) for f in ranges):
                return  # two reads missed it at once, or a wider range came first
            gone = [f for f in ranges if span.covers(self._files[f][2].start, self._files[f][2].end)]
            for f in gone:
                self._forget(f)
            while len(self._ranges.get(name, ())) >= MAX_RANGES_PER_BLOCK:
                gone.append(self._ranges[name][0])
                self._forget(gone[-1])
            gone += self._make_room(size)
        for old in gone:
            if old != file:  # a file of the same name is replaced below, whole
                _unlink(self._path(old))
        flags = _ENDS_OBJECT if span.ends_object else 0
        header = _HEADER.pack(_MAGIC, _range_checksum(identity, span.start, len(data), flags, data),
                              span.start, len(data), flags)
        # Written aside and renamed into place: a reader that opened a file of the same
        # name reads it whole, and one that opens it now finds a whole file.
        path = self._path(file)
        temporary = path.with_name(path.name + ".new")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                if os.writev(fd, [header, data]) != size:
                    raise OSError(errno.ENOSPC, "short write")  # a full disk may take part of it
            finally:
                os.close(fd)
            os.replace(temporary, path)
        except OSError:
            _unlink(temporary)  # not in the index: nothing else would remove it
            raise
        with self._mutex:
            self._forget(file)
            self.used += size
            self._files[file] = (size, name, span)
            self._ranges.setdefault(name, []).append(file)
            metrics.cache_bytes(self.used)

    def drop(self, file: str) -> None:
        with self._mutex:
            self._forget(file)
            metrics.cache_bytes(self.used)
        _unlink(self._path(file))

    def close(self) -> None:
        """Remove every block and let another mount use the directory."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self._lock_file.close()

    def _make_room(self, size: int) -> list[str]:
        evicted = []
        while self._files and self.used + size > self.max_size:
            file = next(iter(self._files))
            self._forget(file)
            evicted.append(file)
        return evicted

    def _forget(self, file: str) -> None:
        """Take ``file`` out of the index (the caller holds the mutex)."""
        entry = self._files.pop(file, None)
        if entry is None:
            return
        size, name, _ = entry
        self.used -= size
        ranges = self._ranges[name]
        ranges.remove(file)
        if not ranges:
            del self._ranges[name]

    def _path(self, name: str) -> Path:
        return self.directory / name[:2] / name


class CachingObjectClient:
    """An ObjectClient whose ranged GETs are answered from a BlockStore when they can be,
    and fill it when they cannot. Every other operation goes to the client it wraps."""

    def __init__(self, client: ObjectClient, store: BlockStore) -> None:
        self._client = client
        self._store = store
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pail-cache")
        self._pending = 0
        self._pending_mutex = threading.Lock()
        self._write_failures = 0
        self._write_failure_logged = 0.0

    # A read from the cache and S3 both is put together from pieces: a copy besides them.
    copies_in_flight = 2

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def get_range(self, key: str, start: int, length: int, *, etag: str) -> bytes | memoryview:
        if length <= 0 or not etag:
            # No ETag, no way to tell versions apart: such objects are not cached.
            return await self._client.get_range(key, start, length, etag=etag)
        version = _version_name(key, etag)
        end = start + length
        first, last = start // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        # Per block: its name, its identity, and the bytes of it this read needs.
        wanted = {index: (f"{version}.{index}", _identity(key, etag, index),
                          max(start, index * BLOCK_SIZE) - index * BLOCK_SIZE,
                          min(end, (index + 1) * BLOCK_SIZE) - index * BLOCK_SIZE)
                  for index in range(first, last + 1)}
        held = [(index, files, identity) for index, (name, identity, low, high) in wanted.items()
                if (files := self._store.covering(name, low, high)) is not None]
        pieces: dict[int, tuple[Span, memoryview]] = {}
        if held:
            # Allocated here, filled there: memory a worker thread allocates comes from its
            # own malloc arena, which keeps what is freed (reading 1 GiB from the cache grew
            # the mount by ~100 MiB more than reading it from S3).
            buffer = memoryview(bytearray(len(held) * BLOCK_SIZE))
            pieces = await trio.to_thread.run_sync(self._read_blocks, held, buffer)
        missing = [index for index, (_, _, low, high) in wanted.items()
                   if (index not in pieces or not pieces[index][0].covers(low, high))
                   and not _ended_before(pieces, index)]
        metrics.cache_block("hit", len(wanted) - len(missing))
        if missing:
            metrics.cache_block("miss", len(missing))
            pieces.update(await self._fetch(key, etag, wanted, missing))
        return _assemble(pieces, wanted)

    async def _fetch(self, key: str, etag: str, wanted: dict[int, tuple[str, bytes, int, int]],
                     missing: list[int]) -> dict[int, tuple[Span, memoryview]]:
        """One GET for the missing blocks' bytes, from what the first needs to what the
        last needs; the pieces go to the writer thread."""
        low_block, high_block = missing[0], missing[-1]
        low, high = wanted[low_block][2], wanted[high_block][3]
        fetch_start = low_block * BLOCK_SIZE + low
        fetch_end = high_block * BLOCK_SIZE + high
        body = memoryview(await self._client.get_range(key, fetch_start, fetch_end - fetch_start, etag=etag))
        body_end = fetch_start + len(body)
        pieces, new = {}, []
        for index in range(low_block, high_block + 1):
            block_start = index * BLOCK_SIZE
            piece_start, piece_end = max(fetch_start, block_start), min(body_end, block_start + BLOCK_SIZE)
            if piece_end <= piece_start:
                break  # the object ended before this block
            ends_object = body_end < fetch_end and piece_end == body_end
            span = Span(piece_start - block_start, piece_end - block_start, ends_object)
            piece = body[piece_start - fetch_start:piece_end - fetch_start]
            pieces[index] = (span, piece)
            new.append((wanted[index][0], wanted[index][1], span, piece))
            if ends_object:
                break
        self._write_later(new)
        return pieces

    async def aclose(self) -> None:
        await self._client.aclose()
        self._writer.shutdown(wait=False, cancel_futures=True)
        await trio.to_thread.run_sync(self._close_store)

    def _close_store(self) -> None:
        self._writer.shutdown(wait=True)
        self._store.close()

    def _read_blocks(self, blocks: list[tuple[int, list[str], bytes]],
                     buffer: memoryview) -> dict[int, tuple[Span, memoryview]]:
        """The blocks (index, files of its ranges, identity) whose ranges all check out,
        each read into its own MiB of ``buffer``, where the ranges lie in it."""
        found = {}
        for n, (index, files, identity) in enumerate(blocks):
            room = buffer[n * BLOCK_SIZE:(n + 1) * BLOCK_SIZE]
            spans = [self._store.read_into(file, identity, room) for file in files]
            if None not in spans:
                # covering() chose them overlapping or touching, in order: one span.
                span = Span(spans[0].start, spans[-1].end, spans[-1].ends_object)
                found[index] = (span, room[span.start:span.end])
        return found

    def _write_later(self, blocks: list[tuple[str, bytes, Span, memoryview]]) -> None:
        """Hand blocks to the writer thread, as many as fit in what may wait for it: one
        job for all, since each wake-up of that thread is a wait for the GIL."""
        with self._pending_mutex:
            room = MAX_PENDING_WRITES - self._pending
            taken = []
            for block in blocks:
                if len(block[3]) > room:
                    break  # the disk is behind: the rest are not cached
                taken.append(block)
                room -= len(block[3])
            size = sum(len(block[3]) for block in taken)
            self._pending += size
        if not taken:
            return
        try:
            self._writer.submit(self._write, taken, size)
        except RuntimeError:  # shutting down
            self._written(size)

    def _write(self, blocks: list[tuple[str, bytes, Span, memoryview]], size: int) -> None:
        try:
            for name, identity, span, data in blocks:
                try:
                    self._store.write(name, identity, span, data)
                except OSError as exc:
                    self._write_failed(exc)
        finally:
            self._written(size)

    def _write_failed(self, exc: OSError) -> None:
        self._write_failures += 1
        now = time.monotonic()
        if now - self._write_failure_logged >= _WRITE_ERROR_LOG_INTERVAL:
            # A full disk fails every write: one line a minute says so.
            self._write_failure_logged = now
            log.warning("cache write failed; reading on without caching", op="read",
                        errno=exc.errno, reason=exc.strerror, failures=self._write_failures)

    def _written(self, size: int) -> None:
        with self._pending_mutex:
            self._pending -= size


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _version_name(key: str, etag: str) -> str:
    return hashlib.sha256(f"{key}\0{etag}".encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _identity(key: str, etag: str, index: int) -> bytes:
    return f"{key}\0{etag}\0{index}".encode("utf-8", "surrogateescape")


def _range_checksum(identity: bytes, start: int, length: int, flags: int, data: memoryview | bytes) -> int:
    """What a range file's CRC32C covers: its block's identity, the header after the CRC,
    and the bytes; one function for writing and for checking."""
    return awscrt.checksums.crc32c(data, awscrt.checksums.crc32c(identity + _FIELDS.pack(start, length, flags)))


def _ended_before(pieces: dict[int, tuple[Span, memoryview]], index: int) -> bool:
    """Whether the object ends in a block before ``index``."""
    return any(i < index and span.ends_object for i, (span, _) in pieces.items())


def _assemble(pieces: dict[int, tuple[Span, memoryview]],
              wanted: dict[int, tuple[str, bytes, int, int]]) -> bytes | memoryview:
    """The bytes each block was wanted for, in order, short where the object ends."""
    parts: list[memoryview] = []
    for index, (_, _, low, high) in wanted.items():
        if index not in pieces:
            break  # past the object's end
        span, data = pieces[index]
        parts.append(data[low - span.start:min(high, span.end) - span.start])
        if span.end < high:
            break  # the object ends in this block
    return parts[0] if len(parts) == 1 else b"".join(parts)
