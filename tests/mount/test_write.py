"""Writing through a real mount: new objects byte for byte, uploaded while written,
complete when closed, every failure reported."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess

import pytest

from tests.support.processes import wait_until
from tests.support.proxy import Status

KiB, MiB = 1024, 1024 * 1024
PART = 8 * MiB


def s3_bytes(s3, bucket, key) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def write_file(path, data: bytes, chunk: int = MiB) -> None:
    with open(path, "wb") as f:
        for offset in range(0, len(data), chunk):
            f.write(data[offset:offset + chunk])


@pytest.mark.parametrize("size", [0, 1, PART, 2 * PART + 1])
def test_new_file_becomes_one_object(s3, bucket, mount_bucket, size):
    data = os.urandom(size)
    mount = mount_bucket(bucket)
    write_file(mount.path / "out.bin", data)
    assert s3_bytes(s3, bucket, "out.bin") == data
    assert (mount.path / "out.bin").read_bytes() == data
    assert os.stat(mount.path / "out.bin").st_size == size
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


@pytest.mark.s3_servers("seaweedfs")  # moto keeps every part in Python memory; slow at this size
def test_large_file_uploads_while_written_with_bounded_memory(s3, bucket, proxy, mount_bucket):
    from tests.mount.test_prefetch import current_rss, peak_rss

    mount = mount_bucket(bucket, endpoint=proxy.endpoint)
    rss_before = current_rss(mount.process.pid)
    sha = hashlib.sha256()
    block = os.urandom(MiB)
    parts_before_close = None
    with open(mount.path / "big.bin", "wb") as f:
        for i in range(200):
            chunk = bytes([i]) + block[1:]
            f.write(chunk)
            sha.update(chunk)
        f.flush()
        parts_before_close = proxy.count("UploadPart")
    assert parts_before_close >= 20, "parts go up while the file is written"
    # A writer holds the part it fills and the parts in flight, not the file.
    assert peak_rss(mount.process.pid) - rss_before <= 6 * PART + 32 * MiB
    body = s3.get_object(Bucket=bucket, Key="big.bin")["Body"]
    assert hashlib.sha256(body.read()).digest() == sha.digest()


@pytest.mark.s3_servers("seaweedfs")
def test_writers_at_once_stay_within_the_mounts_memory_budget(s3, bucket, mount_bucket):
    from concurrent.futures import ThreadPoolExecutor

    from tests.mount.test_prefetch import current_rss, peak_rss

    part, writers, size = 5 * MiB, 6, 60 * MiB
    mount = mount_bucket(bucket, "--max-memory", "8MiB", "--write-part-size", "5MiB")
    rss_before = current_rss(mount.process.pid)
    block = os.urandom(MiB)

    def write(n):
        sha = hashlib.sha256()
        with open(mount.path / f"out{n}.bin", "wb") as f:
            for i in range(size // MiB):
                chunk = bytes([n, i]) + block[2:]
                f.write(chunk)
                sha.update(chunk)
        return sha.digest()

    with ThreadPoolExecutor(writers) as pool:
        digests = list(pool.map(write, range(writers)))
    # Whatever the budget, each writer holds the part it fills (twice while it is joined
    # into one piece) and one part in flight; more parts in flight come out of
    # --max-memory. Without the budget they went up to 183 MiB here.
    assert peak_rss(mount.process.pid) - rss_before <= 8 * MiB + writers * 3 * part + 32 * MiB
    for n, digest in enumerate(digests):
        assert hashlib.sha256(s3_bytes(s3, bucket, f"out{n}.bin")).digest() == digest


def test_failed_part_is_eio_at_close_and_leaves_no_upload(s3, bucket, proxy, mount_bucket):
    mount = mount_bucket(bucket, "--request-timeout", "10", endpoint=proxy.endpoint)
    with proxy.inject(Status(500), op="UploadPart", times=None):
        with pytest.raises(OSError) as error:
            write_file(mount.path / "doomed.bin", os.urandom(3 * PART))
    assert error.value.errno == 5  # EIO, from a write or from close()
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert "doomed.bin" not in [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert not (mount.path / "doomed.bin").exists()


def test_an_upload_aborted_in_s3_mid_write_is_eio(s3, bucket, mount_bucket):
    """Another client (or a lifecycle rule) aborts the multipart upload: S3 answers the
    next part with 404 NoSuchUpload, a failed upload like any other, not a deleted file."""
    mount = mount_bucket(bucket)
    f = open(mount.path / "aborted.bin", "wb")
    try:
        f.write(os.urandom(PART + MiB))
        f.flush()  # the first part is on its way: the upload exists in S3
        [upload] = wait_until(lambda: s3.list_multipart_uploads(Bucket=bucket).get("Uploads"),
                              "the upload started in S3", timeout=10)
        s3.abort_multipart_upload(Bucket=bucket, Key="aborted.bin", UploadId=upload["UploadId"])
        with pytest.raises(OSError) as error:
            f.write(os.urandom(2 * PART))  # its parts go to an upload that is gone
            f.close()
        assert error.value.errno == errno.EIO, error.value
    finally:
        with contextlib.suppress(OSError):
            f.close()
    assert "aborted.bin" not in [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_failed_small_upload_is_eio_at_close(s3, bucket, proxy, mount_bucket):
    mount = mount_bucket(bucket, "--request-timeout", "10", endpoint=proxy.endpoint)
    f = open(mount.path / "small.txt", "wb")
    f.write(b"tiny")
    # A 503 that every retry meets. Not SlowDown: botocore backs off from throttling codes
    # starting at 1 s (up to 31 s of sleep before the last attempt), from other 503s at
    # 50 ms; Pail handles both the same way.
    with proxy.inject(Status(503, "ServiceUnavailable"), op="PutObject", times=None):
        with pytest.raises(OSError) as error:
            f.close()
    assert error.value.errno == 5
    assert proxy.count("PutObject") > 1, "retried before giving up"
    assert not (mount.path / "small.txt").exists()


def test_fsync_completes_the_object_and_ends_writing(s3, bucket, mount_bucket):
    mount = mount_bucket(bucket)
    fd = os.open(mount.path / "synced.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        assert s3_bytes(s3, bucket, "synced.txt") == b"durable"
        with pytest.raises(OSError) as error:
            os.write(fd, b" more")
        assert error.value.errno == 1  # EPERM
    finally:
        os.close(fd)
    assert s3_bytes(s3, bucket, "synced.txt") == b"durable"


@pytest.mark.parametrize("command,key,expected", [
    ("echo hello > redirect.txt", "redirect.txt", b"hello\n"),
    ("(echo one; sleep 0.2; echo two) > subshell.txt", "subshell.txt", b"one\ntwo\n"),
    ("dd if=/dev/zero of=dd.bin bs=64K count=20 status=none", "dd.bin", b"\0" * (64 * KiB * 20)),
    ("touch empty.txt", "empty.txt", b""),
    ("printf 'a\\nb\\n' | tee tee.txt > /dev/null", "tee.txt", b"a\nb\n"),
    ("python3 -c \"open('py.txt', 'w').write('from python')\"", "py.txt", b"from python"),
])
def test_tools_write_the_right_object(s3, bucket, mount_bucket, command, key, expected):
    mount = mount_bucket(bucket)
    subprocess.run(["bash", "-c", command], cwd=mount.path, check=True, timeout=60)
    assert s3_bytes(s3, bucket, key) == expected


def test_cp_tar_and_rsync_of_new_files(s3, bucket, mount_bucket, tmp_path):
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_bytes(b"alpha")
    (source / "sub" / "b.bin").write_bytes(os.urandom(3 * MiB))
    os.utime(source / "a.txt", (1_600_000_000, 1_600_000_000))
    subprocess.run(["tar", "cf", str(tmp_path / "src.tar"), "-C", str(tmp_path), "src"], check=True)
    mount = mount_bucket(bucket)
    run = lambda *args: subprocess.run(args, cwd=mount.path, capture_output=True, text=True, timeout=120)  # noqa: E731
    assert run("cp", str(source / "a.txt"), "cp.txt").returncode == 0
    assert run("cp", "-p", str(source / "a.txt"), "cp-p.txt").returncode == 0
    assert run("cp", "-r", str(source), "cp-r").returncode == 0
    untar = run("tar", "xf", str(tmp_path / "src.tar"))
    assert untar.returncode == 0, untar.stderr
    rsync = run("rsync", "-r", "--inplace", f"{source}/", "rsynced/")
    assert rsync.returncode == 0, rsync.stderr
    keys = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    for prefix in ("cp-r/", "src/", "rsynced/"):
        assert keys[prefix + "a.txt"] == 5 and keys[prefix + "sub/b.bin"] == 3 * MiB
    assert s3_bytes(s3, bucket, "cp-p.txt") == b"alpha" and s3_bytes(s3, bucket, "cp.txt") == b"alpha"
    assert s3_bytes(s3, bucket, "src/sub/b.bin") == (source / "sub" / "b.bin").read_bytes()


def test_a_forked_child_closing_its_copy_does_not_end_the_upload(s3, bucket, mount_bucket):
    mount = mount_bucket(bucket)
    fd = os.open(mount.path / "forked.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"parent before fork\n")
    pid = os.fork()
    if pid == 0:  # the child closes its inherited descriptor and exits
        os.close(fd)
        os._exit(0)
    os.waitpid(pid, 0)
    os.write(fd, b"parent after the child closed\n")
    os.close(fd)
    assert s3_bytes(s3, bucket, "forked.txt") == b"parent before fork\nparent after the child closed\n"


def test_a_dup_closed_early_does_not_end_the_upload(s3, bucket, mount_bucket):
    mount = mount_bucket(bucket)
    fd = os.open(mount.path / "dup.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(os.dup(fd))
    os.write(fd, b"written after the dup was closed")
    os.close(fd)
    assert s3_bytes(s3, bucket, "dup.txt") == b"written after the dup was closed"


def test_a_killed_writer_still_completes_what_it_wrote(s3, bucket, mount_bucket):
    mount = mount_bucket(bucket)
    writer = subprocess.Popen(["python3", "-c", "import sys, time\n"
                               "f = open('killed.txt', 'wb', buffering=0)\n"
                               "f.write(b'written before the kill')\n"
                               "print('ready', flush=True)\n"
                               "time.sleep(60)\n"], cwd=mount.path, stdout=subprocess.PIPE)
    assert writer.stdout.readline() == b"ready\n"
    writer.kill()
    writer.wait(timeout=30)
    assert s3_bytes(s3, bucket, "killed.txt") == b"written before the kill"


def test_written_files_are_one_view_with_s3(s3, bucket, mount_bucket):
    mount = mount_bucket(bucket, "--allow-delete")
    (mount.path / "mine.txt").write_bytes(b"from the mount")
    assert s3_bytes(s3, bucket, "mine.txt") == b"from the mount"
    s3.put_object(Bucket=bucket, Key="theirs.txt", Body=b"from another client")
    s3.delete_object(Bucket=bucket, Key="mine.txt")
    import time
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and sorted(os.listdir(mount.path)) != ["theirs.txt"]:
        time.sleep(0.1)
    assert sorted(os.listdir(mount.path)) == ["theirs.txt"]
    assert (mount.path / "theirs.txt").read_bytes() == b"from another client"
    os.unlink(mount.path / "theirs.txt")
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


@pytest.mark.s3_servers("seaweedfs")
def test_stopping_the_mount_mid_write_leaves_no_truncated_object(s3, bucket, mount_bucket):
    import signal

    mount = mount_bucket(bucket)
    fd = os.open(mount.path / "unfinished.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, os.urandom(3 * PART))  # parts are in flight or uploaded
    mount.process.send_signal(signal.SIGTERM)
    assert mount.process.wait(timeout=60) == 0
    try:
        os.close(fd)
    except OSError:
        pass  # the mount is gone: ENOTCONN
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0, "no truncated object"
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == [], "the upload was aborted"
