"""Real FUSE mounts of `pail mount` for tests: started, waited for, always cleaned up.

``PailMount`` runs ``pail mount --foreground`` as a child process with the hidden
``--ready-fd`` that plain ``pail mount`` uses to learn the mount answers, so the fixture
knows exactly when the mount is live or why it failed, and owns the process to stop it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.proxy import Stall

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
PAIL = [sys.executable, "-m", "driver"]


class MountFailed(RuntimeError):
    """pail mount did not produce a live mount; the message is its error line."""


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(extra)
    return env


def is_mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
        return any(line.split()[4] == target for line in mountinfo)


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the kernel's page cache (util-linux fincore: mincore, no read)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return int(out.strip())


@contextlib.contextmanager
def random_reader_of_a_slow_store(proxy, path: Path):
    """``path`` opened unbuffered, advised random, while every GET through ``proxy`` answers
    30 ms late (S3 as seen from EC2): where block fills run."""
    with proxy.inject(Stall(0.03), op="GetObject", times=None), open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        yield f


def force_unmount(path: Path) -> None:
    """Lazy unmount: never blocks, works on a dead or busy mount."""
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, timeout=30)


@dataclass
class PailMount:
    bucket: str
    path: Path
    endpoint: str
    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    log_path: Path | None = None
    process: subprocess.Popen | None = None

    def start(self) -> "PailMount":
        self.path.mkdir(parents=True, exist_ok=True)
        read_end, write_end = os.pipe()
        command = [*PAIL, "mount", self.bucket, str(self.path), "--endpoint-url", self.endpoint,
                   "--foreground", "--log-format", "json", "--ready-fd", str(write_end), *self.args]
        if self.log_path is not None:
            command += ["--log-file", str(self.log_path)]
        stderr = open(self.path.parent / f"{self.path.name}.stderr", "wb")
        self.process = subprocess.Popen(command, env=_clean_env(self.env), stdin=subprocess.DEVNULL,
                                        stdout=stderr, stderr=stderr, pass_fds=[write_end])
        stderr.close()
        os.close(write_end)
        try:
            line = _read_line(read_end, READY_TIMEOUT)
        finally:
            os.close(read_end)
        if line != "ready":
            self.stop()
            raise MountFailed(line or f"no answer from pail mount; stderr:\n{self.stderr()}")
        return self

    def stderr(self) -> str:
        path = self.path.parent / f"{self.path.name}.stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    def log(self) -> list[dict]:
        """The mount's JSON log events so far."""
        if self.log_path is None or not self.log_path.exists():
            return []
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
        return events

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Unmount and wait for the process to end; escalate, bounded, until both hold."""
        if self.process is None:
            return
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True, timeout=30)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
        force_unmount(self.path)


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").strip()


def _pail(after: str | None = None) -> list[str]:
    """The `pail` command as installed; with ``after``, in an interpreter that first runs
    that Python (``driver.cli`` imported as ``cli``): to shorten one of its waits, or to
    stall one step, for a test, the code otherwise as installed."""
    if after is not None:
        return [sys.executable, "-c", f"import sys\nimport driver.cli as cli\n{after}\nsys.exit(cli.main())"]
    return [shutil.which("pail", path=str(Path(sys.executable).parent)) or "pail"]


def pail_cli(*args: str, env: dict[str, str], timeout: float = 90, after: str | None = None
             ) -> subprocess.CompletedProcess:
    """Run the `pail` command as a user would."""
    return subprocess.run([*_pail(after), *args], env=_clean_env(env), capture_output=True, text=True,
                          timeout=timeout)


def start_pail_cli(*args: str, env: dict[str, str], after: str | None = None) -> subprocess.Popen:
    """Start the `pail` command as a user would, to act on it while it runs."""
    return subprocess.Popen([*_pail(after), *args], env=_clean_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
