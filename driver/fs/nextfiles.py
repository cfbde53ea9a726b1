"""Fetching the next files of a directory that is being read in order.

A program that reads the files of a directory one after another (``cat dir/*``, ``cp -r``,
a loader going through a sorted list) waits for one GET per file: for small files, that
latency is the whole cost. When a file is opened right after the one before it in the
directory's listing order, the next few small files of that listing are fetched whole, in
parallel, and handed to whoever opens them. It starts at the third file opened in order, so
that a program reading in random order rarely starts it by chance.

What makes it safe: each GET carries If-Match with the ETag the listing gave, and a fetched
body is used only by an open that found the same ETag; anything else is dropped unread. What
bounds it: only files up to SMALL_FILE bytes, at most AHEAD of them per directory, memory
from the mount's budget only when it is free, the bodies nobody opened dropped as the reader
moves on, and at most MAX_FETCHED held for all directories together. A program reading in
another order never starts it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import trio

from driver.fs.inode import Inode
from driver.fs.listing import Entry
from driver.fs.prefetch import Chunk, MemoryBudget, cancel, fetch
from driver.s3.api import ObjectClient

SMALL_FILE = 1024 * 1024
AHEAD = 8
# Opening the entry one or two places after the last one opened counts as in order: a
# program may skip a file, and parallel readers of one list open files slightly out of turn.
IN_ORDER_STEP = 2
# Opens in order, after the first, before files are fetched ahead.
IN_ORDER_OPENS = 2
# Directories whose last open position is remembered.
TRACKED_DIRECTORIES = 64
# Bodies held for all directories together: a program that stops in the middle of a
# directory leaves what was fetched for it until others push it out.
MAX_FETCHED = 2 * AHEAD


@dataclass(eq=False)
class _Fetched:
    directory: int
    position: int  # in the directory's listing
    etag: str
    chunk: Chunk


class NextFiles:
    """The bodies fetched ahead of the readers of one mount."""

    def __init__(self, client: ObjectClient, budget: MemoryBudget) -> None:
        self._client = client
        self._budget = budget
        self._nursery: trio.Nursery | None = None
        # directory -> listing position last opened, opens in order up to it
        self._last_opened: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self._fetched: dict[str, _Fetched] = {}  # by object key

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def take(self, inode: Inode) -> Chunk | None:
        """The body fetched for ``inode``'s version, if any: the reader starts with it."""
        fetched = self._fetched.pop(inode.key, None)
        if fetched is None:
            return None
        if fetched.etag != inode.etag or (fetched.chunk.done.is_set() and fetched.chunk.error is not None):
            cancel(fetched.chunk, self._budget)
            return None
        return fetched.chunk

    def opened(self, inode: Inode, place: tuple[list[Entry], int] | None) -> None:
        """``inode`` was opened for reading; ``place``: its directory's last complete
        listing (in key order) and the position of its entry there, if known."""
        if place is None or self._nursery is None:
            return
        listing, position = place
        directory = inode.parent
        last, in_order = self._last_opened.pop(directory, (None, 0))
        in_order = in_order + 1 if last is not None and 0 < position - last <= IN_ORDER_STEP else 0
        self._last_opened[directory] = (position, in_order)
        while len(self._last_opened) > TRACKED_DIRECTORIES:
            self._last_opened.popitem(last=False)
        self._drop_passed(directory, position)
        if in_order < IN_ORDER_OPENS:
            return
        wanted = 0
        for index in range(position + 1, min(len(listing), position + 1 + 2 * AHEAD)):
            if wanted == AHEAD:
                break
            entry = listing[index]
            if entry.info is None or not 0 < entry.info.size <= SMALL_FILE:
                continue
            wanted += 1
            if entry.info.key not in self._fetched and not self._start(directory, index, entry):
                break  # the mount's memory is in use: read on without fetching ahead

    def _start(self, directory: int, position: int, entry: Entry) -> bool:
        info = entry.info
        assert info is not None and self._nursery is not None
        charge = self._client.copies_in_flight * info.size
        if not self._budget.try_reserve(charge):
            return False
        chunk = Chunk(0, info.size, reserved=charge, speculative=True)
        self._fetched[info.key] = _Fetched(directory, position, info.etag, chunk)
        self._nursery.start_soon(fetch, chunk, self._client, info.key, info.etag, self._budget)
        while len(self._fetched) > MAX_FETCHED:
            cancel(self._fetched.pop(next(iter(self._fetched))).chunk, self._budget)  # the oldest
        return True

    def _drop_passed(self, directory: int, position: int) -> None:
        """Bodies of files the reader went past without opening them."""
        for key, fetched in list(self._fetched.items()):
            if fetched.directory == directory and fetched.position <= position:
                del self._fetched[key]
                cancel(fetched.chunk, self._budget)

    def close(self) -> None:
        for fetched in self._fetched.values():
            cancel(fetched.chunk, self._budget)
        self._fetched.clear()
