"""The filesystem: lookups, attributes, directory listings and reads, over an ObjectClient.

Operations take and return plain values (inode numbers, ``Inode`` records, bytes) and
raise ``FsError``; ``driver.fuse`` turns them into kernel replies. Metadata is cached for
``metadata_ttl`` seconds: within it, a lookup or ``stat`` answers from what the last
listing or HEAD said; after it, S3 is asked again.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog
import trio

from driver.config import FsSettings
from driver.fs.errors import FsError, from_store
from driver.fs.inode import Inode, InodeTable, Kind
from driver.fs.listing import DirectoryListing, Entry
from driver.fs.names import DELIMITER, NAME_MAX, is_valid_name
from driver.fs.prefetch import MemoryBudget, PrefetchConfig, Prefetcher
from driver.s3.api import ListPage, NoSuchKey, ObjectClient, ObjectClientError

log = structlog.get_logger("pail.fs")
_H = TypeVar("_H", "FileHandle", "DirHandle")

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT


@dataclass(eq=False)
class FileHandle:
    inode: Inode
    reader: Prefetcher


@dataclass(eq=False)
class DirHandle:
    inode: Inode
    listing: DirectoryListing | None  # None once the whole directory is listed
    # Entries listed so far; entry i is at readdir offset i + 2 ("." and ".." are 0 and 1).
    entries: list[tuple[str, Inode]] = field(default_factory=list)
    listed: list[Entry] = field(default_factory=list)


@dataclass(eq=False)
class _CachedListing:
    entries: list[Entry]
    valid_until: float


# Entries of complete listings kept for reuse within the TTL, all directories together.
MAX_CACHED_ENTRIES = 200_000


class Filesystem:
    """One mounted bucket (or prefix)."""

    def __init__(self, client: ObjectClient, settings: FsSettings) -> None:
        self.client = client
        self.settings = settings
        self.inodes = InodeTable(settings.prefix, mount_time=time.time())
        self.budget = MemoryBudget(settings.max_memory)
        self._prefetch = PrefetchConfig(settings.min_request, settings.max_request, settings.max_ahead)
        self._handles: dict[int, FileHandle | DirHandle] = {}
        self._next_fh = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._listings: dict[int, _CachedListing] = {}
        self._cached_entries = 0
        # Called with an inode number when its size or mtime changed outside a reply to the
        # kernel; the FUSE adapter invalidates the kernel's cached attributes.
        self.on_attributes_changed: Callable[[int], None] = lambda ino: None

    def start(self, nursery: trio.Nursery) -> None:
        """Background work (prefetch requests) runs in ``nursery``, which outlives handles."""
        self._nursery = nursery

    def _deadline(self) -> float:
        return time.monotonic() + self.settings.metadata_ttl

    def _inode(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is None:
            raise FsError(errno.ENOENT, f"unknown inode {ino}")
        return inode

    # -- names -------------------------------------------------------------------------

    async def lookup(self, parent_ino: int, name: str) -> Inode:
        """The entry ``name`` in a directory; counts one kernel reference on success."""
        parent = self._inode(parent_ino)
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR, "lookup in a file")
        if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG, "name longer than 255 bytes")
        if not is_valid_name(name):
            raise FsError(errno.ENOENT, "name can never be an S3 key segment")
        inode = self.inodes.child(parent.ino, name)
        if inode is None or not inode.is_fresh():
            inode = await self._lookup_remote(parent, name)
        self.inodes.add_lookup(inode)
        return inode

    async def _lookup_remote(self, parent: Inode, name: str) -> Inode:
        before = self.inodes.child(parent.ino, name)
        try:
            found = await self._ask_s3(parent, name, was_dir=before is not None and before.is_dir)
        except FsError as exc:
            if exc.errno == errno.ENOENT and before is not None:
                self._forget_listing(parent.ino)  # the cached listing shows a name now gone
            raise
        if before is None or before.kind is not found.kind:
            self._forget_listing(parent.ino)  # the cached listing lacks this name or kind
        return found

    async def _ask_s3(self, parent: Inode, name: str, *, was_dir: bool) -> Inode:
        key = parent.key + name
        if was_dir:
            # Revalidating a directory: while anything is under it, it is a directory
            # whatever else exists (the directory wins), so one LIST answers.
            page = await self._list_one(key + DELIMITER)
            if page.objects or page.prefixes:
                return self.inodes.upsert(parent, name, Kind.DIR, valid_until=self._deadline())
        head: list = [None]
        listed: list = [None]

        async def head_object() -> None:
            try:
                head[0] = await self.client.head_object(key)
            except NoSuchKey:
                pass
            except ObjectClientError as exc:
                raise from_store(exc, during="lookup") from None

        async def list_prefix() -> None:
            listed[0] = await self._list_one(key + DELIMITER)

        # Both requests at once: one round trip whether the name is a file or a directory.
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(head_object)
                nursery.start_soon(list_prefix)
        except* FsError as group:
            raise group.exceptions[0] from None
        page = listed[0]
        if page.objects or page.prefixes:
            # A prefix with anything under it is a directory, and wins over an object of
            # the same name.
            return self.inodes.upsert(parent, name, Kind.DIR, valid_until=self._deadline())
        if head[0] is not None:
            info = head[0]
            return self.inodes.upsert(parent, name, Kind.FILE, size=info.size, mtime=info.mtime,
                                      etag=info.etag, valid_until=self._deadline())
        self.inodes.remove_child(parent.ino, name)
        raise FsError(errno.ENOENT, "no such object or prefix")

    async def _list_one(self, prefix: str) -> ListPage:
        try:
            return await self.client.list_objects(prefix, max_keys=1)
        except ObjectClientError as exc:
            raise from_store(exc, during="lookup") from None

    def forget(self, ino: int, count: int) -> None:
        self.inodes.forget(ino, count)
        if self.inodes.get(ino) is None:
            self._forget_listing(ino)

    # -- attributes ----------------------------------------------------------------------

    async def getattr(self, ino: int) -> Inode:
        inode = self._inode(ino)
        if inode.is_dir or inode.is_fresh():
            return inode
        try:
            info = await self.client.head_object(inode.key)
        except NoSuchKey:
            self.inodes.remove_child(inode.parent, inode.name)
            self._forget_listing(inode.parent)
            raise FsError(errno.ENOENT, "object deleted in S3") from None
        except ObjectClientError as exc:
            raise from_store(exc, during="getattr") from None
        changed = (info.size, info.mtime) != (inode.size, inode.mtime)
        inode.size, inode.etag, inode.mtime = info.size, info.etag, info.mtime
        inode.valid_until = self._deadline()
        if changed:
            # The kernel may hold the old size for its own TTL (an open() does not refresh
            # it), and would cut reads of a grown object short.
            log.debug("object changed in S3", key=inode.key)
            self.on_attributes_changed(inode.ino)
        return inode

    def attr_timeout(self) -> float:
        return self.settings.metadata_ttl

    # -- directories ---------------------------------------------------------------------

    async def opendir(self, ino: int) -> int:
        inode = self._inode(ino)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR, "opendir of a file")
        fh = next(self._next_fh)
        self._handles[fh] = self._start_listing(inode)
        return fh

    def _start_listing(self, inode: Inode) -> DirHandle:
        """A listing of ``inode``: from the cache while the last complete listing is within
        the TTL (an ``ls`` right after an ``ls`` asks S3 nothing), else from S3."""
        cached = self._listings.get(inode.ino)
        if cached is not None and time.monotonic() < cached.valid_until:
            handle = DirHandle(inode, None, listed=cached.entries)
            handle.entries = [(e.name, self._remember(inode, e, cached.valid_until)) for e in cached.entries]
            return handle
        return DirHandle(inode, DirectoryListing(self.client, inode.key))

    async def readdir(self, fh: int, start: int, emit: Callable[[str, Inode, int], bool]) -> None:
        """Call ``emit(name, inode, next_offset)`` for entries from offset ``start`` on,
        until it returns False (the kernel's buffer is full) or the directory ends.
        Entries other than "." and ".." that ``emit`` accepts count a kernel reference."""
        handle = self._handle(fh, DirHandle)
        if start == 0 and handle.entries:
            # Rewound: list afresh (or from a fresh cache), as a local filesystem would
            # show what changed.
            handle = self._handles[fh] = self._start_listing(handle.inode)
        dots = [(".", handle.inode), ("..", self.inodes.get(handle.inode.parent) or handle.inode)]
        offset = start
        while True:
            if offset < 2:
                name, inode = dots[offset]
                if not emit(name, inode, offset + 1):
                    return
                offset += 1
                continue
            index = offset - 2
            while index >= len(handle.entries) and handle.listing is not None:
                await self._list_more(handle)
            if index >= len(handle.entries):
                return
            name, inode = handle.entries[index]
            if not emit(name, inode, offset + 1):
                return
            self.inodes.add_lookup(inode)
            offset += 1

    async def _list_more(self, handle: DirHandle) -> None:
        assert handle.listing is not None
        try:
            batch = await handle.listing.next_batch()
        except ObjectClientError as exc:
            raise from_store(exc, during="readdir") from None
        deadline = self._deadline()
        for entry in batch:
            handle.entries.append((entry.name, self._remember(handle.inode, entry, deadline)))
        handle.listed.extend(batch)
        if handle.listing.done:
            handle.listing = None
            self._cache_listing(handle.inode, handle.listed, deadline)

    def _cache_listing(self, inode: Inode, entries: list[Entry], deadline: float) -> None:
        if self.settings.metadata_ttl <= 0 or len(entries) > MAX_CACHED_ENTRIES:
            return
        self._listings.pop(inode.ino, None)
        self._listings[inode.ino] = _CachedListing(entries, deadline)
        self._cached_entries += len(entries)
        while self._cached_entries > MAX_CACHED_ENTRIES:
            oldest = next(iter(self._listings))  # dicts keep insertion order
            self._cached_entries -= len(self._listings.pop(oldest).entries)

    def _forget_listing(self, ino: int) -> None:
        cached = self._listings.pop(ino, None)
        if cached is not None:
            self._cached_entries -= len(cached.entries)

    def _remember(self, parent: Inode, entry: Entry, deadline: float) -> Inode:
        if entry.info is None:
            return self.inodes.upsert(parent, entry.name, Kind.DIR, valid_until=deadline)
        info = entry.info
        return self.inodes.upsert(parent, entry.name, Kind.FILE, size=info.size, mtime=info.mtime,
                                  etag=info.etag, valid_until=deadline)

    def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # -- files ---------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """A handle for reading; returns (fh, keep_cache): whether the kernel's cached pages
        of this inode are still the object's bytes."""
        inode = self._inode(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR, "open of a directory")
        if flags & WRITE_FLAGS:
            raise FsError(errno.EROFS, "writes are not supported yet: the mount is read-only")
        if not inode.is_fresh():
            await self.getattr(ino)
        assert inode.etag is not None
        if self._nursery is None:
            raise RuntimeError("Filesystem.start() was not called")
        keep_cache = inode.open_etag == inode.etag
        inode.open_etag = inode.etag
        reader = Prefetcher(self.client, inode.key, inode.etag, inode.size, config=self._prefetch,
                            budget=self.budget, nursery=self._nursery)
        fh = next(self._next_fh)
        self._handles[fh] = FileHandle(inode, reader)
        return fh, keep_cache

    async def read(self, fh: int, offset: int, length: int) -> bytes | memoryview:
        handle = self._handle(fh, FileHandle)
        try:
            return await handle.reader.read(offset, length)
        except FsError as exc:
            if exc.errno == errno.ESTALE:
                # This handle stays stale; the next open asks S3 for the new version.
                handle.inode.valid_until = 0.0
            raise

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, FileHandle):
            handle.reader.close()

    def _handle(self, fh: int, kind: type[_H]) -> _H:
        handle = self._handles.get(fh)
        if not isinstance(handle, kind):
            raise FsError(errno.EBADF, f"no such handle {fh}")
        return handle

    # -- the mount -----------------------------------------------------------------------

    def statfs(self) -> dict[str, int]:
        # S3 has no capacity to report; large round numbers keep tools that check free
        # space before writing (installers, tar) from refusing.
        block = 4096
        blocks = 2**50 // block
        return {"block_size": block, "blocks": blocks, "free": blocks, "files": 2**32, "files_free": 2**32,
                "name_max": 255}

    async def aclose(self) -> None:
        for fh in list(self._handles):
            self.release(fh)
        await self.client.aclose()

