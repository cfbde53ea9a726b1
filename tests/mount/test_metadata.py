"""What a mount asks S3 for names and attributes, counted at the proxy."""

from __future__ import annotations

import math
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest


def fill(s3, bucket, keys, body=b"."):
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=body), keys))


def ls_l(path):
    return subprocess.run(["ls", "-l", str(path)], check=True, capture_output=True, text=True).stdout


def test_ls_l_takes_attributes_from_the_listing_not_a_head_per_entry(s3, bucket, proxy, mount_bucket):
    fill(s3, bucket, [f"f{i:03d}" for i in range(150)] + ["sub/x"])
    mount = mount_bucket(bucket, endpoint=proxy.endpoint)
    proxy.clear()
    out = ls_l(mount.path)
    assert out.count("\n") == 152  # "total" + 151 entries
    assert proxy.count("HeadObject") == 0
    assert proxy.count("ListObjectsV2") == 1


def test_indefinite_ttl_second_ls_l_asks_nothing(s3, bucket, proxy, mount_bucket):
    fill(s3, bucket, [f"dir/f{i:03d}" for i in range(50)])
    mount = mount_bucket(bucket, "--metadata-ttl", "indefinite", endpoint=proxy.endpoint)
    first = ls_l(mount.path / "dir")
    proxy.clear()
    second = ls_l(mount.path / "dir")
    assert second == first
    assert proxy.count("ListObjectsV2") == 0
    assert proxy.count("HeadObject") == 0
    assert proxy.count() == 0


def test_default_ttl_shows_outside_changes_within_a_second(s3, bucket, mount_bucket):
    s3.put_object(Bucket=bucket, Key="existing", Body=b"v1")
    mount = mount_bucket(bucket)
    target = mount.path / "arrives-later"
    with pytest.raises(FileNotFoundError):
        os.stat(target)
    assert os.stat(mount.path / "existing").st_size == 2
    s3.put_object(Bucket=bucket, Key="arrives-later", Body=b"12345")
    s3.put_object(Bucket=bucket, Key="existing", Body=b"version 2")
    # The default TTL is one second: both changes show within TTL + 1 s.
    deadline = time.monotonic() + 2.0
    seen = None
    while time.monotonic() < deadline:
        try:
            seen = (os.stat(target).st_size, os.stat(mount.path / "existing").st_size)
            if seen == (5, 9):
                break
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    assert seen == (5, 9)
    assert (mount.path / "existing").read_bytes() == b"version 2"


def test_ls_l_sends_no_xattr_requests(s3, bucket, mount_bucket):
    fill(s3, bucket, [f"f{i}" for i in range(20)])
    mount = mount_bucket(bucket, "--debug")
    for _ in range(3):
        ls_l(mount.path)
    ops = [e.get("op") for e in mount.log()]
    assert "readdir" in ops, "the debug log records operations"
    # The kernel asks at most once, gets ENOSYS, and answers EOPNOTSUPP itself after that.
    assert ops.count("getxattr") + ops.count("listxattr") <= 2


@pytest.mark.s3_servers("seaweedfs")
def test_ls_l_of_ten_thousand_objects(s3_server, bucket, proxy, mount_bucket):
    s3_server.put_many(bucket, [f"big/obj{i:05d}" for i in range(10_000)])
    mount = mount_bucket(bucket, endpoint=proxy.endpoint)
    proxy.clear()
    started = time.monotonic()
    out = ls_l(mount.path / "big")
    seconds = time.monotonic() - started
    names = [line.split()[-1] for line in out.splitlines()[1:]]
    assert names == [f"obj{i:05d}" for i in range(10_000)]
    # Ten pages and the lookup of "big"; for each TTL (1 s) that ls outlasts, the kernel's
    # attributes of the entries expire and their lookups may list the directory again (ten
    # pages, and a LIST revalidating "big"): 31 in a run where ls took over 2 s beside the
    # suite. Never a request per entry.
    assert 11 <= proxy.count("ListObjectsV2") <= 11 * (1 + math.ceil(seconds))
    assert proxy.count("HeadObject") <= 1  # the first lookup of "big" itself
