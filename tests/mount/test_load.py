"""Load through one real mount: many readers and writers at once, every byte checked,
and the mount process's peak memory within the bound its settings give."""

from __future__ import annotations

import hashlib
import os
import random
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import pytest

from tests.support.processes import proc_status_bytes

KiB, MiB = 1024, 1024 * 1024

READERS, READ_SIZE = 16, 64 * MiB  # 1 GiB read
WRITERS, WRITE_SIZE = 8, 64 * MiB  # 512 MiB written
MAX_MEMORY = 64 * MiB
PART_SIZE = 5 * MiB  # S3's smallest part: a 64 MiB file is 13 parts, at most 4 uploading at once
CHUNK = MiB  # what each program reads or writes at a time
DEADLINE = 100.0  # seconds for all readers and writers together; far more than they need

# The bound on the mount process's peak RSS above what it used before the load, from the
# settings (docs/PERFORMANCE.md, "Limits: memory"):
# Readers: prefetched data within --max-memory, plus, per reader, the request its read
# forces once the budget is spent (driver/fs/prefetch.py, Prefetcher._forced_size): only
# what the read needs, at most one FUSE read (1 MiB with Pail's read-ahead), counted once
# while in flight: the default data path receives a body into the buffer it hands over
# (S3ObjectClient.copies_in_flight). Writers: their parts in flight come out of the same
# budget, but a writer's first one goes even when the budget is spent (driver/fs/upload.py,
# Upload._charge). That is the budget's own count.
IN_FLIGHT_COPIES = 1
FUSE_READ_MAX = MiB
BUDGET_BOUND = MAX_MEMORY + READERS * IN_FLIGHT_COPIES * FUSE_READ_MAX + WRITERS * PART_SIZE
# Outside the budget, each writer's part being filled, twice while it is joined into one
# piece (Upload._take).
WRITERS_FILLING = WRITERS * 2 * PART_SIZE
# The allocator: the mount process keeps up to 128 MiB of freed heap for the next bodies
# (driver/mount.py, _HEAP_KEEP).
ALLOCATOR_SLACK = 128 * MiB
BOUND = BUDGET_BOUND + WRITERS_FILLING + ALLOCATOR_SLACK
# The bound only means something if the data moved exceeds it: a mount that kept every
# byte it read, or every byte written to it, must fail it.
assert READERS * READ_SIZE > BOUND
assert WRITERS * WRITE_SIZE > BOUND


def _data(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.s3_servers("seaweedfs")  # moto serves large ranged GETs at ~10 MB/s
def test_readers_and_writers_at_once_through_one_mount(s3, bucket, mount_bucket):
    started = time.monotonic()
    inputs: dict[str, str] = {}

    def put(i: int) -> None:
        data = _data(i, READ_SIZE)
        s3.put_object(Bucket=bucket, Key=f"in/obj{i:02d}", Body=data)
        inputs[f"obj{i:02d}"] = hashlib.sha256(data).hexdigest()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(put, range(READERS)))
    uploaded = time.monotonic()

    mount = mount_bucket(bucket, "--max-memory", f"{MAX_MEMORY // MiB}MiB",
                         "--write-part-size", f"{PART_SIZE // MiB}MiB")
    pid = mount.process.pid
    assert sorted(os.listdir(mount.path / "in")) == sorted(inputs)
    rss_before = proc_status_bytes(pid, "VmRSS")

    def read(name: str) -> tuple[str, str]:
        sha = hashlib.sha256()
        with open(mount.path / "in" / name, "rb") as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
        return name, sha.hexdigest()

    def write(i: int) -> tuple[str, str]:
        data = _data(1000 + i, WRITE_SIZE)
        name = f"out{i}"
        with open(mount.path / name, "wb") as f:
            f.writelines(data[offset:offset + CHUNK] for offset in range(0, WRITE_SIZE, CHUNK))
            f.flush()
            if i % 2:
                os.fsync(f.fileno())  # half complete on fsync, half on close
        return name, hashlib.sha256(data).hexdigest()

    pool = ThreadPoolExecutor(READERS + WRITERS)
    try:
        reads = [pool.submit(read, name) for name in inputs]
        writes = [pool.submit(write, i) for i in range(WRITERS)]
        done, pending = wait(reads + writes, timeout=DEADLINE, return_when=FIRST_EXCEPTION)
        for future in done:
            future.result()  # raises the first error
        assert not pending, \
            f"{len(pending)} of {len(reads + writes)} readers and writers still running after {DEADLINE:.0f} s"
        read_digests = dict(f.result() for f in reads)
        outputs = dict(f.result() for f in writes)
    finally:
        # A hung reader or writer is freed when the fixture stops the mount (ENOTCONN).
        pool.shutdown(wait=False, cancel_futures=True)
    loaded = time.monotonic()
    peak = proc_status_bytes(pid, "VmHWM")

    assert read_digests == inputs, "every byte read is the object's"
    for name, digest in outputs.items():
        assert (mount.path / name).stat().st_size == WRITE_SIZE
        body = s3.get_object(Bucket=bucket, Key=name)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest, f"{name} is in S3 byte for byte"
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"), "no upload left incomplete"

    mount.stop()
    events = mount.log()
    trouble = [e for e in events if e.get("level") in ("warning", "error", "critical")]
    assert not trouble, trouble[:5]
    unmounted = [e for e in events if e.get("event") == "unmounted"]
    budget_peak = unmounted[0]["object_memory_peak"] if unmounted else None

    growth = peak - rss_before
    assert budget_peak is not None and budget_peak <= BUDGET_BOUND, \
        f"the memory budget's own count peaked at {budget_peak / MiB:.0f} MiB"

    print(f"\nload: {READERS} readers x {READ_SIZE // MiB} MiB and {WRITERS} writers x {WRITE_SIZE // MiB} MiB "
          f"through one mount in {loaded - uploaded:.1f} s (setup {uploaded - started:.1f} s); "
          f"RSS before {rss_before / MiB:.0f} MiB, peak (VmHWM) {peak / MiB:.0f} MiB, "
          f"growth {growth / MiB:.0f} MiB, bound {BOUND / MiB:.0f} MiB "
          f"(budget {BUDGET_BOUND / MiB:.0f} + writers filling {WRITERS_FILLING / MiB:.0f} + "
          f"allocator {ALLOCATOR_SLACK / MiB:.0f}); memory budget peak "
          f"{(budget_peak or 0) / MiB:.0f} MiB of {MAX_MEMORY / MiB:.0f}")
    assert growth <= BOUND, f"peak RSS grew by {growth / MiB:.0f} MiB, bound {BOUND / MiB:.0f} MiB"
