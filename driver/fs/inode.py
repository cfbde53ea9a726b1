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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from driver.fs.blockfill import BlockFill

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
    # Exists only in this mount so far: a directory made by mkdir, or a file being
    # created. S3 knows nothing of it; listings and lookups must not make it disappear.
    local: bool = False
    writer: object | None = None  # the handle writing this file, if any
    readers: int = 0  # open read handles
    pins: int = 0  # local entries below this directory: it exists while they do
    fill: BlockFill | None = None  # blocks around random reads, for the kernel's page cache

    @property
    def is_dir(self) -> bool:
        return self.kind is Kind.DIR

    @property
    def held(self) -> bool:
        """This mount's own doing keeps it in place, whatever S3 shows."""
        return self.local or self.pins > 0 or self.writer is not None

    def is_fresh(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) < self.valid_until


class InodeTable:
    """Inodes by number and by (parent, name)."""

    def __init__(self, root_key: str, mount_time: float) -> None:
        root = Inode(ROOT_INODE, ROOT_INODE, "", Kind.DIR, root_key, mtime=mount_time, lookups=1,
                     valid_until=float("inf"))
        self._by_ino: dict[int, Inode] = {ROOT_INODE: root}
        self._children: dict[tuple[int, str], int] = {}
        self._held: dict[int, set[str]] = {}  # parent -> names of children that are held
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
        if current is not None and current.writer is not None:
            return current  # being written here: this mount's view wins until it is uploaded
        if current is not None and current.held and current.is_dir and kind is Kind.FILE:
            return current  # a directory this mount needs wins over an object of the same name
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

    def add_local(self, parent: Inode, name: str, kind: Kind, *, mtime: float) -> Inode:
        """A new entry that exists only in this mount (mkdir, create)."""
        current = self.child(parent.ino, name)
        if current is not None:
            self._unlink(current)
        key = parent.key + name + ("/" if kind is Kind.DIR else "")
        inode = Inode(self._next_ino, parent.ino, name, kind, key, mtime=mtime, local=True,
                      valid_until=float("inf"))
        self._next_ino += 1
        self._by_ino[inode.ino] = inode
        self._children[(parent.ino, name)] = inode.ino
        self._pin_ancestors(inode, +1)
        self._update_held(inode)
        return inode

    def settle(self, inode: Inode) -> list[Inode]:
        """``inode`` now exists in S3 (its upload completed); so do the local directories
        above it. Returns the inodes that changed."""
        settled = []
        while inode.local:
            settled.append(inode)
            inode.local = False
            self._pin_ancestors(inode, -1)
            self._update_held(inode)
            parent = self._by_ino.get(inode.parent)
            if parent is None or parent.ino == inode.ino:
                break
            inode = parent
        return settled

    def held_children(self, parent: int) -> list[Inode]:
        """Children this mount holds in place: local entries and directories above them."""
        found = []
        for name in sorted(self._held.get(parent, ())):
            child = self.child(parent, name)
            if child is not None:
                found.append(child)
        return found

    def _pin_ancestors(self, inode: Inode, delta: int) -> None:
        ino = inode.parent
        while ino != ROOT_INODE:
            ancestor = self._by_ino.get(ino)
            if ancestor is None:
                break
            ancestor.pins += delta
            self._update_held(ancestor)
            ino = ancestor.parent

    def _update_held(self, inode: Inode) -> None:
        names = self._held.setdefault(inode.parent, set())
        if inode.local or inode.pins > 0:
            names.add(inode.name)
        else:
            names.discard(inode.name)
            if not names:
                del self._held[inode.parent]

    def remove_child(self, parent: int, name: str) -> None:
        """S3 says ``name`` no longer exists: forget the name, keep the inode while referenced."""
        current = self.child(parent, name)
        if current is not None:
            self._unlink(current)

    def _unlink(self, inode: Inode) -> None:
        self._children.pop((inode.parent, inode.name), None)
        if inode.local:
            inode.local = False
            self._pin_ancestors(inode, -1)
            self._update_held(inode)
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
