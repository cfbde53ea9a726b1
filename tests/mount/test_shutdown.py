"""SIGTERM to a mount process (`pail mount --foreground`, or one the node server started):
it stops reading kernel requests, answers the ones it is already serving, unmounts
(lazily: open descriptors stay, answered ENOTCONN), aborts the uploads of files still
being written, and exits 0, within a bounded time. Measured times are printed (`-s`).

What the application sees after the mount stopped:
- a file it was still writing: no object and no multipart upload in S3; its next write,
  fsync and its close() fail with ENOTCONN;
- a read being served when SIGTERM came: answered with the bytes if S3 answers; if S3 does
  not, EIO after --request-timeout, and the kernel's own retry of that page is then ended
  with ECONNABORTED (queued before the mount closed /dev/fuse) or ENOTCONN (sent after),
  which is what read() returns; the next read fails with ENOTCONN;
- a write being served (waiting for a free part-upload slot): EIO once the held part
  fails (--request-timeout), then ENOTCONN;
- more SIGTERMs (or SIGINTs) while it stops are logged and change nothing.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

import pytest

from tests.support.mounts import is_mounted
from tests.support.processes import errno_of
from tests.support.proxy import Stall

pytestmark = pytest.mark.s3_servers("seaweedfs")

MiB = 1024 * 1024
PART = 5 * MiB  # the smallest part size S3 allows: multipart uploads with little data
EXIT_BOUND = 20.0  # seconds; nothing here waits on S3 longer than --request-timeout (3 s)


def _sigterm(mount, bound: float = EXIT_BOUND) -> tuple[int, float]:
    """SIGTERM, then (exit status, seconds until the process ended)."""
    started = time.monotonic()
    mount.process.send_signal(signal.SIGTERM)
    status = mount.process.wait(timeout=bound)  # TimeoutExpired: a hang; the fixture kills it
    return status, time.monotonic() - started


def _events(mount) -> list[dict]:
    return mount.log()


def _assert_stopped_cleanly(mount, status: int) -> None:
    assert status == 0
    assert not is_mounted(mount.path), "the mount point is left behind"
    events = _events(mount)
    stopping = [e for e in events if e["event"] == "stopping"]
    assert [e["signal"] for e in stopping] == ["SIGTERM"]
    assert events[-1]["event"] == "unmounted" and events[-1]["clean"] is True


def _uploads(s3, bucket) -> list[dict]:
    return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def _keys(s3, bucket) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


class _Blocked(threading.Thread):
    """One call in a daemon thread (it may stay blocked in the kernel while the test
    fails; the fixture's stop of the mount releases it). ``result`` or ``error`` (errno)."""

    def __init__(self, call) -> None:
        super().__init__(daemon=True)
        self._call = call
        self.result = None
        self.error: int | None = None
        self.finished_at: float | None = None

    def run(self) -> None:
        try:
            self.result = self._call()
        except OSError as exc:
            self.error = exc.errno
        finally:
            self.finished_at = time.monotonic()


def test_idle_mount_exits_0_unmounted(s3, bucket, mount_bucket):
    s3.put_object(Bucket=bucket, Key="f", Body=b"idle")
    mount = mount_bucket(bucket)
    assert (mount.path / "f").read_bytes() == b"idle"
    status, seconds = _sigterm(mount)
    print(f"\nidle: SIGTERM → exit {status} in {seconds:.2f} s")
    _assert_stopped_cleanly(mount, status)
    assert mount.path.is_dir() and os.listdir(mount.path) == [], "the plain directory is back"


def test_file_being_written_is_aborted_not_completed(s3, bucket, mount_bucket):
    mount = mount_bucket(bucket, "--write-part-size", "5MiB")
    path = mount.path / "unfinished.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, os.urandom(2 * PART + 1))  # two parts go up, the rest waits in the mount
        assert [u["Key"] for u in _uploads(s3, bucket)] == ["unfinished.bin"], "a multipart upload is open"
        status, seconds = _sigterm(mount)
        print(f"\nwriting (file open, no write in flight): SIGTERM → exit {status} in {seconds:.2f} s")
        _assert_stopped_cleanly(mount, status)
        assert errno_of(lambda: os.write(fd, b"more")) == errno.ENOTCONN
        assert errno_of(lambda: os.fsync(fd)) == errno.ENOTCONN
    finally:
        close_error = errno_of(lambda: os.close(fd))
    assert close_error == errno.ENOTCONN, "close() does not report a file as written"
    assert _keys(s3, bucket) == [], "no truncated object"
    assert _uploads(s3, bucket) == [], "the multipart upload was aborted"
    aborted = [e for e in _events(mount) if e["event"] == "unmounted while being written: upload aborted"]
    assert [(e["key"], e["size"]) for e in aborted] == [("unfinished.bin", 2 * PART + 1)]


def test_write_in_flight_is_answered_eio_then_the_upload_aborted(s3, bucket, proxy, mount_bucket):
    """A write waiting for a free upload slot (S3 holds every UploadPart) when SIGTERM
    comes: the mount waits for it, at most --request-timeout, answers it EIO, aborts the
    upload and exits."""
    mount = mount_bucket(bucket, "--write-part-size", "5MiB", "--request-timeout", "3",
                         endpoint=proxy.endpoint)
    fd = os.open(mount.path / "stuck.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    accepted = [0]

    def write_until_it_fails() -> None:
        chunk = os.urandom(64 * 1024)  # one FUSE write request per call
        while accepted[0] < 8 * PART:
            accepted[0] += os.write(fd, chunk)

    try:
        with proxy.inject(Stall(None), op="UploadPart", times=None) as stall:
            writer = _Blocked(write_until_it_fails)
            writer.start()
            # Parts 1-4 are in flight (held); the write that fills part 5 waits for a slot.
            assert stall.wait(hits=4, timeout=30), "the parts never reached S3"
            time.sleep(0.5)
            assert writer.is_alive() and accepted[0] <= 5 * PART + 64 * 1024, "the writer waits for a slot"
            signalled = time.monotonic()
            status, seconds = _sigterm(mount)
            writer.join(timeout=EXIT_BOUND)
        assert not writer.is_alive(), "the writer is still blocked"
        print(f"\nwrite in flight, S3 holding every part (--request-timeout 3): SIGTERM → exit {status} "
              f"in {seconds:.2f} s; the write failed {writer.finished_at - signalled:.2f} s after SIGTERM")
        _assert_stopped_cleanly(mount, status)
        assert writer.error == errno.EIO, "the mount's own answer to the write it was serving"
        assert errno_of(lambda: os.write(fd, b"more")) == errno.ENOTCONN
    finally:
        close_error = errno_of(lambda: os.close(fd))
    assert close_error == errno.ENOTCONN
    assert _keys(s3, bucket) == []
    assert _uploads(s3, bucket) == [], "the multipart upload was aborted"


def test_read_in_flight_is_answered_before_the_mount_exits(s3, bucket, proxy, mount_bucket):
    data = os.urandom(4 * MiB)
    s3.put_object(Bucket=bucket, Key="slow.bin", Body=data)
    mount = mount_bucket(bucket, "--request-timeout", "10", endpoint=proxy.endpoint)
    fd = os.open(mount.path / "slow.bin", os.O_RDONLY)
    try:
        with proxy.inject(Stall(1.5), op="GetObject", times=None) as stall:  # a slow S3, not a dead one
            reader = _Blocked(lambda: os.pread(fd, 64 * 1024, 0))
            reader.start()
            assert stall.wait(timeout=30)
            signalled = time.monotonic()
            status, seconds = _sigterm(mount)
            reader.join(timeout=EXIT_BOUND)
        print(f"\nread in flight, S3 answering in 1.5 s: SIGTERM → exit {status} in {seconds:.2f} s; "
              f"the read returned {reader.finished_at - signalled:.2f} s after SIGTERM")
        assert reader.error is None and reader.result == data[:64 * 1024], "the read in flight was answered"
        _assert_stopped_cleanly(mount, status)
        assert errno_of(lambda: os.pread(fd, 64 * 1024, 2 * MiB)) == errno.ENOTCONN
    finally:
        errno_of(lambda: os.close(fd))


def test_read_stalled_in_s3_delays_the_exit_by_at_most_the_request_timeout(s3, bucket, proxy, mount_bucket):
    s3.put_object(Bucket=bucket, Key="stuck.bin", Body=os.urandom(MiB))
    mount = mount_bucket(bucket, "--request-timeout", "3", endpoint=proxy.endpoint)
    fd = os.open(mount.path / "stuck.bin", os.O_RDONLY)
    try:
        with proxy.inject(Stall(None), op="GetObject", times=None) as stall:
            reader = _Blocked(lambda: os.pread(fd, 64 * 1024, 0))
            reader.start()
            assert stall.wait(timeout=30)
            status, seconds = _sigterm(mount)
            reader.join(timeout=EXIT_BOUND)
        print(f"\nread in flight, S3 not answering (--request-timeout 3): SIGTERM → exit {status} "
              f"in {seconds:.2f} s")
        assert not reader.is_alive()
        # The mount answered the read EIO after --request-timeout; the kernel asks once more
        # for a page whose read failed. That retry races the mount's exit: queued before the
        # mount's /dev/fuse descriptor closed, the kernel ends it ECONNABORTED; sent after,
        # ENOTCONN (CI saw both). Either way an error, never data and never a hang.
        assert reader.error in (errno.ECONNABORTED, errno.ENOTCONN), (reader.error, reader.result)
        assert seconds < 3 + 5, "bounded by --request-timeout"
        _assert_stopped_cleanly(mount, status)
        assert errno_of(lambda: os.pread(fd, 64 * 1024, 0)) == errno.ENOTCONN
    finally:
        errno_of(lambda: os.close(fd))


def test_a_second_sigterm_while_stopping_does_not_cut_the_clean_up_short(s3, bucket, proxy, mount_bucket):
    """Stopping waits for the requests in flight (here a write waiting on S3 until
    --request-timeout): more SIGTERMs meanwhile are logged and change nothing. (Before the
    fix, the second one killed the process: exit -15, the dead mount left in place and the
    multipart upload left in S3.)"""
    mount = mount_bucket(bucket, "--write-part-size", "5MiB", "--request-timeout", "3",
                         endpoint=proxy.endpoint)
    fd = os.open(mount.path / "stuck.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with proxy.inject(Stall(None), op="UploadPart", times=None) as stall:
            writer = _Blocked(lambda: os.write(fd, os.urandom(6 * PART + 1)))
            writer.start()
            assert stall.wait(hits=4, timeout=30), "the parts never reached S3"
            time.sleep(0.5)
            mount.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert mount.alive, "still stopping: a write is in flight"
            status, seconds = _sigterm(mount)
        writer.join(timeout=EXIT_BOUND)
        print(f"\nsecond SIGTERM 0.5 s into stopping: exit {status} {seconds:.2f} s after it")
        assert status == 0 and not is_mounted(mount.path)
        events = [e["event"] for e in _events(mount)]
        assert [e for e in events if e in ("stopping", "already stopping", "unmounted")] == \
            ["stopping", "already stopping", "unmounted"]
    finally:
        errno_of(lambda: os.close(fd))
    assert _uploads(s3, bucket) == [], "the multipart upload was aborted"
    assert _keys(s3, bucket) == []
