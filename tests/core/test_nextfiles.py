"""Fetching the next files of a directory read in order (driver.fs.nextfiles), S3 in
memory: which GETs are sent, and that readers always get the bytes of their version."""

from __future__ import annotations

import os

import pytest
import trio

from driver.fs.inode import ROOT_INODE
from driver.fs.nextfiles import AHEAD, SMALL_FILE
from driver.s3.api import ObjectClientError
from driver.s3.memory import Call, MemoryClient
from tests.core.test_filesystem import listdir, run

FILES = 30


def fill(client, sizes=None):
    contents = {}
    for i in range(FILES):
        name = f"f{i:03d}"
        contents[name] = os.urandom(sizes[i] if sizes else 64 * 1024)
        client.put(f"dir/{name}", contents[name])
    return contents


async def cat(fs, directory, name):
    inode = await fs.lookup(directory.ino, name)
    fh, _ = await fs.open(inode.ino, os.O_RDONLY)
    data = await fs.read(fh, 0, inode.size + 1)
    await fs.release(fh)
    return bytes(data)


def gets(client):
    return [c.key for c in client.calls if c.operation == "GetObject"]


def read_all(client, order, *, before=None, settings=None):
    """List dir/, then read the files named in ``order`` one after another."""
    async def body(fs):
        directory = await fs.lookup(ROOT_INODE, "dir")
        await listdir(fs, directory.ino)
        client.calls.clear()
        out = {}
        for i, name in enumerate(order):
            if before is not None:
                before(i, name)
            out[name] = await cat(fs, directory, name)
        fs.next_files.close()
        return out, fs.budget.used

    return run(client, body, metadata_ttl=60, **(settings or {}))


def test_reading_in_order_fetches_each_file_once_and_ahead_of_the_reader():
    client = MemoryClient(latency=0.01)
    contents = fill(client)
    read, used = read_all(client, sorted(contents))
    assert read == contents
    assert sorted(gets(client)) == sorted(f"dir/{n}" for n in contents)  # once each
    assert client.max_in_flight > 1  # fetched while the reader was elsewhere
    assert used == 0


@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_reading_in_another_order_fetches_only_what_is_read(order):
    client = MemoryClient()
    contents = fill(client)
    names = sorted(contents)
    # Shuffled: never two files in a row that are at most two places apart in the listing.
    names = names[9::-1] if order == "reversed" else [names[i] for i in (7, 2, 9, 0, 5, 3, 8, 1, 6, 4)]
    read, used = read_all(client, names)
    assert read == {n: contents[n] for n in names}
    assert sorted(gets(client)) == sorted(f"dir/{n}" for n in names)
    assert used == 0


def test_a_reader_that_stops_costs_at_most_the_files_fetched_ahead():
    client = MemoryClient()
    contents = fill(client)
    read_all(client, sorted(contents)[:5])
    assert 5 < len(gets(client)) <= 5 + AHEAD


def test_large_files_are_not_fetched_ahead():
    client = MemoryClient()
    sizes = [SMALL_FILE + 1 if i % 2 else 1000 for i in range(FILES)]
    contents = fill(client, sizes)
    names = sorted(contents)[:4]  # f000 small, f001 large, ...
    read_all(client, names)
    fetched_unread = [k for k in gets(client) if k.rsplit("/", 1)[1] not in names]
    assert fetched_unread and all(len(contents[k.rsplit("/", 1)[1]]) <= SMALL_FILE for k in fetched_unread)


def test_a_file_replaced_after_it_was_fetched_ahead_is_read_as_one_version():
    client = MemoryClient()
    contents = fill(client)
    names = sorted(contents)

    def replace_f005(i, name):
        if name == names[4]:  # f005 was fetched ahead when f002 was opened
            client.put("dir/f005", b"replaced in S3")

    read, _ = read_all(client, names[:6], before=replace_f005)
    # The listing named the first version: that is what the open reads, whole (it would
    # be ESTALE without the fetch ahead, never a mix of versions).
    assert read["f005"] == contents["f005"]


class FirstGetFails(MemoryClient):
    """Fails the first GET of each of ``keys`` with a 500."""

    def __init__(self, keys):
        super().__init__()
        self.failing = set(keys)

    async def get_range(self, key, start, length, *, etag):
        if key in self.failing:
            self.failing.discard(key)
            await self._request(Call("GetObject", key, start, length))
            raise ObjectClientError(f"GetObject {key}: injected 500", operation="GetObject", status=500)
        return await super().get_range(key, start, length, etag=etag)


def test_a_failed_fetch_ahead_is_not_the_readers_error():
    client = FirstGetFails([f"dir/f{i:03d}" for i in range(3, 3 + AHEAD)])
    contents = fill(client)
    names = sorted(contents)[:8]
    read, used = read_all(client, names)
    assert read == {n: contents[n] for n in names}
    assert not client.failing  # the fetches ahead did fail
    assert used == 0


def test_readers_that_stop_midway_hold_at_most_a_few_bodies():
    client = MemoryClient()
    for directory in ("a", "b", "c"):
        for i in range(FILES):
            client.put(f"{directory}/f{i:03d}", b"x" * 1000)

    async def body(fs):
        for directory in ("a", "b", "c"):  # each read in order for 4 files, then left
            inode = await fs.lookup(ROOT_INODE, directory)
            await listdir(fs, inode.ino)
            for i in range(4):
                await cat(fs, inode, f"f{i:03d}")
        await trio.sleep(0.1)  # the fetches ahead arrive
        return fs.budget.used

    used = run(client, body, metadata_ttl=60)
    # Three directories left with AHEAD bodies each would hold 3 * AHEAD.
    assert 0 < used <= 2 * AHEAD * 1000
