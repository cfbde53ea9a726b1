"""Writing through the filesystem core, S3 in memory: uploads, refusals, directories."""

from __future__ import annotations

import errno
import functools
import os

import pytest
import trio

from driver.config import FsSettings
from driver.fs.core import Filesystem
from driver.fs.errors import FsError
from driver.fs.inode import ROOT_INODE
from driver.s3.memory import MemoryClient

PART = 1024  # a tiny part size keeps these tests small; the memory store accepts it
NEW = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def run(client, body, **settings):
    settings.setdefault("write_part_size", PART)
    fs = Filesystem(client, FsSettings(**settings))

    async def main():
        async with trio.open_nursery() as nursery:
            fs.start(nursery)
            try:
                return await body(fs)
            finally:
                nursery.cancel_scope.cancel()

    return trio.run(main)


def store(**kwargs) -> MemoryClient:
    return MemoryClient(min_part_size=0, **kwargs)


async def write_file(fs, name, data, *, chunk=300, parent=ROOT_INODE):
    inode, fh = await fs.create(parent, name, NEW, pid=0)
    for offset in range(0, len(data), chunk):
        await fs.write(fh, offset, data[offset:offset + chunk])
    await fs.flush(fh, opener_done=True)
    await fs.release(fh)
    return inode


def errno_of(coroutine_factory):
    async def check():
        with pytest.raises(FsError) as error:
            await coroutine_factory()
        return error.value.errno
    return check()


@pytest.mark.parametrize("size", [0, 1, PART, PART + 1, 5 * PART + 17])
def test_written_bytes_become_one_object(size):
    client = store()
    data = os.urandom(size)

    async def body(fs):
        await write_file(fs, "f.bin", data)

    run(client, body)
    assert client._data["f.bin"] == data
    operations = [c.operation for c in client.calls]
    if size <= PART:
        assert operations == ["PutObject"], "a file within one part is one PutObject"
    else:
        assert operations[0] == "CreateMultipartUpload" and operations[-1] == "CompleteMultipartUpload"
    assert client.uploads == {}


def test_parts_upload_while_writing_with_bounded_memory():
    client = store(latency=0.002)
    data = os.urandom(40 * PART)

    async def body(fs):
        inode, fh = await fs.create(ROOT_INODE, "big", NEW)
        for offset in range(0, len(data), PART // 2):
            await fs.write(fh, offset, data[offset:offset + PART // 2])
        uploaded_before_close = sum(1 for c in client.calls if c.operation == "UploadPart")
        await fs.flush(fh, opener_done=True)
        return uploaded_before_close

    before_close = run(client, body, parts_in_flight=2)
    assert before_close >= 38, "parts go up while the file is written, not at close"
    assert client.max_in_flight <= 2
    assert client._data["big"] == data


class CountingParts(MemoryClient):
    """Counts UploadParts in flight at once."""

    def __init__(self, **kwargs):
        super().__init__(min_part_size=0, **kwargs)
        self.parts_in_flight = self.max_parts_in_flight = 0

    async def upload_part(self, *args, **kwargs):
        self.parts_in_flight += 1
        self.max_parts_in_flight = max(self.max_parts_in_flight, self.parts_in_flight)
        try:
            return await super().upload_part(*args, **kwargs)
        finally:
            self.parts_in_flight -= 1


@pytest.mark.parametrize("max_memory, fewest", [(2 * PART, 4), (8 * PART, 5), (64 * PART, 4 * 4)])
def test_writers_share_the_memory_budget(max_memory, fewest):
    """Each of 4 writers always has one part in flight; more only while the parts in
    flight stay within --max-memory, and no writer more than its parts_in_flight. So at
    most the 4 writers' own plus what the budget holds, at most 4 each: a writer takes a
    second part when the others are between parts (1 of 4 in flight, room for 1 more in
    2 parts' budget) and they start theirs after it, 5 in flight, seen under load."""
    client = CountingParts(latency=0.005)
    files = {f"f{n}": os.urandom(12 * PART) for n in range(4)}

    async def body(fs):
        async with trio.open_nursery() as writers:
            for name, data in files.items():
                writers.start_soon(functools.partial(write_file, fs, name, data, chunk=PART))
        assert fs.budget.used == 0, "every part gave its memory back"

    run(client, body, parts_in_flight=4, min_request=PART, max_request=PART, max_memory=max_memory)
    assert all(client._data[name] == data for name, data in files.items())
    assert fewest <= client.max_parts_in_flight <= min(4 * 4, 4 + max_memory // PART)


def test_failed_parts_give_the_memory_budget_back_to_the_writers_waiting_on_it():
    client = CountingParts(latency=0.005)
    client.failures["UploadPart"] = 3
    files = {f"f{n}": os.urandom(12 * PART) for n in range(4)}

    async def body(fs):
        outcomes = {}

        async def write(name, data):  # as a program does: close the file whatever happened
            inode, fh = await fs.create(ROOT_INODE, name, NEW, pid=0)
            try:
                for offset in range(0, len(data), PART):
                    await fs.write(fh, offset, data[offset:offset + PART])
                await fs.flush(fh, opener_done=True)
                outcomes[name] = "written"
            except FsError as exc:
                outcomes[name] = errno.errorcode[exc.errno]
            finally:
                await fs.release(fh)

        async with trio.open_nursery() as writers:
            for name, data in files.items():
                writers.start_soon(write, name, data)
        return outcomes, fs.budget.used

    outcomes, used = run(client, body, parts_in_flight=4, min_request=PART, max_request=PART,
                         max_memory=8 * PART)
    assert used == 0, "failed and finished parts alike gave their memory back"
    assert "EIO" in outcomes.values()
    assert all(client._data[name] == files[name] for name, outcome in outcomes.items() if outcome == "written")
    assert client.uploads == {}, "every failed upload was aborted"


def test_parts_are_whole_whatever_the_sizes_of_the_writes():
    client = store()
    data = os.urandom(7 * PART + 5)
    sizes = [1, PART - 1, 3 * PART + 2, 7, PART, 2 * PART - 4]  # within, across and past parts
    buffer = bytearray(max(sizes))

    async def body(fs):
        inode, fh = await fs.create(ROOT_INODE, "f.bin", NEW)
        offset = 0
        for size in sizes:
            buffer[:size] = data[offset:offset + size]
            assert await fs.write(fh, offset, memoryview(buffer)[:size]) == size
            buffer[:] = bytes(len(buffer))  # the caller reuses its buffer once write returns
            offset += size
        await fs.flush(fh, opener_done=True)

    run(client, body)
    assert client._data["f.bin"] == data
    part_sizes = [c.length for c in client.calls if c.operation == "UploadPart"]
    assert part_sizes == [PART] * 7 + [5]


def test_refusals_while_writing():
    client = store()

    async def body(fs):
        inode, fh = await fs.create(ROOT_INODE, "f", NEW)
        await fs.write(fh, 0, b"abc")
        results = {
            "gap": await errno_of(lambda: fs.write(fh, 10, b"x")),
            "rewrite": await errno_of(lambda: fs.write(fh, 0, b"x")),
            "read": await errno_of(lambda: fs.open(inode.ino, os.O_RDONLY)),
            "second writer": await errno_of(lambda: fs.open(inode.ino, os.O_WRONLY | os.O_TRUNC)),
            "unlink": await errno_of(lambda: fs.unlink(ROOT_INODE, "f")),
            "rename": await errno_of(lambda: fs.rename(ROOT_INODE, "f")),
            "truncate to 1": await errno_of(lambda: fs.setattr(inode.ino, size=1)),
            "chmod": await errno_of(lambda: fs.setattr(inode.ino, mode=0o600)),
            "chown": await errno_of(lambda: fs.setattr(inode.ino, uid=4242)),
            "o_sync": await errno_of(lambda: fs.create(ROOT_INODE, "g", NEW | os.O_SYNC)),
            "o_dsync": await errno_of(lambda: fs.create(ROOT_INODE, "h", NEW | os.O_DSYNC)),
        }
        await fs.setattr(inode.ino, times=True)  # allowed while written
        await fs.setattr(inode.ino, mode=0o644, uid=0, gid=0)  # the mount's own values
        await fs.fsync(fh)
        results["write after fsync"] = await errno_of(lambda: fs.write(fh, 3, b"x"))
        await fs.release(fh)
        return results

    results = run(client, body, allow_delete=True)
    assert results == {
        "gap": errno.EINVAL, "rewrite": errno.EINVAL, "read": errno.EPERM, "second writer": errno.EPERM,
        "unlink": errno.EPERM, "rename": errno.ENOSYS, "truncate to 1": errno.EPERM, "chmod": errno.EPERM,
        "chown": errno.EPERM, "o_sync": errno.EINVAL, "o_dsync": errno.EINVAL, "write after fsync": errno.EPERM,
    }
    assert client._data["f"] == b"abc"


def test_efbig_past_ten_thousand_parts():
    client = store()

    async def body(fs):
        _, fh = await fs.create(ROOT_INODE, "huge", NEW)
        block = b"z" * (100 * PART)
        for offset in range(0, 10_000 * PART, len(block)):
            await fs.write(fh, offset, block)
        code = await errno_of(lambda: fs.write(fh, 10_000 * PART, b"1"))
        await fs.flush(fh, opener_done=True)
        return code

    assert run(client, body) == errno.EFBIG
    assert len(client._data["huge"]) == 10_000 * PART


@pytest.mark.parametrize("failing", ["UploadPart", "CompleteMultipartUpload", "CreateMultipartUpload", "PutObject"])
def test_a_failed_upload_is_eio_at_close_and_leaves_nothing(failing):
    client = store()
    client.failures[failing] = 1
    size = PART // 2 if failing == "PutObject" else 4 * PART

    async def body(fs):
        inode, fh = await fs.create(ROOT_INODE, "f", NEW)
        codes = []
        for offset in range(0, size, 256):
            try:
                await fs.write(fh, offset, b"w" * 256)
            except FsError as exc:  # a failed part shows on the next write at the latest
                codes.append(exc.errno)
                break
        try:
            await fs.flush(fh, opener_done=True)
        except FsError as exc:
            codes.append(exc.errno)
        await fs.release(fh)
        gone = await errno_of(lambda: fs.lookup(ROOT_INODE, "f"))
        return codes, gone

    codes, gone = run(client, body, metadata_ttl=0)
    assert codes and set(codes) == {errno.EIO}
    assert gone == errno.ENOENT, "a file that failed to upload does not exist"
    assert "f" not in client._data
    assert client.uploads == {}, "the multipart upload was aborted"


def test_an_unexpected_error_uploading_a_part_is_eio_at_close_and_leaves_nothing():
    client = store()
    original = client.upload_part

    async def failing(*args, **kwargs):
        client.upload_part = original
        raise RuntimeError("a library bug")
    client.upload_part = failing

    async def body(fs):
        inode, fh = await fs.create(ROOT_INODE, "f", NEW)
        codes = []
        try:
            for offset in range(0, 4 * PART, 256):
                await fs.write(fh, offset, b"w" * 256)
            await fs.flush(fh, opener_done=True)
        except FsError as exc:
            codes.append(exc.errno)
        await fs.release(fh)
        return codes

    assert run(client, body, metadata_ttl=0) == [errno.EIO]
    assert "f" not in client._data and client.uploads == {}


def test_only_the_openers_last_close_completes():
    client = store()

    async def body(fs):
        _, fh = await fs.create(ROOT_INODE, "f", NEW)
        await fs.flush(fh, opener_done=False)  # a forked child closing its copy
        await fs.write(fh, 0, b"still writing")
        before = "f" in client._data
        await fs.flush(fh, opener_done=True)
        return before

    assert run(client, body) is False
    assert client._data["f"] == b"still writing"


def test_release_completes_when_no_flush_did():
    client = store()

    async def body(fs):
        _, fh = await fs.create(ROOT_INODE, "f", NEW)
        await fs.write(fh, 0, b"data")
        await fs.release(fh)

    run(client, body)
    assert client._data["f"] == b"data"


def test_overwrite_and_delete_need_their_options():
    client = store()
    client.put("f", b"old")

    async def body(fs):
        f = await fs.lookup(ROOT_INODE, "f")
        refused = await errno_of(lambda: fs.open(f.ino, os.O_WRONLY | os.O_TRUNC))
        return refused, await errno_of(lambda: fs.unlink(ROOT_INODE, "f"))

    assert run(client, body) == (errno.EPERM, errno.EPERM)

    async def allowed(fs):
        f = await fs.lookup(ROOT_INODE, "f")
        no_trunc = await errno_of(lambda: fs.open(f.ino, os.O_WRONLY))
        fh, _ = await fs.open(f.ino, os.O_WRONLY | os.O_TRUNC)
        await fs.write(fh, 0, b"new content")
        await fs.flush(fh, opener_done=True)
        await fs.release(fh)
        replaced = client._data["f"]
        await fs.unlink(ROOT_INODE, "f")
        return no_trunc, replaced

    assert run(client, allowed, allow_overwrite=True, allow_delete=True) == (errno.EPERM, b"new content")
    assert "f" not in client._data


def test_truncate_to_zero_while_writing_starts_over():
    client = store()

    async def body(fs):
        inode, fh = await fs.create(ROOT_INODE, "f", NEW)
        await fs.write(fh, 0, b"x" * (3 * PART))
        await fs.setattr(inode.ino, size=0)
        await fs.write(fh, 0, b"fresh")
        await fs.flush(fh, opener_done=True)

    run(client, body)
    assert client._data["f"] == b"fresh"
    assert client.uploads == {}


async def names(fs, ino):
    fh = await fs.opendir(ino)
    found = []
    await fs.readdir(fh, 0, lambda name, inode, nxt: found.append((name, inode.is_dir)) or True)
    fs.releasedir(fh)
    return sorted(f for f in found if f[0] not in (".", ".."))


def test_local_directories_until_a_file_is_written_in_them():
    client = store()

    async def body(fs):
        a = await fs.mkdir(ROOT_INODE, "a")
        b = await fs.mkdir(a.ino, "b")
        listed = await names(fs, ROOT_INODE)
        not_empty = await errno_of(lambda: fs.rmdir(ROOT_INODE, "a"))
        exists = await errno_of(lambda: fs.mkdir(ROOT_INODE, "a"))
        await write_file(fs, "f", b"in b", parent=b.ino)
        in_s3 = await errno_of(lambda: fs.rmdir(a.ino, "b"))
        await fs.mkdir(ROOT_INODE, "empty")
        await fs.rmdir(ROOT_INODE, "empty")
        return listed, not_empty, exists, in_s3, await names(fs, ROOT_INODE)

    listed, not_empty, exists, in_s3, after = run(client, body)
    assert listed == [("a", True)]
    assert (not_empty, exists, in_s3) == (errno.ENOTEMPTY, errno.EEXIST, errno.EPERM)
    assert after == [("a", True)]
    assert client.keys() == ["a/b/f"], "no marker objects, just the file"


def test_a_file_being_written_shows_with_its_growing_size():
    client = store()

    async def body(fs):
        inode, fh = await fs.create(ROOT_INODE, "growing", NEW)
        await fs.write(fh, 0, b"x" * 1500)
        listed = await names(fs, ROOT_INODE)
        size = (await fs.getattr(inode.ino)).size
        await fs.flush(fh, opener_done=True)
        return listed, size

    assert run(client, body) == ([("growing", False)], 1500)
