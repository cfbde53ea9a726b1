"""Whether the process that opened a file still holds a descriptor of it.

The kernel sends FUSE a flush for every close() of a descriptor — of a dup, of a copy a
forked child inherited, of the descriptor a shell opened before dup2() — and the upload of
a file being written must complete at the one close that ends the writer's use of it:
the last close by the process that opened it. pyfuse3 does not pass the closing process
to flush(), but /proc tells whether the opener still holds a descriptor of the file
(close() removes the descriptor before the flush is sent): when it holds none, this
flush is its last close.
"""

from __future__ import annotations

import os


def holds_open(pid: int, ino: int, device: str) -> bool | None:
    """Whether process ``pid`` has a descriptor open on inode ``ino`` of the filesystem
    whose device is ``device`` ("major:minor"). False when the process is gone; None
    when that cannot be known (pid 0: the process is outside this PID namespace; /proc
    not readable)."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
            # The process may see the mount through bind mounts with other ids (a pod).
            mount_ids = {fields[0] for fields in map(str.split, mountinfo) if fields[2] == device}
        fdinfo = f"/proc/{pid}/fdinfo"
        for fd in os.listdir(fdinfo):
            try:
                with open(f"{fdinfo}/{fd}", encoding="ascii", errors="replace") as info:
                    fields = dict(line.split(":", 1) for line in info if ":" in line)
            except FileNotFoundError:
                continue  # closed meanwhile
            if fields.get("mnt_id", "").strip() in mount_ids and fields.get("ino", "").strip() == str(ino):
                return True
        return False
    except FileNotFoundError:
        return False  # the process has exited: it holds nothing
    except PermissionError:
        return None
