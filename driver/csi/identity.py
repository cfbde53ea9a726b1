"""The Identity service: who this plugin is, what it offers, and whether it is ready."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

from google.protobuf import wrappers_pb2

from csi import csi_pb2, csi_pb2_grpc
from driver import __version__
from driver.csi.errors import grpc_errors

DRIVER_NAME = "s3.csi.pail.dev"


def can_mount() -> bool:
    """A node can mount when it can open /dev/fuse and has fusermount3 to unmount."""
    return os.access("/dev/fuse", os.R_OK | os.W_OK) and shutil.which("fusermount3") is not None


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, ready: Callable[[], bool] = lambda: True) -> None:
        self._ready = ready

    @grpc_errors
    def GetPluginInfo(self, request, context):
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    @grpc_errors
    def GetPluginCapabilities(self, request, context):
        service = csi_pb2.PluginCapability.Service
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[
            csi_pb2.PluginCapability(service=service(type=service.CONTROLLER_SERVICE)),
        ])

    @grpc_errors
    def Probe(self, request, context):
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=self._ready()))
