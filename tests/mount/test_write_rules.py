"""Every refusal and allowance of the write semantics, through a real mount, with the one
errno docs/SEMANTICS.md gives it."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

NEW = os.O_WRONLY | os.O_CREAT


def expect(code, fn, *args):
    with pytest.raises(OSError) as error:
        fn(*args)
    assert error.value.errno == code, f"{getattr(fn, '__name__', fn)}: expected {errno.errorcode[code]}, got {error.value!r}"


@pytest.fixture
def mnt(s3, bucket, mount_bucket):
    s3.put_object(Bucket=bucket, Key="existing.txt", Body=b"old")
    s3.put_object(Bucket=bucket, Key="dir/inside.txt", Body=b"in")
    return mount_bucket(bucket).path


def test_write_at_another_offset_is_einval(mnt):
    fd = os.open(mnt / "seq.txt", NEW, 0o644)
    try:
        os.write(fd, b"abc")
        expect(errno.EINVAL, os.pwrite, fd, b"x", 10)
        expect(errno.EINVAL, os.pwrite, fd, b"x", 0)
        os.write(fd, b"def")
    finally:
        os.close(fd)
    assert (mnt / "seq.txt").read_bytes() == b"abcdef"


@pytest.mark.parametrize("flag", [os.O_SYNC, os.O_DSYNC])
def test_o_sync_and_o_dsync_are_einval(mnt, flag):
    expect(errno.EINVAL, os.open, mnt / "sync.txt", NEW | flag, 0o644)
    assert not (mnt / "sync.txt").exists()


def test_existing_object_is_not_opened_for_writing(mnt):
    expect(errno.EPERM, os.open, mnt / "existing.txt", os.O_WRONLY)
    expect(errno.EPERM, os.open, mnt / "existing.txt", os.O_WRONLY | os.O_TRUNC)
    expect(errno.EPERM, os.open, mnt / "existing.txt", os.O_WRONLY | os.O_APPEND)
    assert (mnt / "existing.txt").read_bytes() == b"old"


def test_reader_and_writer_at_once_is_eperm_on_the_second_open(mnt):
    fd = os.open(mnt / "busy.txt", NEW, 0o644)
    try:
        os.write(fd, b"partial")
        expect(errno.EPERM, os.open, mnt / "busy.txt", os.O_RDONLY)
        assert os.stat(mnt / "busy.txt").st_size == 7, "it shows, with its size so far"
        assert "busy.txt" in os.listdir(mnt)
    finally:
        os.close(fd)
    reader = os.open(mnt / "busy.txt", os.O_RDONLY)
    try:
        assert os.read(reader, 100) == b"partial"
    finally:
        os.close(reader)


def test_writer_refused_while_a_reader_has_it_open(s3, bucket, mount_bucket):
    s3.put_object(Bucket=bucket, Key="f.txt", Body=b"v1")
    mnt = mount_bucket(bucket, "--allow-overwrite").path
    with open(mnt / "f.txt", "rb"):
        expect(errno.EPERM, os.open, mnt / "f.txt", os.O_WRONLY | os.O_TRUNC)


def test_rename_link_and_ownership(mnt):
    expect(errno.ENOSYS, os.rename, mnt / "existing.txt", mnt / "moved.txt")
    expect(errno.EPERM, os.rename, mnt / "dir", mnt / "moved-dir")
    expect(errno.EPERM, os.link, mnt / "existing.txt", mnt / "hard")
    expect(errno.EPERM, os.symlink, "existing.txt", mnt / "soft")
    expect(errno.EPERM, os.chmod, mnt / "existing.txt", 0o600)
    expect(errno.EPERM, os.chown, mnt / "existing.txt", 1234, 1234)
    os.chmod(mnt / "existing.txt", 0o644)  # the mode it already has: no change, accepted
    assert sorted(os.listdir(mnt)) == ["dir", "existing.txt"]


def test_xattrs_and_fallocate_are_eopnotsupp(mnt):
    expect(errno.EOPNOTSUPP, os.setxattr, mnt / "existing.txt", "user.tag", b"v")
    expect(errno.EOPNOTSUPP, os.getxattr, mnt / "existing.txt", "user.tag")
    expect(errno.EOPNOTSUPP, os.listxattr, mnt / "existing.txt")
    result = subprocess.run(["fallocate", "-l", "1M", str(mnt / "prealloc.bin")], capture_output=True, text=True)
    assert result.returncode != 0 and "Operation not supported" in result.stderr


def test_times_and_truncate_while_writing_are_allowed(s3, bucket, mnt):
    fd = os.open(mnt / "stamped.txt", NEW, 0o644)
    try:
        os.write(fd, b"draft that is thrown away")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"final")
        os.utime(fd, (1_600_000_000, 1_600_000_000))
        expect(errno.EPERM, os.ftruncate, fd, 2)
    finally:
        os.close(fd)
    assert s3.get_object(Bucket=bucket, Key="stamped.txt")["Body"].read() == b"final"
    expect(errno.EPERM, os.utime, mnt / "stamped.txt", (0, 0))
    expect(errno.EPERM, os.truncate, mnt / "existing.txt", 0)


def test_unlink_needs_allow_delete_and_a_finished_file(s3, bucket, mount_bucket):
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"a")
    plain = mount_bucket(bucket).path
    expect(errno.EPERM, os.unlink, plain / "a.txt")
    deleting = mount_bucket(bucket, "--allow-delete").path
    fd = os.open(deleting / "writing.txt", NEW, 0o644)
    try:
        expect(errno.EPERM, os.unlink, deleting / "writing.txt")
    finally:
        os.close(fd)
    os.unlink(deleting / "a.txt")
    expect(errno.ENOENT, os.unlink, deleting / "a.txt")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["writing.txt"]


def test_overwrite_with_allow_overwrite_and_o_trunc(s3, bucket, mount_bucket):
    s3.put_object(Bucket=bucket, Key="model.ckpt", Body=b"epoch 1")
    mnt = mount_bucket(bucket, "--allow-overwrite").path
    assert (mnt / "model.ckpt").read_bytes() == b"epoch 1"
    (mnt / "model.ckpt").write_bytes(b"epoch 2, longer")  # open(O_WRONLY|O_CREAT|O_TRUNC)
    assert s3.get_object(Bucket=bucket, Key="model.ckpt")["Body"].read() == b"epoch 2, longer"
    assert (mnt / "model.ckpt").read_bytes() == b"epoch 2, longer"
    expect(errno.EPERM, os.open, mnt / "model.ckpt", os.O_WRONLY)  # without O_TRUNC


def test_directories(s3, bucket, mnt):
    os.mkdir(mnt / "new")
    os.mkdir(mnt / "new" / "deeper")
    assert "new" in os.listdir(mnt)
    expect(errno.EEXIST, os.mkdir, mnt / "dir")
    expect(errno.ENOTEMPTY, os.rmdir, mnt / "new")
    expect(errno.EPERM, os.rmdir, mnt / "dir")
    os.rmdir(mnt / "new" / "deeper")
    os.rmdir(mnt / "new")
    assert "new" not in os.listdir(mnt)
    os.makedirs(mnt / "kept" / "sub")
    (mnt / "kept" / "sub" / "f.txt").write_bytes(b"x")
    expect(errno.EPERM, os.rmdir, mnt / "kept" / "sub")  # now a key prefix in S3
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["dir/inside.txt", "existing.txt", "kept/sub/f.txt"], "no directory marker objects"


@pytest.mark.s3_servers("moto")
def test_file_past_ten_thousand_parts_is_efbig(tmp_path_factory):
    """With parts of 1 KiB, on a moto that accepts them, the 10,001st part is refused."""
    from tests.support.mounts import PailMount
    from tests.support.s3server import start_moto

    workdir = tmp_path_factory.mktemp("small-parts")
    server = start_moto(workdir, min_part_size=1024)
    try:
        bucket = server.create_bucket()
        mount = PailMount(bucket=bucket, path=workdir / "mnt", endpoint=server.endpoint, env=server.env(),
                          args=["--write-part-size", "1KiB"], log_path=workdir / "mnt.log").start()
        try:
            limit = 10_000 * 1024
            fd = os.open(mount.path / "huge.bin", NEW, 0o644)
            try:
                block = b"p" * (64 * 1024)
                for offset in range(0, limit, len(block)):
                    os.write(fd, block[: limit - offset])
                expect(errno.EFBIG, os.write, fd, b"one byte too many")
            finally:
                os.close(fd)
            head = server.client().head_object(Bucket=bucket, Key="huge.bin")
            assert head["ContentLength"] == limit
        finally:
            mount.stop()
    finally:
        server.stop()
