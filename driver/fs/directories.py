"""Directories: listings (from S3, or cached for the metadata TTL), the entries that
exist only in this mount, mkdir and rmdir.

A listing shows what S3 lists plus this mount's local entries (directories made by mkdir,
files being written) that S3 does not have yet. A directory made by mkdir writes nothing
to S3: it exists until the mount ends or a file written in it makes it a key prefix.
"""

from __future__ import annotations

import errno
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from driver.fs.errors import FsError, from_store, unexpected
from driver.fs.inode import Inode, InodeTable, Kind
from driver.fs.listing import DirectoryListing, Entry
from driver.s3.api import ObjectClient, ObjectClientError

# Entries of complete listings kept for reuse within the TTL, all directories together.
MAX_CACHED_ENTRIES = 200_000
# When this many names of one directory were looked up in S3 (within two TTLs), the
# directory is listed (again) instead of asking S3 about each name: a program going
# through a directory (`cat dir/*`, a training epoch) then costs one LIST per 1,000 files
# a TTL, not a HEAD and a LIST per file. Lookups wait for the page that decides their name
# only in directories whose last full listing had at most RELIST_MAX_ENTRIES entries;
# a directory never listed is listed up to that many entries, and lookups use what has
# arrived.
RELIST_AFTER = 3
RELIST_MAX_ENTRIES = 10_000


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
    _by_name: dict[str, Entry] | None = None
    _positions: dict[str, int] | None = None

    @property
    def by_name(self) -> dict[str, Entry]:
        if self._by_name is None:
            self._by_name = {entry.name: entry for entry in self.entries}
        return self._by_name

    @property
    def positions(self) -> dict[str, int]:
        if self._positions is None:
            self._positions = {entry.name: i for i, entry in enumerate(self.entries)}
        return self._positions


# What a Relisting knows of a name: UNKNOWN when it cannot tell (ask S3 about the name).
ABSENT = "absent"
UNKNOWN = "unknown"


class Relisting:
    """A directory listed again, page by page, to answer lookups of its names.

    Lookups wait for the page that decides their name when the directory's size is known
    to be small (``waits``); otherwise they take what is listed already and ask S3 about
    names not reached yet."""

    def __init__(self, prefix: str, *, waits: bool) -> None:
        self._prefix = prefix
        self.waits = waits
        self.found: dict[str, tuple[Entry, float]] = {}  # name -> entry, valid until
        self.listed_through = ""
        self.complete = False  # the whole directory is listed
        self.ended = False  # complete, or stopped (error, change, size cap)
        self.invalidated = False
        self.error: FsError | None = None
        self._progress = trio.Event()

    def advance(self, listed_through: str, complete: bool) -> None:
        self.listed_through = listed_through
        self.complete = complete
        self._wake()

    def finish(self, *, error: FsError | None = None, invalidated: bool = False) -> None:
        self.error = self.error or error
        self.invalidated = self.invalidated or invalidated
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        progress, self._progress = self._progress, trio.Event()
        progress.set()

    async def find(self, name: str) -> tuple[Entry, float] | str:
        """The entry ``name`` has in the new listing and until when it is valid, ABSENT,
        or UNKNOWN."""
        directory_key = self._prefix + name + "/"
        while True:
            if self.invalidated:
                return UNKNOWN
            if name in self.found:
                return self.found[name]
            if self.complete or self.listed_through > directory_key:
                return ABSENT
            if self.error is not None and self.waits:
                raise self.error
            if self.ended or not self.waits:
                return UNKNOWN
            await self._progress.wait()


class Directories:
    def __init__(self, client: ObjectClient, inodes: InodeTable, ttl: float) -> None:
        self._client = client
        self._inodes = inodes
        self._ttl = ttl
        self._listings: dict[int, _CachedListing] = {}
        self._cached_entries = 0
        self._relistings: dict[int, Relisting] = {}
        self._nursery: trio.Nursery | None = None
        # Per directory listed completely: its size then, and the lookups in S3 counted
        # towards listing it again (count, time of the first). They outlive the cached
        # listing, which any change drops.
        self._sizes: dict[int, int] = {}
        self._s3_lookups: dict[int, tuple[int, float]] = {}

    def start(self, nursery: trio.Nursery) -> None:
        """Relistings run in ``nursery``: lookups of several names wait on one."""
        self._nursery = nursery

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
        self._sizes[inode.ino] = len(entries)
        self._s3_lookups.pop(inode.ino, None)
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
        relisting = self._relistings.pop(ino, None)
        if relisting is not None:
            relisting.finish(invalidated=True)

    def contradicted(self, parent: Inode, name: str, kind: Kind | None) -> None:
        """S3 just said ``name`` is of ``kind`` (None: does not exist): drop the cached
        listing of ``parent`` if it says otherwise."""
        cached = self._listings.get(parent.ino)
        if cached is None:
            return
        entry = cached.by_name.get(name)
        listed_kind = None if entry is None else (Kind.DIR if entry.is_dir else Kind.FILE)
        if listed_kind is not kind:
            self.forget(parent.ino)

    def drop(self, ino: int) -> None:
        """The directory ``ino`` is gone from the inode table."""
        self.forget(ino)
        self._sizes.pop(ino, None)
        self._s3_lookups.pop(ino, None)

    def listed(self, parent: Inode, name: str, known: Inode | None) -> tuple[Entry, float] | str:
        """What a complete listing of ``parent`` within its TTL, newer than what was
        ``known`` of the name, says of it: its entry and until when it is valid, ABSENT
        (not in S3, as far as the TTL goes), or UNKNOWN (no such listing). A name never
        seen is not ABSENT with an indefinite TTL: a name created elsewhere after the
        listing is still found by looking it up."""
        cached = self._listings.get(parent.ino)
        if cached is None or time.monotonic() >= cached.valid_until:
            return UNKNOWN
        if known is not None and cached.valid_until <= known.valid_until:
            return UNKNOWN
        entry = cached.by_name.get(name)
        if entry is not None:
            return entry, cached.valid_until
        return ABSENT if known is not None or math.isfinite(self._ttl) else UNKNOWN

    def position(self, parent: Inode, name: str) -> tuple[list[Entry], int] | None:
        """A complete listing of ``parent`` within its TTL (in key order) and the place of
        ``name`` in it."""
        cached = self._listings.get(parent.ino)
        if cached is None or time.monotonic() >= cached.valid_until:
            return None
        index = cached.positions.get(name)
        return None if index is None else (cached.entries, index)

    # -- listing again, for lookups of names in S3 ----------------------------------------

    def relisting(self, parent: Inode) -> Relisting | None:
        """A new listing of ``parent`` to look a name up in: the one running, or a new one
        when ``parent`` is being gone through (see RELIST_AFTER). None: ask S3 about the
        name itself. (Whether the name was listed before cannot be told: the kernel
        forgets the inodes of expired entries as soon as nothing uses them.)"""
        running = self._relistings.get(parent.ino)
        if running is not None:
            return running
        size = self._sizes.get(parent.ino)  # None: never listed in full
        if self._nursery is None or self._ttl <= 0 or (size is not None and size > RELIST_MAX_ENTRIES):
            return None
        now = time.monotonic()
        count, first = self._s3_lookups.get(parent.ino, (0, now))
        if now - first > 2 * self._ttl:
            count, first = 0, now
        self._s3_lookups[parent.ino] = (count + 1, first)
        if count + 1 < RELIST_AFTER:
            return None
        relisting = self._relistings[parent.ino] = Relisting(parent.key, waits=size is not None)
        self._nursery.start_soon(self._relist, parent, relisting)
        return relisting

    async def _relist(self, parent: Inode, relisting: Relisting) -> None:
        listing = DirectoryListing(self._client, parent.key)
        entries: list[Entry] = []
        deadline = self._deadline()
        try:
            while not listing.done:
                if len(entries) > RELIST_MAX_ENTRIES:
                    self._sizes[parent.ino] = len(entries)  # at least: not again until listed in full
                    return
                batch = await listing.next_batch()
                if relisting.invalidated:
                    return  # the directory changed here meanwhile: what was listed may be old
                deadline = self._deadline()
                for entry in batch:
                    # Not remembered as inodes here: only the names looked up become
                    # inodes, with a kernel reference that frees them again.
                    relisting.found[entry.name] = (entry, deadline)
                entries.extend(batch)
                relisting.advance(listing.listed_through, listing.done)
            del self._relistings[parent.ino]  # before _cache, which would call it outdated
            self._cache(parent, entries, deadline)
        except ObjectClientError as exc:
            relisting.finish(error=from_store(exc, during="lookup"))
        except Exception as exc:
            relisting.finish(error=unexpected(exc, during="lookup", key=parent.key))
        finally:
            if self._relistings.get(parent.ino) is relisting:
                del self._relistings[parent.ino]
            relisting.finish()

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
