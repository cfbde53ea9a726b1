"""A local disk cache of object data (``--cache DIR``), for programs that read the same
data again: training jobs reading their dataset every epoch, tools that reread a file.

Object data is kept in blocks of 1 MiB, one file each, the least recently used evicted
past ``--max-cache-size``. A block is named by the object's key, its ETag and the block's
number, so it only ever answers for the version a handle was opened with: a replaced
object has another ETag and is fetched afresh. Every block file carries a CRC32C of its
name and bytes, checked at each read: a block that does not check out (a disk error,
a file changed by someone else) is dropped and the bytes come from S3.

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
import os
import shutil
import struct
import threading
import time
from collections import OrderedDict
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
_HEADER = struct.Struct("<4sIQ")  # magic, CRC32C of the block's name and bytes, length
_MAGIC = b"PLB1"
_WRITE_ERROR_LOG_INTERVAL = 60.0


class CacheDirError(Exception):
    """The cache directory cannot be used; the message says why."""


class BlockStore:
    """Blocks on disk with a size cap; thread-safe."""

    def __init__(self, directory: Path, max_size: int, lock_file: Any) -> None:
        self.directory = directory
        self.max_size = max_size
        self.used = 0
        self._lock_file = lock_file
        self._blocks: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
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

    def has(self, name: str) -> bool:
        return name in self._blocks

    def read_into(self, name: str, identity: bytes, out: memoryview) -> int | None:
        """Read the block into ``out`` (room for a whole block); its length, or None when
        it is not cached or does not check out."""
        with self._mutex:
            if name not in self._blocks:
                return None
            self._blocks.move_to_end(name)
        header = bytearray(_HEADER.size)
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                got = os.preadv(fd, [header, out], 0) - _HEADER.size
            finally:
                os.close(fd)
        except OSError:
            self.drop(name)  # evicted meanwhile, or unreadable
            return None
        if got >= 0:
            magic, crc, length = _HEADER.unpack(header)
            if magic == _MAGIC and length == got and crc == _checksum(identity, out[:got]):
                return got
        log.warning("cache block failed its check; reading it from S3", op="read", block=name)
        metrics.cache_block("invalid")
        self.drop(name)
        return None

    def write(self, name: str, identity: bytes, data: memoryview) -> None:
        """Keep a block, evicting the least recently used to stay within the cap.

        Few calls, each releasing the GIL: this thread competes with the FUSE loop for it,
        and every extra step is another wait (5 ms at worst) for the loop to let go."""
        size = _HEADER.size + len(data)
        with self._mutex:
            if name in self._blocks:
                return  # two reads missed it at once: a reader may be reading the first copy
            evicted = self._make_room(size)
        for old in evicted:
            _unlink(self._path(old))
        # Written in place, not renamed into place: a block is read only once it is in the
        # index, which it enters after this; a half-written file would fail its check.
        fd = os.open(self._path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if os.writev(fd, [_HEADER.pack(_MAGIC, _checksum(identity, data), len(data)), data]) != size:
                raise OSError(errno.ENOSPC, "short write")  # a full disk may take part of it
        finally:
            os.close(fd)
        with self._mutex:
            self.used += size
            self._blocks[name] = size
            metrics.cache_bytes(self.used)

    def drop(self, name: str) -> None:
        with self._mutex:
            size = self._blocks.pop(name, None)
            if size is not None:
                self.used -= size
                metrics.cache_bytes(self.used)
        _unlink(self._path(name))

    def close(self) -> None:
        """Remove every block and let another mount use the directory."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self._lock_file.close()

    def _make_room(self, size: int) -> list[str]:
        evicted = []
        while self._blocks and self.used + size > self.max_size:
            name, old = self._blocks.popitem(last=False)
            self.used -= old
            evicted.append(name)
        return evicted

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

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def get_range(self, key: str, start: int, length: int, *, etag: str) -> bytes | memoryview:
        if length <= 0 or not etag:
            # No ETag, no way to tell versions apart: such objects are not cached.
            return await self._client.get_range(key, start, length, etag=etag)
        version = _version_name(key, etag)
        first, last = start // BLOCK_SIZE, (start + length - 1) // BLOCK_SIZE
        wanted = [(index, f"{version}.{index}", _identity(key, etag, index)) for index in range(first, last + 1)]
        blocks: dict[int, bytes | memoryview] = {}
        cached = [block for block in wanted if self._store.has(block[1])]
        if cached:
            # Allocated here, filled there: memory a worker thread allocates comes from its
            # own malloc arena, which keeps what is freed (reading 1 GiB from the cache grew
            # the mount by ~100 MiB more than reading it from S3).
            buffer = memoryview(bytearray(len(cached) * BLOCK_SIZE))
            found = await trio.to_thread.run_sync(self._read_blocks, cached, buffer)
            if len(found) == len(wanted):
                metrics.cache_block("hit", len(found))
                # The blocks lie one after another in the buffer: answer with a view of it.
                size = sum(len(data) for data in found.values())
                return buffer[start - first * BLOCK_SIZE:min(size, start - first * BLOCK_SIZE + length)]
            blocks.update(found)
        metrics.cache_block("hit", len(blocks))
        missing = [index for index in range(first, last + 1) if index not in blocks
                   and not _ends_before(blocks, index)]
        if missing:
            metrics.cache_block("miss", len(missing))
            low, high = missing[0], missing[-1]
            body = memoryview(await self._client.get_range(key, low * BLOCK_SIZE, (high - low + 1) * BLOCK_SIZE,
                                                           etag=etag))
            new = []
            for index in range(low, high + 1):
                piece = body[(index - low) * BLOCK_SIZE:(index - low + 1) * BLOCK_SIZE]
                if not piece:
                    break
                if index not in blocks:
                    blocks[index] = piece
                    new.append((f"{version}.{index}", _identity(key, etag, index), piece))
                if len(piece) < BLOCK_SIZE:
                    break  # the object ends in this block
            self._write_later(new)
        return _assemble(blocks, first, last, start - first * BLOCK_SIZE, length)

    async def aclose(self) -> None:
        await self._client.aclose()
        self._writer.shutdown(wait=False, cancel_futures=True)
        await trio.to_thread.run_sync(self._close_store)

    def _close_store(self) -> None:
        self._writer.shutdown(wait=True)
        self._store.close()

    def _read_blocks(self, blocks: list[tuple[int, str, bytes]], buffer: memoryview) -> dict[int, memoryview]:
        """The blocks that check out, read into ``buffer`` in the order given."""
        found = {}
        for n, (index, name, identity) in enumerate(blocks):
            room = buffer[n * BLOCK_SIZE:(n + 1) * BLOCK_SIZE]
            got = self._store.read_into(name, identity, room)
            if got is not None:
                found[index] = room[:got]
        return found

    def _write_later(self, blocks: list[tuple[str, bytes, memoryview]]) -> None:
        """Hand blocks to the writer thread, as many as fit in what may wait for it: one
        job for all, since each wake-up of that thread is a wait for the GIL."""
        with self._pending_mutex:
            room = MAX_PENDING_WRITES - self._pending
            taken = []
            for block in blocks:
                if len(block[2]) > room:
                    break  # the disk is behind: the rest are not cached
                taken.append(block)
                room -= len(block[2])
            size = sum(len(block[2]) for block in taken)
            self._pending += size
        if not taken:
            return
        try:
            self._writer.submit(self._write, taken, size)
        except RuntimeError:  # shutting down
            self._written(size)

    def _write(self, blocks: list[tuple[str, bytes, memoryview]], size: int) -> None:
        try:
            for name, identity, data in blocks:
                try:
                    self._store.write(name, identity, data)
                except OSError as exc:
                    self._store.drop(name)
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


def _checksum(identity: bytes, data: memoryview | bytes) -> int:
    return awscrt.checksums.crc32c(data, awscrt.checksums.crc32c(identity))


def _ends_before(blocks: dict[int, bytes | memoryview], index: int) -> bool:
    """Whether a block before ``index`` is short: the object ends there."""
    return any(i < index and len(data) < BLOCK_SIZE for i, data in blocks.items())


def _assemble(blocks: dict[int, bytes | memoryview], first: int, last: int, skip: int,
              length: int) -> bytes | memoryview:
    """Bytes [skip, skip + length) of blocks first..last, short where the object ends."""
    pieces: list[bytes | memoryview] = []
    for index in range(first, last + 1):
        data = blocks.get(index)
        if data is None:
            break
        pieces.append(data)
        if len(data) < BLOCK_SIZE:
            break
    if len(pieces) == 1:
        return memoryview(pieces[0])[skip:skip + length]
    return memoryview(b"".join(pieces))[skip:skip + length]
