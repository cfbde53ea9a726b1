"""The node server as kubelet sees it: started on a unix socket, driven with the
generated gRPC client, with kubelet's target-path layout and volume-context keys.
Everything it starts is stopped, and everything it mounted unmounted, even when a test
fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from csi import csi_pb2, csi_pb2_grpc
from tests.support.mounts import force_unmount, is_mounted

START_TIMEOUT = 30.0
AccessMode = csi_pb2.VolumeCapability.AccessMode


@dataclass
class NodeServer:
    root: Path
    env: dict[str, str]
    extra_args: list[str] = field(default_factory=list)
    # Runs the server inside something, e.g. a node container of namespaces
    # (tests.support.namespaces.node_container_prefix).
    command_prefix: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    @property
    def socket(self) -> Path:
        return self.root / "plugins" / "s3.csi.pail.dev" / "csi.sock"

    @property
    def kubelet_dir(self) -> Path:
        return self.root / "kubelet"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log_path(self) -> Path:
        return self.root / "node.log"

    def start(self) -> "NodeServer":
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        command = [*self.command_prefix, sys.executable, "-m", "driver", "csi", "node",
                   "--endpoint", f"unix://{self.socket}", "--node-id", "test-node", "--state-dir", str(self.state_dir),
                   "--kubelet-dir", str(self.kubelet_dir), *self.extra_args]
        log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.process = subprocess.Popen(command, env={**env, **self.env}, stdout=log, stderr=log,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node server exited: {self.log_path.read_text()[-2000:]}")
            if self.socket.exists():
                try:
                    if self.identity().Probe(csi_pb2.ProbeRequest(), timeout=2).ready.value:
                        return self
                except grpc.RpcError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"node server did not answer: {self.log_path.read_text()[-2000:]}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix://{self.socket}")

    def identity(self):
        return csi_pb2_grpc.IdentityStub(self.channel())

    def node(self):
        return csi_pb2_grpc.NodeStub(self.channel())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Stop the server (and its supervisor), then unmount whatever it left mounted."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # one SIGTERM to the supervisor, as a container runtime sends
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
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


def capability(mode=AccessMode.MULTI_NODE_MULTI_WRITER, flags=(), block=False, fs_group=""):
    if block:
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                        access_mode=AccessMode(mode=mode))
    mount = csi_pb2.VolumeCapability.MountVolume(mount_flags=list(flags), volume_mount_group=fs_group)
    return csi_pb2.VolumeCapability(mount=mount, access_mode=AccessMode(mode=mode))


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
