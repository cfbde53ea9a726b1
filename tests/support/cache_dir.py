"""What a mount's --cache directory holds, for tests that look at it from outside.

The cache writes blocks on its own thread, after the read that fetched them has returned,
and evicts before it writes: a test waits (bounded) for what it expects instead of looking
once, and a file may vanish between listing and stat."""

from __future__ import annotations

import time
from pathlib import Path


def cache_files(cache: Path) -> list[Path]:
    """The files the cache has written; not the temporaries (.new) a write renames into place."""
    return [p for p in (cache / "pail-cache").rglob("*") if p.is_file() and p.suffix != ".new"]


def temporaries(cache: Path) -> list[Path]:
    return [p for p in (cache / "pail-cache").rglob("*.new") if p.is_file()]


def disk_use(cache: Path) -> int:
    total = 0
    for path in cache_files(cache):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass  # evicted or replaced by the writer meanwhile
    return total


def after_the_writer(condition, seconds: float = 10):
    """``condition()``'s last value, once true or after ``seconds``: the assertion after it
    says what is wrong."""
    deadline = time.monotonic() + seconds
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value
