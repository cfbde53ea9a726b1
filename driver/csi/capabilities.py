"""Which volume capabilities Pail serves, checked in one place for the node (publish) and
the controller (CreateVolume, ValidateVolumeCapabilities), so a capability the controller
accepts is one every node will mount.

A volume is a directory of a bucket: mount access only (block access has no meaning for
S3), any access mode (S3 serves many readers and writers; what a writer may do to one
file is the filesystem's business, not the access mode's).
"""

from __future__ import annotations

from csi import csi_pb2

AccessMode = csi_pb2.VolumeCapability.AccessMode
READER_ONLY = frozenset({AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY})
SUPPORTED_MODES = READER_ONLY | {
    AccessMode.SINGLE_NODE_WRITER, AccessMode.SINGLE_NODE_SINGLE_WRITER, AccessMode.SINGLE_NODE_MULTI_WRITER,
    AccessMode.MULTI_NODE_SINGLE_WRITER, AccessMode.MULTI_NODE_MULTI_WRITER,
}


def unsupported(capability: csi_pb2.VolumeCapability) -> str | None:
    """Why Pail cannot serve ``capability``, or None when it can."""
    if capability.HasField("block"):
        return "block access is not supported: S3 is mounted as a file system"
    if not capability.HasField("mount"):
        return "access_type mount is required"
    mode = capability.access_mode.mode
    if mode not in SUPPORTED_MODES:
        name = AccessMode.Mode.Name(mode) if mode in AccessMode.Mode.values() else str(mode)
        return f"access mode {name} is not supported"
    return None
