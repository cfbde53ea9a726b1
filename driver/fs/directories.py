"""Directories: listings (from S3, or cached for the metadata TTL), the entries that
exist only in this mount, mkdir and rmdir.

A listing shows what S3 lists plus this mount's local entries (directories made by mkdir,
files being written) that S3 does not have yet. A directory made by mkdir writes nothing
to S3: it exists until the mount ends or a file written in it makes it a key prefix.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from driver.fs.errors import FsError, from_store
from driver.fs.inode import Inode, InodeTable, Kind
from driver.fs.listing import DirectoryListing, Entry
from driver.s3.api import ObjectClient, ObjectClientError

# Entries of complete listings kept for reuse within the TTL, all directories together.
MAX_CACHED_ENTRIES = 200_000


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


class Directories:
    def __init__(self, client: ObjectClient, inodes: InodeTable, ttl: float) -> None:
        self._client = client
        self._inodes = inodes
        self._ttl = ttl
        self._listings: dict[int, _CachedListing] = {}
        self._cached_entries = 0

    def _deadline(self) -> float:
        return time.monotonic() + self._ttl

    # -- listing -------------------------------------------------------------------------

    def open(self, inode: Inode) -> DirHandle:
        """A listing of ``inode``: from the cache while the last complete listing is within
        the TTL (an ``ls`` right after an ``ls`` asks S3 nothing), else from S3."""
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR, "opendir of a file")
        cached = self._listings.get(inode.ino)
        if cached is not None and time.monotonic() < cached.valid_until:
            handle = DirHandle(inode, None, listed=cached.entries)
            handle.entries = [(e.name, self.remember(inode, e, cached.valid_until)) for e in cached.entries]
            self._add_local(handle)
            return handle
        return DirHandle(inode, DirectoryListing(self._client, inode.key))

    async def readdir(self, handle: DirHandle, start: int, emit: Callable[[str, Inode, int], bool]) -> DirHandle:
        """Call ``emit(name, inode, next_offset)`` for entries from offset ``start`` on,
        until it returns False (the kernel's buffer is full) or the directory ends.
        Entries other than "." and ".." that ``emit`` accepts count a kernel reference.
        Returns the handle to keep (a rewound listing starts afresh)."""
        if start == 0 and handle.entries:
            # Rewound: list afresh (or from a fresh cache), as a local filesystem would
            # show what changed.
            handle = self.open(handle.inode)
        dots = [(".", handle.inode), ("..", self._inodes.get(handle.inode.parent) or handle.inode)]
        offset = start
        while True:
            if offset < 2:
                name, inode = dots[offset]
                if not emit(name, inode, offset + 1):
                    return handle
                offset += 1
                continue
            index = offset - 2
            while index >= len(handle.entries) and handle.listing is not None:
                await self._list_more(handle)
            if index >= len(handle.entries):
                return handle
            name, inode = handle.entries[index]
            if not emit(name, inode, offset + 1):
                return handle
            self._inodes.add_lookup(inode)
            offset += 1

    async def _list_more(self, handle: DirHandle) -> None:
        assert handle.listing is not None
        try:
            batch = await handle.listing.next_batch()
        except ObjectClientError as exc:
            raise from_store(exc, during="readdir") from None
        deadline = self._deadline()
        for entry in batch:
            handle.entries.append((entry.name, self.remember(handle.inode, entry, deadline)))
        handle.listed.extend(batch)
        if handle.listing.done:
            handle.listing = None
            self._cache(handle.inode, handle.listed, deadline)
            self._add_local(handle)

    def _add_local(self, handle: DirHandle) -> None:
        """This mount's own entries that S3 does not list (yet)."""
        listed = {name for name, _ in handle.entries}
        handle.entries.extend((c.name, c) for c in self._inodes.held_children(handle.inode.ino)
                              if c.name not in listed)

    def remember(self, parent: Inode, entry: Entry, deadline: float) -> Inode:
        if entry.info is None:
            return self._inodes.upsert(parent, entry.name, Kind.DIR, valid_until=deadline)
        info = entry.info
        return self._inodes.upsert(parent, entry.name, Kind.FILE, size=info.size, mtime=info.mtime,
                                   etag=info.etag, valid_until=deadline)

    def _cache(self, inode: Inode, entries: list[Entry], deadline: float) -> None:
        if self._ttl <= 0 or len(entries) > MAX_CACHED_ENTRIES:
            return
        self.forget(inode.ino)
        self._listings[inode.ino] = _CachedListing(entries, deadline)
        self._cached_entries += len(entries)
        while self._cached_entries > MAX_CACHED_ENTRIES:
            oldest = next(iter(self._listings))  # dicts keep insertion order
            self._cached_entries -= len(self._listings.pop(oldest).entries)

    def forget(self, ino: int) -> None:
        """The cached listing of ``ino`` no longer matches what exists."""
        cached = self._listings.pop(ino, None)
        if cached is not None:
            self._cached_entries -= len(cached.entries)

    # -- mkdir, rmdir --------------------------------------------------------------------

    def mkdir(self, parent: Inode, name: str) -> Inode:
        """A local directory: nothing is written to S3 (no marker objects)."""
        return self._inodes.add_local(parent, name, Kind.DIR, mtime=time.time())

    async def rmdir(self, parent: Inode, child: Inode) -> None:
        if not child.is_dir:
            raise FsError(errno.ENOTDIR, "rmdir of a file")
        if self._inodes.held_children(child.ino):
            raise FsError(errno.ENOTEMPTY, "the directory has entries")
        if not child.local or await self._in_s3(child):
            # Removing it would mean deleting every object under the prefix.
            raise FsError(errno.EPERM, "the directory exists in S3: delete its objects instead")
        self._inodes.remove_child(parent.ino, child.name)
        self.forget(child.ino)

    async def _in_s3(self, directory: Inode) -> bool:
        """Whether another client has written keys under a directory made here."""
        try:
            page = await self._client.list_objects(directory.key, max_keys=1)
        except ObjectClientError as exc:
            raise from_store(exc, during="rmdir") from None
        return bool(page.objects or page.prefixes)
