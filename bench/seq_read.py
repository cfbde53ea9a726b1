"""Sequential read of one large object: through a Pail mount versus raw S3 clients.

    .venv/bin/python -m bench.seq_read [--size-mib 1024] [--runs 3] [--out bench/results]

Starts a local SeaweedFS (everything on 127.0.0.1), uploads one object of random bytes,
then measures, ``--runs`` times each, interleaved round by round:

  raw_awscrt    awscrt.s3.S3Client GET_OBJECT of the whole object (auto-ranged parallel
                8 MiB parts, SigV4), the body discarded in on_body
  raw_boto3     boto3 ranged GETs of 8 MiB in a pool of 16 threads, bodies read
  mount_awscrt  a fresh ``pail mount`` (default data path, awscrt), the file read to the
                end with 1 MiB reads
  mount_boto3   the same with PAIL_DATA_PATH=boto3 in the mount process's environment

Before every timed run the page cache is dropped and the server's own files are read
back into it, so every run finds the same state: nothing of the client side cached, the
server's data in memory. A last, untimed pass reads the file through each kind of mount
once more via a recording proxy, to check every byte and count the requests.

Writes OUT/seq_read.json and OUT/seq_read.md and prints the table. Timing never fails
the run; errors (a failed mount, a short read, wrong bytes) do.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path

MiB = 1024 * 1024
MB = 1_000_000  # MB/s here are decimal megabytes per second
BLOCK_SIZE = 64 * MiB  # the object is this random block repeated
PART_SIZE = 8 * MiB  # awscrt's part size, boto3's range size (Pail's own request size)
BOTO3_THREADS = 16  # as many as Pail's boto3 data path uses
READ_SIZE = 1 * MiB
READ_TIMEOUT = 300.0
MOUNT_TIMEOUT = 90.0
UNMOUNT_TIMEOUT = 30.0
REGION = "us-east-1"
KEY = "bench/seq-read.bin"
CLK_TCK = os.sysconf("SC_CLK_TCK")

VARIANTS = {
    "raw_awscrt": "raw awscrt (S3Client, 8 MiB parts)",
    "raw_boto3": f"raw boto3 ({BOTO3_THREADS} threads, 8 MiB ranges)",
    "mount_awscrt": "Pail mount, awscrt data path (default)",
    "mount_boto3": "Pail mount, PAIL_DATA_PATH=boto3",
}


class BenchError(RuntimeError):
    pass


# ------------------------------------------------------------------ the object
class RepeatingBlock:
    """A read-only, seekable file of ``size`` bytes: ``block`` repeated. boto3's
    upload_fileobj reads one part at a time from it, so 1 GiB never sits in memory."""

    def __init__(self, block: bytes, size: int) -> None:
        self._block = block
        self._size = size
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        out = bytearray()
        while self._pos < end:
            at = self._pos % len(self._block)
            take = min(end - self._pos, len(self._block) - at)
            out += self._block[at:at + take]
            self._pos += take
        return bytes(out)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        pass


def upload(server, bucket: str, block: bytes, size: int) -> dict:
    from boto3.s3.transfer import TransferConfig

    client = server.client()
    config = TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB,
                            max_concurrency=4, use_threads=True)
    t0 = time.perf_counter()
    client.upload_fileobj(RepeatingBlock(block, size), bucket, KEY, Config=config)
    seconds = time.perf_counter() - t0
    head = client.head_object(Bucket=bucket, Key=KEY)
    if head["ContentLength"] != size:
        raise BenchError(f"uploaded {head['ContentLength']} bytes, expected {size}")
    return {"seconds": seconds, "mb_s": size / seconds / MB, "etag": head["ETag"]}


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


def status_kib(pid: int, field: str) -> int | None:
    status = _read(f"/proc/{pid}/status") or ""
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def mount_pid(directory: str) -> int | None:
    """The ``python -m driver mount ... DIR`` process serving ``directory``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        raw = _read(f"/proc/{entry}/cmdline")
        if not raw:
            continue
        argv = raw.split("\0")
        if "driver" in argv and "mount" in argv and directory in argv and "--foreground" in argv:
            return int(entry)
    return None


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


def warm(directory: Path) -> float:
    """Read every file under ``directory`` (the server's data) into the page cache."""
    total = 0
    buf = bytearray(8 * MiB)
    for path in directory.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                with open(path, "rb", buffering=0) as f:
                    while n := f.readinto(buf):
                        total += n
    return total


def prepare_run(server) -> dict:
    t0 = time.perf_counter()
    dropped = drop_caches()
    warmed = warm(Path(server.data_dir))
    return {"page_cache_dropped": dropped, "server_bytes_warmed": warmed,
            "prepare_s": round(time.perf_counter() - t0, 2)}


# ------------------------------------------------------------------ raw clients
def raw_awscrt(server, bucket: str, size: int) -> dict:
    import awscrt.auth
    import awscrt.http
    import awscrt.io
    import awscrt.s3

    event_loops = awscrt.io.EventLoopGroup(max(2, min(8, os.cpu_count() or 2)))  # as Pail
    bootstrap = awscrt.io.ClientBootstrap(event_loops, awscrt.io.DefaultHostResolver(event_loops))
    credentials = awscrt.auth.AwsCredentialsProvider.new_static(server.access_key, server.secret_key)
    client = awscrt.s3.S3Client(
        bootstrap=bootstrap, region=REGION,
        signing_config=awscrt.s3.create_default_s3_signing_config(region=REGION,
                                                                  credential_provider=credentials),
        tls_mode=awscrt.s3.S3RequestTlsMode.DISABLED, part_size=PART_SIZE,
        memory_limit=1024 * MiB, throughput_target_gbps=10.0,  # as Pail
    )
    host = server.endpoint.split("://", 1)[1]
    request = awscrt.http.HttpRequest("GET", f"/{bucket}/{KEY}", awscrt.http.HttpHeaders([("Host", host)]))
    received = [0]
    lock = threading.Lock()

    def on_body(chunk, offset, **_):
        with lock:
            received[0] += len(chunk)

    cpu0, ticks0, server0 = os.times(), machine_ticks(), cpu_seconds(server.process.pid)
    t0 = time.perf_counter()
    meta = client.make_request(type=awscrt.s3.S3RequestType.GET_OBJECT, request=request, on_body=on_body)
    try:
        meta.finished_future.result(timeout=READ_TIMEOUT)
    except TimeoutError:
        meta.cancel()
        raise BenchError(f"awscrt GET did not finish within {READ_TIMEOUT:.0f} s") from None
    seconds = time.perf_counter() - t0
    cpu1, ticks1, server1 = os.times(), machine_ticks(), cpu_seconds(server.process.pid)
    if received[0] != size:
        raise BenchError(f"awscrt received {received[0]} bytes, expected {size}")
    return {"bytes": size, "seconds": seconds, "mb_s": size / seconds / MB,
            "client_cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 2),
            "server_cpu_s": round((server1 or 0) - (server0 or 0), 2),
            "machine": machine_cpu(ticks0, ticks1)}


def raw_boto3(server, bucket: str, size: int) -> dict:
    client = server.client(max_pool_connections=BOTO3_THREADS * 2, read_timeout=60)
    ranges = [(start, min(size, start + PART_SIZE) - 1) for start in range(0, size, PART_SIZE)]

    def get(r: tuple[int, int]) -> int:
        response = client.get_object(Bucket=bucket, Key=KEY, Range=f"bytes={r[0]}-{r[1]}")
        return len(response["Body"].read())

    pool = ThreadPoolExecutor(BOTO3_THREADS, thread_name_prefix="bench-boto3")
    cpu0, ticks0, server0 = os.times(), machine_ticks(), cpu_seconds(server.process.pid)
    t0 = time.perf_counter()
    try:
        futures = [pool.submit(get, r) for r in ranges]
        done, pending = wait_futures(futures, timeout=READ_TIMEOUT)
        if pending:
            raise BenchError(f"boto3 GETs did not finish within {READ_TIMEOUT:.0f} s")
        received = sum(f.result() for f in done)
        seconds = time.perf_counter() - t0
        cpu1, ticks1, server1 = os.times(), machine_ticks(), cpu_seconds(server.process.pid)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if received != size:
        raise BenchError(f"boto3 received {received} bytes, expected {size}")
    return {"bytes": size, "seconds": seconds, "mb_s": size / seconds / MB,
            "client_cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 2),
            "server_cpu_s": round((server1 or 0) - (server0 or 0), 2),
            "machine": machine_cpu(ticks0, ticks1)}


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

    def mount(self, server, bucket: str, endpoint: str, data_path: str) -> tuple[str, int, Path]:
        self.count += 1
        directory = self.workdir / f"mnt-{self.count}-{data_path}"
        directory.mkdir()
        log_path = self.workdir / f"mnt-{self.count}-{data_path}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "PAIL_DATA_PATH"}
        env.update(server.env())
        env["PAIL_DATA_PATH"] = data_path
        self.live[str(directory)] = None
        result = subprocess.run(
            [*self.pail, "mount", bucket, str(directory), "--endpoint-url", endpoint, "--region", REGION,
             "--log-format", "json", "--log-file", str(log_path)],
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


def mount_run(mounts: Mounts, server, bucket: str, size: int, data_path: str) -> dict:
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
    if seen != data_path:
        _say(f"warning: asked for data path {data_path}, but the mount's threads look like {seen}")
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


def _attribute(run: dict) -> None:
    """CPU seconds the machine spent busy during the timed part that none of our processes
    (client or mount, reader, server) account for: other processes, interrupts, softirq.
    A large value means the run shared the machine with something else."""
    machine = run.get("machine") or {}
    if machine.get("busy") is None:
        return
    cpu = machine["cpu_s"]
    busy = sum(v for k, v in cpu.items() if k not in ("idle", "iowait", "steal"))
    ours = sum(run.get(k) or 0 for k in ("client_cpu_s", "mount_cpu_s", "reader_cpu_s", "server_cpu_s"))
    machine["unattributed_cpu_s"] = round(busy - ours, 2)


# ------------------------------------------------------------------ trace pass
def trace_pass(mounts: Mounts, server, bucket: str, block_file: Path) -> dict:
    """Untimed: read the file through each kind of mount via the recording proxy, checking
    every byte, and describe the requests the mount made."""
    from tests.support.proxy import S3Proxy

    out = {}
    for data_path in ("crt", "boto3"):
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
                raise BenchError(f"wrong bytes through the mount ({data_path}) at offset "
                                 f"{read['first_mismatch_at']}")
            out["mount_awscrt" if data_path == "crt" else "mount_boto3"] = {
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


# --------------------------------------------------------------------- report
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


def summarize(runs: list[dict]) -> dict:
    speeds = [r["mb_s"] for r in runs]
    out = {"median_mb_s": statistics.median(speeds), "min_mb_s": min(speeds), "max_mb_s": max(speeds)}
    for field in ("peak_rss_mib", "mount_cpu_s", "mount_cpu_util", "mount_main_thread_util", "client_cpu_s",
                  "server_cpu_s"):
        values = [r[field] for r in runs if r.get(field) is not None]
        if values:
            out[f"median_{field}"] = statistics.median(values)
    busy = [r["machine"]["busy"] for r in runs if r.get("machine", {}).get("busy") is not None]
    if busy:
        out["median_machine_busy"] = statistics.median(busy)
    return out


def markdown(result: dict) -> str:
    variants = result["variants"]
    lines = [
        (f"Sequential read of a {result['config']['size_mib']} MiB object, SeaweedFS on 127.0.0.1, "
         f"median of {result['config']['runs']} runs (MB/s = 10^6 bytes/s), {result['date']}, "
         f"Pail {result['machine'].get('pail_commit')}"
         f"{' + uncommitted driver/ changes' if result['machine'].get('pail_driver_modified') else ''}"),
        "",
        ("| variant | median MB/s | min–max | ratio to raw awscrt | ratio to raw boto3 | peak RSS | "
         "client CPU s/GiB |"),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    gib = result["config"]["size_bytes"] / (1024 * MiB)
    for name, label in VARIANTS.items():
        v = variants[name]
        s = v["summary"]
        ratios = result["ratios"].get(name, {})
        rss = f"{s['median_peak_rss_mib']:.0f} MiB" if "median_peak_rss_mib" in s else "–"
        cpu = s.get("median_mount_cpu_s", s.get("median_client_cpu_s"))
        cpu_text = f"{cpu / gib:.1f}" if cpu is not None else "–"
        lines.append(
            f"| {label} | {s['median_mb_s']:.0f} | {s['min_mb_s']:.0f}–{s['max_mb_s']:.0f} | "
            f"{ratios['to_raw_awscrt']:.2f} | {ratios['to_raw_boto3']:.2f} | {rss} | {cpu_text} |")
    lines.append("")
    lines.append("Client CPU: the benchmark process for raw clients, the mount process for mounts "
                 "(the reader and the server are not included). Peak RSS: the mount process's VmHWM.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.seq_read", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="object size in MiB (default 1024)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per variant (default 3)")
    parser.add_argument("--out", default="bench/results",
                        help="directory for the results (default bench/results)")
    parser.add_argument("--no-trace", action="store_true",
                        help="skip the untimed pass through the recording proxy")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the server's data and mount logs")
    args = parser.parse_args(argv)
    if args.size_mib <= 0 or args.runs <= 0:
        parser.error("--size-mib and --runs must be positive")

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support
    from tests.support.s3server import start_seaweedfs

    size = args.size_mib * MiB
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="pail-bench-"))
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    server = None
    mounts = Mounts(workdir)
    try:
        started = datetime.datetime.now(datetime.UTC)
        load_before = os.getloadavg()
        _say(f"starting SeaweedFS in {workdir}")
        server = start_seaweedfs(workdir / "seaweedfs")
        bucket = server.create_bucket("pail-bench")
        block = os.urandom(min(BLOCK_SIZE, size))
        block_file = workdir / "block.bin"
        block_file.write_bytes(block)
        _say(f"uploading {args.size_mib} MiB")
        uploaded = upload(server, bucket, block, size)
        _say(f"uploaded at {uploaded['mb_s']:.0f} MB/s")

        runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
        for round_no in range(1, args.runs + 1):
            for name in VARIANTS:  # interleaved, so drift in machine load hits every variant
                if name.startswith("raw_"):
                    prepared = prepare_run(server)
                    run = (raw_awscrt if name == "raw_awscrt" else raw_boto3)(server, bucket, size)
                    run.update(prepared)
                else:
                    data_path = "crt" if name == "mount_awscrt" else "boto3"
                    run = mount_run(mounts, server, bucket, size, data_path)
                _attribute(run)
                run["load_avg_1m"] = round(os.getloadavg()[0], 2)
                runs[name].append(run)
                _say(f"round {round_no}/{args.runs} {name:13s} {run['mb_s']:8.1f} MB/s  "
                     f"({run['seconds']:.2f} s, load {run['load_avg_1m']})")

        trace = None
        if not args.no_trace:
            _say("untimed pass through the recording proxy (checks every byte, counts requests)")
            trace = trace_pass(mounts, server, bucket, block_file)

        variants = {name: {"label": VARIANTS[name], "runs": runs[name], "summary": summarize(runs[name])}
                    for name in VARIANTS}
        medians = {name: v["summary"]["median_mb_s"] for name, v in variants.items()}
        ratios = {
            name: {"to_raw_awscrt": medians[name] / medians["raw_awscrt"],
                   "to_raw_boto3": medians[name] / medians["raw_boto3"]}
            for name in VARIANTS
        }
        ratios["mount_boto3"]["to_mount_awscrt"] = medians["mount_boto3"] / medians["mount_awscrt"]
        result = {
            "benchmark": "seq_read",
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {**machine_info(), "load_avg_before": [round(x, 2) for x in load_before],
                        "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
            "config": {"size_mib": args.size_mib, "size_bytes": size, "runs": args.runs,
                       "part_size": PART_SIZE, "boto3_threads": BOTO3_THREADS, "read_size": READ_SIZE,
                       "random_block": len(block), "mb": "10^6 bytes"},
            "upload": uploaded,
            "variants": variants,
            "ratios": ratios,
            "trace": trace,
        }
        table = markdown(result)
        (out_dir / "seq_read.json").write_text(json.dumps(result, indent=2) + "\n")
        (out_dir / "seq_read.md").write_text(table)
        print(table, end="")
        if trace:
            for name, t in trace.items():
                print(f"{name}: requests {t['requests']}, GET sizes {t['get_sizes']}, "
                      f"max GETs in flight {t['max_gets_in_flight']}, bytes verified: {t['verified']}")
        _say(f"wrote {out_dir / 'seq_read.json'} and {out_dir / 'seq_read.md'}")
        return 0
    except KeyboardInterrupt:
        _say("interrupted; cleaning up")
        return 130
    finally:
        mounts.cleanup()
        if server is not None:
            server.stop()
        signal.signal(signal.SIGTERM, previous_term)
        if args.keep_workdir:
            _say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _say(message: str) -> None:
    print(f"[seq_read] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
