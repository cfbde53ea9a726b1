"""The Node service: NodePublishVolume mounts a volume at kubelet's target path, through
a mount process per target (driver.csi.mounts); NodeUnpublishVolume takes it away.

Every publish is idempotent as kubelet needs it (it republishes periodically because the
CSIDriver sets requiresRepublish): the same volume at the same target succeeds without a
second mount; something different there is ALREADY_EXISTS; a dead mount is repaired.
Concurrent calls for one (volume, target) get ABORTED; different targets go in parallel.
"""

from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager

import grpc
import structlog

from csi import csi_pb2, csi_pb2_grpc
from driver.cli import parse_mount_options
from driver.config import REGION_NAME, validate_bucket
from driver.csi import capabilities
from driver.csi import context as ctx
from driver.csi.errors import CsiError, grpc_errors, invalid, require
from driver.csi.mount_flags import MAX_VALUE_BYTES, parse_mount_flags
from driver.csi.mounts import MountManager, MountSpec
from driver.csi.volume_credentials import PodIdentitySettings, ServiceAccountLookup, credential_source

log = structlog.get_logger("pail.csi.node")

# With fsGroup, the group gets write access, as for any volume kubelet would chown.
GROUP_FILE_MODE, GROUP_DIR_MODE = "0664", "0775"
NAME_MAX = 255  # bytes in one name of a path (Linux)


class InFlight:
    """Keys of calls in progress; a second call for the same key is ABORTED."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: set[tuple[str, str]] = set()

    @contextmanager
    def guard(self, key: tuple[str, str]):
        with self._lock:
            if key in self._keys:
                raise CsiError(grpc.StatusCode.ABORTED, f"an operation on volume {key[0]} at {key[1]} "
                                                        "is in progress")
            self._keys.add(key)
        try:
            yield
        finally:
            with self._lock:
                self._keys.discard(key)


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, node_id: str, mounts: MountManager, *, kubelet_dir: str = "/var/lib/kubelet",
                 enable_ephemeral: bool = False, service_accounts: ServiceAccountLookup | None = None,
                 pod_identity: PodIdentitySettings = PodIdentitySettings()) -> None:
        self._node_id = node_id
        self._service_accounts = service_accounts
        self._pod_identity = pod_identity
        self._mounts = mounts
        self._kubelet_dir = os.path.normpath(kubelet_dir)
        self._enable_ephemeral = enable_ephemeral
        self._in_flight = InFlight()

    @grpc_errors
    def NodePublishVolume(self, request, context):
        require(request, "volume_id", "target_path", "volume_capability")
        target = self._target(request.target_path)
        spec = self._spec(request, target)
        with self._in_flight.guard((request.volume_id, target)):
            self._mounts.publish(spec, target)
        return csi_pb2.NodePublishVolumeResponse()

    @grpc_errors
    def NodeUnpublishVolume(self, request, context):
        require(request, "volume_id", "target_path")
        target = self._target(request.target_path)
        with self._in_flight.guard((request.volume_id, target)):
            self._mounts.unpublish(target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    @grpc_errors
    def NodeGetCapabilities(self, request, context):
        rpc = csi_pb2.NodeServiceCapability.RPC
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=rpc(type=rpc.VOLUME_MOUNT_GROUP)),
        ])

    @grpc_errors
    def NodeGetInfo(self, request, context):
        return csi_pb2.NodeGetInfoResponse(node_id=self._node_id)

    # -- reading the request -----------------------------------------------------------------

    def _target(self, path: str) -> str:
        """kubelet's target layout, under its own directory: anything else is refused, so
        no request can make the node mount (or unmount) somewhere else."""
        if "\0" in path or not os.path.isabs(path) or os.path.normpath(path) != path:
            raise invalid(f"target_path {path!r} is not a normalized absolute path")
        if re.search(r"[\x00-\x1f\x7f]", path):  # kubelet's are uids and object names
            raise invalid(f"target_path {path!r} contains a control character")
        pattern = re.escape(self._kubelet_dir) + r"/pods/[^/]+/volumes/kubernetes\.io~csi/[^/]+/mount"
        if not re.fullmatch(pattern, path):
            raise invalid(f"target_path {path!r} is not a kubelet volume path under {self._kubelet_dir}")
        if any(len(name.encode()) > NAME_MAX for name in path.split("/")):
            raise invalid(f"target_path {path!r} has a name longer than {NAME_MAX} bytes")
        # The directories above the target are kubelet's: a symbolic link among them (or
        # as the target) would put the mount, and its removal, somewhere else.
        parent = os.path.dirname(path)
        inside = os.path.join(os.path.realpath(self._kubelet_dir), os.path.relpath(parent, self._kubelet_dir))
        if os.path.realpath(parent) != inside or os.path.islink(path):
            raise invalid(f"target_path {path!r} leads out of {self._kubelet_dir} through a symbolic link")
        return path

    def _spec(self, request, target: str) -> MountSpec:
        capability = request.volume_capability
        problem = capabilities.unsupported(capability)
        if problem:
            raise invalid(f"volume_capability: {problem}")
        mode = capability.access_mode.mode
        attributes = dict(request.volume_context)
        unknown = sorted(k for k in attributes if k not in ctx.VOLUME_ATTRIBUTES and not k.startswith(ctx.PROVISIONER_PREFIX))
        if unknown:
            raise invalid(f"volume_context: unknown attribute {unknown[0]!r}")
        for key in sorted(ctx.VOLUME_ATTRIBUTES & attributes.keys()):
            # They become arguments of the mount process, as mountOptions values do.
            value = attributes[key]
            if "\0" in value or "\n" in value or "\r" in value:
                raise invalid(f"volume_context: {key} contains a NUL or a line break")
            if len(value.encode("utf-8", "surrogatepass")) > MAX_VALUE_BYTES:
                raise invalid(f"volume_context: {key} is longer than {MAX_VALUE_BYTES} bytes")
        if ctx.parse_bool(attributes.get(ctx.EPHEMERAL, "false"), ctx.EPHEMERAL):
            self._check_ephemeral(attributes)
        source = attributes.get(ctx.AUTHENTICATION_SOURCE, ctx.AUTH_SOURCE_DRIVER)
        if source not in ctx.AUTH_SOURCES:
            raise invalid(f"volume_context: {ctx.AUTHENTICATION_SOURCE} must be driver or pod, not {source!r}")
        bucket = attributes.get(ctx.BUCKET_NAME)
        if not bucket:
            raise invalid(f"volume_context: {ctx.BUCKET_NAME} is required")
        validate_bucket(bucket)  # before it is an argument: "--read-only" is no bucket, nor an option

        options: list[str] = []
        for key, option in ((ctx.PREFIX, "--prefix"), (ctx.ENDPOINT, "--endpoint-url"), (ctx.REGION, "--region")):
            if attributes.get(key):  # "--region=-x": a value, as mount_flags passes it
                value = attributes[key]
                options += [f"{option}={value}"] if value.startswith("-") else [option, value]
        if ctx.parse_bool(attributes.get(ctx.FORCE_PATH_STYLE, "false"), ctx.FORCE_PATH_STYLE):
            options.append("--force-path-style")
        flags = parse_mount_flags(capability.mount.mount_flags, cache_dir=self._mounts.cache_path(target))
        if capability.mount.volume_mount_group:
            group = capability.mount.volume_mount_group
            if not re.fullmatch(r"[0-9]+", group):  # not str.isdigit(): "١٢٣" and "²" are digits
                raise invalid(f"volume_mount_group {group!r} is not a numeric group id")
            for option, value in (("--gid", group), ("--file-mode", GROUP_FILE_MODE), ("--dir-mode", GROUP_DIR_MODE)):
                if option not in flags:  # the PV's own mountOptions win
                    options += [option, value]
        options += flags
        if (request.readonly or mode in capabilities.READER_ONLY) and "--read-only" not in options:
            options.append("--read-only")
        # Validate it all now, as the mount process would: a mistake is INVALID_ARGUMENT
        # naming the option, before anything is mounted.
        config = parse_mount_options(bucket, target, options)
        sts_region = attributes.get(ctx.STS_REGION)
        if sts_region and not REGION_NAME.fullmatch(sts_region):
            raise invalid(f"volume_context: {ctx.STS_REGION} {sts_region!r} is not a region name")
        own = credential_source(attributes, request.secrets, self._service_accounts, self._pod_identity)
        if own is not None:  # the file is written just before the mount process starts
            options += ["--credentials-file", self._mounts.credentials_path(target)]
        return MountSpec(request.volume_id, bucket, tuple(options), credentials=own,
                         max_cache_size=config.fs.max_cache_size if config.fs.cache_dir else 0)

    def _check_ephemeral(self, attributes: dict[str, str]) -> None:
        """An inline volume's attributes come from a pod's author: they may not choose the
        endpoint nor use the node's own credentials."""
        if not self._enable_ephemeral:
            raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                           "inline ephemeral volumes are not enabled on this node")
        for key in attributes:
            if key not in ctx.INLINE_VOLUME_KEYS and not key.startswith(ctx.PROVISIONER_PREFIX):
                raise invalid(f"volume_context: {key!r} cannot be set on an inline ephemeral volume")
        if attributes.get(ctx.AUTHENTICATION_SOURCE) != ctx.AUTH_SOURCE_POD:
            raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"an inline ephemeral volume needs {ctx.AUTHENTICATION_SOURCE}=pod")

