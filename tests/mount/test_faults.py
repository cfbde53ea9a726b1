"""Faults between a real mount and S3, injected by the recording proxy (issue 8).

Transient server errors, resets and slowness are retried and never change a byte; a
server that stops answering gives EIO within --request-timeout, on reads and on writes,
and the mount works again once it answers. Whatever happens, data that close() or
fsync() reported as written is in S3 byte for byte, and every failed write reported an
error to the writer.

Faults act in the proxy, so one S3 server (SeaweedFS) is enough. Every blocking file
operation runs under a hard limit (``bounded``), so a hang fails the test instead of
stalling the suite; mounts and the proxy are cleaned up by their fixtures.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
import time
from dataclasses import dataclass

import pytest

from driver.fs.prefetch import FAILED_RANGE_HOLD
from tests.support.proxy import DropContentRange, Record, Reset, Stall, Status

pytestmark = pytest.mark.s3_servers("seaweedfs")

KiB, MiB = 1024, 1024 * 1024
PART = 5 * MiB  # --write-part-size of the write tests: S3's minimum, small files have parts
WRITE_OPS = ("PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload")
TIMEOUT = 3  # --request-timeout of the tests where the server stops answering
NO_HANG = 45.0  # no file operation in this file may take longer: past it, it hangs


# -- helpers ----------------------------------------------------------------------------

def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Outcome:
    value: object
    error: BaseException | None
    elapsed: float


def bounded(fn, *args, limit: float = NO_HANG, **kwargs) -> Outcome:
    """Run ``fn(*args, **kwargs)`` in a thread; fail the test if it has not returned within ``limit``
    seconds. (A thread stuck in the mount is freed when the fixture stops the mount.)"""
    box: dict = {}

    def run() -> None:
        start = time.monotonic()
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc
        box["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True, name=f"bounded-{fn.__name__}")
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        pytest.fail(f"{fn.__name__}{args!r} did not return within {limit:.0f} s: it hangs")
    return Outcome(box.get("value"), box.get("error"), box["elapsed"])


def read_all(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_file(path, data: bytes, *, fsync: bool = False, chunk: int = MiB) -> OSError | None:
    """Write a new file front to back; the first error the writer saw (open, write, fsync
    or close), or None when every call succeeded."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    error = None
    try:
        for offset in range(0, len(data), chunk):
            piece = data[offset:offset + chunk]
            assert os.write(fd, piece) == len(piece)
        if fsync:
            os.fsync(fd)
    except OSError as exc:
        error = exc
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            error = error or exc
    return error


def write_bounded(path, data: bytes, **kwargs) -> tuple[OSError | None, float]:
    outcome = bounded(write_file, path, data, **kwargs)
    if outcome.error is not None:
        raise outcome.error
    return outcome.value, outcome.elapsed


def s3_object(s3, bucket: str, key: str) -> bytes | None:
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None


def assert_no_data_loss(s3, bucket: str, written: dict[str, tuple[bytes, OSError | None]],
                        existing: tuple[str, ...] = ()) -> None:
    """Checked outside the mount, against the server itself: every write that succeeded
    is in S3 byte for byte; every one that did not reported EIO to the writer and left no
    other bytes under its name; no multipart upload is left behind, no stray object."""
    for key, (data, error) in written.items():
        stored = s3_object(s3, bucket, key)
        if error is None:
            assert stored is not None, f"{key}: close()/fsync() succeeded but S3 has no object"
            assert sha(stored) == sha(data), f"{key}: S3 has {len(stored)} other bytes than the {len(data)} written"
        else:
            assert error.errno == errno.EIO, f"{key}: the writer got {error!r}, not EIO"
            # A request that timed out may still have been applied: then it is all there.
            assert stored is None or sha(stored) == sha(data), f"{key}: failed, yet S3 has other bytes"
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert keys <= set(written) | set(existing), f"objects nobody wrote: {keys - set(written)}"


def assert_retried(records: list[Record], *, same=lambda r: (r.op, r.range, r.query.get("partNumber"))) -> None:
    """Every request the proxy failed was sent again (same operation, range, part) and
    that later attempt succeeded."""
    failed = [r for r in records if r.fault]
    assert failed, "no fault was injected"
    for r in failed:
        assert any(same(ok) == same(r) and ok.fault is None and ok.status is not None and ok.status < 300
                   and ok.start >= r.start for ok in records), f"{r.op} {r.range} {r.query} was not retried"


def file_through_proxy(s3, bucket, proxy, mount_bucket, size, *options):
    """An object "f" of ``size`` random bytes, a mount (with ``options``) through the proxy
    that knows it already, and the proxy's records cleared: (the bytes, the mount)."""
    data = os.urandom(size)
    s3.put_object(Bucket=bucket, Key="f", Body=data)
    mount = mount_bucket(bucket, *options, endpoint=proxy.endpoint)
    os.stat(mount.path / "f")
    proxy.clear()
    return data, mount


# -- transient errors: retried, bytes unchanged --------------------------------------------

@pytest.mark.parametrize("fault", [Status(500), Status(503, "SlowDown")], ids=["500", "503-SlowDown"])
def test_server_errors_for_a_while_are_retried_on_reads(s3, bucket, proxy, mount_bucket, fault):
    data, mount = file_through_proxy(s3, bucket, proxy, mount_bucket, 4 * MiB)
    with proxy.inject(fault, op="GetObject", times=3) as errors:
        outcome = bounded(read_all, mount.path / "f")
    assert outcome.error is None, outcome.error
    assert sha(outcome.value) == sha(data)
    assert errors.hits == 3
    gets = proxy.records("GetObject")
    assert [r.status for r in gets if r.fault] == [fault.code] * 3
    assert_retried(gets)


def test_a_ranged_answer_without_content_range_is_asked_again(s3, bucket, proxy, mount_bucket):
    # Seen from SeaweedFS under load (and reported of S3 itself): a 206 without its
    # Content-Range. awscrt refuses such an answer and does not retry it; Pail does.
    data, mount = file_through_proxy(s3, bucket, proxy, mount_bucket, 4 * MiB)
    with proxy.inject(DropContentRange(), op="GetObject", times=2) as dropped:
        outcome = bounded(read_all, mount.path / "f")
    assert outcome.error is None, outcome.error
    assert sha(outcome.value) == sha(data)
    assert dropped.hits == 2


def test_ranged_answers_that_stay_malformed_are_eio_after_the_attempts(s3, bucket, proxy, mount_bucket):
    data, mount = file_through_proxy(s3, bucket, proxy, mount_bucket, 4 * MiB)
    with open(mount.path / "f", "rb", buffering=0) as f:
        with proxy.inject(DropContentRange(), op="GetObject", times=None) as dropped:
            outcome = bounded(os.pread, f.fileno(), MiB, 0)
        assert isinstance(outcome.error, OSError) and outcome.error.errno == errno.EIO, outcome
        assert dropped.hits == 5, "the attempts setting bounds the requests"
        time.sleep(FAILED_RANGE_HOLD)
        outcome = bounded(os.pread, f.fileno(), MiB, 0)
        assert outcome.error is None and outcome.value == data[:MiB], outcome.error


@pytest.mark.parametrize("fault", [Status(500), Status(503, "SlowDown")], ids=["500", "503-SlowDown"])
def test_server_errors_for_a_while_are_retried_on_writes(s3, bucket, proxy, mount_bucket, fault):
    mount = mount_bucket(bucket, "--write-part-size", "5MiB", endpoint=proxy.endpoint)
    proxy.clear()
    # Two failures of every upload request: PutObject, CreateMultipartUpload, the parts
    # (the first two sent, whichever they are), CompleteMultipartUpload.
    errors = {op: proxy.inject(fault, op=op, times=2) for op in WRITE_OPS}
    small, large = os.urandom(100 * KiB), os.urandom(2 * PART + MiB)
    written = {}
    for key, data, fsync in (("small.bin", small, False), ("large.bin", large, True)):
        error, _ = write_bounded(mount.path / key, data, fsync=fsync)
        written[key] = (data, error)
    assert {key: error for key, (_, error) in written.items()} == {"small.bin": None, "large.bin": None}
    assert_no_data_loss(s3, bucket, written)
    assert {op: h.hits for op, h in errors.items()} == dict.fromkeys(WRITE_OPS, 2)
    # One successful request each (three parts), after two failed ones.
    assert {op: proxy.count(op) for op in WRITE_OPS} == {
        "PutObject": 3, "CreateMultipartUpload": 3, "UploadPart": 5, "CompleteMultipartUpload": 3}
    assert_retried([r for r in proxy.records() if r.op in WRITE_OPS])
    assert (mount.path / "large.bin").read_bytes() == large


# -- the server stops answering: EIO within --request-timeout, then it works again ---------

@pytest.mark.parametrize("fault", [Stall(None), Reset()], ids=["stall", "reset"])
def test_server_unreachable_mid_read_is_eio_not_a_hang_then_reads_resume(
        s3, bucket, proxy, mount_bucket, fault):
    data = os.urandom(16 * MiB)
    s3.put_object(Bucket=bucket, Key="f", Body=data)
    mount = mount_bucket(bucket, "--request-timeout", str(TIMEOUT), endpoint=proxy.endpoint)
    with open(mount.path / "f", "rb", buffering=0) as f:
        assert f.read(64 * KiB) == data[:64 * KiB]
        # Every GET from now on is held without an answer, or reset; the next read needs
        # bytes far from what was prefetched.
        with proxy.inject(fault, op="GetObject", times=None) as down:
            outcome = bounded(os.pread, f.fileno(), MiB, 15 * MiB)
        assert isinstance(outcome.error, OSError) and outcome.error.errno == errno.EIO, outcome
        # The GET fails after --request-timeout (a stalled one is not retried: the timeout
        # counts retries in). The kernel then asks at once for the page it was reading again
        # (a failed readahead is retried as a one-page read): that fails at once, with no
        # second GET and no second timeout.
        if isinstance(fault, Stall):
            assert down.hits == 1
        else:
            assert down.hits >= 1  # reset: retried by awscrt within the timeout
        print(f"\n{down.fault.name} of every GET: EIO after {outcome.elapsed:.2f} s "
              f"(--request-timeout {TIMEOUT}), {down.hits} GETs")
        # The server answers again: once the failed bytes are no longer failed at once
        # (FAILED_RANGE_HOLD), the same open file reads on, the right bytes.
        time.sleep(FAILED_RANGE_HOLD)
        outcome = bounded(os.pread, f.fileno(), MiB, 15 * MiB)
        assert outcome.error is None and outcome.value == data[15 * MiB:], outcome.error
    assert sha(bounded(read_all, mount.path / "f").value) == sha(data)


@pytest.mark.parametrize("fault", [Stall(None), Status(503, "SlowDown")], ids=["stall", "503-SlowDown"])
@pytest.mark.parametrize("size", [100 * KiB, 2 * PART + MiB], ids=["PutObject", "multipart"])
def test_server_unreachable_during_upload_is_eio_within_the_timeout(
        s3, bucket, proxy, mount_bucket, fault, size):
    mount = mount_bucket(bucket, "--write-part-size", "5MiB", "--request-timeout", str(TIMEOUT),
                         endpoint=proxy.endpoint)
    data = os.urandom(size)
    op = "PutObject" if size < PART else "UploadPart"
    with proxy.inject(fault, op=op, times=None) as down:
        error, elapsed = write_bounded(mount.path / "lost.bin", data)
    assert error is not None and error.errno == errno.EIO, error
    print(f"\n{down.fault.name} of every {op}: EIO after {elapsed:.2f} s (--request-timeout {TIMEOUT}), "
          f"{proxy.count(op)} {op} requests")
    # Bounded by the request timeout, not by the retries: each stage that waits on S3 (the
    # upload that fails, then the abort of a multipart upload) within one timeout, with
    # room for a loaded machine. Unbounded retries took 5 x the timeout and more.
    assert elapsed < 3 * TIMEOUT + 4, f"EIO only after {elapsed:.1f} s"
    # Once S3 answers again, a new file is written whole.
    again = os.urandom(size)
    error, _ = write_bounded(mount.path / "later.bin", again)
    assert error is None, error
    # The failed file is not in S3, or (a stalled PutObject the server carried out once it
    # answered again, after the writer got EIO) it is there whole.
    assert_no_data_loss(s3, bucket, {"lost.bin": (data, OSError(errno.EIO, "")), "later.bin": (again, None)})


# -- connection resets: retried, exactly the object's bytes ---------------------------------

def test_connection_resets_mid_get_are_retried_with_exactly_the_objects_bytes(s3, bucket, proxy, mount_bucket):
    # Without block fills: reads slowed by resets and retries (8 ms or more each) would
    # fetch the whole of "g" below in the background, where a reset meant for a read may
    # land and its retry come after the assertions.
    data, mount = file_through_proxy(s3, bucket, proxy, mount_bucket, 6 * MiB, "--no-block-fill")
    # Before any byte of the answer, after its first byte, and deep into the body.
    resets = [proxy.inject(Reset(), op="GetObject", times=1),
              proxy.inject(Reset(), op="GetObject", times=1, after_bytes=1),
              proxy.inject(Reset(), op="GetObject", times=2, after_bytes=200 * KiB)]
    outcome = bounded(read_all, mount.path / "f")
    assert outcome.error is None, outcome.error
    assert sha(outcome.value) == sha(data)
    assert [h.hits for h in resets] == [1, 1, 2]
    # Random reads of another object (none of it in the page cache), far apart and
    # backwards, so that each needs a GET of its own, reset once mid-body.
    other = os.urandom(6 * MiB)
    s3.put_object(Bucket=bucket, Key="g", Body=other)
    rng = random.Random(8)
    with open(mount.path / "g", "rb", buffering=0) as f:
        for start in (4.5 * MiB, 3 * MiB, 1.5 * MiB, 0):
            offset, length = int(start) + rng.randrange(64 * KiB), rng.randrange(2, 300 * KiB)
            with proxy.inject(Reset(), op="GetObject", times=1, after_bytes=length // 2) as reset:
                outcome = bounded(os.pread, f.fileno(), length, offset)
            assert outcome.error is None, outcome.error
            assert outcome.value == other[offset:offset + length]
            assert reset.hits == 1
    gets = proxy.records("GetObject")
    assert sum(1 for r in gets if r.fault == "Reset") == 8
    assert_retried(gets)


def test_connection_resets_mid_upload_are_retried_and_the_object_is_exact(s3, bucket, proxy, mount_bucket):
    mount = mount_bucket(bucket, "--write-part-size", "5MiB", endpoint=proxy.endpoint)
    proxy.clear()
    # A part reset while its head is sent, two reset after 1 MiB of their body reached the
    # server, and a PutObject reset 10 KiB into its body.
    resets = [proxy.inject(Reset(), op="UploadPart", times=1),
              proxy.inject(Reset(), op="UploadPart", times=2, after_request_bytes=MiB),
              proxy.inject(Reset(), op="PutObject", times=1, after_request_bytes=10 * KiB)]
    small, large = os.urandom(100 * KiB), os.urandom(2 * PART + MiB)
    written = {}
    for key, data in (("large.bin", large), ("small.bin", small)):
        error, _ = write_bounded(mount.path / key, data)
        written[key] = (data, error)
    assert [h.hits for h in resets] == [1, 2, 1]
    truncated = [r for r in proxy.records() if r.fault == "Reset" and r.forwarded]
    assert len(truncated) == 3 and all(0 < r.request_bytes < PART for r in truncated), \
        "the server got part of a body, then the connection was reset"
    assert {key: error for key, (_, error) in written.items()} == {"large.bin": None, "small.bin": None}
    assert_no_data_loss(s3, bucket, written)
    assert_retried([r for r in proxy.records() if r.op in WRITE_OPS])


# -- a slow server: slow, not failed ----------------------------------------------------------

def test_a_slow_server_makes_reads_and_writes_slow_not_failed(s3, bucket, proxy, mount_bucket):
    data = {key: os.urandom(3 * MiB) for key in ("f1", "f2")}
    for key, body in data.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    mount = mount_bucket(bucket, "--write-part-size", "5MiB", "--request-timeout", str(TIMEOUT),
                         endpoint=proxy.endpoint)
    slow = 1.0  # a third of the request timeout
    # Every GET of f1 waits before it is forwarded; every GET of f2 stops mid-body.
    for key, stall in (("f1", {}), ("f2", {"after_bytes": 64 * KiB})):
        with proxy.inject(Stall(slow), op="GetObject", times=None, **stall) as held:
            outcome = bounded(read_all, mount.path / key)
        assert outcome.error is None, outcome.error
        assert sha(outcome.value) == sha(data[key])
        assert held.hits >= 1 and outcome.elapsed >= slow
    # Every upload request waits before it is forwarded.
    written = {}
    with proxy.inject(Stall(slow), match=lambda r: r.op in WRITE_OPS, times=None) as held:
        for key, payload in (("small.bin", os.urandom(100 * KiB)), ("large.bin", os.urandom(PART + MiB))):
            error, elapsed = write_bounded(mount.path / key, payload)
            written[key] = (payload, error)
            assert elapsed >= slow
    assert held.hits >= 4  # PutObject; Create, two parts, Complete
    assert {key: error for key, (_, error) in written.items()} == {"small.bin": None, "large.bin": None}
    assert_no_data_loss(s3, bucket, written, existing=("f1", "f2"))
    assert not [r for r in proxy.records() if r.op in (*WRITE_OPS, "GetObject") and r.status not in (200, 206)], \
        "nothing failed"


# -- all of it at once: no data loss ------------------------------------------------------------

def test_no_data_loss_under_mixed_faults(s3, bucket, proxy, mount_bucket):
    """Files written (closed or fsync'd) while a quarter of the upload requests fail in
    one of the ways above, some files while their parts always fail; then read back
    through the mount while GETs fail too. Each close()/fsync() that succeeded left its
    bytes in S3; each failure was an error for the writer."""
    mount = mount_bucket(bucket, "--write-part-size", "5MiB", "--request-timeout", str(TIMEOUT),
                         endpoint=proxy.endpoint)
    rng = random.Random(88)
    lock = threading.Lock()

    def sometimes(probability, ops):
        def match(record: Record) -> bool:
            if record.op not in ops or (record.key or "").startswith("doomed"):
                return False
            with lock:
                return rng.random() < probability
        return match

    uploads = ("PutObject", "UploadPart")
    faults = [
        proxy.inject(Reset(), match=lambda r: (r.key or "").startswith("doomed") and r.op == "UploadPart",
                     times=None),
        proxy.inject(Status(500), match=sometimes(0.08, WRITE_OPS), times=None),
        proxy.inject(Status(503, "SlowDown"), match=sometimes(0.04, WRITE_OPS), times=None),
        proxy.inject(Reset(), match=sometimes(0.08, WRITE_OPS), times=None),
        proxy.inject(Reset(), match=sometimes(0.08, uploads), times=None, after_request_bytes=32 * KiB),
    ]
    sizes = [0, 1, 100 * KiB, PART, PART + 1, 2 * PART + MiB, 100 * KiB, 2 * PART + MiB]
    written: dict[str, tuple[bytes, OSError | None]] = {}
    for i, size in enumerate(sizes):
        key = f"file-{i}.bin"
        data = os.urandom(size)
        error, _ = write_bounded(mount.path / key, data, fsync=i % 2 == 1)
        written[key] = (data, error)
    for i in range(2):
        key = f"doomed-{i}.bin"
        data = os.urandom(PART + MiB)
        error, _ = write_bounded(mount.path / key, data, fsync=i % 2 == 1)
        written[key] = (data, error)
        assert error is not None and error.errno == errno.EIO, f"{key}: every part failed, yet {error!r}"
    for handle in faults:
        handle.remove()
    hits = [h.hits for h in faults]
    assert hits[0] >= 2 and sum(hits[1:]) >= 3, f"faults were injected: {hits}"
    print(f"\nmixed faults: hits {hits}; failed writes "
          f"{sorted(k for k, (_, e) in written.items() if e is not None)}")
    assert_no_data_loss(s3, bucket, written)

    # Read back through the mount while a quarter of the GETs fail.
    with proxy.inject(Reset(), match=sometimes(0.1, ("GetObject",)), times=None, after_bytes=16 * KiB), \
            proxy.inject(Status(500), match=sometimes(0.1, ("GetObject",)), times=None):
        for key, (data, error) in written.items():
            if error is None:
                outcome = bounded(read_all, mount.path / key)
                assert outcome.error is None, f"{key}: {outcome.error!r}"
                assert sha(outcome.value) == sha(data), key
