"""The filesystem core without a kernel: operations called directly, S3 in memory."""

from __future__ import annotations

import errno
import math
import os

import pytest
import trio

from driver.config import FsSettings
from driver.fs.core import Filesystem
from driver.fs.errors import FsError
from driver.fs.inode import ROOT_INODE
from driver.s3.memory import MemoryClient


def run(client, body, **settings):
    """Run ``body(fs)`` against a Filesystem over ``client``; return its result."""
    fs = Filesystem(client, FsSettings(**settings))

    async def main():
        async with trio.open_nursery() as nursery:
            fs.start(nursery)
            try:
                return await body(fs)
            finally:
                nursery.cancel_scope.cancel()

    return trio.run(main)


async def listdir(fs, ino, *, stop_every=None):
    """All names via readdir, optionally resuming every ``stop_every`` entries as the
    kernel does when its buffer fills."""
    fh = await fs.opendir(ino)
    names, offset = [], 0
    while True:
        batch = []

        def emit(name, inode, next_offset):
            if stop_every is not None and len(batch) >= stop_every:
                return False
            batch.append((name, next_offset))
            return True

        await fs.readdir(fh, offset, emit)
        if not batch:
            break
        names += [n for n, _ in batch]
        offset = batch[-1][1]
    fs.releasedir(fh)
    return names


def errno_of(excinfo):
    return excinfo.value.errno


def test_lookup_file_directory_and_missing():
    client = MemoryClient()
    client.put("docs/readme.md", b"# hi")
    client.put("top.txt", b"top")

    async def body(fs):
        docs = await fs.lookup(ROOT_INODE, "docs")
        readme = await fs.lookup(docs.ino, "readme.md")
        top = await fs.lookup(ROOT_INODE, "top.txt")
        with pytest.raises(FsError) as missing:
            await fs.lookup(ROOT_INODE, "nope")
        with pytest.raises(FsError) as in_file:
            await fs.lookup(top.ino, "x")
        with pytest.raises(FsError) as too_long:
            await fs.lookup(ROOT_INODE, "x" * 256)
        return docs, readme, top, missing, in_file, too_long

    docs, readme, top, missing, in_file, too_long = run(client, body)
    assert docs.is_dir and not readme.is_dir and readme.size == 4 and top.key == "top.txt"
    assert errno_of(missing) == errno.ENOENT
    assert errno_of(in_file) == errno.ENOTDIR
    assert errno_of(too_long) == errno.ENAMETOOLONG


def test_readdir_resumes_at_offsets_without_skipping_or_repeating():
    client = MemoryClient()
    names = [f"f{i:03d}" for i in range(57)] + ["sub"]
    for n in names[:-1]:
        client.put(n, b"x")
    client.put("sub/inner", b"y")

    async def body(fs):
        whole = await listdir(fs, ROOT_INODE)
        chunked = await listdir(fs, ROOT_INODE, stop_every=5)
        return whole, chunked

    whole, chunked = run(client, body)
    assert whole == chunked
    assert whole[:2] == [".", ".."]
    assert sorted(whole[2:]) == names


def test_readdir_entries_count_kernel_references_except_dots():
    client = MemoryClient()
    client.put("a", b"1")

    async def body(fs):
        await listdir(fs, ROOT_INODE)
        a = fs.inodes.child(ROOT_INODE, "a")
        before = a.lookups
        fs.forget(a.ino, before)
        return before, fs.inodes.get(a.ino), fs.inodes.get(ROOT_INODE).lookups

    before, after_forget, root_lookups = run(client, body)
    assert before == 1
    assert after_forget is None, "a forgotten file inode is dropped"
    assert root_lookups == 1, "'.' does not count a reference to the directory"


def test_metadata_is_cached_for_the_ttl_and_asked_again_after():
    client = MemoryClient()
    client.put("f", b"1")

    async def body(fs):
        await fs.lookup(ROOT_INODE, "f")
        calls = len(client.calls)
        await fs.lookup(ROOT_INODE, "f")
        return len(client.calls) - calls

    assert run(client, body, metadata_ttl=math.inf) == 0
    assert run(client, body, metadata_ttl=0) == 2  # HEAD + LIST again


@pytest.mark.parametrize("ttl,expected", [(0, b"newer content"), (math.inf, b"old")])
def test_remote_change_shows_after_ttl(ttl, expected):
    client = MemoryClient()
    client.put("f", b"old")

    async def body(fs):
        f = await fs.lookup(ROOT_INODE, "f")
        client.put("f", b"newer content")
        return (await fs.getattr(f.ino)).size

    assert run(client, body, metadata_ttl=ttl) == len(expected)


def test_open_read_release():
    client = MemoryClient()
    data = os.urandom(3 * 1024 * 1024 + 7)
    client.put("blob", data)

    async def body(fs):
        blob = await fs.lookup(ROOT_INODE, "blob")
        fh, keep_cache = await fs.open(blob.ino, os.O_RDONLY)
        parts = [await fs.read(fh, off, 128 * 1024) for off in range(0, len(data), 128 * 1024)]
        await fs.release(fh)
        fh2, keep_cache_again = await fs.open(blob.ino, os.O_RDONLY)
        await fs.release(fh2)
        return b"".join(parts), keep_cache, keep_cache_again, fs.budget.used

    read, first_keep, second_keep, used = run(client, body)
    assert read == data
    assert (first_keep, second_keep) == (False, True)
    assert used == 0


@pytest.mark.parametrize("read_only,expected", [(True, errno.EROFS), (False, errno.EPERM)])
@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND])
def test_opening_an_existing_object_for_writing_is_refused(flags, read_only, expected):
    client = MemoryClient()
    client.put("f", b"1")

    async def body(fs):
        f = await fs.lookup(ROOT_INODE, "f")
        with pytest.raises(FsError) as error:
            await fs.open(f.ino, flags)
        return error.value.errno

    assert run(client, body, read_only=read_only) == expected


def test_read_of_replaced_object_is_estale():
    client = MemoryClient()
    client.put("f", b"version one")

    async def body(fs):
        f = await fs.lookup(ROOT_INODE, "f")
        fh, _ = await fs.open(f.ino, os.O_RDONLY)
        client.put("f", b"version two!")
        with pytest.raises(FsError) as error:
            await fs.read(fh, 0, 4096)
        return error.value.errno

    assert run(client, body) == errno.ESTALE


def test_kind_change_gets_a_new_inode():
    client = MemoryClient()
    client.put("x", b"file")

    async def body(fs):
        as_file = await fs.lookup(ROOT_INODE, "x")
        client.delete("x")
        client.put("x/y", b"now a dir")
        as_dir = await fs.lookup(ROOT_INODE, "x")
        return as_file.ino, as_dir.ino, as_dir.is_dir

    file_ino, dir_ino, is_dir = run(client, body, metadata_ttl=0)
    assert is_dir and file_ino != dir_ino


@pytest.mark.parametrize("ttl,lists", [(math.inf, 1), (0, 2)])
def test_second_listing_within_ttl_asks_s3_nothing(ttl, lists):
    client = MemoryClient()
    for i in range(10):
        client.put(f"d/f{i}", b"x")

    async def body(fs):
        d = await fs.lookup(ROOT_INODE, "d")
        client.calls.clear()
        first = await listdir(fs, d.ino)
        second = await listdir(fs, d.ino)
        return first, second, [c.operation for c in client.calls]

    first, second, operations = run(client, body, metadata_ttl=ttl)
    assert first == second
    assert operations == ["ListObjectsV2"] * lists


def test_a_name_found_later_refreshes_the_cached_listing():
    client = MemoryClient()
    client.put("d/old", b"x")

    async def body(fs):
        d = await fs.lookup(ROOT_INODE, "d")
        before = await listdir(fs, d.ino)
        client.put("d/new", b"y")
        await fs.lookup(d.ino, "new")  # e.g. the user typed the name they know exists
        return before, await listdir(fs, d.ino)

    before, after = run(client, body, metadata_ttl=math.inf)
    assert sorted(before) == [".", "..", "old"]
    assert sorted(after) == [".", "..", "new", "old"]


# -- going through a directory after its TTL: one listing, not a HEAD per name ---------------

TTL = 0.05


async def _expire():
    await trio.sleep(TTL * 1.5)


async def _two_lookups_after_the_ttl(fs, client, files):
    """``d`` with ``files`` listed, the TTL run out, two names asked about in S3: the next
    lookup starts a relisting."""
    for i in range(files):
        client.put(f"d/f{i}", b"x")
    d = await fs.lookup(ROOT_INODE, "d")
    await listdir(fs, d.ino)
    await _expire()
    for i in range(2):
        await fs.lookup(d.ino, f"f{i}")
    return d


def _operations(client):
    return [c.operation for c in client.calls]


def test_names_looked_up_again_after_the_ttl_are_answered_by_one_new_listing():
    client = MemoryClient()
    for i in range(50):
        client.put(f"d/f{i:02d}", b"x" * i)

    async def body(fs):
        d = await fs.lookup(ROOT_INODE, "d")
        await listdir(fs, d.ino)
        await _expire()
        client.put("d/f10", b"changed meanwhile")
        client.delete("d/f20")
        client.put("d/f30/inner", b"now also a directory")
        client.calls.clear()
        found = {}
        for i in range(50):
            try:
                found[i] = await fs.lookup(d.ino, f"f{i:02d}")
            except FsError as exc:
                found[i] = exc.errno
        return found, _operations(client)

    found, operations = run(client, body, metadata_ttl=TTL)
    # The first two expired names are asked about one by one (HEAD and LIST each), the
    # third starts a new listing of the directory that answers all the others.
    assert sorted(operations[:2]) == sorted(operations[2:4]) == ["HeadObject", "ListObjectsV2"]
    assert operations[4:] == ["ListObjectsV2"]
    assert found[10].size == len(b"changed meanwhile")
    assert found[20] == errno.ENOENT
    assert found[30].is_dir
    assert [found[i].size for i in (0, 1, 2, 49)] == [0, 1, 2, 49]


def test_a_failed_relisting_is_the_lookups_error():
    client = MemoryClient()

    async def body(fs):
        d = await _two_lookups_after_the_ttl(fs, client, 5)
        client.failures["ListObjectsV2"] = 1
        with pytest.raises(FsError) as excinfo:
            await fs.lookup(d.ino, "f2")
        return errno_of(excinfo), await fs.lookup(d.ino, "f3")

    code, later = run(client, body, metadata_ttl=TTL)
    assert code == errno.EIO
    assert later.size == 1  # the next lookup asks again


def fail_once_unexpectedly(client, method: str) -> None:
    """The next call of ``method`` raises what no S3 client error handler expects."""
    original = getattr(client, method)

    async def failing(*args, **kwargs):
        setattr(client, method, original)
        raise RuntimeError("a library bug")
    setattr(client, method, failing)


def test_an_unexpected_error_in_a_read_is_eio_and_the_mount_carries_on():
    client = MemoryClient()
    client.put("f", bytes(range(256)) * 4096)  # 1 MiB

    async def body(fs):
        f = await fs.lookup(ROOT_INODE, "f")
        fh, _ = await fs.open(f.ino, os.O_RDONLY)
        fail_once_unexpectedly(client, "get_range")
        with pytest.raises(FsError) as excinfo:
            await fs.read(fh, 0, 4096)
        later = await fs.read(fh, 512 * 1024, 4096)  # elsewhere: the failed range is held a second
        return errno_of(excinfo), later

    code, later = run(client, body)
    assert code == errno.EIO
    assert later == (bytes(range(256)) * 16)


def test_an_unexpected_error_in_a_relisting_is_the_lookups_eio():
    client = MemoryClient()

    async def body(fs):
        d = await _two_lookups_after_the_ttl(fs, client, 5)
        fail_once_unexpectedly(client, "list_objects")
        with pytest.raises(FsError) as excinfo:
            await fs.lookup(d.ino, "f2")
        return errno_of(excinfo), await fs.lookup(d.ino, "f3")

    code, later = run(client, body, metadata_ttl=TTL)
    assert code == errno.EIO
    assert later.size == 1


def test_a_directory_changed_by_this_mount_while_relisted_answers_from_s3():
    client = MemoryClient(latency=0.01)

    async def body(fs):
        d = await _two_lookups_after_the_ttl(fs, client, 5)
        async with trio.open_nursery() as nursery:
            results = {}

            async def look(name):
                results[name] = await fs.lookup(d.ino, name)

            nursery.start_soon(look, "f2")  # starts the relisting
            await trio.sleep(0)
            fs.directories.forget(d.ino)  # what an unlink or a finished upload does
            nursery.start_soon(look, "f3")
        return results

    results = run(client, body, metadata_ttl=TTL, allow_delete=True)
    assert sorted(results) == ["f2", "f3"] and all(r.size == 1 for r in results.values())


def test_large_directories_are_not_listed_again_for_a_lookup(monkeypatch):
    monkeypatch.setattr("driver.fs.directories.RELIST_MAX_ENTRIES", 10)
    client = MemoryClient()
    for i in range(11):
        client.put(f"d/f{i:02d}", b"x")

    async def body(fs):
        d = await fs.lookup(ROOT_INODE, "d")
        await listdir(fs, d.ino)
        await _expire()
        client.calls.clear()
        for i in range(11):
            await fs.lookup(d.ino, f"f{i:02d}")
        return _operations(client)

    operations = run(client, body, metadata_ttl=TTL)
    assert sorted(operations) == ["HeadObject"] * 11 + ["ListObjectsV2"] * 11


def test_names_of_a_directory_never_listed_are_answered_by_a_listing_once_it_arrives():
    """`cat dir/a dir/b ...` by name: no readdir, a lookup per name."""
    client = MemoryClient(latency=0.001)
    for i in range(40):
        client.put(f"d/f{i:02d}", b"x" * i)

    async def body(fs):
        d = await fs.lookup(ROOT_INODE, "d")
        client.calls.clear()
        found = [await fs.lookup(d.ino, f"f{i:02d}") for i in range(40)]
        with pytest.raises(FsError) as missing:
            await fs.lookup(d.ino, "f99")
        return found, errno_of(missing), [(c.operation, c.key) for c in client.calls]

    found, missing, calls = run(client, body, metadata_ttl=60)
    assert [f.size for f in found] == list(range(40)) and missing == errno.ENOENT
    # Three names asked about one by one (the third starts listing "d/" and does not wait
    # for it), the rest answered by the listing, the missing name too.
    assert calls.count(("ListObjectsV2", "d/")) == 1
    assert len([c for c in calls if c[0] == "HeadObject"]) == 3
    assert len(calls) == 7

