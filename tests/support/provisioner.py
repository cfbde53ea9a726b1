"""The controller server as csi-provisioner sees it: `pail csi controller` started on a
unix socket and driven with the generated gRPC client, with the requests csi-provisioner
builds from a StorageClass and a PVC. The server is stopped even when a test fails."""

from __future__ import annotations

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

START_TIMEOUT = 30.0
CALL_TIMEOUT = 60.0
GiB = 1024**3
AccessMode = csi_pb2.VolumeCapability.AccessMode
# How csi-provisioner turns a PVC's accessModes into CSI access modes (for a driver
# without the SINGLE_NODE_MULTI_WRITER capability, as Pail).
ACCESS_MODES = {
    "ReadWriteOnce": AccessMode.SINGLE_NODE_WRITER,
    "ReadOnlyMany": AccessMode.MULTI_NODE_READER_ONLY,
    "ReadWriteMany": AccessMode.MULTI_NODE_MULTI_WRITER,
    "ReadWriteOncePod": AccessMode.SINGLE_NODE_SINGLE_WRITER,
}
PROVISIONER_PREFIX = "csi.storage.k8s.io/"


@dataclass
class ControllerServer:
    root: Path
    env: dict[str, str]
    args: list[str] = field(default_factory=list)  # e.g. --s3-endpoint-url URL
    process: subprocess.Popen | None = None

    @property
    def socket(self) -> Path:
        return self.root / "csi.sock"

    @property
    def log_path(self) -> Path:
        return self.root / "controller.log"

    def start(self) -> ControllerServer:
        self.root.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "driver", "csi", "controller", "--endpoint", f"unix://{self.socket}",
                   *self.args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, env={**env, **self.env}, stdout=log, stderr=log,
                                            start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"controller server exited: {self.log()[-2000:]}")
            if self.socket.exists():
                try:
                    csi_pb2_grpc.IdentityStub(self.channel()).Probe(csi_pb2.ProbeRequest(), timeout=2)
                    return self
                except grpc.RpcError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"controller server did not answer: {self.log()[-2000:]}")

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix://{self.socket}")

    def identity(self):
        return csi_pb2_grpc.IdentityStub(self.channel())

    def controller(self):
        return csi_pb2_grpc.ControllerStub(self.channel())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)


def capability(mode=AccessMode.MULTI_NODE_MULTI_WRITER, mount_flags=(), block=False) -> csi_pb2.VolumeCapability:
    if block:
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                        access_mode=AccessMode(mode=mode))
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(mount_flags=list(mount_flags)),
                                    access_mode=AccessMode(mode=mode))


class Provisioner:
    """Calls the controller as csi-provisioner does for a PVC of a StorageClass (run with
    --extra-create-metadata)."""

    def __init__(self, server: ControllerServer) -> None:
        self.stub = server.controller()

    @staticmethod
    def pv_name() -> str:
        return f"pvc-{uuid.uuid4()}"  # csi-provisioner: --volume-name-prefix "pvc" and the PVC's uid

    def create_request(self, parameters: dict[str, str], *, name: str | None = None, pvc: str = "data",
                       namespace: str = "default", size: int = GiB, access_modes=("ReadWriteMany",),
                       mount_options=()) -> csi_pb2.CreateVolumeRequest:
        name = name or self.pv_name()
        # The provisioner's own StorageClass keys (secret names, fstype) never reach the driver.
        params = {k: v for k, v in parameters.items() if not k.startswith(PROVISIONER_PREFIX)}
        params.update({f"{PROVISIONER_PREFIX}pv/name": name, f"{PROVISIONER_PREFIX}pvc/name": pvc,
                       f"{PROVISIONER_PREFIX}pvc/namespace": namespace})
        return csi_pb2.CreateVolumeRequest(
            name=name, parameters=params, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[capability(ACCESS_MODES[m], mount_options) for m in access_modes])

    def create(self, request: csi_pb2.CreateVolumeRequest) -> csi_pb2.Volume:
        return self.stub.CreateVolume(request, timeout=CALL_TIMEOUT).volume

    def provision(self, parameters: dict[str, str], **kwargs) -> csi_pb2.Volume:
        return self.create(self.create_request(parameters, **kwargs))

    def delete(self, volume_id: str) -> None:
        self.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=CALL_TIMEOUT)
