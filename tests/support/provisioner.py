"""The controller server as csi-provisioner sees it: `pail csi controller` started on a
unix socket and driven with the generated gRPC client, with the requests csi-provisioner
builds from a StorageClass and a PVC. The server is stopped even when a test fails."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from csi import csi_pb2, csi_pb2_grpc
from tests.support.csi_server import ACCESS_MODES, AccessMode, CsiServerProcess, capability  # noqa: F401

CALL_TIMEOUT = 60.0
GiB = 1024**3
PROVISIONER_PREFIX = "csi.storage.k8s.io/"


@dataclass
class ControllerServer(CsiServerProcess):
    args: list[str] = field(default_factory=list)  # e.g. --s3-endpoint-url URL
    name = "controller server"

    @property
    def socket(self) -> Path:
        return self.root / "csi.sock"

    @property
    def log_path(self) -> Path:
        return self.root / "controller.log"

    def arguments(self) -> list[str]:
        return ["csi", "controller", "--endpoint", f"unix://{self.socket}", *self.args]

    def controller(self):
        return csi_pb2_grpc.ControllerStub(self.channel())


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
