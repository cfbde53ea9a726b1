"""Wiring: the gRPC server on a unix socket with the services asked for, and the
supervisor that keeps it running.

``pail csi node`` runs as the node container's main process. It does not serve gRPC
itself: it supervises a server process and restarts it when it dies, and it is the
subreaper of the mount processes (PR_SET_CHILD_SUBREAPER), which live in their own
sessions and so outlive a crashed server. A restarted server finds them through its
state directory.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import structlog

from csi import csi_pb2_grpc
from driver.csi.identity import IdentityService, can_mount
from driver.csi.interceptor import LoggingInterceptor
from driver.csi import metrics as node_metrics
from driver.csi.mounts import MountManager, process_alive
from driver.csi.node import NodeService
from driver.csi.volume_credentials import KubernetesServiceAccounts, PodIdentitySettings

log = structlog.get_logger("pail.csi")

RESTART_BACKOFF_MAX = 30.0
_PR_SET_CHILD_SUBREAPER = 36


def socket_path(endpoint: str) -> str:
    """unix:///path or unix:/path (the forms CSI sidecars use) to a filesystem path."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:"):]
    else:
        raise ValueError(f"--endpoint must be unix:///path, not {endpoint!r}")
    if not path.startswith("/"):
        raise ValueError(f"--endpoint must name an absolute socket path, not {endpoint!r}")
    return path


def serve(endpoint: str, *, node_id: str | None, controller: bool, state_dir: Path, kubelet_dir: str,
          enable_ephemeral: bool, pod_identity: PodIdentitySettings = PodIdentitySettings(),
          kubeconfig: str | None = None, controller_settings=None, workers: int = 16,
          metrics: tuple[str, int] | None = None, cache_dir: Path | None = None,
          cache_capacity: int | None = None) -> None:
    """Serve until SIGTERM or SIGINT. A node server first re-adopts the mounts it made.
    ``controller_settings`` (driver.csi.controller.ControllerSettings): where the controller's
    S3 requests go. ``metrics``: (address, port) of a node's /metrics, or None. ``cache_dir``:
    where volumes with the ``cache`` mount option keep data (default: <state_dir>/cache);
    ``cache_capacity``: bytes all their caches together may take (None: no limit)."""
    path = socket_path(endpoint)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=[LoggingInterceptor()])
    ready = can_mount if node_id else (lambda: True)
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(ready), server)
    if node_id:
        metrics_dir = node_metrics.directory(state_dir) if metrics else None
        mounts = MountManager(state_dir, metrics_dir=metrics_dir, cache_dir=cache_dir, cache_capacity=cache_capacity)
        kept, cleaned = mounts.adopt()
        log.info("mounts adopted", kept=kept, cleaned=cleaned)
        if metrics is not None and metrics_dir is not None:
            node_metrics.forget_ended_processes(metrics_dir, process_alive)
            node_metrics.serve(metrics_dir, mounts, *metrics)
        node = NodeService(node_id, mounts, kubelet_dir=kubelet_dir, enable_ephemeral=enable_ephemeral,
                           service_accounts=KubernetesServiceAccounts(kubeconfig), pod_identity=pod_identity)
        csi_pb2_grpc.add_NodeServicer_to_server(node, server)
    if controller:
        from driver.csi.controller import ControllerService, ControllerSettings

        service = ControllerService(controller_settings or ControllerSettings())
        csi_pb2_grpc.add_ControllerServicer_to_server(service, server)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # a socket left by a previous run
    server.add_insecure_port(f"unix://{path}")
    server.start()
    log.info("serving", endpoint=endpoint, node=bool(node_id), controller=controller)
    stop = _StopFlag()
    while not stop.raised:
        time.sleep(0.2)
    log.info("stopping")
    server.stop(grace=5).wait()


def supervise(command: list[str]) -> int:
    """Run ``command`` (the server) and start it again whenever it dies, until SIGTERM or
    SIGINT; meanwhile reap whatever orphaned process is handed to us."""
    try:
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except OSError:
        log.warning("cannot become a subreaper: mount processes of a crashed server become zombies")
    stopping = _StopFlag()
    backoff = 0.5
    while not stopping.raised:
        started = time.monotonic()
        child = subprocess.Popen(command)
        signalled = False
        while child.poll() is None:
            if stopping.raised and not signalled:
                child.terminate()
                signalled = True
            _reap_orphans(child.pid)
            time.sleep(0.2)
        if stopping.raised:
            break
        # Fast crash loops back off; a server that ran for a while restarts after the
        # shortest delay.
        backoff = 0.5 if time.monotonic() - started > 60 else min(backoff * 2, RESTART_BACKOFF_MAX)
        log.error("server exited; restarting", status=child.returncode, delay=backoff)
        deadline = time.monotonic() + backoff
        while not stopping.raised and time.monotonic() < deadline:
            time.sleep(0.1)
    _reap_orphans(None)
    return 0


class _StopFlag:
    """Set by SIGTERM or SIGINT, polled by the main loop. The handler only assigns: a
    handler that took a lock (Event.set) could deadlock with the main thread it interrupts
    inside Event.wait, and a wait without a timeout never runs a handler whose signal
    landed on one of grpc's threads."""

    def __init__(self) -> None:
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._raise)

    def _raise(self, *_: object) -> None:
        self.raised = True


def _reap_orphans(keep: int | None) -> None:
    """Collect exited orphans (mount processes of a server that died), never ``keep``,
    whose status its Popen must read itself."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == keep:
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == me:
            try:
                os.waitpid(int(entry), os.WNOHANG)
            except ChildProcessError:
                pass


def server_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "driver", *argv, "--no-supervisor"]
