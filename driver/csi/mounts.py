"""The node's mounts: one mount process per published target, and a record of each.

A mount process is ``python -m driver mount ... --foreground`` — the code of ``pail
mount`` — forked by the launcher (driver.csi.launcher, which has imported it already) or,
failing that, started afresh; either way in its own session so that it outlives the gRPC
server, and with that command line in /proc. A server that
crashes and comes back (same state directory) finds its records, keeps the mounts that
still answer and cleans up the dead ones. Records are JSON files under
``<state>/mounts/``, one per target, written atomically.

A volume with its own credentials (a secret's keys, a pod's token) gets them in
``<state>/credentials/<target hash>.json``: created 0600 in a 0700 directory, replaced
atomically on every publish (kubelet's republish brings fresh tokens, which the mount
process picks up without remounting) and deleted with the mount.

A volume with the ``cache`` mount option keeps object data in ``<cache dir>/<target
hash>/``: made 0700 before its mount process starts, removed with the mount (the process
empties it when it ends, but not when it is killed), kept for a mount that is adopted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import structlog

from driver import readiness
from driver.config import MiB
from driver.csi.errors import MOUNT_ERROR_CODES, CsiError
from driver.csi.launcher import READY_FD, Launcher, LauncherLost
from driver.log import VOLUME_ID_ENV
from driver.mountpoint import mounts as mount_table

log = structlog.get_logger("pail.csi.mounts")

READY_TIMEOUT = 60.0  # seconds a mount may take to answer
STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class MountSpec:
    """What to mount: the bucket and the ``pail mount`` options, already validated."""

    volume_id: str
    bucket: str
    options: tuple[str, ...]
    # A driver.credentials source for --credentials-file, or None for the node's own
    # chain. Not part of the fingerprint: tokens and secrets change with every publish.
    credentials: dict | None = field(default=None, compare=False, repr=False)
    # --max-cache-size of a mount with --cache, 0 without (from the options, as the mount
    # process reads them): counted against --cache-capacity.
    max_cache_size: int = field(default=0, compare=False)

    @property
    def fingerprint(self) -> str:
        """Equal for publishes a target may share (tokens and pod info are not part of it)."""
        text = json.dumps([self.volume_id, self.bucket, list(self.options)])
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class MountRecord:
    volume_id: str
    target: str
    pid: int
    fingerprint: str
    started: float
    cache_size: int = 0  # node disk its cache may take (_cache_disk), counted against --cache-capacity


class MountManager:
    def __init__(self, state_dir: Path, *, env: dict[str, str] | None = None,
                 metrics_dir: Path | None = None, cache_dir: Path | None = None,
                 cache_capacity: int | None = None) -> None:
        self._dir = state_dir / "mounts"
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._credentials_dir = state_dir / "credentials"
        self._credentials_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self._credentials_dir, 0o700)  # whatever an older run or umask left
        self._env = env
        # Mount processes count into files here (driver.metrics); driver.csi.metrics serves them.
        self._metrics_dir = metrics_dir
        if metrics_dir is not None:
            metrics_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._cache_dir = cache_dir if cache_dir is not None else state_dir / "cache"
        self._cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._cache_capacity = cache_capacity
        self._cache_mutex = threading.Lock()  # publishes of different targets run at once
        self._cache_starting: dict[str, int] = {}  # target -> cache size, while it is mounted
        self._children: dict[int, subprocess.Popen] = {}  # mount processes started afresh
        # The rest are forked by the launcher, which imports what they run once (0.6 s each).
        self._launcher = Launcher(self._environment())
        self._launcher.start()

    def close(self) -> None:
        """Stop the launcher; mount processes, and their records, stay."""
        self._launcher.close()

    # -- records ---------------------------------------------------------------------------

    def _record_path(self, target: str) -> Path:
        return self._dir / (_target_hash(target) + ".json")

    def credentials_path(self, target: str) -> str:
        """Where the mount at ``target`` finds its own credentials, if it has any."""
        return str(self._credentials_dir / (_target_hash(target) + ".json"))

    def cache_path(self, target: str) -> str:
        """The directory of the mount at ``target``'s cache, if it has one (``--cache``)."""
        return str(self._cache_dir / _target_hash(target))

    def _write_credentials(self, spec: MountSpec, target: str) -> None:
        if spec.credentials is None:
            return
        path = self.credentials_path(target)
        temporary = path + ".tmp"
        Path(temporary).unlink(missing_ok=True)  # O_EXCL below: the file is born 0600, and ours
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(spec.credentials, f)
        os.replace(temporary, path)

    def record(self, target: str) -> MountRecord | None:
        try:
            return MountRecord(**json.loads(self._record_path(target).read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            log.warning("unreadable mount record dropped", target=target)
            self._record_path(target).unlink(missing_ok=True)
            return None

    def records(self) -> list[MountRecord]:
        found = []
        for path in sorted(self._dir.glob("*.json")):
            try:
                found.append(MountRecord(**json.loads(path.read_text())))
            except (ValueError, TypeError, OSError):
                path.unlink(missing_ok=True)
        return found

    def _save(self, record: MountRecord) -> None:
        path = self._record_path(record.target)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(record)))
        os.replace(temporary, path)

    # -- publish and unpublish -------------------------------------------------------------

    def publish(self, spec: MountSpec, target: str) -> bool:
        """Mount ``spec`` at ``target`` unless it is mounted there already. True when a
        new mount was made. A live mount of something else: ALREADY_EXISTS; a dead one is
        cleaned up and mounted again."""
        self._reap()
        record = self.record(target)
        if record is not None:
            if self.is_live(record):
                if record.fingerprint != spec.fingerprint:
                    raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"{target} is published with another volume, capability or attributes")
                self._write_credentials(spec, target)  # fresh tokens for the live mount
                return False
            log.warning("repairing a dead mount", target=target, volume_id=record.volume_id, pid=record.pid)
            self._clean_up(record.target, record.pid)
        elif _is_mount_point(target):
            raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, f"{target} is already a mount point, not Pail's")
        self._reserve_cache(spec, target)
        try:
            self._write_credentials(spec, target)
            try:
                pid = self._start(spec, target)
            except BaseException:
                Path(self.credentials_path(target)).unlink(missing_ok=True)
                _remove_tree(self.cache_path(target))
                raise
            self._save(MountRecord(spec.volume_id, target, pid, spec.fingerprint, time.time(),
                                   _cache_disk(spec.max_cache_size)))
        finally:
            with self._cache_mutex:
                self._cache_starting.pop(target, None)
        return True

    def _reserve_cache(self, spec: MountSpec, target: str) -> None:
        """Refuse a cache that would take the caches of this node past --cache-capacity:
        past the node pod's emptyDir sizeLimit, kubelet evicts the pod and every mount ends."""
        size = _cache_disk(spec.max_cache_size)
        if not size:
            return
        with self._cache_mutex:
            if self._cache_capacity is not None:
                taken = (sum(r.cache_size for r in self.records() if r.target != target)
                         + sum(n for t, n in self._cache_starting.items() if t != target))
                if taken + size > self._cache_capacity:
                    raise CsiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"mount option max-cache-size: this node's caches may take "
                                   f"{_mib(self._cache_capacity)} (--cache-capacity), {_mib(taken)} are "
                                   f"taken, this one needs {_mib(size)}")
            self._cache_starting[target] = size

    def unpublish(self, target: str) -> None:
        """Unmount and forget ``target``; nothing there is not an error."""
        self._reap()
        record = self.record(target)
        self._clean_up(target, record.pid if record else None)

    def adopt(self) -> tuple[int, int]:
        """After a restart: keep the mounts that still answer, clean up the rest.
        Returns (kept, cleaned)."""
        kept = cleaned = 0
        for record in self.records():
            if self.is_live(record):
                kept += 1
            else:
                self._clean_up(record.target, record.pid)
                cleaned += 1
        recorded = {self.credentials_path(r.target) for r in self.records()}
        for path in self._credentials_dir.iterdir():
            if str(path) not in recorded:  # left by a server that died mid-publish
                path.unlink(missing_ok=True)
        caches = {self.cache_path(r.target) for r in self.records()}
        for path in self._cache_dir.iterdir():
            # Only names this manager makes: --cache-dir may be a directory others use too.
            if _TARGET_HASH.fullmatch(path.name) and str(path) not in caches:
                _remove_tree(str(path))
        return kept, cleaned

    def is_serving(self, record: MountRecord) -> bool:
        """Its process runs and it is mounted (without a request to the mount)."""
        return _process_serves(record.pid, record.target) and _is_mount_point(record.target)

    def is_live(self, record: MountRecord) -> bool:
        """The mount is there, its process runs, and it answers (a dead FUSE mount
        answers ENOTCONN)."""
        if not _process_serves(record.pid, record.target) or not _is_mount_point(record.target):
            return False
        try:
            os.stat(record.target)
        except OSError:
            return False
        return True

    # -- processes -------------------------------------------------------------------------

    def _start(self, spec: MountSpec, target: str) -> int:
        os.makedirs(target, mode=0o750, exist_ok=True)
        cache = self.cache_path(target)
        if cache in spec.options:
            # The node server's directory, whoever made it before: pods' data goes in it.
            os.makedirs(cache, mode=0o700, exist_ok=True)
            os.chmod(cache, 0o700)
        read_end, write_end = os.pipe()
        command = [sys.executable, "-m", "driver", "mount", spec.bucket, target, *spec.options,
                   "--foreground", "--allow-other", "--log-format", "json", "--ready-fd"]
        env = self._environment()
        env[VOLUME_ID_ENV] = spec.volume_id  # on every line the mount process logs
        if spec.credentials is not None:
            # The volume's own credentials only: nothing of the node's to fall back on.
            for name in _NODE_CREDENTIAL_VARIABLES:
                env.pop(name, None)
        lost: LauncherLost | None = None
        try:
            try:
                pid = self._launcher.launch([*command, str(READY_FD)], env, write_end)
            except LauncherLost as exc:
                pid, lost = None, exc  # and no process started afresh: there may be one already
            if pid is None and lost is None:
                child = subprocess.Popen([*command, str(write_end)], env=env, stdin=subprocess.DEVNULL,
                                         pass_fds=[write_end], start_new_session=True, close_fds=True)
                self._children[child.pid] = child
                pid = child.pid
        except BaseException:
            os.close(read_end)
            self._clean_up(target, None)  # the directory made above
            raise
        finally:
            os.close(write_end)
        try:
            line = _read_line(read_end, READY_TIMEOUT)
        finally:
            os.close(read_end)
        if lost is not None:
            # A process the launcher may have forked holds the pipe's last writer: by now it
            # has answered or ended. Unmounted, it ends; kubelet publishes again.
            self._clean_up(target, None)
            raise CsiError(grpc.StatusCode.UNAVAILABLE, f"the mount launcher did not answer: {lost}")
        error = readiness.parse(line) if line else (readiness.INTERNAL, "the mount process did not answer")
        if error is not None:
            self._clean_up(target, pid)
            kind, message = error
            raise CsiError(MOUNT_ERROR_CODES[kind], message)
        log.info("mounted", target=target, volume_id=spec.volume_id, pid=pid)
        return pid

    def _environment(self) -> dict[str, str]:
        """What every mount process's environment starts from."""
        env = dict(self._env if self._env is not None else os.environ)
        env.pop(_METRICS_DIR_ENV, None)
        if self._metrics_dir is not None:
            env[_METRICS_DIR_ENV] = str(self._metrics_dir)
        return env

    def _clean_up(self, target: str, pid: int | None) -> None:
        """No mount, no process, no record, no directory left at ``target``."""
        if _is_mount_point(target):
            result = subprocess.run(["fusermount3", "-u", target], capture_output=True, text=True)
            if result.returncode != 0:
                # Busy or dead: detach it. kubelet unpublishes when the pod is gone, so
                # whatever still holds it open is on its way out.
                subprocess.run(["fusermount3", "-u", "-z", target], capture_output=True, text=True)
        if pid is not None and _process_serves(pid, target):
            self._stop(pid)
        if pid is not None and self._metrics_dir is not None and not process_alive(pid):
            # The volume's series end with it; files of every ended mount would otherwise
            # pile up and be read at every scrape.
            for file in self._metrics_dir.glob(f"*_{pid}.db"):
                file.unlink(missing_ok=True)
        # A mount process empties its cache as it ends, but not when it is killed (or dies
        # with the node container), and leaves its lock file either way.
        _remove_tree(self.cache_path(target))
        self._record_path(target).unlink(missing_ok=True)
        Path(self.credentials_path(target)).unlink(missing_ok=True)
        try:
            os.rmdir(target)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EBUSY):
                raise

    def _stop(self, pid: int) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            while time.monotonic() < deadline and process_alive(pid):
                self._reap()
                time.sleep(0.05)
            if not process_alive(pid):
                break
            deadline = time.monotonic() + STOP_TIMEOUT
        self._reap()

    def _reap(self) -> None:
        # gRPC worker threads reap concurrently: two may see the same child exit, and the
        # second must not fail its call (KeyError) over a child the first one forgot.
        for pid, child in list(self._children.items()):
            if child.poll() is not None:
                self._children.pop(pid, None)


# prometheus-client's multiprocess mode: where a process keeps its values.
_METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

_NODE_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
)


def _target_hash(target: str) -> str:
    return hashlib.sha256(target.encode()).hexdigest()[:32]


_TARGET_HASH = re.compile(r"[0-9a-f]{32}")
# Disk a cache takes besides its blocks: 256 directories, a lock file.
CACHE_OVERHEAD = 2 * MiB


def _cache_disk(max_cache_size: int) -> int:
    """Node disk a cache of ``max_cache_size`` may take (0: no cache): each 1 MiB block file
    takes at least one more file-system block for its 16-byte header (1/256 with 4 KiB
    blocks); 1/128 leaves room for larger blocks and the files' metadata."""
    if not max_cache_size:
        return 0
    return max_cache_size + max_cache_size // 128 + CACHE_OVERHEAD


def _mib(size: int) -> str:
    return f"{size / MiB:.0f} MiB"


def _remove_tree(path: str) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


def _is_mount_point(path: str) -> bool:
    return any(point == path for point, _ in mount_table())


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _process_serves(pid: int, target: str) -> bool:
    """``pid`` is a running mount process for ``target`` (not a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            args = cmdline.read().split(b"\0")
    except OSError:
        return False
    return target.encode() in args and b"mount" in args and process_alive(pid)


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").strip()
