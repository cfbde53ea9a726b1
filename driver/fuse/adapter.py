"""pyfuse3 Operations over ``driver.fs.core.Filesystem``: translation only.

Every handler goes through ``_errors``, the one place where filesystem errors become
``FUSEError`` and anything unexpected becomes EIO instead of stopping the FUSE loop.
Operations this class does not define (xattrs, fallocate, locks) keep pyfuse3's ENOSYS:
for xattrs and fallocate the kernel then answers EOPNOTSUPP itself and stops asking (so
``ls -l`` costs no xattr round trips), and locks stay local to this node's kernel.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import stat
from collections.abc import Iterator

import pyfuse3
import structlog
import trio

from driver import metrics
from driver.fs.core import Filesystem, wants_write
from driver.fs.errors import FsError
from driver.fs.inode import Inode
from driver.fuse.openers import holds_open
from driver.mountpoint import mount_device

log = structlog.get_logger("pail.fuse")

# The kernel takes entry and attribute timeouts in seconds; 'indefinite' becomes ten years.
KERNEL_TTL_MAX = 10 * 365 * 24 * 3600.0
_NS = 1_000_000_000
# Expected answers, not failures worth a warning.
# notify_store in pieces: the kernel locks each page it stores, one piece at a time.
STORE_PIECE = 1024 * 1024
_QUIET_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.ENAMETOOLONG, errno.EEXIST,
                 errno.ENOTEMPTY, errno.EPERM, errno.EINVAL, errno.ENOSYS}


@contextlib.contextmanager
def _errors(op: str, **fields: object) -> Iterator[None]:
    """Turn the core's errors into the kernel's, logged and counted."""
    try:
        yield
    except FsError as exc:
        level = log.debug if exc.errno in _QUIET_ERRNOS else log.warning
        level("operation failed", op=op, errno=errno.errorcode.get(exc.errno, exc.errno),
              reason=exc.reason, **fields, **exc.fields)
        metrics.fuse_operation(op, exc.errno)
        raise pyfuse3.FUSEError(exc.errno) from None
    except pyfuse3.FUSEError as exc:
        metrics.fuse_operation(op, exc.errno)
        raise
    except Exception:
        log.exception("operation failed unexpectedly", op=op, **fields)
        metrics.fuse_operation(op, errno.EIO)
        raise pyfuse3.FUSEError(errno.EIO) from None
    metrics.fuse_operation(op)


def _store_in_kernel(ino: int, offset: int, data: memoryview) -> None:
    try:
        for at in range(0, len(data), STORE_PIECE):
            pyfuse3.notify_store(ino, offset + at, data[at:at + STORE_PIECE])
    except OSError as exc:  # ENOENT: the kernel forgot the inode; ENODEV: unmounted
        log.debug("pages not stored", inode=ino, offset=offset, size=len(data), error=exc.strerror)
        return
    metrics.block_fill()


class Operations(pyfuse3.Operations):
    """Each method: log at debug, call the core, convert the result."""

    def __init__(self, fs: Filesystem, mountpoint: str) -> None:
        super().__init__()
        self.fs = fs
        self.mountpoint = mountpoint
        self._device_id: str | None = None
        self._warned_unknown_opener = False
        ttl = fs.settings.metadata_ttl
        self._ttl = KERNEL_TTL_MAX if math.isinf(ttl) else ttl
        fs.on_attributes_changed = self._invalidate_attributes
        if not fs.settings.direct_io:  # with direct_io, reads never look in the page cache
            fs.store_pages = self._store_pages

    @staticmethod
    def _invalidate_attributes(ino: int) -> None:
        try:
            # Attributes only: without writeback caching this does not block.
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError as exc:  # ENOENT: the kernel holds nothing for this inode
            log.debug("attribute invalidation skipped", inode=ino, error=exc.strerror)

    @staticmethod
    async def _store_pages(ino: int, offset: int, data: memoryview) -> None:
        # In a thread, not on the loop: a page may be locked by a read the kernel sent us,
        # which this loop must answer before the store can take that page.
        await trio.to_thread.run_sync(_store_in_kernel, ino, offset, data)

    # -- conversion ----------------------------------------------------------------------

    def _attributes(self, inode: Inode) -> pyfuse3.EntryAttributes:
        settings = self.fs.settings
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode.ino
        attr.generation = 0
        attr.entry_timeout = self._ttl
        attr.attr_timeout = self._ttl
        if inode.is_dir:
            attr.st_mode = stat.S_IFDIR | settings.dir_mode
            attr.st_nlink = 2
            attr.st_size = 0
        else:
            attr.st_mode = stat.S_IFREG | settings.file_mode
            attr.st_nlink = 1
            attr.st_size = inode.size
        attr.st_uid = settings.uid
        attr.st_gid = settings.gid
        attr.st_blksize = 512 * 1024  # large reads suit S3 better than 4 KiB ones
        attr.st_blocks = (attr.st_size + 511) // 512
        mtime_ns = int(inode.mtime * _NS)
        attr.st_mtime_ns = attr.st_ctime_ns = attr.st_atime_ns = mtime_ns
        return attr

    # -- names and attributes ------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        text = os.fsdecode(name)
        log.debug("lookup", op="lookup", parent=parent_inode, name=text)
        try:
            with _errors("lookup", parent=parent_inode, name=text):
                return self._attributes(await self.fs.lookup(parent_inode, text))
        except pyfuse3.FUSEError as exc:
            if exc.errno == errno.ENOENT and self._ttl > 0:
                # Let the kernel cache the miss for the TTL, as it caches hits.
                miss = pyfuse3.EntryAttributes()
                miss.st_ino = 0
                miss.entry_timeout = self._ttl
                return miss
            raise

    async def forget(self, inode_list):
        for ino, count in inode_list:
            self.fs.forget(ino, count)

    async def getattr(self, inode, ctx=None):
        log.debug("getattr", op="getattr", inode=inode)
        with _errors("getattr", inode=inode):
            return self._attributes(await self.fs.getattr(inode))

    async def statfs(self, ctx):
        info = self.fs.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = info["block_size"]
        data.f_blocks = info["blocks"]
        data.f_bfree = data.f_bavail = info["free"]
        data.f_files = info["files"]
        data.f_ffree = data.f_favail = info["files_free"]
        data.f_namemax = info["name_max"]
        return data

    # -- directories ---------------------------------------------------------------------

    async def opendir(self, inode, ctx):
        log.debug("opendir", op="opendir", inode=inode)
        with _errors("opendir", inode=inode):
            fh = await self.fs.opendir(inode)
        metrics.handles(+1)
        return fh

    async def readdir(self, fh, start_id, token):
        log.debug("readdir", op="readdir", fh=fh, start=start_id)

        def emit(name: str, inode: Inode, next_id: int) -> bool:
            return pyfuse3.readdir_reply(token, os.fsencode(name), self._attributes(inode), next_id)

        with _errors("readdir", fh=fh):
            await self.fs.readdir(fh, start_id, emit)

    async def releasedir(self, fh):
        metrics.handles(-1)
        self.fs.releasedir(fh)

    # -- files ---------------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        log.debug("open", op="open", inode=inode, flags=flags, pid=ctx.pid)
        with _errors("open", inode=inode):
            fh, keep_cache = await self.fs.open(inode, flags, ctx.pid)
        metrics.handles(+1)
        # Reads only: writing 1 GiB measured the same either way (the upload is what limits it).
        direct_io = self.fs.settings.direct_io and not wants_write(flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache, direct_io=direct_io)

    async def read(self, fh, off, size):
        log.debug("read", op="read", fh=fh, offset=off, size=size)
        with _errors("read", fh=fh, offset=off, size=size):
            data = await self.fs.read(fh, off, size)
        metrics.read_bytes(len(data))
        return data

    async def create(self, parent_inode, name, mode, flags, ctx):
        text = os.fsdecode(name)
        log.debug("create", op="create", parent=parent_inode, name=text, flags=flags, pid=ctx.pid)
        with _errors("create", parent=parent_inode, name=text):
            inode, fh = await self.fs.create(parent_inode, text, flags, ctx.pid)
        metrics.handles(+1)
        return pyfuse3.FileInfo(fh=fh), self._attributes(inode)

    async def write(self, fh, off, buf):
        log.debug("write", op="write", fh=fh, offset=off, size=len(buf))
        with _errors("write", fh=fh, offset=off, size=len(buf)):
            written = await self.fs.write(fh, off, buf)
        metrics.written_bytes(written)
        return written

    async def flush(self, fh):
        log.debug("flush", op="flush", fh=fh)
        with _errors("flush", fh=fh):
            handle = self.fs.write_handle(fh)
            if handle is not None:
                held = holds_open(handle.opener_pid, handle.inode.ino, self._device())
                if held is None and not self._warned_unknown_opener:
                    self._warned_unknown_opener = True
                    log.warning("writer not visible from this PID namespace: uploads complete at release, "
                                "after close() returned (run the CSI node plugin with hostPID: true)",
                                op="flush", pid=handle.opener_pid)
                # Unknown (pid outside this namespace): the release completes the upload.
                await self.fs.flush(fh, opener_done=held is False)

    async def fsync(self, fh, datasync):
        log.debug("fsync", op="fsync", fh=fh)
        with _errors("fsync", fh=fh):
            await self.fs.fsync(fh)

    async def release(self, fh):
        log.debug("release", op="release", fh=fh)
        metrics.handles(-1)  # gone for the kernel, whatever the upload's outcome
        with _errors("release", fh=fh):
            await self.fs.release(fh)

    async def setattr(self, inode, attr, fields, fh, ctx):
        log.debug("setattr", op="setattr", inode=inode)
        with _errors("setattr", inode=inode):
            updated = await self.fs.setattr(
                inode,
                size=attr.st_size if fields.update_size else None,
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                times=fields.update_atime or fields.update_mtime,
            )
            return self._attributes(updated)

    # -- directories and names -------------------------------------------------------------

    async def mkdir(self, parent_inode, name, mode, ctx):
        text = os.fsdecode(name)
        log.debug("mkdir", op="mkdir", parent=parent_inode, name=text)
        with _errors("mkdir", parent=parent_inode, name=text):
            return self._attributes(await self.fs.mkdir(parent_inode, text))

    async def rmdir(self, parent_inode, name, ctx):
        text = os.fsdecode(name)
        log.debug("rmdir", op="rmdir", parent=parent_inode, name=text)
        with _errors("rmdir", parent=parent_inode, name=text):
            await self.fs.rmdir(parent_inode, text)

    async def unlink(self, parent_inode, name, ctx):
        text = os.fsdecode(name)
        log.debug("unlink", op="unlink", parent=parent_inode, name=text)
        with _errors("unlink", parent=parent_inode, name=text):
            await self.fs.unlink(parent_inode, text)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        text = os.fsdecode(name_old)
        log.debug("rename", op="rename", parent=parent_inode_old, name=text)
        with _errors("rename", parent=parent_inode_old, name=text):
            await self.fs.rename(parent_inode_old, text)

    async def _refuse(self, op: str, reason: str):
        with _errors(op):
            raise FsError(errno.EPERM if not self.fs.settings.read_only else errno.EROFS, reason)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        await self._refuse("link", "S3 has no links")

    async def symlink(self, parent_inode, name, target, ctx):
        await self._refuse("symlink", "S3 has no links")

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        await self._refuse("mknod", "only regular files and directories exist in S3")

    def _device(self) -> str:
        if self._device_id is None:
            self._device_id = mount_device(self.mountpoint) or ""
        return self._device_id
