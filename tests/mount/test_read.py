"""Reading a bucket through a real mount: names, attributes, contents."""

from __future__ import annotations

import errno
import hashlib
import os
import stat

import pytest


def put(s3, bucket, key, body=b""):
    s3.put_object(Bucket=bucket, Key=key, Body=body)


def test_files_and_directories_show_as_s3_has_them(s3, bucket, mount_bucket):
    put(s3, bucket, "hello.txt", b"hello world\n")
    put(s3, bucket, "photos/2024/cat.jpg", b"\xff\xd8 jpeg bytes")
    put(s3, bucket, "photos/dog.jpg", b"woof")
    mount = mount_bucket(bucket)

    assert sorted(os.listdir(mount.path)) == ["hello.txt", "photos"]
    assert sorted(os.listdir(mount.path / "photos")) == ["2024", "dog.jpg"]
    assert (mount.path / "hello.txt").read_bytes() == b"hello world\n"
    assert (mount.path / "photos/2024/cat.jpg").read_bytes() == b"\xff\xd8 jpeg bytes"
    assert stat.S_ISDIR(os.stat(mount.path / "photos/2024").st_mode)
    assert os.stat(mount.path / "photos/dog.jpg").st_size == 4


def test_size_and_mtime_come_from_s3(s3, bucket, mount_bucket):
    put(s3, bucket, "data.bin", b"x" * 12345)
    head = s3.head_object(Bucket=bucket, Key="data.bin")
    mount = mount_bucket(bucket)
    st = os.stat(mount.path / "data.bin")
    assert st.st_size == 12345
    assert int(st.st_mtime) == int(head["LastModified"].timestamp())


def test_missing_names_are_enoent(s3, bucket, mount_bucket):
    put(s3, bucket, "dir/file", b"1")
    mount = mount_bucket(bucket)
    for name in ["nothing", "dir/nothing", "di", "dir/fil"]:
        with pytest.raises(FileNotFoundError):
            os.stat(mount.path / name)
    with pytest.raises(NotADirectoryError):
        os.stat(mount.path / "dir/file/below")


def test_large_object_reads_back_byte_for_byte(s3, bucket, mount_bucket):
    data = os.urandom(20 * 1024 * 1024 + 123)
    put(s3, bucket, "big", data)
    mount = mount_bucket(bucket)
    with open(mount.path / "big", "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    # Random reads anywhere in the object return the right bytes.
    with open(mount.path / "big", "rb") as f:
        for offset in [0, 7 * 1024 * 1024 + 5, len(data) - 10, 1, 16 * 1024 * 1024 - 1]:
            f.seek(offset)
            assert f.read(4096) == data[offset:offset + 4096]


def test_empty_object_reads_empty(s3, bucket, mount_bucket):
    put(s3, bucket, "empty", b"")
    mount = mount_bucket(bucket)
    assert (mount.path / "empty").read_bytes() == b""
    assert os.stat(mount.path / "empty").st_size == 0


def test_folder_marker_is_an_empty_directory(s3, bucket, mount_bucket):
    put(s3, bucket, "folder/")  # what the S3 console's "Create folder" writes
    put(s3, bucket, "full/", b"")
    put(s3, bucket, "full/inside.txt", b"in")
    mount = mount_bucket(bucket)
    assert sorted(os.listdir(mount.path)) == ["folder", "full"]
    assert os.listdir(mount.path / "folder") == []
    assert os.listdir(mount.path / "full") == ["inside.txt"]
    assert stat.S_ISDIR(os.stat(mount.path / "folder").st_mode)


def test_ownership_and_modes_are_mount_wide(s3, bucket, mount_bucket):
    put(s3, bucket, "a/b.txt", b"1")
    mount = mount_bucket(bucket, "--uid", "1234", "--gid", "4321", "--file-mode", "0640",
                         "--dir-mode", "0750")
    for path, mode, kind in [(mount.path / "a", 0o750, stat.S_IFDIR),
                             (mount.path / "a/b.txt", 0o640, stat.S_IFREG),
                             (mount.path, 0o750, stat.S_IFDIR)]:
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (1234, 4321)
        assert stat.S_IMODE(st.st_mode) == mode
        assert stat.S_IFMT(st.st_mode) == kind


def test_prefix_mounts_only_what_is_under_it(s3, bucket, mount_bucket):
    put(s3, bucket, "team-a/report.csv", b"a")
    put(s3, bucket, "team-a/sub/x", b"x")
    put(s3, bucket, "team-b/secret.csv", b"b")
    put(s3, bucket, "team-abc", b"not under team-a/")
    mount = mount_bucket(bucket, "--prefix", "team-a")
    assert sorted(os.listdir(mount.path)) == ["report.csv", "sub"]
    assert (mount.path / "report.csv").read_bytes() == b"a"
    with pytest.raises(FileNotFoundError):
        os.stat(mount.path / "secret.csv")


def test_listing_pages_past_1000_keys(s3_server, s3, bucket, mount_bucket):
    names = [f"f{i:05d}" for i in range(2100)]
    s3_server.put_many(bucket, ["many/" + n for n in names], body=b".")
    put(s3, bucket, "many/zz/inner", b"")
    mount = mount_bucket(bucket)
    listed = os.listdir(mount.path / "many")
    assert sorted(listed) == names + ["zz"]
    assert len(listed) == len(set(listed))


@pytest.mark.s3_servers("moto")  # SeaweedFS cannot store such keys
def test_keys_that_cannot_be_file_names_are_hidden(s3, bucket, mount_bucket):
    long_name = "n" * 256
    for key in ["ok.txt", "a//b", "./dot", "x/../y", "z/./w", "dir/" + long_name, "nul\0x",
                "fine/" + "m" * 255]:
        put(s3, bucket, key, b"v")
    mount = mount_bucket(bucket)
    top = sorted(os.listdir(mount.path))
    # "a/" holds only "a//b" (empty segment): the directory shows, the key does not.
    assert top == ["a", "dir", "fine", "ok.txt", "x", "z"]
    assert os.listdir(mount.path / "a") == []
    assert os.listdir(mount.path / "dir") == []
    assert os.listdir(mount.path / "x") == []
    assert os.listdir(mount.path / "z") == []
    assert os.listdir(mount.path / "fine") == ["m" * 255]
    with pytest.raises(OSError) as too_long:
        os.stat(mount.path / "dir" / long_name)
    assert too_long.value.errno == errno.ENAMETOOLONG


@pytest.mark.s3_servers("moto")  # SeaweedFS cannot hold key "a" and "a/b" in the same bucket
def test_directory_wins_over_file_of_the_same_name(s3, bucket, mount_bucket):
    put(s3, bucket, "a", b"file a")
    put(s3, bucket, "a-1", b"between a and a/")
    put(s3, bucket, "a.txt", b"also between")
    put(s3, bucket, "a/inner", b"in dir a")
    mount = mount_bucket(bucket)
    assert sorted(os.listdir(mount.path)) == ["a", "a-1", "a.txt"]
    assert stat.S_ISDIR(os.stat(mount.path / "a").st_mode)
    assert (mount.path / "a/inner").read_bytes() == b"in dir a"


def test_odd_but_valid_names_work(s3, bucket, mount_bucket):
    names = ["with space", "per%25cent", "unicodé ✓", "semi;colon", "q?mark", "hash#", "plus+sign"]
    for name in names:
        put(s3, bucket, "odd/" + name, name.encode())
    mount = mount_bucket(bucket)
    assert sorted(os.listdir(mount.path / "odd")) == sorted(names)
    for name in names:
        assert (mount.path / "odd" / name).read_bytes() == name.encode()
