"""Memory maps, and reading past the kernel's page cache (``--direct-io``), through a real mount."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os

import pytest

from tests.support.cache_dir import after_the_writer, disk_use

MiB = 1024 * 1024
_CACHESTAT = 451  # cachestat(2), Linux 6.5: the same number on every architecture


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def cached_pages(fd: int) -> int:
    """Pages of the open file ``fd`` in the kernel's page cache (cachestat(2), whole file)."""
    libc = ctypes.CDLL(None, use_errno=True)
    whole, stat = _Range(0, 0), _Stat()
    if libc.syscall(_CACHESTAT, fd, ctypes.byref(whole), ctypes.byref(stat), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cachestat: {os.strerror(err)} (needs Linux 6.5)")
    return stat.nr_cache


@pytest.fixture
def big_object(s3, bucket):
    data = os.urandom(12 * MiB + 4321)
    s3.put_object(Bucket=bucket, Key="weights.bin", Body=data)
    return data


def read_through(path, data):
    """Reads ``path`` front to back and at a few offsets, checking every byte; returns the
    descriptor's cached page count before closing it."""
    with open(path, "rb", buffering=0) as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
        for offset in (0, 5 * MiB + 3, len(data) - 100):
            f.seek(offset)
            assert f.read(64 * 1024) == data[offset:offset + 64 * 1024]
        return cached_pages(f.fileno())


def test_read_only_maps_show_the_object(big_object, bucket, mount_bucket):
    mount = mount_bucket(bucket)
    with open(mount.path / "weights.bin", "rb") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as shared:  # MAP_SHARED, as numpy.memmap
            assert len(shared) == len(big_object)
            assert shared[7 * MiB:7 * MiB + 4096] == big_object[7 * MiB:7 * MiB + 4096]
            assert hashlib.sha256(shared).digest() == hashlib.sha256(big_object).digest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as private:  # MAP_PRIVATE
            private[:5] = b"local"  # stays in this process
            assert private[5:MiB] == big_object[5:MiB]
    assert (mount.path / "weights.bin").read_bytes()[:5] == big_object[:5]


def test_changes_through_a_shared_map_of_a_new_file_are_refused(s3, bucket, mount_bucket):
    mount = mount_bucket(bucket)
    fd = os.open(mount.path / "new.bin", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"w" * 8192)
        with mmap.mmap(fd, 8192, access=mmap.ACCESS_WRITE) as shared:
            shared[:4] = b"abcd"
            # The kernel writes the changed page back at its offset: a write behind the end.
            with pytest.raises(OSError) as refused:
                shared.flush()
            assert refused.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    assert s3.get_object(Bucket=bucket, Key="new.bin")["Body"].read() == b"w" * 8192


def test_the_page_cache_keeps_what_was_read_by_default(big_object, bucket, mount_bucket):
    mount = mount_bucket(bucket)
    assert read_through(mount.path / "weights.bin", big_object) > 0


def test_direct_io_reads_every_byte_and_keeps_none_in_the_page_cache(big_object, bucket, mount_bucket):
    mount = mount_bucket(bucket, "--direct-io")
    assert read_through(mount.path / "weights.bin", big_object) == 0
    # Small reads too, each one a request to the mount.
    with open(mount.path / "weights.bin", "rb", buffering=0) as f:
        f.seek(3 * MiB)
        pieces = [f.read(4096) for _ in range(64)]
    assert b"".join(pieces) == big_object[3 * MiB:3 * MiB + 64 * 4096]


def test_direct_io_refuses_a_shared_map_and_allows_a_private_one(big_object, bucket, mount_bucket):
    mount = mount_bucket(bucket, "--direct-io")
    with open(mount.path / "weights.bin", "rb") as f:
        with pytest.raises(OSError) as refused:
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        assert refused.value.errno == errno.ENODEV
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as private:
            assert hashlib.sha256(private).digest() == hashlib.sha256(big_object).digest()


def test_direct_io_leaves_writing_as_it_is(s3, bucket, mount_bucket):
    mount = mount_bucket(bucket, "--direct-io")
    data = os.urandom(3 * MiB + 17)
    with open(mount.path / "out.bin", "wb") as f:
        for start in range(0, len(data), 100_000):
            f.write(data[start:start + 100_000])
    assert s3.get_object(Bucket=bucket, Key="out.bin")["Body"].read() == data
    assert (mount.path / "out.bin").read_bytes() == data


@pytest.mark.s3_servers("seaweedfs")
def test_direct_io_reads_again_from_the_cache(big_object, bucket, proxy, mount_bucket, tmp_path):
    """An epoch-style job with --direct-io keeps nothing in the page cache: --cache is where
    a second read comes from."""
    mount = mount_bucket(bucket, "--direct-io", "--cache", str(tmp_path / "cache"), endpoint=proxy.endpoint)
    assert read_through(mount.path / "weights.bin", big_object) == 0
    assert sum(r.response_bytes for r in proxy.records("GetObject")) >= len(big_object)
    after_the_writer(lambda: disk_use(tmp_path / "cache") >= len(big_object))
    proxy.clear()
    assert read_through(mount.path / "weights.bin", big_object) == 0
    # Python's buffers do not start on a page, so the kernel cuts a large direct read into
    # requests off the cache's 1 MiB blocks; the cache answers from the pieces side by side.
    assert proxy.records("GetObject") == []
