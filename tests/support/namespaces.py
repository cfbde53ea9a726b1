"""A Kubernetes node in miniature, made of Linux namespaces, for restart tests.

* The kubelet directory is a *shared* mount point (``SharedDirectory``), as kubelet's
  directory is on a node, and the node plugin container mounts it with Bidirectional
  propagation: a FUSE mount the node server makes under it in its own mount namespace
  appears at the same path in the test's (the host's) mount namespace.
* The node container (``node_container_prefix``) is ``unshare --pid --fork --mount`` with
  this module as PID 1 until it execs ``pail csi node``: it takes every mount except the
  kubelet directory out of any peer group, detaches its copies of other people's FUSE
  mounts (a copy would keep their FUSE sessions alive after they unmount), mounts a
  /proc of the new PID namespace and becomes the supervisor. SIGKILL to that PID 1 ends
  the namespace: the kernel kills every process in it, mount processes included, as a
  container restart does.
* A pod container (``PodContainer``) is a process in a mount namespace of its own with
  private propagation, holding a bind of the volume's target path at a path of its own,
  as container runtimes bind volumes without mountPropagation; its other FUSE mounts
  are detached. The test reads and writes as the pod with ``nsenter --mount``.

Run as a script it is the in-namespace half: ``namespaces.py node KEEP -- COMMAND...``
or ``namespaces.py pod SOURCE DEST private|slave``. Only the standard library is used here, because
the script runs before anything else in the namespace.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_BIND, MS_REC = 4096, 16384
MS_PRIVATE, MS_SLAVE, MS_SHARED = 1 << 18, 1 << 19, 1 << 20
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    encode = lambda s: None if s is None else s.encode()
    if _libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), None) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount {target}: {os.strerror(error)}")


def _detach(target: str) -> None:
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"umount {target}: {os.strerror(error)}")


@dataclass(frozen=True)
class Mount:
    id: int
    parent: int
    point: str
    fstype: str
    shared: bool

    @property
    def is_fuse(self) -> bool:
        return self.fstype in ("fuse", "fuseblk") or self.fstype.startswith("fuse.")


def _unescape(field: str) -> str:
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def mount_table(pid: str = "self") -> list[Mount]:
    """The mounts of ``pid``'s mount namespace, parents before children."""
    table = []
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as mountinfo:
        for line in mountinfo:
            left, _, right = line.partition(" - ")
            fields = left.split()
            table.append(Mount(int(fields[0]), int(fields[1]), _unescape(fields[4]), right.split()[0],
                               any(f.startswith("shared:") for f in fields[6:])))
    return table


def fuse_mounts_at(path: Path | str, pid: str = "self") -> int:
    """How many FUSE mounts are stacked at ``path`` in ``pid``'s mount namespace."""
    return sum(1 for m in mount_table(pid) if m.point == str(path) and m.is_fuse)


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _detach_fuse_mounts(keep) -> None:
    """Detach this namespace's copies of FUSE mounts for which ``keep(point)`` is false,
    but only where the unmount cannot propagate (the parent is in no peer group)."""
    table = mount_table()
    by_id = {m.id: m for m in table}
    for m in reversed(table):
        parent = by_id.get(m.parent)
        if m.is_fuse and not keep(m.point) and (parent is None or not parent.shared):
            try:
                _detach(m.point)
            except OSError:
                pass


# -- the in-namespace half --------------------------------------------------------------------

def _node_main(keep: str, command: list[str]) -> None:
    """PID 1 of a fresh PID and mount namespace whose mounts are copies of the host's."""
    for m in mount_table():
        if not _under(m.point, keep):
            try:  # out of any peer group: nothing done here reaches the host
                _mount(None, m.point, None, MS_PRIVATE)
            except OSError:
                pass
    _detach_fuse_mounts(lambda point: _under(point, keep))
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.execvp(command[0], command)


def _pod_main(source: str, dest: str, propagation: str) -> None:
    """A container of a pod: its volume is a bind of the target, taken now."""
    os.makedirs(dest, exist_ok=True)
    _mount(source, dest, None, MS_BIND)
    _mount(None, dest, None, MS_REC | (MS_SLAVE if propagation == "slave" else MS_PRIVATE))
    _detach_fuse_mounts(lambda point: point == dest)
    print("ready", flush=True)
    while True:
        signal.pause()


# -- the test's half -----------------------------------------------------------------------------

class SharedDirectory:
    """``path`` bound onto itself and made a shared mount point; ``remove()`` detaches
    whatever is still mounted under it (in this namespace), then the bind."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        _mount(str(path), str(path), None, MS_BIND)
        try:
            _mount(None, str(path), None, MS_SHARED)
        except BaseException:
            _detach(str(path))
            raise

    def remove(self) -> None:
        for m in reversed(mount_table()):
            if _under(m.point, str(self.path)):
                try:
                    _detach(m.point)
                except OSError:
                    pass


def node_container_prefix(kubelet_dir: Path) -> list[str]:
    """The command prefix that runs a node server as PID 1 of a node container whose
    ``kubelet_dir`` is shared with the host (Bidirectional)."""
    return ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "unchanged",
            sys.executable, str(Path(__file__).resolve()), "node", str(kubelet_dir), "--"]


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def mount_process(target: Path) -> int | None:
    """The (host) pid of the running ``pail mount`` process serving ``target``."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            args = cmdline(int(entry.name))
            if str(target).encode() in args and b"mount" in args and alive(int(entry.name)):
                return int(entry.name)
    return None


def namespace_pid(pid: int) -> int:
    """``pid`` as its own (innermost) PID namespace numbers it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise LookupError(pid)


_POD_IO = r"""
import json, os, sys
op, path = sys.argv[1], sys.argv[2]
try:
    if op == "read":
        with open(path, "rb") as f:
            print(json.dumps({"data": f.read().decode("latin-1")}))
    else:
        with open(path, "wb") as f:
            f.write(sys.stdin.buffer.read())
        print(json.dumps({"data": ""}))
except OSError as exc:
    print(json.dumps({"errno": exc.errno}))
"""


_POD_READER = r"""
import json, os, select, sys
path = sys.argv[1]
reads, errors = 0, []
while not select.select([sys.stdin], [], [], 0.05)[0]:
    try:
        with open(path, "rb") as f:
            f.read()
        os.listdir(os.path.dirname(path))
        reads += 1
    except OSError as exc:
        errors.append(exc.errno)
print(json.dumps({"reads": reads, "errors": errors}))
"""


class Reader:
    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process

    def finish(self) -> tuple[int, list[int]]:
        """(successful reads, errnos of the failed ones)."""
        out, err = self.process.communicate(timeout=60)
        try:
            answer = json.loads(out)
        except ValueError:
            raise RuntimeError(f"the pod's reader failed: {err.decode()[-2000:]}") from None
        return answer["reads"], answer["errors"]


class PodContainer:
    """A container of a pod: its own mount namespace with a bind of ``target`` at
    ``root/data``, taken when it starts. ``propagation`` is the volume mount's:
    "private" (no mountPropagation, the default) or "slave" (HostToContainer)."""

    def __init__(self, target: Path, root: Path, propagation: str = "private") -> None:
        assert propagation in ("private", "slave")
        self.volume = root / "data"
        self._readers: list[subprocess.Popen] = []
        root.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", propagation, sys.executable, str(Path(__file__).resolve()),
             "pod", str(target), str(self.volume), propagation],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        line = _read_line(self.process.stdout, 30)
        if line != "ready":
            self.stop()
            raise RuntimeError(f"pod did not start: {line!r} {self.process.stderr.read().decode()[-2000:]}")

    def _io(self, op: str, name: str, data: bytes = b"") -> bytes:
        result = subprocess.run(
            ["nsenter", "--target", str(self.process.pid), "--mount", sys.executable, "-c", _POD_IO, op,
             str(self.volume / name)], input=data, capture_output=True, timeout=60, check=False)
        try:
            answer = json.loads(result.stdout)
        except ValueError:
            raise RuntimeError(f"pod {op} failed: {result.stderr.decode()[-2000:]}") from None
        if "errno" in answer:
            raise OSError(answer["errno"], f"{os.strerror(answer['errno'])} (as the pod: {op} {name})")
        return answer["data"].encode("latin-1")

    def keep_reading(self, name: str) -> Reader:
        """Read ``name`` and list the volume over and over, as the pod, until ``finish()``."""
        process = subprocess.Popen(
            ["nsenter", "--target", str(self.process.pid), "--mount", sys.executable, "-c", _POD_READER,
             str(self.volume / name)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._readers.append(process)
        return Reader(process)

    def read(self, name: str) -> bytes:
        """Read ``name`` in the pod's volume, as a process of the pod; OSError as it got it."""
        return self._io("read", name)

    def write(self, name: str, data: bytes) -> None:
        self._io("write", name, data)

    def stop(self) -> None:
        for reader in self._readers:
            if reader.poll() is None:
                reader.kill()
            reader.communicate(timeout=30)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()


def _read_line(stream, timeout: float) -> str:
    import select

    deadline = time.monotonic() + timeout
    data = b""
    fd = stream.fileno()
    while b"\n" not in data and time.monotonic() < deadline:
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


if __name__ == "__main__":
    if sys.argv[1] == "node" and sys.argv[3] == "--":
        _node_main(sys.argv[2], sys.argv[4:])
    elif sys.argv[1] == "pod" and len(sys.argv) == 5:
        _pod_main(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(f"usage: {sys.argv[0]} node KEEP -- COMMAND... | pod SOURCE DEST private|slave")
