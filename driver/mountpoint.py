"""Checks on a mount directory, shared by ``pail mount``, ``pail unmount`` and the node
server: read from /proc/self/mountinfo so a dead FUSE mount (ENOTCONN) is still seen."""

from __future__ import annotations

import os


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = bytearray(), 0
    raw = field.encode("utf-8", "surrogateescape")
    while i < len(raw):
        if raw[i:i + 1] == b"\\" and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def resolve(path: str) -> str:
    """Absolute path with symlinks resolved in the parent only: the last component may be a
    mount whose server does not answer, and touching it would block or fail."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount this process can see."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as mountinfo:
        for line in mountinfo:
            left, _, right = line.partition(" - ")
            fields = left.split()
            found.append((_unescape(fields[4]), right.split()[0]))
    return found


def is_mount_point(path: str) -> bool:
    target = resolve(path)
    return any(point == target for point, _ in mounts())


def mount_device(path: str) -> str | None:
    """major:minor of the most recent mount at ``path``."""
    target = resolve(path)
    device = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if _unescape(fields[4]) == target:
                device = fields[2]
    return device


def check_mount_directory(path: str) -> str | None:
    """Why ``path`` cannot be mounted on, or None when it can."""
    if not os.path.lexists(path):
        return f"{path}: no such directory"
    if is_mount_point(path):
        return f"{path}: already a mount point"
    if not os.path.isdir(path):
        return f"{path}: not a directory"
    try:
        if os.listdir(path):
            return f"{path}: directory is not empty"
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    return None
