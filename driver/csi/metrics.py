"""The node's /metrics: the node server's own gauges and the sum of its mount processes'
counters (driver.metrics), on one port for the whole node.

Mount processes write their values to files in ``<state dir>/metrics`` (prometheus-client's
multiprocess mode); this process reads them at each scrape. A mount process's files are
removed when its volume is unpublished (MountManager), or, if it ended while no server
ran, when the server starts: the volume's series end with it.
"""

from __future__ import annotations

import re
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from driver.csi.mounts import MountManager

log = structlog.get_logger("pail.csi.metrics")

_PID_FILE = re.compile(r".*_(\d+)\.db")


def directory(state_dir: Path) -> Path:
    return state_dir / "metrics"


def forget_ended_processes(path: Path, alive) -> None:
    for file in path.glob("*.db"):
        match = _PID_FILE.fullmatch(file.name)
        if match and not alive(int(match.group(1))):
            file.unlink(missing_ok=True)


class _Mounts:
    """pail_mounts{state}: the node's recorded mounts, read at each scrape without asking
    the mounts anything (a hung mount must not hang the scrape)."""

    def __init__(self, mounts: MountManager) -> None:
        self._mounts = mounts

    def collect(self):
        family = GaugeMetricFamily("pail_mounts", "Mounts the node server made, by state: running "
                                   "(its process serves it) or dead (repaired by the next publish)",
                                   labels=["state"])
        states = {"running": 0, "dead": 0}
        for record in self._mounts.records():
            states["running" if self._mounts.is_serving(record) else "dead"] += 1
        for state, count in states.items():
            family.add_metric([state], count)
        yield family


def serve(path: Path, mounts: MountManager, address: str, port: int) -> None:
    """Serve /metrics on ``address``:``port`` from a thread of this process."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    registry.register(_Mounts(mounts))
    start_http_server(port, addr=address, registry=registry)
    log.info("serving metrics", address=address, port=port)
