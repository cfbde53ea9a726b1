"""A --read-only mount: each mutating operation fails with EROFS, at once, and changes
nothing in S3."""

from __future__ import annotations

import errno
import os

import pytest


def expect_erofs(fn, *args, **kwargs):
    with pytest.raises(OSError) as error:
        fn(*args, **kwargs)
    assert error.value.errno == errno.EROFS, f"{fn.__name__}: {error.value!r}"


def test_every_change_is_erofs(s3, bucket, mount_bucket):
    s3.put_object(Bucket=bucket, Key="file.txt", Body=b"data")
    s3.put_object(Bucket=bucket, Key="dir/inner", Body=b"x")
    mount = mount_bucket(bucket, "--read-only", "--allow-delete", "--allow-overwrite")
    root = mount.path
    f, d = root / "file.txt", root / "dir"

    expect_erofs(os.open, root / "new.txt", os.O_CREAT | os.O_WRONLY, 0o644)
    expect_erofs(os.open, f, os.O_WRONLY)
    expect_erofs(os.open, f, os.O_RDWR)
    expect_erofs(os.open, f, os.O_WRONLY | os.O_TRUNC)
    expect_erofs(os.open, f, os.O_WRONLY | os.O_APPEND)
    expect_erofs(os.truncate, f, 0)
    expect_erofs(os.mkdir, root / "newdir")
    expect_erofs(os.rmdir, d)
    expect_erofs(os.unlink, f)
    expect_erofs(os.rename, f, root / "renamed.txt")
    expect_erofs(os.rename, d, root / "renamed-dir")
    expect_erofs(os.symlink, "file.txt", root / "link")
    expect_erofs(os.link, f, root / "hardlink")
    expect_erofs(os.chmod, f, 0o600)
    expect_erofs(os.chown, f, 1000, 1000)
    expect_erofs(os.utime, f, (0, 0))
    expect_erofs(os.setxattr, f, "user.note", b"v")
    expect_erofs(os.removexattr, f, "user.note")
    expect_erofs(os.mknod, root / "fifo", 0o600 | 0o010000)

    listing = s3.list_objects_v2(Bucket=bucket)
    assert sorted(o["Key"] for o in listing["Contents"]) == ["dir/inner", "file.txt"]
    assert f.read_bytes() == b"data"
