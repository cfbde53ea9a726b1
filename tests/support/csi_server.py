"""A Pail CSI server (`pail csi node` or `pail csi controller`) as a process on a unix
socket, and the volume capabilities that kubelet and csi-provisioner send it. Shared by
tests.support.kubelet and tests.support.provisioner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from csi import csi_pb2, csi_pb2_grpc

START_TIMEOUT = 30.0
AccessMode = csi_pb2.VolumeCapability.AccessMode
# How kubelet and csi-provisioner turn a PV's or PVC's accessModes into CSI access modes
# (for a driver without the SINGLE_NODE_MULTI_WRITER capability, as Pail).
ACCESS_MODES = {
    "ReadWriteOnce": AccessMode.SINGLE_NODE_WRITER,
    "ReadOnlyMany": AccessMode.MULTI_NODE_READER_ONLY,
    "ReadWriteMany": AccessMode.MULTI_NODE_MULTI_WRITER,
    "ReadWriteOncePod": AccessMode.SINGLE_NODE_SINGLE_WRITER,
}


def capability(mode=AccessMode.MULTI_NODE_MULTI_WRITER, flags=(), block=False, fs_group="") \
        -> csi_pb2.VolumeCapability:
    if block:
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                        access_mode=AccessMode(mode=mode))
    mount = csi_pb2.VolumeCapability.MountVolume(mount_flags=list(flags), volume_mount_group=fs_group)
    return csi_pb2.VolumeCapability(mount=mount, access_mode=AccessMode(mode=mode))


@dataclass
class CsiServerProcess:
    """`python -m driver csi ...` in a session of its own, its output in a log file. start()
    returns once Probe says ready; stop() ends the whole process group."""

    root: Path
    env: dict[str, str]
    # Runs the server inside something, e.g. a node container of namespaces
    # (tests.support.namespaces.node_container_prefix).
    command_prefix: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    name = "csi server"

    @property
    def socket(self) -> Path:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    def arguments(self) -> list[str]:
        """What follows `pail` on the command line."""
        raise NotImplementedError

    def start(self):
        self.root.mkdir(parents=True, exist_ok=True)
        command = [*self.command_prefix, sys.executable, "-m", "driver", *self.arguments()]
        # The server's credentials are the test's to give: none leak in from the machine.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, env={**env, **self.env}, stdout=log, stderr=log,
                                            start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()  # what it made before it exited (a node server's socket directory)
                raise RuntimeError(f"{self.name} exited: {self.log()[-3000:]}")
            if self.socket.exists():
                try:
                    if self.identity().Probe(csi_pb2.ProbeRequest(), timeout=2).ready.value:
                        return self
                except grpc.RpcError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {START_TIMEOUT:.0f} s: {self.log()[-3000:]}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix://{self.socket}")

    def identity(self):
        return csi_pb2_grpc.IdentityStub(self.channel())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str) -> list[dict]:
        """The JSON log events named ``name``, oldest first."""
        found = []
        for line in self.log().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                found.append(event)
        return found

    def terminate(self) -> None:
        """How a container runtime stops it: SIGTERM to the whole group."""
        os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self) -> None:
        if self.running:
            self.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
