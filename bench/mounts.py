"""Pail mounts for the benchmarks, and reading a file through one.

Mounts runs ``pail mount`` / ``pail unmount`` on fresh directories and cleans up whatever
it left behind. read_file reads a file to the end in a child process (bench/readfile.py)
under a timeout; mount_run times one such read through a fresh mount with the CPU and
memory it cost; trace_pass reads through each kind of mount via the tests' recording
proxy, untimed, to check every byte and describe the requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.clients import KEY, READ_TIMEOUT, REGION
from bench.system import (
    MB,
    BenchError,
    MiB,
    cpu_seconds,
    is_mounted,
    machine_cpu,
    machine_ticks,
    mount_pid,
    prepare_run,
    status_kib,
    thread_cpu,
)

READ_SIZE = 1 * MiB
MOUNT_TIMEOUT = 90.0
UNMOUNT_TIMEOUT = 30.0


# ---------------------------------------------------------------------- mounts
class Mounts:
    """``pail mount`` / ``pail unmount`` of fresh directories; ``cleanup`` undoes every
    mount this benchmark made, whatever state it is in."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.count = 0
        self.live: dict[str, int | None] = {}
        pail = Path(sys.executable).with_name("pail")
        self.pail = [str(pail)] if pail.exists() else [sys.executable, "-m", "driver"]

    def mount(self, server, bucket: str, endpoint: str, data_path: str | None, options: tuple[str, ...] = (),
              env_extra: dict[str, str] | None = None, tag: str | None = None) -> tuple[str, int, Path]:
        """``data_path`` None: Pail's default, whatever it is (bench.compare measures that).
        ``options``: more ``pail mount`` options (bench.compare's pail-cache: ``--cache DIR``);
        ``env_extra``: more environment for the mount process; ``tag`` names the directory."""
        self.count += 1
        name = f"mnt-{self.count}-{tag or data_path or 'default'}"
        directory = self.workdir / name
        directory.mkdir()
        log_path = self.workdir / f"{name}.log"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("AWS_") and k not in ("PAIL_DATA_PATH", "PROMETHEUS_MULTIPROC_DIR")}
        env.update(server.env())
        env.update(env_extra or {})
        if data_path is not None:
            env["PAIL_DATA_PATH"] = data_path
        self.live[str(directory)] = None
        result = subprocess.run(
            [*self.pail, "mount", bucket, str(directory), "--endpoint-url", endpoint, "--region", REGION,
             "--log-format", "json", "--log-file", str(log_path), *options],
            env=env, capture_output=True, text=True, timeout=MOUNT_TIMEOUT, stdin=subprocess.DEVNULL,
            check=False)
        pid = self._find(str(directory))
        self.live[str(directory)] = pid
        if result.returncode != 0:
            raise BenchError(f"pail mount failed ({result.returncode}): {result.stderr.strip()}")
        if pid is None or not is_mounted(str(directory)):
            raise BenchError(f"pail mount returned but {directory} is not served by a mount process")
        return str(directory), pid, log_path

    @staticmethod
    def _find(directory: str, timeout: float = 5.0) -> int | None:
        deadline = time.monotonic() + timeout
        while True:
            pid = mount_pid(directory)
            if pid is not None or time.monotonic() > deadline:
                return pid
            time.sleep(0.05)

    def unmount(self, directory: str) -> float:
        """``pail unmount``, then wait (bounded) for the mount process to exit."""
        t0 = time.perf_counter()
        result = subprocess.run([*self.pail, "unmount", directory], capture_output=True, text=True,
                                timeout=UNMOUNT_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
        if result.returncode != 0:
            raise BenchError(f"pail unmount failed: {result.stderr.strip()}")
        deadline = time.monotonic() + UNMOUNT_TIMEOUT
        while mount_pid(directory) is not None:
            if time.monotonic() > deadline:
                raise BenchError(f"the mount process of {directory} still runs {UNMOUNT_TIMEOUT:.0f} s "
                                 "after unmount")
            time.sleep(0.05)
        self.live.pop(directory, None)
        return time.perf_counter() - t0

    def cleanup(self) -> None:
        for directory in list(self.live):
            with contextlib.suppress(Exception):
                if is_mounted(directory):
                    subprocess.run(["fusermount3", "-u", "-z", directory], capture_output=True, timeout=30,
                                   check=False)
            pid = mount_pid(directory)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if pid is None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and mount_pid(directory) == pid:
                    time.sleep(0.1)
                pid = mount_pid(directory)
            self.live.pop(directory, None)


def read_file(path: str, verify: Path | None = None) -> dict:
    command = [sys.executable, "-m", "bench.readfile", path, "--read-size", str(READ_SIZE)]
    if verify is not None:
        command += ["--verify", str(verify)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=READ_TIMEOUT,
                                cwd=Path(__file__).resolve().parent.parent, stdin=subprocess.DEVNULL,
                                check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"reading {path} did not finish within {READ_TIMEOUT:.0f} s") from None
    if result.returncode != 0:
        raise BenchError(f"reading {path} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout)


def mount_run(mounts: Mounts, server, bucket: str, size: int, data_path: str | None) -> dict:
    directory, pid, log_path = mounts.mount(server, bucket, server.endpoint, data_path)
    prepared = prepare_run(server)
    cpu0, threads0, ticks0 = cpu_seconds(pid), thread_cpu(pid), machine_ticks()
    server0 = cpu_seconds(server.process.pid)
    read = read_file(os.path.join(directory, KEY))
    cpu1, threads1, ticks1 = cpu_seconds(pid), thread_cpu(pid), machine_ticks()
    server1 = cpu_seconds(server.process.pid)
    peak_rss = status_kib(pid, "VmHWM")
    n_threads = len(os.listdir(f"/proc/{pid}/task")) if os.path.isdir(f"/proc/{pid}/task") else None
    unmount_s = mounts.unmount(directory)
    if read["bytes"] != size:
        raise BenchError(f"read {read['bytes']} bytes through the mount, expected {size} (log {log_path})")
    seen = "crt" if any(name.startswith("AwsEventLoop") for name in threads1) else "boto3"
    seconds = read["seconds"]
    mount_cpu = (cpu1 or 0) - (cpu0 or 0)
    by_thread = {k: round(threads1.get(k, 0) - threads0.get(k, 0), 2) for k in threads1}
    return {
        "bytes": size, "seconds": seconds, "mb_s": size / seconds / MB,
        "mount_cpu_s": round(mount_cpu, 2),
        "mount_cpu_util": round(mount_cpu / seconds, 2),  # 1.0 = one core busy all along
        "mount_main_thread_util": round(by_thread.get("main", 0) / seconds, 2),
        "mount_cpu_by_thread_s": by_thread,
        "mount_threads": n_threads,
        "data_path_seen": seen,  # from the mount's thread names: awscrt runs "AwsEventLoop" threads
        # includes the reader's start-up (~0.1 s of a Python interpreter) around the read
        "server_cpu_s": round((server1 or 0) - (server0 or 0), 2),
        "machine": machine_cpu(ticks0, ticks1),
        "peak_rss_mib": round(peak_rss / 1024, 1) if peak_rss else None,
        "reader_cpu_s": round(read["reader_cpu_s"], 2),
        "longest_read_s": round(read["longest_read_s"], 3),
        "slow_reads": read["slow_reads"],
        "mb_per_interval": [round(b / MB, 1) for b in read["bytes_per_interval"]],
        "unmount_s": round(unmount_s, 2),
        **prepared,
    }


# ------------------------------------------------------------------ trace pass
def trace_pass(mounts: Mounts, server, bucket: str, block_file: Path) -> dict:
    """Untimed: read the file through each kind of mount via the recording proxy, checking
    every byte, and describe the requests the mount made."""
    from tests.support.proxy import S3Proxy

    out = {}
    for name, data_path in (("mount", None), ("mount_awscrt", "crt"), ("mount_boto3", "boto3")):
        with S3Proxy(server.endpoint) as proxy:
            directory, _, _ = mounts.mount(server, bucket, proxy.endpoint, data_path)
            proxy.clear()
            read = read_file(os.path.join(directory, KEY), verify=block_file)
            mounts.unmount(directory)
            gets = proxy.records("GetObject")
            ops = Counter(r.op for r in proxy.records())
            sizes = Counter()
            for r in gets:
                if r.range and r.range[0] is not None and r.range[1] is not None:
                    sizes[r.range[1] - r.range[0] + 1] += 1
                else:
                    sizes["whole"] += 1
            if not read["verified"]:
                raise BenchError(f"wrong bytes through the mount ({name}) at offset "
                                 f"{read['first_mismatch_at']}")
            out[name] = {
                "verified": read["verified"],
                "requests": dict(ops),
                "get_sizes": {_size_name(k): v for k, v in sorted(sizes.items(), key=lambda kv: str(kv[0]))},
                "get_bytes": sum(r.response_bytes for r in gets),
                "max_gets_in_flight": proxy.max_in_flight("GetObject"),
                "get_errors": sum(1 for r in gets if r.status is None or r.status >= 400),
                "mb_s_through_proxy": round(read["mb_s"], 1),
            }
    return out


def _size_name(n) -> str:
    if not isinstance(n, int):
        return str(n)
    return f"{n // MiB} MiB" if n % MiB == 0 else (f"{n // 1024} KiB" if n % 1024 == 0 else f"{n} B")
