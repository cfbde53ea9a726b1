"""Machine and /proc helpers shared by the benchmarks.

CPU seconds of a process or of its threads (by thread name), the machine's CPU ticks and
how all cores spent a stretch of time (and how much of it none of ours account for),
the bytes sent on loopback, VmHWM/VmRSS and /proc/meminfo readers and resetting VmHWM,
finding the process serving a Pail mount and whether a directory is mounted, dropping
the page cache before a timed run (for reads, also reading the server's files back into
it), and a description of the machine, the packages and the Pail commit measured. Also
the units (MiB, MB) and the error (BenchError) every benchmark module uses.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

MiB = 1024 * 1024
MB = 1_000_000  # MB/s here are decimal megabytes per second
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """Something is wrong (a failed mount, a short read, wrong bytes); timing never raises it."""


# --------------------------------------------------------------- /proc helpers
def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """utime + stime of a process (all its threads) or of one thread."""
    stat = _read(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    if stat is None:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads, summed by thread name; the main thread is 'main'."""
    out: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            stat = _read(f"/proc/{pid}/task/{tid}/stat")
            if stat is None:
                continue
            name = "main" if int(tid) == pid else stat[stat.index("(") + 1:stat.rindex(")")]
            # awscrt names threads "AwsEventLoop 1", "AwsEventLoop 2"...: group them
            name = name.rstrip("0123456789 ") or name
            fields = stat[stat.rindex(")") + 2:].split()
            out[name] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return {k: round(v, 2) for k, v in sorted(out.items())}


def loopback_bytes() -> int | None:
    """Bytes sent on the loopback interface since boot (/proc/net/dev): every byte between
    client and server here, which are both on 127.0.0.1."""
    for line in (_read("/proc/net/dev") or "").splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])  # receive has 8 fields, then transmit bytes
    return None


_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_ticks() -> dict[str, int]:
    """Jiffies of all CPUs since boot by kind, from the first line of /proc/stat."""
    fields = (_read("/proc/stat") or "cpu").splitlines()[0].split()[1:]
    return {name: int(value) for name, value in zip(_STAT_FIELDS, fields)}


def machine_cpu(before: dict[str, int], after: dict[str, int]) -> dict:
    """How all cores spent the time between two machine_ticks(): CPU seconds by kind, and
    the busy share (everything but idle, iowait and steal; 1.0 = every core busy)."""
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in _STAT_FIELDS}
    total = sum(delta.values())
    busy = total - delta["idle"] - delta["iowait"] - delta["steal"]
    return {
        "busy": round(busy / total, 2) if total > 0 else None,
        "cpu_s": {k: round(v / CLK_TCK, 2) for k, v in delta.items() if v},
    }


def attribute_cpu(run: dict) -> None:
    """Add to run["machine"] the CPU seconds the machine spent busy during the timed part
    that none of our processes (client or mount, reader or writer, server) account for:
    other processes, interrupts, softirq. A large value means the run shared the machine."""
    machine = run.get("machine") or {}
    if machine.get("busy") is None:
        return
    busy = sum(v for k, v in machine["cpu_s"].items() if k not in ("idle", "iowait", "steal"))
    ours = sum(run.get(k) or 0 for k in ("client_cpu_s", "mount_cpu_s", "reader_cpu_s", "writer_cpu_s",
                                         "server_cpu_s"))
    machine["unattributed_cpu_s"] = round(busy - ours, 2)


def status_kib(pid: int, field: str) -> int | None:
    status = _read(f"/proc/{pid}/status") or ""
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def reset_peak_rss(pid: int) -> bool:
    """Set a process's VmHWM back to its current RSS (root, or the process's owner)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5\n")
        return True
    except OSError:
        return False


def mount_pid(directory: str) -> int | None:
    """The Pail mount process serving ``directory``: ``pail mount ... DIR`` (forked by the
    command, it keeps the command's arguments) or ``python -m driver mount ... DIR
    --foreground`` (as the node server starts it)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        raw = _read(f"/proc/{entry}/cmdline")
        if not raw:
            continue
        argv = raw.split("\0")
        pail = "driver" in argv or any(os.path.basename(arg) == "pail" for arg in argv)
        if pail and "mount" in argv and directory in argv and _running(entry):
            return int(entry)
    return None


def _running(pid: str) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] != "Z"


def is_mounted(directory: str) -> bool:
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        parts = line.split()
        if len(parts) > 4 and parts[4] == directory:
            return True
    return False


def drop_caches() -> bool:
    subprocess.run(["sync"], timeout=120, check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


WARM_CHUNK = 64 * MiB
WARM_THREADS = 8  # a virtual disk reads about 4x faster with several reads in flight than with one


def warm(directory: Path) -> int:
    """Read every file under ``directory`` (the server's data) into the page cache, in
    chunks from several threads at once (preadv releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = []
    for path in directory.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                size = path.stat().st_size
                chunks += [(path, offset) for offset in range(0, size, WARM_CHUNK)]
    buffers = threading.local()

    def read(chunk: tuple[Path, int]) -> int:
        path, offset = chunk
        buf = getattr(buffers, "buf", None) or bytearray(8 * MiB)
        buffers.buf = buf
        done = 0
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                while done < WARM_CHUNK and (n := os.preadv(fd, [buf], offset + done)):
                    done += n
            finally:
                os.close(fd)
        return min(done, WARM_CHUNK)

    with ThreadPoolExecutor(WARM_THREADS) as pool:
        return sum(pool.map(read, chunks))


def settle() -> dict:
    """Before a timed write: write back what earlier runs left dirty and drop the page cache,
    so that no run pays for the writeback of the one before."""
    t0 = time.perf_counter()
    dropped = drop_caches()
    return {"page_cache_dropped": dropped, "prepare_s": round(time.perf_counter() - t0, 2)}


def prepare_run(server) -> dict:
    t0 = time.perf_counter()
    dropped = drop_caches()
    warmed = warm(Path(server.data_dir))
    return {"page_cache_dropped": dropped, "server_bytes_warmed": warmed,
            "prepare_s": round(time.perf_counter() - t0, 2)}


# -------------------------------------------------------------- machine info
def machine_info() -> dict:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    weed = Path(sys.executable).with_name("weed")
    try:
        weed_version = subprocess.run([str(weed), "version"], capture_output=True, text=True,
                                      timeout=30, check=False).stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        weed_version = None
    cpu_model = None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem = status_kib_from_meminfo("MemTotal")
    root = Path(__file__).resolve().parent.parent
    try:  # read-only git: which Pail was measured
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=30, check=False).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--", "driver"],
                                    cwd=root, capture_output=True, text=True, timeout=30,
                                    check=False).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem / 1024 / 1024, 1) if mem else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {name: version(name) for name in ("awscrt", "boto3", "botocore", "pyfuse3", "trio",
                                                      "pail-csi")},
        "seaweedfs": weed_version,
        "pail_commit": commit,
        "pail_driver_modified": dirty,  # uncommitted changes under driver/ when measured
    }


def status_kib_from_meminfo(field: str) -> int | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None

