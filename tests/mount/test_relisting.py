"""Going through a directory again after the metadata TTL: one new listing answers the
names, not a HEAD and a LIST per file. Requests counted at the proxy."""

from __future__ import annotations

import math
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

FILES = 60
TTL = 1.0


def fill(s3, bucket, keys):
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=k.encode()), keys))


def test_reading_every_file_of_a_directory_after_the_ttl_lists_it_once(s3, bucket, proxy, mount_bucket):
    names = [f"f{i:03d}" for i in range(FILES)]
    fill(s3, bucket, [f"data/{n}" for n in names] + ["data/sub/x"])
    mount = mount_bucket(bucket, "--metadata-ttl", str(TTL), endpoint=proxy.endpoint)
    assert sorted(os.listdir(mount.path / "data")) == sorted(names + ["sub"])
    time.sleep(TTL + 0.3)
    # Meanwhile another client replaces one file, deletes one and adds one.
    s3.put_object(Bucket=bucket, Key="data/f010", Body=b"replaced")
    s3.delete_object(Bucket=bucket, Key="data/f020")
    s3.put_object(Bucket=bucket, Key="data/new", Body=b"new")
    proxy.clear()
    contents = {}
    started = time.monotonic()
    for name in names + ["new"]:  # as `for f in ...; do cat "$f"; done` would
        result = subprocess.run(["cat", str(mount.path / "data" / name)], capture_output=True, timeout=30)
        contents[name] = result.stdout if result.returncode == 0 else result.stderr.decode()
    periods = math.ceil((time.monotonic() - started) / TTL)
    assert contents["f010"] == b"replaced"
    assert "No such file or directory" in contents["f020"]
    assert contents["new"] == b"new"
    assert all(contents[n] == f"data/{n}".encode() for n in names if n not in ("f010", "f020"))
    heads, lists = proxy.records("HeadObject"), proxy.records("ListObjectsV2")
    # Listings of the directory, not revalidations of the name "data" (max-keys=1).
    directory_lists = [r for r in lists if r.query.get("prefix") == "data/" and r.query.get("max-keys") != "1"]
    # In every TTL the loop takes: two expired names asked about one by one (a HEAD and a
    # LIST each), the third starting a new listing that answers the others; the deleted
    # name, if the new listing has expired too by the time it comes; the directory
    # "data" revalidated (a LIST). And once the name never listed ("new").
    assert len(directory_lists) >= 1
    assert len(heads) <= 3 * periods + 1, [r.key for r in heads]
    assert proxy.count("GetObject") == FILES  # one GET per file read, none for the deleted one
    # Without relisting: a HEAD and a LIST per file, 2 * FILES requests besides the GETs.
    others = proxy.count() - proxy.count("GetObject")
    assert others <= 7 * periods + 2 and others < FILES, \
        sorted((r.op, r.key or r.query.get("prefix")) for r in proxy.records() if r.op != "GetObject")


@pytest.mark.parametrize("ttl", ["minimal", "indefinite"])
def test_no_relisting_without_a_ttl_that_expires(s3, bucket, proxy, mount_bucket, ttl):
    """"minimal" asks S3 for every name; "indefinite" never asks again."""
    names = [f"f{i}" for i in range(10)]
    fill(s3, bucket, [f"data/{n}" for n in names])
    mount = mount_bucket(bucket, "--metadata-ttl", ttl, endpoint=proxy.endpoint)
    os.listdir(mount.path / "data")
    proxy.clear()
    for name in names:
        assert (mount.path / "data" / name).read_bytes() == f"data/{name}".encode()
    directory_lists = [r for r in proxy.records("ListObjectsV2")
                       if r.query.get("prefix") == "data/" and r.query.get("max-keys") != "1"]
    assert directory_lists == []
    if ttl == "minimal":
        assert {r.key for r in proxy.records("HeadObject")} == {f"data/{n}" for n in names}
    else:
        assert proxy.count("HeadObject") == 0
