"""Prefetching through a real mount, checked by the requests the proxy sees, not by time."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import random
import subprocess

import pytest

from tests.support.cache_dir import after_the_writer, disk_use
from tests.support.mounts import random_reader_of_a_slow_store, resident_bytes
from tests.support.processes import proc_status_bytes, wait_until
from tests.support.proxy import Stall, Status

KiB, MiB = 1024, 1024 * 1024
MIN_REQUEST = 256 * KiB  # FsSettings defaults
MAX_REQUEST = 8 * MiB
MAX_AHEAD = 4
MAX_DEPTH = 16  # requests ahead for a reader that keeps waiting on them
SLACK = 32 * MiB


def upload(s3, bucket, key, size, seed=1):
    block = random.Random(seed).randbytes(MiB)
    data = b"".join(bytes([i % 251]) + block[1:] for i in range(size // MiB))
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    return hashlib.sha256(data).hexdigest()


def mounted_object(s3, bucket, proxy, mount_bucket, size, *options):
    """An object of ``size`` bytes, its path through a fresh mount (with ``options``) behind
    ``proxy`` (looked up, the proxy's records cleared) and its bytes."""
    upload(s3, bucket, "big", size)
    expected = s3.get_object(Bucket=bucket, Key="big")["Body"].read()
    path = mount_bucket(bucket, *options, endpoint=proxy.endpoint).path / "big"
    os.stat(path)
    proxy.clear()
    return path, expected


def peak_rss(pid: int) -> int:
    return proc_status_bytes(pid, "VmHWM")


def current_rss(pid: int) -> int:
    return proc_status_bytes(pid, "VmRSS")


@pytest.mark.s3_servers("seaweedfs")  # moto serves large ranged GETs at ~10 MB/s
def test_sequential_read_prefetches_growing_part_aligned_requests(s3, bucket, proxy, mount_bucket):
    digest = upload(s3, bucket, "big", 256 * MiB)
    mount = mount_bucket(bucket, "--max-memory", "64MiB", endpoint=proxy.endpoint)
    os.stat(mount.path / "big")
    rss_before = current_rss(mount.process.pid)
    proxy.clear()
    sha = hashlib.sha256()
    with open(mount.path / "big", "rb") as f:
        while chunk := f.read(MiB):
            sha.update(chunk)
    assert sha.hexdigest() == digest

    gets = sorted(proxy.records("GetObject"), key=lambda r: r.range[0])
    sizes = [r.range[1] - r.range[0] + 1 for r in gets]
    # The first request is what the first read needs (the kernel may ask for more than
    # the minimum); the ones after grow until the cap, each ending on a multiple of its
    # size: from 8 MiB on, every request is one whole 8 MiB part of the object.
    assert sizes[0] >= MIN_REQUEST
    capped = sizes.index(MAX_REQUEST)
    assert all(b in (a, 2 * a) for a, b in zip(sizes[:capped], sizes[1:capped + 1])), sizes[:12]
    assert all(r.range[0] % (r.range[1] - r.range[0] + 1) == 0 for r in gets), sizes[:12]
    assert all(size == MAX_REQUEST for size in sizes[capped:-1])
    assert sum(sizes) == 256 * MiB, "each byte fetched once"
    # No more requests at once than the budget holds (a body counts once while it comes,
    # on Pail's own sockets), plus the one a read may force.
    assert proxy.max_in_flight("GetObject") <= 64 * MiB // MAX_REQUEST + 1
    # Memory: object data stays within --max-memory (plus the one request a read may
    # force), on top of what the process used before; SLACK is for the allocator.
    assert peak_rss(mount.process.pid) - rss_before <= 64 * MiB + 2 * MAX_REQUEST + SLACK


@pytest.mark.s3_servers("seaweedfs")
def test_a_distant_store_gets_more_requests_in_flight(s3, bucket, proxy, mount_bucket):
    """Every GET answered 50 ms late, as by a remote S3: a sequential reader keeps catching
    up with four requests in flight, so it gets more of them (within half the budget)."""
    digest = upload(s3, bucket, "big", 256 * MiB)
    mount = mount_bucket(bucket, endpoint=proxy.endpoint)
    os.stat(mount.path / "big")
    proxy.clear()
    sha = hashlib.sha256()
    with proxy.inject(Stall(0.05), op="GetObject", times=None):
        with open(mount.path / "big", "rb") as f:
            while chunk := f.read(MiB):
                sha.update(chunk)
    assert sha.hexdigest() == digest
    assert MAX_AHEAD + 1 < proxy.max_in_flight("GetObject") <= MAX_DEPTH + 1
    sizes = [r.range[1] - r.range[0] + 1 for r in proxy.records("GetObject")]
    assert sum(sizes) == 256 * MiB, "each byte fetched once"


@pytest.mark.s3_servers("seaweedfs")
def test_an_object_uploaded_in_5_mib_parts_is_read_one_part_per_request(s3, bucket, proxy, mount_bucket):
    """rclone and the Go SDK upload in 5 MiB parts. The ETag says how many (-12), which
    with the size gives the part size: no GET crosses a part boundary, and from the
    second part on each GET is one whole part."""
    part, count = 5 * MiB, 12
    rng = random.Random(5)
    parts = [rng.randbytes(part) for _ in range(count - 1)] + [rng.randbytes(3 * MiB)]
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key="parts")["UploadId"]
    done = [{"PartNumber": n, "ETag": s3.upload_part(Bucket=bucket, Key="parts", UploadId=upload_id,
                                                      PartNumber=n, Body=body)["ETag"]}
            for n, body in enumerate(parts, start=1)]
    s3.complete_multipart_upload(Bucket=bucket, Key="parts", UploadId=upload_id,
                                 MultipartUpload={"Parts": done})
    assert s3.head_object(Bucket=bucket, Key="parts")["ETag"].endswith(f'-{count}"')
    mount = mount_bucket(bucket, endpoint=proxy.endpoint)
    os.stat(mount.path / "parts")
    proxy.clear()
    assert (mount.path / "parts").read_bytes() == b"".join(parts)

    ranges = sorted(r.range for r in proxy.records("GetObject"))
    assert all(first // part == last // part for first, last in ranges), ranges
    assert [first for first, _ in ranges[1:]] == [last + 1 for _, last in ranges[:-1]], "each byte once"
    later = [(first, last) for first, last in ranges if first >= part]
    assert later and all(first % part == 0 and last - first + 1 == part for first, last in later[:-1]), later


@pytest.mark.s3_servers("seaweedfs")
def test_random_small_reads_fetch_little_more_than_asked(s3, bucket, proxy, mount_bucket):
    upload(s3, bucket, "big", 64 * MiB)
    mount = mount_bucket(bucket, endpoint=proxy.endpoint)
    os.stat(mount.path / "big")
    proxy.clear()
    rng = random.Random(3)
    with open(mount.path / "big", "rb", buffering=0) as f:
        # Turn off the kernel's own readahead, as random-access programs do.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        for _ in range(100):
            offset = rng.randrange(0, 64 * MiB - 4 * KiB)
            block = os.pread(f.fileno(), 4 * KiB, offset)
            assert block[0] == (offset // MiB) % 251 or offset % MiB != 0
            assert len(block) == 4 * KiB
    fetched = sum(r.range[1] - r.range[0] + 1 for r in proxy.records("GetObject"))
    assert fetched <= 100 * 2 * MIN_REQUEST


@pytest.mark.s3_servers("seaweedfs")
@pytest.mark.parametrize("option", ["--no-block-fill", "--direct-io"])
def test_threads_reading_one_descriptor_at_random_fetch_each_range_once(s3, bucket, proxy, mount_bucket, option):
    # A Parquet reader's thread pool: preads at random places, all on one descriptor. Each
    # read moves the handle's window; the others' requests must not be cancelled by it.
    # Without block fills (off, or no page cache to fill), each read is one request, even
    # against a store slow enough for fills (30 ms per GET).
    path, expected = mounted_object(s3, bucket, proxy, mount_bucket, 64 * MiB, option)
    places = random.Random(5).sample(range(0, 256, 3), 80)  # never next to one another
    with random_reader_of_a_slow_store(proxy, path) as f:
        def read(offsets):
            return [(off, os.pread(f.fileno(), 256 * KiB, off)) for off in offsets]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            done = [r for part in pool.map(read, [[p * 256 * KiB for p in places[i::4]] for i in range(4)])
                    for r in part]
    assert len(done) == 80 and all(data == expected[off:off + 256 * KiB] for off, data in done)
    gets = proxy.records("GetObject")
    assert len(gets) == 80, f"{len(gets)} GETs for 80 reads"


@pytest.mark.s3_servers("seaweedfs")
def test_random_reads_that_keep_coming_back_to_a_block_fetch_it_once_into_the_page_cache(
        s3, bucket, proxy, mount_bucket):
    """A shuffled reader of records, against a store 30 ms away: after two reads in one
    8 MiB block, the block is fetched whole and given to the kernel, and every later read
    in it is answered from the page cache, with no request."""
    path, expected = mounted_object(s3, bucket, proxy, mount_bucket, 64 * MiB)
    block = 3 * MAX_REQUEST
    slots = [block + n * 256 * KiB for n in range(32)]
    first, rest = [slots[31], slots[9]], [s for s in slots if s not in (slots[31], slots[9])]
    random.Random(2).shuffle(rest)
    # Fills start once the mount has seen a few random reads wait on S3: one read in each
    # of four other blocks first.
    elsewhere = [b * MAX_REQUEST + MiB for b in (7, 6, 1, 0)]
    with random_reader_of_a_slow_store(proxy, path) as f:
        for offset in elsewhere + first:  # each before the last: never taken for a sequential reader
            assert os.pread(f.fileno(), 256 * KiB, offset) == expected[offset:offset + 256 * KiB]
        wait_until(lambda: resident_bytes(path) >= MAX_REQUEST, "the block in the page cache", timeout=30)

        def read(offsets):
            return [(off, os.pread(f.fileno(), 256 * KiB, off)) for off in offsets]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            done = [r for part in pool.map(read, [rest[i::4] for i in range(4)]) for r in part]
    assert len(done) == 30 and all(data == expected[off:off + 256 * KiB] for off, data in done)
    gets = sorted(r.range for r in proxy.records("GetObject"))
    assert gets == sorted([(off, off + 256 * KiB - 1) for off in elsewhere + first]
                          + [(block, block + MAX_REQUEST - 1)])


@pytest.mark.s3_servers("seaweedfs")
def test_once_a_reader_keeps_coming_back_a_block_is_fetched_at_its_first_read(s3, bucket, proxy, mount_bucket):
    """Against a store 30 ms away: once an eighth of the random reads (of 16 or more) came
    back to blocks read before, a block is fetched whole at its first read, not its second."""
    path, expected = mounted_object(s3, bucket, proxy, mount_bucket, 12 * MAX_REQUEST)
    # Four reads elsewhere (fills wait for reads that waited on S3), then blocks 7 to 2 read
    # twice (filled at the second): 6 of 16 reads came back. Then one read in block 1.
    elsewhere = [b * MAX_REQUEST + MiB for b in (11, 10, 9, 8)]
    twice = range(7, 1, -1)
    offsets = (elsewhere + [b * MAX_REQUEST + 5 * MiB for b in twice] + [b * MAX_REQUEST + MiB for b in twice]
               + [MAX_REQUEST + 5 * MiB])
    with random_reader_of_a_slow_store(proxy, path) as f:
        for offset in offsets:
            assert os.pread(f.fileno(), 256 * KiB, offset) == expected[offset:offset + 256 * KiB]
        wait_until(lambda: resident_bytes(path) >= 7 * MAX_REQUEST, "seven blocks in the page cache", timeout=30)
    whole = sorted(r.range[0] // MAX_REQUEST for r in proxy.records("GetObject")
                   if r.range[1] + 1 - r.range[0] == MAX_REQUEST)
    assert whole == [1, 2, 3, 4, 5, 6, 7]
    assert len(proxy.records("GetObject")) == len(offsets) + len(whole)


@pytest.mark.s3_servers("seaweedfs")
def test_with_a_cache_a_filled_block_is_kept_on_disk_too(s3, bucket, proxy, mount_bucket, tmp_path):
    """With --cache, a block fetched whole for random reads lands on disk as well as in the
    page cache: once the kernel has let go of it (memory pressure), reads there cost no
    request."""
    cache = tmp_path / "cache"
    path, expected = mounted_object(s3, bucket, proxy, mount_bucket, 32 * MiB, "--cache", str(cache))
    block = 2 * MAX_REQUEST
    elsewhere = [b * MAX_REQUEST + MiB for b in (3, 1, 0)] + [block + 7 * MiB]
    with random_reader_of_a_slow_store(proxy, path) as f:
        for offset in elsewhere + [block + 5 * MiB]:  # filled at the block's second read
            assert os.pread(f.fileno(), 256 * KiB, offset) == expected[offset:offset + 256 * KiB]
        wait_until(lambda: resident_bytes(path) >= MAX_REQUEST, "the block in the page cache", timeout=30)
    # Before the fill: five reads of 256 KiB on disk. After: the block's 8 MiB too.
    after_the_writer(lambda: disk_use(cache) >= MAX_REQUEST + 3 * 256 * KiB)
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert resident_bytes(path) == 0
    proxy.clear()
    with random_reader_of_a_slow_store(proxy, path) as f:
        for offset in reversed(range(block, block + MAX_REQUEST, 256 * KiB)):
            assert os.pread(f.fileno(), 256 * KiB, offset) == expected[offset:offset + 256 * KiB]
    assert proxy.records("GetObject") == []


@pytest.mark.s3_servers("seaweedfs")
def test_a_block_filled_for_an_old_version_is_not_read_after_the_object_changed(s3, bucket, proxy, mount_bucket):
    upload(s3, bucket, "big", 16 * MiB, seed=1)
    new = random.Random(9).randbytes(16 * MiB)
    mount = mount_bucket(bucket, "--metadata-ttl", "minimal", endpoint=proxy.endpoint)
    path = mount.path / "big"
    # Five reads in one block: it fills at the fifth, once four reads have waited on S3.
    places = [MAX_REQUEST + n * MiB for n in (7, 6, 5, 4, 3)]
    with random_reader_of_a_slow_store(proxy, path) as f:
        for offset in places:
            os.pread(f.fileno(), 256 * KiB, offset)
        wait_until(lambda: resident_bytes(path) >= MAX_REQUEST, "the old block in the page cache", timeout=30)
    s3.put_object(Bucket=bucket, Key="big", Body=new)
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        for offset in range(MAX_REQUEST, 16 * MiB, MiB):
            assert os.pread(f.fileno(), 4 * KiB, offset + 100) == new[offset + 100:offset + 100 + 4 * KiB]


@pytest.mark.s3_servers("seaweedfs")
def test_parallel_readers_share_one_budget(s3, bucket, proxy, mount_bucket):
    from concurrent.futures import ThreadPoolExecutor

    digests = {f"obj{i}": upload(s3, bucket, f"obj{i}", 48 * MiB, seed=i) for i in range(4)}
    mount = mount_bucket(bucket, "--max-memory", "32MiB", endpoint=proxy.endpoint)
    for name in digests:
        os.stat(mount.path / name)
    rss_before = current_rss(mount.process.pid)

    def read(name):
        sha = hashlib.sha256()
        with open(mount.path / name, "rb") as f:
            while chunk := f.read(MiB):
                sha.update(chunk)
        return name, sha.hexdigest()

    with ThreadPoolExecutor(4) as pool:
        assert dict(pool.map(read, digests)) == digests
    # Four readers: prefetch within 32 MiB, plus at most one forced request per reader.
    assert peak_rss(mount.process.pid) - rss_before <= 32 * MiB + 4 * 2 * MAX_REQUEST + SLACK


def _small_files(s3, bucket, count):
    from concurrent.futures import ThreadPoolExecutor

    contents = {f"f{i:03d}": random.Random(i).randbytes(64 * KiB) for i in range(count)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: s3.put_object(Bucket=bucket, Key=f"dir/{n}", Body=contents[n]), contents))
    return contents


def test_cat_of_a_directory_fetches_the_next_files_ahead_once_each(s3, bucket, proxy, mount_bucket):
    contents = _small_files(s3, bucket, 40)
    mount = mount_bucket(bucket, "--metadata-ttl", "60", endpoint=proxy.endpoint)
    proxy.clear()
    # The shell lists the directory for the glob, then cat opens the files in that order.
    result = subprocess.run(["bash", "-c", 'cd "$1" && LC_ALL=C cat dir/*', "-", str(mount.path)],
                            capture_output=True, timeout=60, check=True)
    assert result.stdout == b"".join(contents[n] for n in sorted(contents))
    assert sorted(r.key for r in proxy.records("GetObject")) == sorted(f"dir/{n}" for n in contents)
    assert proxy.max_in_flight("GetObject") > 1  # files fetched while cat read others


def test_a_failed_fetch_ahead_is_fetched_again_by_the_reader(s3, bucket, proxy, mount_bucket):
    contents = _small_files(s3, bucket, 20)
    mount = mount_bucket(bucket, "--metadata-ttl", "60", endpoint=proxy.endpoint)
    proxy.clear()
    # The first GET of f010, fetched ahead while cat reads an earlier file, is refused
    # (403 is not retried); the program must not see it.
    with proxy.inject(Status(403, "AccessDenied"), op="GetObject", match=lambda r: r.key == "dir/f010") as refused:
        result = subprocess.run(["bash", "-c", 'cd "$1" && LC_ALL=C cat dir/*', "-", str(mount.path)],
                                capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"".join(contents[n] for n in sorted(contents))
    assert refused.hits == 1
    assert [r.status for r in proxy.records("GetObject") if r.key == "dir/f010"] == [403, 206]


def test_files_read_out_of_order_are_fetched_only_when_opened(s3, bucket, proxy, mount_bucket):
    contents = _small_files(s3, bucket, 20)
    mount = mount_bucket(bucket, "--metadata-ttl", "60", endpoint=proxy.endpoint)
    names = sorted(os.listdir(mount.path / "dir"))
    order = [names[i] for i in (7, 2, 9, 0, 5, 3, 8, 1, 6, 4)]  # no two within two places
    proxy.clear()
    for name in order:
        assert (mount.path / "dir" / name).read_bytes() == contents[name]
    assert sorted(r.key for r in proxy.records("GetObject")) == sorted(f"dir/{n}" for n in order)
