"""The local data cache (--cache DIR) through a real mount: what a program reads again
comes from the disk, and never bytes of another version than the one it opened."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess

import pytest

from driver.fs.cache import BLOCK_SIZE
from tests.support.cache_dir import after_the_writer, cache_files, disk_use, temporaries
from tests.support.mounts import MountFailed, pail_cli

MiB = 1024 * 1024


def read_all(path, block: int = MiB) -> bytes:
    """The file's bytes, as a program that opens it again would see them: the kernel's
    cached pages of it dropped first, so the reads reach the mount."""
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := f.read(block):
            chunks.append(chunk)
    return b"".join(chunks)


def fetched(proxy) -> int:
    return sum(r.response_bytes for r in proxy.records("GetObject"))


@pytest.mark.s3_servers("seaweedfs")
def test_reading_again_comes_from_the_cache(s3, bucket, proxy, mount_bucket, tmp_path):
    data = random.Random(1).randbytes(5 * MiB + 12345)  # a last block that is not whole
    s3.put_object(Bucket=bucket, Key="data/train.bin", Body=data)
    cache = tmp_path / "cache"
    mount = mount_bucket(bucket, "--cache", str(cache), endpoint=proxy.endpoint)
    assert read_all(mount.path / "data/train.bin") == data
    assert fetched(proxy) >= len(data)
    blocks = -(-len(data) // BLOCK_SIZE)  # whole blocks, and the short last one
    after_the_writer(lambda: len(cache_files(cache)) >= blocks)
    assert len(cache_files(cache)) == blocks

    proxy.clear()
    for _ in range(2):
        assert read_all(mount.path / "data/train.bin") == data
        # Random reads too, the last bytes included.
        with open(mount.path / "data/train.bin", "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            for offset in (0, 3 * MiB - 7, len(data) - 100, len(data) - 1):
                assert os.pread(f.fileno(), 4096, offset) == data[offset:offset + 4096]
    assert proxy.records("GetObject") == []

    mount.stop()
    assert not (cache / "pail-cache").exists(), "the cache is emptied when the mount ends"


@pytest.mark.s3_servers("seaweedfs")
def test_a_random_read_fetches_what_it_needs_and_reading_it_again_fetches_nothing(
        s3, bucket, proxy, mount_bucket, tmp_path):
    data = random.Random(8).randbytes(8 * MiB)
    s3.put_object(Bucket=bucket, Key="samples.bin", Body=data)
    cache = tmp_path / "cache"
    mount = mount_bucket(bucket, "--cache", str(cache), endpoint=proxy.endpoint)
    samples = [(5 * MiB + 300_000, 4096), (1 * MiB + 4096, 65536), (5 * MiB + 700_000, 4096)]

    def read_samples():
        with open(mount.path / "samples.bin", "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            for offset, length in samples:
                assert os.pread(f.fileno(), length, offset) == data[offset:offset + length]

    proxy.clear()
    read_samples()
    # Each read is fetched as the mount would without a cache (the kernel's page, the
    # prefetcher's smallest request), not widened to whole 1 MiB blocks (2 MiB for these).
    first_pass = fetched(proxy)
    assert 0 < first_pass < 2 * MiB
    after_the_writer(lambda: disk_use(cache) >= first_pass)
    proxy.clear()
    read_samples()
    assert proxy.records("GetObject") == [], "the same bytes again come from the disk"


@pytest.mark.s3_servers("seaweedfs")
def test_a_replaced_object_is_read_anew(s3, bucket, proxy, mount_bucket, tmp_path):
    old = random.Random(2).randbytes(3 * MiB)
    new = random.Random(3).randbytes(3 * MiB)
    s3.put_object(Bucket=bucket, Key="f", Body=old)
    mount = mount_bucket(bucket, "--cache", str(tmp_path / "cache"), "--metadata-ttl", "minimal",
                         endpoint=proxy.endpoint)
    assert read_all(mount.path / "f") == old
    after_the_writer(lambda: disk_use(tmp_path / "cache") >= len(old))
    s3.put_object(Bucket=bucket, Key="f", Body=new)
    assert read_all(mount.path / "f") == new
    s3.put_object(Bucket=bucket, Key="f", Body=old)  # the old ETag again: its blocks are that version's bytes
    proxy.clear()
    assert read_all(mount.path / "f") == old
    assert proxy.records("GetObject") == []


@pytest.mark.s3_servers("seaweedfs")
def test_a_damaged_block_is_read_from_s3_again(s3, bucket, proxy, mount_bucket, tmp_path):
    data = random.Random(4).randbytes(4 * MiB)
    s3.put_object(Bucket=bucket, Key="f", Body=data)
    cache = tmp_path / "cache"
    mount = mount_bucket(bucket, "--cache", str(cache), endpoint=proxy.endpoint)
    assert read_all(mount.path / "f") == data
    after_the_writer(lambda: len(cache_files(cache)) >= 4)
    block = sorted(cache_files(cache), key=lambda p: p.name)[2]
    with open(block, "r+b") as f:
        f.seek(100_000)
        byte = f.read(1)
        f.seek(100_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    proxy.clear()
    assert read_all(mount.path / "f") == data
    assert fetched(proxy) == BLOCK_SIZE, "the damaged block only"
    assert any(e["event"].startswith("cache block failed its check") for e in mount.log())


@pytest.mark.s3_servers("seaweedfs")
def test_the_cache_stays_within_its_size(s3, bucket, mount_bucket, tmp_path):
    data = random.Random(5).randbytes(40 * MiB)
    s3.put_object(Bucket=bucket, Key="big", Body=data)
    cache = tmp_path / "cache"
    mount = mount_bucket(bucket, "--cache", str(cache), "--max-cache-size", "16MiB")
    for _ in range(2):
        assert hashlib.sha256(read_all(mount.path / "big")).digest() == hashlib.sha256(data).digest()
        # Measured once: the writer evicts a block before it writes the next.
        use = after_the_writer(lambda: (used := disk_use(cache)) >= 15 * MiB and used)
        assert 15 * MiB <= use <= 16 * MiB


@pytest.mark.s3_servers("seaweedfs")
def test_a_full_cache_disk_is_not_the_readers_error(s3, bucket, mount_bucket, tmp_path):
    data = random.Random(6).randbytes(12 * MiB)
    s3.put_object(Bucket=bucket, Key="f", Body=data)
    cache = tmp_path / "small-disk"
    cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(cache)], check=True)
    try:
        mount = mount_bucket(bucket, "--cache", str(cache))
        for _ in range(2):
            assert read_all(mount.path / "f") == data
        assert any(e["event"].startswith("cache write failed") and e["errno"] == 28 for e in mount.log())
        # A write that failed leaves nothing behind that would keep the disk full.
        after_the_writer(lambda: not temporaries(cache), seconds=5)
        assert temporaries(cache) == []
        mount.stop()
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=True)


@pytest.mark.s3_servers("seaweedfs")
def test_two_mounts_cannot_share_a_cache(s3, bucket, mount_bucket, tmp_path):
    cache = tmp_path / "cache"
    mount_bucket(bucket, "--cache", str(cache))
    with pytest.raises(MountFailed, match="cache of another mount"):
        mount_bucket(bucket, "--cache", str(cache))


@pytest.mark.s3_servers("seaweedfs")
def test_a_cache_directory_that_cannot_be_made_is_refused(s3, bucket, mount_bucket, tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_bytes(b"x")
    with pytest.raises(MountFailed, match="--cache: .*file"):
        mount_bucket(bucket, "--cache", str(not_a_directory))
    assert not_a_directory.read_bytes() == b"x"


@pytest.mark.s3_servers("seaweedfs")
def test_a_cache_inside_the_mount_is_refused(s3_server, bucket, tmp_path):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = pail_cli("mount", bucket, str(mountpoint), "--endpoint-url", s3_server.endpoint,
                      "--cache", str(mountpoint / "cache"), env=s3_server.env())
    assert result.returncode == 2
    assert "--cache" in result.stderr and "inside the mount directory" in result.stderr
    assert not os.path.ismount(mountpoint)
