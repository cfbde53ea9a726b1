"""A reference model of the semantics, checked against the filesystem core.

A Hypothesis state machine applies random operations — create, write a part, finish,
unlink, mkdir, a put or a delete by another S3 client — to both a plain model and the
filesystem over the in-memory store, and after every step compares the whole tree:
names, kinds, sizes and the bytes of every complete file. The TTL is 0 so every lookup
and listing asks the store, as after the TTL a real mount does.
"""

from __future__ import annotations

import errno
import os

import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from driver.config import FsSettings
from driver.fs.core import Filesystem
from driver.fs.errors import FsError
from driver.fs.inode import ROOT_INODE
from driver.s3.memory import MemoryClient

PART = 1024
NEW = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
names = st.sampled_from(["a", "b", "c"])
paths = st.lists(names, min_size=1, max_size=3).map(tuple)
chunks = st.binary(min_size=0, max_size=2 * PART + 3)


class Runner:
    """Runs the core's coroutines one at a time on a trio loop that lives with the machine."""

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs
        self._token = None
        self._stop = None
        self._done = None

    def run(self, fn, *args):
        async def call():
            return await fn(*args)
        return trio.run(self._with_nursery, call)

    async def _with_nursery(self, call):
        async with trio.open_nursery() as nursery:
            self.fs.start(nursery)
            try:
                return await call()
            finally:
                nursery.cancel_scope.cancel()


class SemanticsModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.client = MemoryClient(min_part_size=0)
        self.fs = Filesystem(self.client, FsSettings(metadata_ttl=0, write_part_size=PART,
                                                     allow_delete=True))
        self.runner = Runner(self.fs)
        self.objects: dict[tuple[str, ...], bytes] = {}  # what S3 holds
        self.local_dirs: set[tuple[str, ...]] = set()  # made by mkdir, nothing in S3 under them
        self.writing: dict[tuple[str, ...], tuple[int, bytearray]] = {}  # path -> (fh, bytes so far)

    # -- the model's view --------------------------------------------------------------

    def model_tree(self) -> dict[tuple[str, ...], object]:
        """path -> "dir", bytes or ("writing", size), by the rules: directories come
        from keys and mkdir and win over an object of the same path; what this mount is
        doing (a directory it made, a file it is writing) wins over what S3 shows."""
        tree: dict[tuple[str, ...], object] = {}
        dirs = set(self.local_dirs)
        for path in list(self.objects) + list(self.writing) + list(self.local_dirs):
            dirs.update(path[:i] for i in range(1, len(path)))
        for d in dirs:
            tree[d] = "dir"
        for path, data in self.objects.items():
            if path not in dirs:
                tree[path] = data
        for path, (_, data) in self.writing.items():
            tree[path] = ("writing", len(data))
            for below in [p for p in tree if p[:len(path)] == path and len(p) > len(path)]:
                del tree[below]  # hidden under a file
        return tree

    def _dir_of(self, path):
        return path[:-1]

    def _parent_exists(self, path) -> bool:
        tree = self.model_tree()
        return all(tree.get(path[:i]) == "dir" for i in range(1, len(path)))

    # -- filesystem helpers --------------------------------------------------------------

    async def _walk(self, path):
        ino = ROOT_INODE
        for name in path:
            inode = await self.fs.lookup(ino, name)
            ino = inode.ino
        return ino

    async def _tree(self):
        found = {}

        async def visit(ino, path):
            fh = await self.fs.opendir(ino)
            entries = []
            await self.fs.readdir(fh, 0, lambda name, inode, nxt: entries.append((name, inode)) or True)
            self.fs.releasedir(fh)
            for name, inode in entries:
                if name in (".", ".."):
                    continue
                child = path + (name,)
                if inode.is_dir:
                    found[child] = "dir"
                    await visit(inode.ino, child)
                elif inode.writer is not None:
                    found[child] = ("writing", inode.size)
                else:
                    fh, _ = await self.fs.open(inode.ino, os.O_RDONLY)
                    data = bytes(await self.fs.read(fh, 0, inode.size + 10)) if inode.size else b""
                    await self.fs.release(fh)
                    found[child] = data

        await visit(ROOT_INODE, ())
        return found

    # -- rules -----------------------------------------------------------------------------

    @rule(path=paths, data=chunks)
    def create(self, path, data):
        if path in self.writing or not self._parent_exists(path) or path in self.model_tree():
            return

        async def go():
            parent = await self._walk(path[:-1])
            _, fh = await self.fs.create(parent, path[-1], NEW)
            await self.fs.write(fh, 0, data)
            return fh

        fh = self.runner.run(go)
        self.writing[path] = (fh, bytearray(data))

    @precondition(lambda self: self.writing)
    @rule(data=chunks, pick=st.integers(0, 100))
    def write_more(self, data, pick):
        path = sorted(self.writing)[pick % len(self.writing)]
        fh, written = self.writing[path]
        self.runner.run(self.fs.write, fh, len(written), data)
        written += data

    @precondition(lambda self: self.writing)
    @rule(pick=st.integers(0, 100))
    def finish(self, pick):
        path = sorted(self.writing)[pick % len(self.writing)]
        fh, written = self.writing.pop(path)

        async def go():
            await self.fs.flush(fh, opener_done=True)
            await self.fs.release(fh)

        self.runner.run(go)
        self.objects[path] = bytes(written)
        self.local_dirs -= {path[:i] for i in range(1, len(path))}

    @rule(path=paths)
    def unlink(self, path):
        tree = self.model_tree()
        kind = tree.get(path)

        async def go():
            try:
                await self.fs.unlink(await self._walk(path[:-1]), path[-1])
                return None
            except FsError as exc:
                return exc.errno

        if not self._parent_exists(path):
            return
        result = self.runner.run(go)
        if kind is None:
            assert result == errno.ENOENT
        elif kind == "dir":
            assert result == errno.EISDIR
        elif path in self.writing:
            assert result == errno.EPERM
        else:
            assert result is None
            del self.objects[path]

    @rule(path=paths)
    def mkdir(self, path):
        if not self._parent_exists(path):
            return

        async def go():
            try:
                await self.fs.mkdir(await self._walk(path[:-1]), path[-1])
                return None
            except FsError as exc:
                return exc.errno

        result = self.runner.run(go)
        if path in self.model_tree():
            assert result == errno.EEXIST
        else:
            assert result is None
            self.local_dirs.add(path)

    @rule(path=paths)
    def rmdir(self, path):
        if not self._parent_exists(path):
            return
        tree = self.model_tree()

        async def go():
            try:
                await self.fs.rmdir(await self._walk(path[:-1]), path[-1])
                return None
            except FsError as exc:
                return exc.errno

        result = self.runner.run(go)
        kind = tree.get(path)
        below = [p for p in tree if p[:len(path)] == path and len(p) > len(path)]
        in_s3 = any(p[:len(path)] == path and len(p) > len(path) for p in self.objects)
        if kind is None:
            assert result == errno.ENOENT
        elif kind != "dir":
            assert result == errno.ENOTDIR
        elif any(p in self.local_dirs or p in self.writing for p in below):
            assert result == errno.ENOTEMPTY  # this mount's own entries are below it
        elif path not in self.local_dirs or in_s3:
            assert result == errno.EPERM
        else:
            assert result is None
            self.local_dirs.discard(path)

    @rule(path=paths, data=chunks)
    def remote_put(self, path, data):
        if path in self.writing:
            return  # another client replacing a file being written here: the last writer wins
        self.client.put("/".join(path), data)
        self.objects[path] = data

    @rule(path=paths)
    def remote_delete(self, path):
        if path in self.objects:
            self.client.delete("/".join(path))
            del self.objects[path]

    @invariant()
    def trees_match(self):
        assert self.runner.run(self._tree) == self.model_tree()

    def teardown(self):
        async def go():
            for fh, _ in self.writing.values():
                await self.fs.release(fh)
        self.runner.run(go)


TestSemanticsModel = SemanticsModel.TestCase
TestSemanticsModel.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


def test_remote_directory_over_a_file_being_written():
    """Found by the model: another client makes a/a while this mount writes a."""
    state = SemanticsModel()
    state.create(path=("a",), data=b"")
    state.remote_put(path=("a", "a"), data=b"")
    state.trees_match()
    state.teardown()
