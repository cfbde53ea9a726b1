"""The node server as kubelet sees it: started on a unix socket, driven with the
generated gRPC client, with kubelet's target-path layout and volume-context keys.
Everything it starts is stopped, and everything it mounted unmounted, even when a test
fails."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from csi import csi_pb2, csi_pb2_grpc
from tests.support.csi_server import AccessMode, CsiServerProcess, capability  # noqa: F401 (re-exported)
from tests.support.mounts import force_unmount, is_mounted
from tests.support.namespaces import alive, children, cmdline


@dataclass
class NodeServer(CsiServerProcess):
    extra_args: list[str] = field(default_factory=list)
    name = "node server"

    @functools.cached_property
    def socket(self) -> Path:
        """Not under ``root``, as kubelet's plugins/<driver>/ would be: a unix socket's path
        ends at 107 bytes, and pytest's directories (pytest-xdist's popen-gwN in them) took
        some past it ("Failed to add port")."""
        return Path(tempfile.mkdtemp(prefix="pail-node-")) / "csi.sock"

    @property
    def kubelet_dir(self) -> Path:
        return self.root / "kubelet"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def record(self, target: Path) -> dict | None:
        """The server's record of the mount at ``target`` (pid, volume id, ...), if any."""
        for path in self.state_dir.glob("mounts/*.json"):
            record = json.loads(path.read_text())
            if record["target"] == str(target):
                return record
        return None

    @property
    def log_path(self) -> Path:
        return self.root / "node.log"

    def arguments(self) -> list[str]:
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        self.socket.parent.mkdir(exist_ok=True)  # again after a stop()
        return ["csi", "node", "--endpoint", f"unix://{self.socket}", "--node-id", "test-node",
                "--state-dir", str(self.state_dir), "--kubelet-dir", str(self.kubelet_dir), *self.extra_args]

    def node(self):
        return csi_pb2_grpc.NodeStub(self.channel())

    def grpc_server_pid(self) -> int | None:
        """The supervised gRPC server process (the supervisor restarts it when it dies)."""
        return next((pid for pid in children(self.process.pid)
                     if b"--no-supervisor" in cmdline(pid) and alive(pid)), None)

    def answers_probe(self) -> bool:
        with grpc.insecure_channel(f"unix://{self.socket}") as channel:  # no reconnect backoff
            try:
                return csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=1).ready.value
            except grpc.RpcError:
                return False

    def terminate(self) -> None:
        self.process.terminate()  # one SIGTERM to the supervisor, as a container runtime sends

    def stop(self) -> None:
        """Stop the server (and its supervisor), then unmount whatever it left mounted."""
        super().stop()
        shutil.rmtree(self.socket.parent, ignore_errors=True)
        # From the mount table, not a glob: a dead FUSE mount fails a directory walk (ENOTCONN).
        prefix = f"{self.kubelet_dir}/pods/"
        with open("/proc/self/mountinfo") as mountinfo:
            points = [line.split()[4] for line in mountinfo]
        for point in reversed(points):
            if point.startswith(prefix):
                force_unmount(Path(point))
        _kill_mount_processes(self.kubelet_dir)


def _kill_mount_processes(under: Path) -> None:
    marker = str(under).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline and b"mount" in cmdline:
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass


@dataclass
class Pod:
    uid: str
    name: str
    namespace: str = "default"
    service_account: str = "default"


class Kubelet:
    """Calls the node server as kubelet does for a pod's CSI volume."""

    def __init__(self, server: NodeServer) -> None:
        self.server = server
        self.stub = server.node()

    def new_pod(self, name: str = "app") -> Pod:
        return Pod(uid=str(uuid.uuid4()), name=name)

    def target(self, pod: Pod, pv: str) -> Path:
        volume_dir = self.server.kubelet_dir / "pods" / pod.uid / "volumes" / "kubernetes.io~csi" / pv
        volume_dir.mkdir(parents=True, exist_ok=True)  # kubelet makes it; the driver makes "mount"
        return volume_dir / "mount"

    def publish_request(self, pod: Pod, pv: str, attributes: dict[str, str], *, volume_id: str | None = None,
                        readonly: bool = False, cap=None, fs_group: str = "", secrets=None,
                        ephemeral: bool = False) -> csi_pb2.NodePublishVolumeRequest:
        context = dict(attributes)
        context.update({
            "csi.storage.k8s.io/pod.name": pod.name,
            "csi.storage.k8s.io/pod.namespace": pod.namespace,
            "csi.storage.k8s.io/pod.uid": pod.uid,
            "csi.storage.k8s.io/serviceAccount.name": pod.service_account,
            "csi.storage.k8s.io/ephemeral": "true" if ephemeral else "false",
        })
        return csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id or pv, target_path=str(self.target(pod, pv)), readonly=readonly,
            volume_capability=cap or capability(fs_group=fs_group), volume_context=context,
            secrets=secrets or {})

    def publish(self, pod: Pod, pv: str, attributes: dict[str, str], **kwargs) -> Path:
        request = self.publish_request(pod, pv, attributes, **kwargs)
        self.stub.NodePublishVolume(request, timeout=90)
        return Path(request.target_path)

    def unpublish_all(self) -> None:
        """NodeUnpublishVolume for every mount the node server has a record of, as kubelet
        does when pods go away; then nothing of a test is left for the next one."""
        for record in sorted(self.server.state_dir.glob("mounts/*.json")):
            try:
                entry = json.loads(record.read_text())
                self.stub.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                    volume_id=entry["volume_id"], target_path=entry["target"]), timeout=90)
            except (OSError, ValueError, KeyError, grpc.RpcError):
                pass  # the server is gone or broken: NodeServer.stop() unmounts by force

    def unpublish(self, pod: Pod, pv: str, *, volume_id: str | None = None) -> None:
        self.stub.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id or pv, target_path=str(self.target(pod, pv))), timeout=90)


def mounted(path: Path) -> bool:
    return is_mounted(path)
