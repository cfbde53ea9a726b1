"""S3 failures through a real mount: retried when transient, EIO when not, never a hang;
an object replaced while open is ESTALE, never a mix of two versions."""

from __future__ import annotations

import errno
import os

import pytest

from tests.support.proxy import Reset, Stall, Status

MiB = 1024 * 1024


def read_all(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def expect_errno(code, fn, *args):
    with pytest.raises(OSError) as error:
        fn(*args)
    assert error.value.errno == code, f"expected {errno.errorcode[code]}, got {error.value!r}"


def test_persistent_server_errors_are_eio_and_reads_work_again_after(s3, bucket, proxy, mount_bucket):
    data = os.urandom(3 * MiB)
    s3.put_object(Bucket=bucket, Key="f", Body=data)
    mount = mount_bucket(bucket, "--request-timeout", "20", endpoint=proxy.endpoint)
    os.stat(mount.path / "f")
    with proxy.inject(Status(500), op="GetObject", times=None):
        expect_errno(errno.EIO, read_all, mount.path / "f")
    assert read_all(mount.path / "f") == data
    failures = [e for e in mount.log() if e.get("event") == "read failed"]
    assert failures and failures[0]["s3_status"] == 500, "the log names the S3 status"


def test_slowdown_for_a_while_is_retried(s3, bucket, proxy, mount_bucket):
    data = os.urandom(MiB)
    s3.put_object(Bucket=bucket, Key="f", Body=data)
    mount = mount_bucket(bucket, endpoint=proxy.endpoint)
    os.stat(mount.path / "f")
    proxy.clear()
    with proxy.inject(Status(503, "SlowDown"), op="GetObject", times=2) as slowdown:
        assert read_all(mount.path / "f") == data
    assert slowdown.hits == 2
    assert proxy.count("GetObject") >= 3


def test_listing_and_lookup_errors_are_eio(s3, bucket, proxy, mount_bucket):
    s3.put_object(Bucket=bucket, Key="dir/f", Body=b"1")
    mount = mount_bucket(bucket, "--request-timeout", "2", endpoint=proxy.endpoint)
    with proxy.inject(Status(500), op="ListObjectsV2", times=None):
        expect_errno(errno.EIO, os.listdir, mount.path)
        expect_errno(errno.EIO, os.stat, mount.path / "dir")
    with proxy.inject(Status(503), op="HeadObject", times=None):
        expect_errno(errno.EIO, os.stat, mount.path / "other")
    assert os.listdir(mount.path) == ["dir"]


def test_connection_reset_mid_body_is_retried_with_correct_bytes(s3, bucket, proxy, mount_bucket):
    data = os.urandom(6 * MiB)
    s3.put_object(Bucket=bucket, Key="f", Body=data)
    mount = mount_bucket(bucket, endpoint=proxy.endpoint)
    os.stat(mount.path / "f")
    with proxy.inject(Reset(), op="GetObject", times=2, after_bytes=64 * 1024) as reset:
        assert read_all(mount.path / "f") == data
    assert reset.hits == 2


def test_a_server_that_stops_answering_gives_eio_within_the_request_timeout(s3, bucket, proxy, mount_bucket):
    s3.put_object(Bucket=bucket, Key="f", Body=b"x" * MiB)
    mount = mount_bucket(bucket, "--request-timeout", "2", endpoint=proxy.endpoint)
    os.stat(mount.path / "f")
    with proxy.inject(Stall(None), op="GetObject", times=None):
        expect_errno(errno.EIO, read_all, mount.path / "f")
    assert read_all(mount.path / "f") == b"x" * MiB


def test_object_replaced_while_open_is_estale_never_mixed(s3, bucket, mount_bucket):
    old = b"A" * (32 * MiB)
    s3.put_object(Bucket=bucket, Key="f", Body=old)
    mount = mount_bucket(bucket)
    with open(mount.path / "f", "rb", buffering=0) as f:
        assert f.read(MiB) == old[:MiB]
        s3.put_object(Bucket=bucket, Key="f", Body=b"B" * (32 * MiB))
        got = []
        with pytest.raises(OSError) as error:
            for offset in range(MiB, 32 * MiB, MiB):
                f.seek(offset)
                got.append(f.read(MiB))
        assert error.value.errno == errno.ESTALE
        # Whatever was returned before the error came from the version that was opened.
        assert all(chunk == b"A" * len(chunk) for chunk in got)
    # A new open sees the new version.
    assert read_all(mount.path / "f") == b"B" * (32 * MiB)


def test_reopen_after_estale_sees_a_grown_object_whole(s3, bucket, mount_bucket):
    s3.put_object(Bucket=bucket, Key="f", Body=b"short")
    mount = mount_bucket(bucket, "--metadata-ttl", "indefinite")
    with open(mount.path / "f", "rb") as f:
        s3.put_object(Bucket=bucket, Key="f", Body=b"much longer now")
        expect_errno(errno.ESTALE, f.read)
    assert read_all(mount.path / "f") == b"much longer now"
    assert os.stat(mount.path / "f").st_size == len(b"much longer now")
