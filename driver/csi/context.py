"""Every volume-context key and StorageClass parameter Pail reads, named once.

The keys are an interface with people (PV and StorageClass authors) and with Kubernetes
(kubelet, csi-provisioner): a misspelt string literal in a servicer would silently read
nothing. So they live here, each with what sets it and what it means, and the servers
use only these names (as mountpoint-s3-csi-driver does in volumecontext/volume_context.go).
"""

from __future__ import annotations

# --- Pail's volume attributes (PV spec.csi.volumeAttributes, or the volume context that
# CreateVolume returns for a dynamic volume) ---

# The bucket (name or access-point alias) to mount. Required.
BUCKET_NAME = "bucketName"
# Mount only the keys under this prefix ("a/b" or "a/b/"); default: the whole bucket.
PREFIX = "prefix"
# S3-compatible endpoint URL, http[s]://host[:port]. Trusted only from a PV or StorageClass
# (written by a cluster admin), never from an inline ephemeral volume: whoever picks the
# endpoint receives the requests, signed with the credentials the node uses.
ENDPOINT = "endpoint"
# The bucket's region; default: asked of the bucket.
REGION = "region"
# "true" or "false" (default): address the bucket in the URL path (S3-compatible stores).
FORCE_PATH_STYLE = "forcePathStyle"
# Whose credentials the mount uses: AUTH_SOURCE_DRIVER (default) or AUTH_SOURCE_POD.
AUTHENTICATION_SOURCE = "authenticationSource"
AUTH_SOURCE_DRIVER = "driver"  # the node pod's own identity (IRSA, Pod Identity or secret)
AUTH_SOURCE_POD = "pod"  # the workload's projected service-account token, exchanged at STS
AUTH_SOURCES = frozenset({AUTH_SOURCE_DRIVER, AUTH_SOURCE_POD})
# Region of the STS endpoint that exchanges the pod's token (AUTH_SOURCE_POD).
STS_REGION = "stsRegion"

# Pail's own volume attributes: anything else (not kubelet's or the provisioner's) is a typo.
VOLUME_ATTRIBUTES = frozenset({BUCKET_NAME, PREFIX, ENDPOINT, REGION, FORCE_PATH_STYLE,
                               AUTHENTICATION_SOURCE, STS_REGION})

# What a pod author may set on an inline ephemeral volume (pod spec volumes[].csi). Not
# ENDPOINT (see above) and not FORCE_PATH_STYLE (it only matters with a custom endpoint).
# The node server also requires AUTH_SOURCE_POD there, so that a namespace cannot reach
# buckets through the node's own role.
INLINE_VOLUME_KEYS = frozenset({BUCKET_NAME, PREFIX, REGION, AUTHENTICATION_SOURCE, STS_REGION})

# --- Set by kubelet in NodePublishVolume's volume_context (CSIDriver podInfoOnMount and
# tokenRequests). Kubelet writes them after the volume's own attributes, so a PV or pod
# author cannot forge them while the CSIDriver asks for them. ---

POD_NAME = "csi.storage.k8s.io/pod.name"
POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
POD_UID = "csi.storage.k8s.io/pod.uid"
SERVICE_ACCOUNT_NAME = "csi.storage.k8s.io/serviceAccount.name"
# "true" for an inline ephemeral volume, "false" for a PV.
EPHEMERAL = "csi.storage.k8s.io/ephemeral"
# JSON {audience: {"token": ..., "expirationTimestamp": ...}}. A credential that sits in
# volume_context, where generic secret stripping does not look: strip it before logging.
SERVICE_ACCOUNT_TOKENS = "csi.storage.k8s.io/serviceAccount.tokens"

KUBELET_KEYS = frozenset({POD_NAME, POD_NAMESPACE, POD_UID, SERVICE_ACCOUNT_NAME, EPHEMERAL,
                          SERVICE_ACCOUNT_TOKENS})

# --- Set by csi-provisioner in CreateVolume's parameters when it runs with
# --extra-create-metadata. ---

PV_NAME = "csi.storage.k8s.io/pv/name"
PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"

# StorageClass parameters under this prefix are the provisioner's own (for example
# csi.storage.k8s.io/provisioner-secret-name): it strips them before CreateVolume, so a
# key with this prefix that reaches the driver is kubelet's or the provisioner's metadata.
PROVISIONER_PREFIX = "csi.storage.k8s.io/"

# --- StorageClass parameters for dynamic provisioning (CreateVolume parameters) ---

# BUCKET_NAME (above): the bucket that holds the volumes, unless BUCKET_PER_VOLUME.
# Volumes get the prefix "<basePrefix>/<pv name>/" (or "<pv name>/" without it).
BASE_PREFIX = "basePrefix"
# What DeleteVolume does: DELETE_POLICY_RETAIN (default) leaves the objects,
# DELETE_POLICY_DELETE deletes the volume's objects (and its bucket, if it made one).
DELETE_POLICY = "deletePolicy"
DELETE_POLICY_RETAIN = "retain"
DELETE_POLICY_DELETE = "delete"
DELETE_POLICIES = frozenset({DELETE_POLICY_RETAIN, DELETE_POLICY_DELETE})
# "true": CreateVolume creates a bucket per volume, named BUCKET_NAME_PREFIX + the pv name.
BUCKET_PER_VOLUME = "bucketPerVolume"
BUCKET_NAME_PREFIX = "bucketNamePrefix"


class ContextError(ValueError):
    """A volume attribute or parameter is invalid; ``key`` names it as written."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def parse_bool(value: str, key: str) -> bool:
    """"true" or "false", in any case. Anything else is refused rather than guessed:
    Kubernetes attribute values are strings, and "yes" or "1" read as false would
    silently drop a setting."""
    word = value.lower()
    if word == "true":
        return True
    if word == "false":
        return False
    raise ContextError(key, f"expected 'true' or 'false', not {value!r}")
