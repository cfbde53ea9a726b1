"""Inodes: what the kernel holds references to, and the metadata cached for each.

A file inode stands for an object key, a directory inode for a key prefix. An inode lives
while the kernel references it (lookup count) or while it is the current entry of its name
in its parent; a name whose kind changes in S3 gets a new inode, so the kernel never sees
a file turn into a directory under the same inode number.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

ROOT_INODE = 1  # FUSE's fixed root inode number


class Kind(enum.Enum):
    FILE = "file"
    DIR = "dir"


@dataclass(slots=True)
class Inode:
    ino: int
    parent: int
    name: str
    kind: Kind
    key: str  # files: the object key; directories: the prefix, '' or ending in '/'
    size: int = 0
    mtime: float = 0.0
    etag: str | None = None
    valid_until: float = 0.0  # time.monotonic() until which the attributes are trusted
    lookups: int = 0  # references the kernel holds (lookup, create, readdirplus)
    open_etag: str | None = None  # ETag when last opened: lets the kernel keep page cache

    @property
    def is_dir(self) -> bool:
        return self.kind is Kind.DIR

    def is_fresh(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) < self.valid_until


class InodeTable:
    """Inodes by number and by (parent, name)."""

    def __init__(self, root_key: str, mount_time: float) -> None:
        root = Inode(ROOT_INODE, ROOT_INODE, "", Kind.DIR, root_key, mtime=mount_time, lookups=1,
                     valid_until=float("inf"))
        self._by_ino: dict[int, Inode] = {ROOT_INODE: root}
        self._children: dict[tuple[int, str], int] = {}
        self._next_ino = ROOT_INODE + 1
        self.mount_time = mount_time

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Inode | None:
        return self._by_ino.get(ino)

    def child(self, parent: int, name: str) -> Inode | None:
        ino = self._children.get((parent, name))
        return self._by_ino.get(ino) if ino is not None else None

    def upsert(
        self,
        parent: Inode,
        name: str,
        kind: Kind,
        *,
        size: int = 0,
        mtime: float | None = None,
        etag: str | None = None,
        valid_until: float,
    ) -> Inode:
        """The inode for ``name`` in ``parent`` as S3 now shows it, reusing the current one
        when the kind is unchanged."""
        current = self.child(parent.ino, name)
        if current is None or current.kind is not kind:
            if current is not None:
                self._unlink(current)
            key = parent.key + name + ("/" if kind is Kind.DIR else "")
            current = Inode(self._next_ino, parent.ino, name, kind, key)
            self._next_ino += 1
            self._by_ino[current.ino] = current
            self._children[(parent.ino, name)] = current.ino
        if kind is Kind.FILE:
            current.size = size
            current.etag = etag
            current.mtime = mtime if mtime is not None else current.mtime
        elif current.mtime == 0.0:
            current.mtime = mtime if mtime is not None else self.mount_time
        current.valid_until = valid_until
        return current

    def remove_child(self, parent: int, name: str) -> None:
        """S3 says ``name`` no longer exists: forget the name, keep the inode while referenced."""
        current = self.child(parent, name)
        if current is not None:
            self._unlink(current)

    def _unlink(self, inode: Inode) -> None:
        self._children.pop((inode.parent, inode.name), None)
        inode.valid_until = 0.0
        if inode.lookups == 0:
            self._by_ino.pop(inode.ino, None)

    def add_lookup(self, inode: Inode) -> None:
        inode.lookups += 1

    def forget(self, ino: int, count: int) -> None:
        inode = self._by_ino.get(ino)
        if inode is None or ino == ROOT_INODE:
            return
        inode.lookups = max(0, inode.lookups - count)
        if inode.lookups == 0:
            linked = self._children.get((inode.parent, inode.name)) == ino
            # Files are cheap to look up again; a directory stays while it is its parent's
            # current entry so that its inode number is stable across kernel evictions.
            if linked and inode.is_dir:
                return
            if linked:
                del self._children[(inode.parent, inode.name)]
            del self._by_ino[ino]
