"""Small helpers the process-level tests share: a process's memory from /proc, the errno
of a call, and waiting (bounded) for a condition."""

from __future__ import annotations

import time

import pytest

KiB = 1024


def proc_status_bytes(pid: int, field: str) -> int:
    """A size from /proc/PID/status, in bytes: VmRSS (now) or VmHWM (peak)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * KiB
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def errno_of(call) -> int | None:
    """The errno ``call()`` failed with, or None if it succeeded."""
    try:
        call()
    except OSError as exc:
        return exc.errno
    return None


def wait_until(condition, what: str, timeout: float, interval: float = 0.05):
    """``condition()``'s first true value within ``timeout`` seconds; else the test fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"not within {timeout} s: {what}")
