"""The filesystem: names, attributes, reads and writes, over an ObjectClient.

Operations take and return plain values (inode numbers, ``Inode`` records, bytes) and
raise ``FsError``; ``driver.fuse`` turns them into kernel replies. Metadata is cached for
``metadata_ttl`` seconds: within it, a lookup or ``stat`` answers from what the last
listing or HEAD said; after it, S3 is asked again. Files are read through a
``Prefetcher`` and written through an ``Upload``; directory work is in ``directories``.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
import trio

from driver.config import FsSettings
from driver.fs.blockfill import BlockFill, PageStore, ReadWaits
from driver.fs.directories import ABSENT, UNKNOWN, DirHandle, Directories
from driver.fs.errors import FsError, from_store
from driver.fs.inode import Inode, InodeTable, Kind
from driver.fs.names import DELIMITER, NAME_MAX, is_valid_name
from driver.fs.nextfiles import NextFiles
from driver.fs.parts import part_size, request_unit
from driver.fs.prefetch import MemoryBudget, PrefetchConfig, Prefetcher
from driver.fs.upload import Upload
from driver.s3.api import ListPage, NoSuchKey, ObjectClient, ObjectClientError

log = structlog.get_logger("pail.fs")
_H = TypeVar("_H", "ReadHandle", "WriteHandle", DirHandle)

_ACCESS = os.O_RDONLY | os.O_WRONLY | os.O_RDWR


@dataclass(eq=False)
class ReadHandle:
    inode: Inode
    reader: Prefetcher


@dataclass(eq=False)
class WriteHandle:
    inode: Inode
    upload: Upload
    opener_pid: int  # the process that opened it: its last close completes the upload
    committed: bool = False  # fsync completed the object: no more writes


def wants_write(flags: int) -> bool:
    """Whether an open with these flags makes a write handle (a new object)."""
    return (flags & _ACCESS) != os.O_RDONLY or bool(flags & (os.O_TRUNC | os.O_APPEND))


class Filesystem:
    """One mounted bucket (or prefix)."""

    def __init__(self, client: ObjectClient, settings: FsSettings) -> None:
        self.client = client
        self.settings = settings
        self.inodes = InodeTable(settings.prefix, mount_time=time.time())
        self.directories = Directories(client, self.inodes, settings.metadata_ttl)
        self.budget = MemoryBudget(settings.max_memory)
        self._prefetch = PrefetchConfig(settings.min_request, settings.max_request, settings.max_ahead)
        self.next_files = NextFiles(client, self.budget)
        self._handles: dict[int, ReadHandle | WriteHandle | DirHandle] = {}
        self._next_fh = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        # Called with an inode number when its size or mtime changed outside a reply to the
        # kernel; the FUSE adapter invalidates the kernel's cached attributes.
        self.on_attributes_changed: Callable[[int], None] = lambda ino: None
        # Gives bytes to the kernel's page cache; set by the FUSE adapter when reads go
        # through that cache. Without it, random reads are never filled around.
        self.store_pages: PageStore | None = None
        self.read_waits = ReadWaits()

    def start(self, nursery: trio.Nursery) -> None:
        """Background work (prefetch, part uploads, relistings) runs in ``nursery``, which
        outlives handles."""
        self._nursery = nursery
        self.directories.start(nursery)
        self.next_files.start(nursery)

    def _deadline(self) -> float:
        return time.monotonic() + self.settings.metadata_ttl

    def _inode(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is None:
            raise FsError(errno.ENOENT, f"unknown inode {ino}")
        return inode

    def _handle(self, fh: int, kind: type[_H]) -> _H:
        handle = self._handles.get(fh)
        if not isinstance(handle, kind):
            raise FsError(errno.EBADF, f"no such handle {fh}")
        return handle

    def _new_handle(self, handle: ReadHandle | WriteHandle | DirHandle) -> int:
        fh = next(self._next_fh)
        self._handles[fh] = handle
        return fh

    def _writable(self) -> None:
        if self.settings.read_only:
            raise FsError(errno.EROFS, "the mount is read-only")

    # -- names -------------------------------------------------------------------------

    async def lookup(self, parent_ino: int, name: str) -> Inode:
        """The entry ``name`` in a directory; counts one kernel reference on success."""
        parent = self._dir(parent_ino)
        self._check_name(name)
        inode = self.inodes.child(parent.ino, name)
        if inode is None or not (inode.is_fresh() or inode.held):
            inode = await self._lookup_remote(parent, name)
        self.inodes.add_lookup(inode)
        return inode

    def _dir(self, ino: int) -> Inode:
        inode = self._inode(ino)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR, "not a directory")
        return inode

    @staticmethod
    def _check_name(name: str) -> None:
        if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG, "name longer than 255 bytes")
        if not is_valid_name(name):
            raise FsError(errno.ENOENT, "name can never be an S3 key segment")

    async def _lookup_remote(self, parent: Inode, name: str) -> Inode:
        # A listing answers first: a complete one within its TTL, else one started for
        # lookups like this one (see Directories.relisting).
        answer = self.directories.listed(parent, name, self.inodes.child(parent.ino, name))
        if answer is UNKNOWN and (relisting := self.directories.relisting(parent)) is not None:
            answer = await relisting.find(name)
        if answer is ABSENT:
            self.inodes.remove_child(parent.ino, name)
            raise FsError(errno.ENOENT, "no such object or prefix")
        if answer is not UNKNOWN:
            entry, valid_until = answer
            return self.directories.remember(parent, entry, valid_until)
        before = self.inodes.child(parent.ino, name)
        try:
            found = await self._ask_s3(parent, name, was_dir=before is not None and before.is_dir)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                self.directories.contradicted(parent, name, None)
            raise
        self.directories.contradicted(parent, name, found.kind)
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
            self.directories.drop(ino)

    # -- attributes ----------------------------------------------------------------------

    async def getattr(self, ino: int) -> Inode:
        inode = self._inode(ino)
        if inode.is_dir or inode.is_fresh() or inode.held:
            return inode
        try:
            info = await self.client.head_object(inode.key)
        except NoSuchKey:
            self.inodes.remove_child(inode.parent, inode.name)
            self.directories.forget(inode.parent)
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

    async def setattr(self, ino: int, *, size: int | None = None, mode: int | None = None,
                      uid: int | None = None, gid: int | None = None, times: bool = False) -> Inode:
        """Only what S3 can keep: truncating a file being written to 0 (it starts over),
        setting its times while it is written (S3 then keeps the upload's time), a
        directory's times (not stored), and modes or owners equal to the mount's."""
        self._writable()
        inode = self._inode(ino)
        expected_mode = self.settings.dir_mode if inode.is_dir else self.settings.file_mode
        if mode is not None and (mode & 0o7777) != expected_mode:
            raise FsError(errno.EPERM, "modes are mount-wide (--file-mode, --dir-mode)")
        if (uid is not None and uid != self.settings.uid) or (gid is not None and gid != self.settings.gid):
            raise FsError(errno.EPERM, "owners are mount-wide (--uid, --gid)")
        writer = inode.writer if isinstance(inode.writer, WriteHandle) else None
        if size is not None and size != inode.size:
            if writer is None or size != 0:
                raise FsError(errno.EPERM, "S3 objects cannot be truncated; only a file being "
                                           "written can be truncated, to 0")
            await writer.upload.truncate()
            inode.size = 0
        if times and writer is None and not inode.is_dir:
            # A directory's times are not stored anywhere (S3 has no directories): setting
            # them succeeds and changes nothing, as tar x and rsync -a expect.
            raise FsError(errno.EPERM, "times can be set only while a file is being written")
        return inode

    # -- directories ---------------------------------------------------------------------

    async def opendir(self, ino: int) -> int:
        return self._new_handle(self.directories.open(self._inode(ino)))

    async def readdir(self, fh: int, start: int, emit: Callable[[str, Inode, int], bool]) -> None:
        handle = self._handle(fh, DirHandle)
        self._handles[fh] = await self.directories.readdir(handle, start, emit)

    def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def mkdir(self, parent_ino: int, name: str) -> Inode:
        self._writable()
        parent = self._dir(parent_ino)
        self._check_name(name)
        await self._must_not_exist(parent, name)
        inode = self.directories.mkdir(parent, name)
        self.inodes.add_lookup(inode)
        return inode

    async def rmdir(self, parent_ino: int, name: str) -> None:
        self._writable()
        parent = self._dir(parent_ino)
        await self.directories.rmdir(parent, await self.lookup_existing(parent, name))

    async def lookup_existing(self, parent: Inode, name: str) -> Inode:
        """``name`` in ``parent`` as it exists now, without counting a kernel reference."""
        inode = await self.lookup(parent.ino, name)
        inode.lookups -= 1
        return inode

    async def _must_not_exist(self, parent: Inode, name: str) -> None:
        try:
            await self.lookup_existing(parent, name)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
        raise FsError(errno.EEXIST, "exists")

    # -- reading -------------------------------------------------------------------------

    async def open(self, ino: int, flags: int, pid: int = 0) -> tuple[int, bool]:
        """A handle; returns (fh, keep_cache): whether the kernel's cached pages of this
        inode are still the object's bytes."""
        inode = self._inode(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR, "open of a directory")
        if wants_write(flags):
            await self._stop_fill(inode)
            return self._open_for_writing(inode, flags, pid), False
        if inode.writer is not None:
            raise FsError(errno.EPERM, "the file is being written: it can be read once complete")
        if not inode.is_fresh():
            await self.getattr(ino)
        assert inode.etag is not None and self._nursery is not None
        keep_cache = inode.open_etag == inode.etag
        if not keep_cache:
            await self._stop_fill(inode)
        inode.open_etag = inode.etag
        reader = Prefetcher(self.client, inode.key, inode.etag, inode.size, config=self._prefetch,
                            budget=self.budget, nursery=self._nursery, fetched=self.next_files.take(inode),
                            fill=self._fill(inode))
        parent = self.inodes.get(inode.parent)
        if parent is not None:
            self.next_files.opened(inode, self.directories.position(parent, inode.name))
        inode.readers += 1
        return self._new_handle(ReadHandle(inode, reader)), keep_cache

    def _fill(self, inode: Inode) -> BlockFill | None:
        """The block fill of the version being opened, shared by all its handles."""
        if self.store_pages is None or not self.settings.block_fill:
            return None
        assert inode.etag is not None and self._nursery is not None
        fill = inode.fill
        if fill is None or fill.stopped or fill.etag != inode.etag:
            block = request_unit(part_size(inode.etag, inode.size), self.settings.max_request)
            fill = inode.fill = BlockFill(self.client, ino=inode.ino, key=inode.key, etag=inode.etag,
                                          size=inode.size, block=block, budget=self.budget,
                                          nursery=self._nursery, store=self.store_pages, waits=self.read_waits)
        return fill

    @staticmethod
    async def _stop_fill(inode: Inode) -> None:
        """Before the kernel drops its pages of ``inode`` (an open that does not keep them)
        or writes its own: no page of the version read before may arrive after."""
        if inode.fill is not None:
            fill, inode.fill = inode.fill, None
            await fill.stop()

    async def read(self, fh: int, offset: int, length: int) -> bytes | memoryview:
        handle = self._handles.get(fh)
        if isinstance(handle, WriteHandle):
            raise FsError(errno.EPERM, "a file being written cannot be read until it is complete")
        handle = self._handle(fh, ReadHandle)
        try:
            return await handle.reader.read(offset, length)
        except FsError as exc:
            if exc.errno == errno.ESTALE:
                # This handle stays stale; the next open asks S3 for the new version.
                handle.inode.valid_until = 0.0
            raise

    # -- writing -------------------------------------------------------------------------

    async def create(self, parent_ino: int, name: str, flags: int, pid: int = 0) -> tuple[Inode, int]:
        """A new file, written front to back and uploaded when its opener closes it."""
        self._writable()
        parent = self._dir(parent_ino)
        self._check_name(name)
        self._check_write_flags(flags)
        inode = self.inodes.add_local(parent, name, Kind.FILE, mtime=time.time())
        fh = self._start_upload(inode, pid)
        self.inodes.add_lookup(inode)
        return inode, fh

    def _open_for_writing(self, inode: Inode, flags: int, pid: int) -> int:
        self._writable()
        self._check_write_flags(flags)
        if inode.writer is not None:
            raise FsError(errno.EPERM, "the file is already being written")
        if inode.readers:
            raise FsError(errno.EPERM, "the file is open for reading")
        if not (self.settings.allow_overwrite and flags & os.O_TRUNC):
            raise FsError(errno.EPERM, "existing objects are replaced only with --allow-overwrite "
                                       "and O_TRUNC")
        inode.size = 0
        return self._start_upload(inode, pid)

    @staticmethod
    def _check_write_flags(flags: int) -> None:
        if flags & os.O_DSYNC:  # O_SYNC includes O_DSYNC
            raise FsError(errno.EINVAL, "O_SYNC/O_DSYNC: S3 cannot persist each write; use fsync")

    def _start_upload(self, inode: Inode, pid: int) -> int:
        assert self._nursery is not None
        upload = Upload(self.client, inode.key, part_size=self.settings.write_part_size,
                        parts_in_flight=self.settings.parts_in_flight, budget=self.budget,
                        nursery=self._nursery)
        handle = WriteHandle(inode, upload, pid)
        inode.writer = handle
        inode.mtime = upload.started
        return self._new_handle(handle)

    def write_handle(self, fh: int) -> WriteHandle | None:
        handle = self._handles.get(fh)
        return handle if isinstance(handle, WriteHandle) else None

    async def write(self, fh: int, offset: int, data: bytes | memoryview) -> int:
        handle = self._handle(fh, WriteHandle)
        if handle.committed:
            raise FsError(errno.EPERM, "write after fsync: the object is complete")
        written = await handle.upload.write(offset, data)
        handle.inode.size = handle.upload.size
        return written

    async def flush(self, fh: int, *, opener_done: bool) -> None:
        """A descriptor was closed. Only when the process that opened the file has closed
        its last descriptor of it (``opener_done``) is the upload completed here, so that
        close() reports its outcome; other flushes (a dup, a forked child) change nothing."""
        handle = self._handles.get(fh)
        if isinstance(handle, WriteHandle) and opener_done:
            await self._commit(handle)

    async def fsync(self, fh: int) -> None:
        handle = self._handles.get(fh)
        if isinstance(handle, WriteHandle):
            await self._commit(handle)

    async def _commit(self, handle: WriteHandle) -> None:
        handle.committed = True
        inode = handle.inode
        try:
            info = await handle.upload.complete()
        except FsError:
            self._drop_failed(handle)
            raise
        if inode.writer is handle:
            inode.writer = None
            inode.size, inode.etag, inode.mtime = info.size, info.etag, info.mtime
            inode.valid_until = self._deadline()
            # Cached listings of the directories above no longer show what exists: the
            # file, and local directories that are now key prefixes.
            self.directories.forget(inode.parent)
            for settled in self.inodes.settle(inode):
                self.directories.forget(settled.parent)

    def _drop_failed(self, handle: WriteHandle) -> None:
        """A failed new file never existed in S3: it disappears. A failed overwrite leaves
        the object as it was; its metadata is asked of S3 again."""
        inode = handle.inode
        if inode.writer is handle:
            inode.writer = None
            inode.valid_until = 0.0
            if inode.local:
                self.inodes.remove_child(inode.parent, inode.name)

    async def release(self, fh: int) -> None:
        """The last descriptor of a handle is gone: a write not completed yet completes
        now (errors can only be logged: nobody is left to tell)."""
        handle = self._handles.pop(fh, None)
        if isinstance(handle, ReadHandle):
            handle.reader.close()
            handle.inode.readers -= 1
        elif isinstance(handle, WriteHandle) and not handle.upload.done:
            try:
                await self._commit(handle)
            except FsError as exc:
                log.error("upload failed after the last close", op="release", key=handle.inode.key,
                          errno=exc.errno, reason=exc.reason)

    # -- removing and renaming ----------------------------------------------------------

    async def unlink(self, parent_ino: int, name: str) -> None:
        self._writable()
        parent = self._dir(parent_ino)
        inode = await self.lookup_existing(parent, name)
        if inode.is_dir:
            raise FsError(errno.EISDIR, "unlink of a directory")
        if inode.writer is not None:
            raise FsError(errno.EPERM, "the file is being written")
        if not self.settings.allow_delete:
            raise FsError(errno.EPERM, "deleting objects needs --allow-delete")
        try:
            await self.client.delete_object(inode.key)
        except ObjectClientError as exc:
            raise from_store(exc, during="unlink") from None
        self.inodes.remove_child(parent.ino, name)
        self.directories.forget(parent.ino)

    async def rename(self, parent_ino: int, name: str) -> None:
        """Always refused: S3 has no rename, and copying would not be atomic."""
        self._writable()
        inode = await self.lookup_existing(self._dir(parent_ino), name)
        if inode.is_dir:
            raise FsError(errno.EPERM, "directories cannot be renamed")
        raise FsError(errno.ENOSYS, "S3 has no rename")

    # -- the mount -----------------------------------------------------------------------

    def statfs(self) -> dict[str, int]:
        # S3 has no capacity to report; large round numbers keep tools that check free
        # space before writing (installers, tar) from refusing.
        block = 4096
        blocks = 2**50 // block
        return {"block_size": block, "blocks": blocks, "free": blocks, "files": 2**32, "files_free": 2**32,
                "name_max": 255}

    async def aclose(self) -> None:
        """The mount is ending while files may still be open. A file still being written
        was not closed by its writer: completing it would make a truncated object, so its
        upload is aborted (and the writer's next call fails, ENOTCONN)."""
        for fh, handle in list(self._handles.items()):
            if isinstance(handle, WriteHandle) and not handle.upload.done:
                log.warning("unmounted while being written: upload aborted", op="unmount",
                            key=handle.inode.key, size=handle.upload.size)
                await handle.upload.abort()
                self._handles.pop(fh, None)
            else:
                await self.release(fh)
        self.next_files.close()
        await self.client.aclose()
