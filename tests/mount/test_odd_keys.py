"""S3 keys with odd bytes through a real mount (issue 8), beyond tests/mount/test_read.py
(which covers "a//b", "./dot", "x/../y", "z/./w", a NUL, one 256-byte name, and
"with space", "per%25cent", "unicodé ✓", "plus+sign" and friends).

What docs/SEMANTICS.md says, checked here at its edges: a key with an empty, "." or ".."
segment, a NUL, or a segment longer than 255 *bytes* is hidden, the directories above it
still show; a key ending in "/" is an empty directory; everything else is a name, control
characters, leading and trailing spaces and percent signs included. readdir never fails,
`ls` lists what is left, and the mount process is still serving afterwards.

moto only: SeaweedFS cannot store keys with empty or dot segments.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

pytestmark = pytest.mark.s3_servers("moto")

# Names that are valid file names although they look odd (no NUL, no "/", at most 255 bytes).
ODD_NAMES = [
    "tab\there", "bell\x07", "esc\x1b[31mred", "del\x7f", "\x01start", "cr\rinside",
    " leading space", "trailing space ", "   ", "%", "%2F", "%00", "100%", "a+b c", "+", "-", "--help",
    "...", ".hidden", "..x", "x..", "~", "*", "?", "[a]", "back\\slash", "quote'\"", "new\u2028line",
    "\u200bzero-width", "e\u0301 (combining)", "\ufeffbom", "\U0001f600 emoji",
    "é" * 127 + "x",             # 255 bytes: the longest name, in two-byte characters
    "\U0001f600" * 63 + "abc",   # 255 bytes in four-byte characters
    "m" * 255,
]
# Keys that must not show, with why.
HIDDEN_KEYS = [
    "/leading-slash",          # empty first segment
    "/",                       # only an empty segment
    "//",
    ".", "..", "./", "../",    # the marker of "." or ".."
    "d/./",                    # a "." marker below a real directory
    "d/..",
    "d/e//",                   # marker with an empty segment
    "d/" + "é" * 128,          # 256 bytes in 128 characters
    "d/" + "\U0001f600" * 64,  # 256 bytes in 64 characters
    "d/x\0y",
    "deep/a/../b/c",           # ".." in the middle: deep/ and deep/a/ still show
]


def put(s3, bucket, key, body=b"v"):
    s3.put_object(Bucket=bucket, Key=key, Body=body)


def ls(path) -> list[str]:
    """`ls -1A` as a pod's shell runs it (not a terminal: names printed as they are)."""
    out = subprocess.run(["ls", "-1A", str(path)], check=True, capture_output=True, timeout=60).stdout
    return sorted(os.fsdecode(name) for name in out.split(b"\n")[:-1])


def test_odd_but_valid_names_are_listed_stat_and_read(s3, bucket, mount_bucket):
    for name in ODD_NAMES:
        put(s3, bucket, "odd/" + name, name.encode())
        assert len(name.encode()) <= 255 and "\n" not in name
    mount = mount_bucket(bucket)
    odd = mount.path / "odd"
    assert sorted(os.listdir(odd)) == sorted(ODD_NAMES)
    assert ls(odd) == sorted(ODD_NAMES)
    for name in ODD_NAMES:
        assert (odd / name).read_bytes() == name.encode(), repr(name)
        assert os.stat(odd / name).st_size == len(name.encode())
    assert mount.alive


def test_names_are_counted_in_bytes_not_characters(s3, bucket, mount_bucket):
    shown = ["é" * 127 + "x", "\U0001f600" * 63 + "abc"]
    hidden = ["é" * 128, "\U0001f600" * 64, "\U0001f600" * 63 + "abcd"]
    for name in shown + hidden:
        put(s3, bucket, "names/" + name)
    mount = mount_bucket(bucket)
    assert sorted(os.listdir(mount.path / "names")) == sorted(shown)
    for name in hidden:
        with pytest.raises(OSError) as error:
            os.stat(mount.path / "names" / name)
        assert error.value.errno == errno.ENAMETOOLONG, repr(name)


def test_hidden_keys_leave_their_directories_and_everything_else(s3, bucket, mount_bucket):
    for key in HIDDEN_KEYS + ["d/visible.txt", "d/e/inner.txt", "top.txt", "deep/a/real.txt"]:
        put(s3, bucket, key)
    put(s3, bucket, "folder-marker/", b"")
    mount = mount_bucket(bucket)
    # "/leading-slash", "/" and "//" hide under an empty top-level name; "." and ".." never show.
    assert ls(mount.path) == ["d", "deep", "folder-marker", "top.txt"]
    assert sorted(os.listdir(mount.path)) == ["d", "deep", "folder-marker", "top.txt"]
    assert ls(mount.path / "d") == ["e", "visible.txt"]
    assert ls(mount.path / "d" / "e") == ["inner.txt"]
    assert ls(mount.path / "deep") == ["a"]
    assert ls(mount.path / "deep" / "a") == ["real.txt"]
    assert ls(mount.path / "folder-marker") == []
    # "." and ".." are the kernel's: they are the directory and its parent, never objects.
    assert os.stat(mount.path / "d" / ".").st_ino == os.stat(mount.path / "d").st_ino
    for name in ["leading-slash", "x\0y"]:
        with pytest.raises((FileNotFoundError, ValueError)):
            os.stat(mount.path / "d" / name)
    assert (mount.path / "d" / "visible.txt").read_bytes() == b"v"
    # Listing again (from the cache, and after it) gives the same answer.
    assert ls(mount.path / "d") == ["e", "visible.txt"]
    assert mount.alive


def test_a_page_of_hidden_keys_before_a_visible_one(s3_server, s3, bucket, mount_bucket):
    """More hidden keys than one ListObjectsV2 page holds, sorted before the only name
    that shows: readdir pages past them and lists just that name."""
    long_names = [f"pages/{i:04d}" + "n" * 256 for i in range(1100)]
    s3_server.put_many(bucket, long_names + ["pages/zz-visible"], body=b".")
    put(s3, bucket, "pages//empty-segment")
    mount = mount_bucket(bucket)
    assert ls(mount.path / "pages") == ["zz-visible"]
    assert os.listdir(mount.path / "pages") == ["zz-visible"]
    assert mount.alive
