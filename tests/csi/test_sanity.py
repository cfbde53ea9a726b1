"""Conformance: the cases of the CSI community's sanity suite, for what Pail advertises.

Mirrors kubernetes-csi/csi-test ``pkg/sanity`` (``identity.go``, ``node.go``,
``controller.go``; ginkgo/v2 era, CSI spec 1.x). Each test is named
``test_<Describe>__<It>`` after the sanity case it mirrors, and its docstring quotes the
sanity spec name and file. The suite's assertions are kept; Pail's own rules (an error
names the missing field, no second mount) are added where they apply. Deviations from the
suite are explained where they occur; the ones shared by many cases:

* Target paths. Sanity publishes at ``<TargetPath>/target`` under a temporary directory.
  Pail only mounts at kubelet's layout, ``<kubelet>/pods/<uid>/volumes/kubernetes.io~csi/
  <pv>/mount`` (anything else is INVALID_ARGUMENT, so that no request can make the node
  mount elsewhere); like sanity, the test makes the parent and the driver makes the entry.
* Volumes. NodePublishVolume needs the bucket's attributes (``bucketName``, and here the
  endpoint of the test's S3 server): a static PV's attributes, or the volume_context that
  CreateVolume returns. kubelet adds its pod-info keys (the CSIDriver sets
  ``podInfoOnMount: true``), and so do these tests.
* Controller and node run as two servers on two sockets (sanity's ``--csi.endpoint`` and
  ``--csi.controllerendpoint``), as Kubernetes runs them (DESIGN.md: a controller
  Deployment with csi-provisioner, a node DaemonSet).
* Sanity *skips* what a driver does not advertise. Pail advertises CONTROLLER_SERVICE;
  CREATE_DELETE_VOLUME on the controller; VOLUME_MOUNT_GROUP on the node. Here, instead
  of skipping, every unadvertised RPC is asserted to answer UNIMPLEMENTED.

Not mirrored, because sanity itself skips them for Pail's capabilities: node.go's
NodeStageVolume, NodeUnstageVolume, NodeGetVolumeStats and NodeExpandVolume Describes
(STAGE_UNSTAGE_VOLUME, GET_VOLUME_STATS, EXPAND_VOLUME); controller.go's GetCapacity,
ListVolumes, ControllerPublishVolume, ControllerUnpublishVolume and "volume lifecycle"
(PUBLISH_UNPUBLISH_VOLUME), CreateVolume from a snapshot or volume (CREATE_DELETE_SNAPSHOT,
CLONE_VOLUME), with a volume attribute class (MODIFY_VOLUME), ListSnapshots,
CreateSnapshot, DeleteSnapshot and ExpandVolume; groupcontroller.go. Their RPCs are the
UNIMPLEMENTED cases below.

Then the idempotency rules of issue 4 (DESIGN.md "CSI wiring"), as cases of their own.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import grpc
import pytest

from csi import csi_pb2, csi_pb2_grpc
from tests.support.kubelet import AccessMode, Kubelet, NodeServer, capability, mounted
from tests.support.provisioner import ControllerServer

pytestmark = pytest.mark.s3_servers("seaweedfs")

RPC_TIMEOUT = 30  # seconds, for calls that do not mount
MOUNT_TIMEOUT = 90  # seconds, for NodePublishVolume (the node waits for the mount to answer)

# pkg/sanity/sanity.go NewTestConfig(): TestVolumeSize 10 GiB, IdempotentCount 10.
TEST_VOLUME_SIZE = 10 * 1024 * 1024 * 1024
IDEMPOTENT_COUNT = 10
# pkg/sanity/controller.go: MaxNameLength = 128.
MAX_NAME_LENGTH = 128
# The CSI spec's size guidance for ids, which Pail keeps (driver/csi/volume_id.py).
MAX_VOLUME_ID_BYTES = 128

Service = csi_pb2.PluginCapability.Service
NodeRPC = csi_pb2.NodeServiceCapability.RPC
ControllerRPC = csi_pb2.ControllerServiceCapability.RPC


# --- helpers -------------------------------------------------------------------------------

def unique_string(prefix: str) -> str:
    """pkg/sanity/util.go UniqueString: the prefix and a random suffix."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def unique_string_with_length(prefix: str, length: int) -> str:
    """pkg/sanity/util.go UniqueStringWithLength: exactly ``length`` characters."""
    name = f"{prefix}-{uuid.uuid4().hex}"
    return (name + "x" * length)[:length] if len(name) < length else name[:length]


def sanity_capability(mode=AccessMode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    """pkg/sanity/controller.go TestVolumeCapabilityWithAccessType: mount access (the
    default TestVolumeAccessType), the given mode, no flags."""
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(),
                                    access_mode=AccessMode(mode=mode))


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """The error ``call`` must fail with (pkg/sanity/util.go ExpectErrorCode)."""
    with pytest.raises(grpc.RpcError) as error:
        call(*args, **kwargs)
    return error.value


def fuse_mounts_at(target: Path) -> int:
    """FUSE mounts whose mount point is ``target`` (stacked mounts count one each)."""
    count = 0
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
        for line in mountinfo:
            fields, _, after = line.partition(" - ")
            if fields.split()[4] == str(target) and after.split()[0].startswith("fuse"):
                count += 1
    return count


def mount_pid(server: NodeServer, target: Path) -> int:
    records = [json.loads(p.read_text()) for p in server.state_dir.glob("mounts/*.json")]
    return next(r["pid"] for r in records if r["target"] == str(target))


class Volumes:
    """CreateVolume through the controller, and DeleteVolume of every volume created,
    even when the test fails (pkg/sanity/resources.go Resources.Cleanup)."""

    def __init__(self, stub, parameters: dict[str, str]) -> None:
        self.stub = stub
        self.parameters = parameters
        self.created: list[str] = []

    def request(self, name: str, **kwargs) -> csi_pb2.CreateVolumeRequest:
        kwargs.setdefault("volume_capabilities", [sanity_capability()])
        kwargs.setdefault("parameters", self.parameters)
        return csi_pb2.CreateVolumeRequest(name=name, **kwargs)

    def create(self, request: csi_pb2.CreateVolumeRequest) -> csi_pb2.CreateVolumeResponse:
        """CreateVolume; on success the id is remembered for cleanup (MustCreateVolume)."""
        response = self.stub.CreateVolume(request, timeout=RPC_TIMEOUT)
        if response.volume.volume_id not in self.created:
            self.created.append(response.volume.volume_id)
        return response

    def must_create(self, name: str, **kwargs) -> csi_pb2.CreateVolumeResponse:
        """pkg/sanity/resources.go MustCreateVolume: success and a volume id."""
        response = self.create(self.request(name, **kwargs))
        assert response.HasField("volume")
        assert response.volume.volume_id
        return response

    def delete(self, volume_id: str) -> None:
        self.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=RPC_TIMEOUT)
        if volume_id in self.created:
            self.created.remove(volume_id)

    def cleanup(self) -> None:
        for volume_id in list(self.created):
            try:
                self.delete(volume_id)
            except grpc.RpcError:
                pass  # the bucket fixture removes whatever is left


# --- fixtures ------------------------------------------------------------------------------

@pytest.fixture
def controller_server(s3_server, tmp_path):
    server = ControllerServer(root=tmp_path / "ctl", env=s3_server.env(),
                              args=["--s3-endpoint-url", s3_server.endpoint, "--s3-region", s3_server.region,
                                    "--s3-force-path-style"])
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def controller(controller_server):
    return controller_server.controller()


@pytest.fixture
def volumes(controller, bucket):
    """sanity's TestVolumeParameters (a StorageClass's parameters): a shared bucket."""
    created = Volumes(controller, {"bucketName": bucket})
    try:
        yield created
    finally:
        created.cleanup()


@pytest.fixture
def node(node_server):
    return node_server.node()


@pytest.fixture(params=["node", "controller"])
def identity(request, s3_server):
    """Identity is served on both sockets: kubelet's registrar and livenessprobe ask the
    node's, csi-provisioner asks the controller's. (``s3_server`` is named so that the
    servers, fetched by name, find it parametrized.)"""
    server = request.getfixturevalue(f"{request.param}_server")
    return server.identity()


# ===========================================================================================
# Identity Service (pkg/sanity/identity.go, DescribeSanity("Identity Service"))
# ===========================================================================================

def test_get_plugin_capabilities__should_return_appropriate_capabilities(identity):
    """identity.go: Identity Service / GetPluginCapabilities / "should return appropriate
    capabilities"."""
    response = identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest(), timeout=RPC_TIMEOUT)
    for cap in response.capabilities:
        kind = cap.WhichOneof("type")
        if kind == "service":
            assert cap.service.type in (Service.CONTROLLER_SERVICE, Service.VOLUME_ACCESSIBILITY_CONSTRAINTS), \
                f"Unknown service: {cap.service.type}"
        elif kind == "volume_expansion":
            assert cap.volume_expansion.type in (csi_pb2.PluginCapability.VolumeExpansion.ONLINE,
                                                 csi_pb2.PluginCapability.VolumeExpansion.OFFLINE)
        else:
            pytest.fail(f"Unknown capability: {cap}")
    # Pail: exactly the controller service (no topology, no expansion).
    assert [(c.WhichOneof("type"), c.service.type) for c in response.capabilities] == \
        [("service", Service.CONTROLLER_SERVICE)]


def test_probe__should_return_appropriate_information(identity):
    """identity.go: Identity Service / Probe / "should return appropriate information".
    Sanity accepts OK or FAILED_PRECONDITION and a ready value either way; these machines
    have /dev/fuse and fusermount3, so Pail must say ready."""
    response = identity.Probe(csi_pb2.ProbeRequest(), timeout=RPC_TIMEOUT)
    assert response.HasField("ready")
    assert response.ready.value is True


def test_get_plugin_info__should_return_appropriate_information(identity):
    """identity.go: Identity Service / GetPluginInfo / "should return appropriate
    information": a name of 1..63 characters matching the suite's pattern."""
    response = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=RPC_TIMEOUT)
    assert response.name
    assert len(response.name) <= 63
    assert re.fullmatch(r"[a-zA-Z][A-Za-z0-9._-]{0,61}[a-zA-Z]", response.name)
    # Pail: the CSIDriver's name, and a version.
    assert response.name == "s3.csi.pail.dev" and response.vendor_version


# ===========================================================================================
# Node Service (pkg/sanity/node.go, DescribeSanity("Node Service"))
# ===========================================================================================

def test_node_get_capabilities__should_return_appropriate_capabilities(node):
    """node.go: Node Service / NodeGetCapabilities / "should return appropriate
    capabilities"."""
    response = node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), timeout=RPC_TIMEOUT)
    known = {NodeRPC.UNKNOWN, NodeRPC.STAGE_UNSTAGE_VOLUME, NodeRPC.GET_VOLUME_STATS, NodeRPC.EXPAND_VOLUME,
             NodeRPC.VOLUME_CONDITION, NodeRPC.SINGLE_NODE_MULTI_WRITER, NodeRPC.VOLUME_MOUNT_GROUP}
    for cap in response.capabilities:
        assert cap.HasField("rpc")
        assert cap.rpc.type in known, f"Unknown capability: {cap.rpc.type}"
    # Pail: VOLUME_MOUNT_GROUP only (the CSIDriver's fsGroupPolicy None relies on it).
    assert [c.rpc.type for c in response.capabilities] == [NodeRPC.VOLUME_MOUNT_GROUP]


def test_node_get_info__should_return_appropriate_values(node):
    """node.go: Node Service / NodeGetInfo / "should return appropriate values". Pail does
    not advertise VOLUME_ACCESSIBILITY_CONSTRAINTS, so sanity checks no topology."""
    response = node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=RPC_TIMEOUT)
    assert response.node_id
    assert response.max_volumes_per_node >= 0
    assert response.node_id == "test-node"  # Pail: the --node-id it was started with


def test_node_publish_volume__should_fail_when_no_volume_id_is_provided(node):
    """node.go: Node Service / NodePublishVolume / "should fail when no volume id is
    provided" (a request with nothing but secrets)."""
    error = rpc_error(node.NodePublishVolume, csi_pb2.NodePublishVolumeRequest(secrets={}), timeout=RPC_TIMEOUT)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "volume_id" in error.details()


def test_node_publish_volume__should_fail_when_no_target_path_is_provided(node):
    """node.go: Node Service / NodePublishVolume / "should fail when no target path is
    provided" (GenerateUniqueValidVolumeID: "fake-vol-id-<10 hex>")."""
    request = csi_pb2.NodePublishVolumeRequest(volume_id=unique_string("fake-vol-id"))
    error = rpc_error(node.NodePublishVolume, request, timeout=RPC_TIMEOUT)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "target_path" in error.details()


def test_node_publish_volume__should_fail_when_no_volume_capability_is_provided(kubelet):
    """node.go: Node Service / NodePublishVolume / "should fail when no volume capability
    is provided". Deviation: the target is in kubelet's layout instead of
    ``<TargetPath>/target`` (see the module docstring)."""
    pod = kubelet.new_pod()
    target = kubelet.target(pod, "pv-sanity")
    request = csi_pb2.NodePublishVolumeRequest(volume_id=unique_string("fake-vol-id"), target_path=str(target))
    error = rpc_error(kubelet.stub.NodePublishVolume, request, timeout=RPC_TIMEOUT)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "volume_capability" in error.details()
    assert not target.exists(), "nothing is made at the target"


def test_node_unpublish_volume__should_fail_when_no_volume_id_is_provided(node):
    """node.go: Node Service / NodeUnpublishVolume / "should fail when no volume id is
    provided"."""
    error = rpc_error(node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(), timeout=RPC_TIMEOUT)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "volume_id" in error.details()


def test_node_unpublish_volume__should_fail_when_no_target_path_is_provided(node):
    """node.go: Node Service / NodeUnpublishVolume / "should fail when no target path is
    provided"."""
    request = csi_pb2.NodeUnpublishVolumeRequest(volume_id=unique_string("fake-vol-id"))
    error = rpc_error(node.NodeUnpublishVolume, request, timeout=RPC_TIMEOUT)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "target_path" in error.details()


def test_node_unpublish_volume__should_remove_target_path(kubelet, attributes):
    """node.go: Node Service / NodeUnpublishVolume / "should remove target path": the
    target exists after NodePublishVolume and is gone after NodeUnpublishVolume (the CSI
    spec: the SP MUST delete the file or directory it created at this path).

    Deviation: sanity first creates the volume with CreateVolume; here it is a static PV
    (its attributes, as a PV author writes them), so that this node case does not depend
    on the controller. CreateVolume → NodePublishVolume is "Node Service should work"."""
    pod = kubelet.new_pod()
    volume_id = unique_string("sanity-node-unpublish-volume")
    request = kubelet.publish_request(pod, "pv-sanity", attributes, volume_id=volume_id,
                                      cap=sanity_capability())
    target = Path(request.target_path)
    node_id = kubelet.stub.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=RPC_TIMEOUT).node_id
    assert node_id
    kubelet.stub.NodePublishVolume(request, timeout=MOUNT_TIMEOUT)
    assert target.is_dir(), "the target path should have been created by the CSI driver"
    assert mounted(target)

    kubelet.stub.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id,
                                                                        target_path=str(target)),
                                     timeout=MOUNT_TIMEOUT)
    assert not mounted(target)
    assert not target.exists(), "the target path should have been removed by the CSI driver"


def _run_controller_test(kubelet: Kubelet, volumes: Volumes, s3, bucket: str, count: int) -> None:
    """node.go runControllerTest, for what Pail advertises (no ControllerPublishVolume, no
    NodeStageVolume, no NodeGetVolumeStats), and the cleanup that sanity leaves to
    Resources.Cleanup (NodeUnpublishVolume, DeleteVolume) done and checked here."""
    stub = kubelet.stub
    # "getting node information"
    info = stub.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=RPC_TIMEOUT)
    assert info.node_id
    assert not info.HasField("accessible_topology")  # so no AccessibilityRequirements
    # "creating a single node writer volume"
    name = unique_string(f"sanity-node-full-{count}")
    created = volumes.must_create(name, capacity_range=csi_pb2.CapacityRange(required_bytes=TEST_VOLUME_SIZE))
    volume = created.volume
    pod = kubelet.new_pod()
    target = kubelet.target(pod, name)
    unpublished = False
    try:
        # "publishing the volume on a node", count times
        for _ in range(count):
            request = kubelet.publish_request(pod, name, dict(volume.volume_context), volume_id=volume.volume_id,
                                              cap=sanity_capability())
            stub.NodePublishVolume(request, timeout=MOUNT_TIMEOUT)
        # Pail: one mount however often it was published, and it is the volume: a file
        # written there is an object in the volume's bucket and prefix.
        assert fuse_mounts_at(target) == 1
        (target / "sanity.txt").write_bytes(b"written through the mount")
        context = dict(volume.volume_context)
        assert context.get("bucketName") == bucket
        prefix = context.get("prefix", "")
        key = (prefix if not prefix or prefix.endswith("/") else prefix + "/") + "sanity.txt"
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"written through the mount"

        stub.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id,
                                                                    target_path=str(target)), timeout=MOUNT_TIMEOUT)
        unpublished = True
        assert not mounted(target) and not target.exists()
        volumes.delete(volume.volume_id)
    finally:
        if not unpublished:
            try:
                stub.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                    volume_id=volume.volume_id, target_path=str(target)), timeout=MOUNT_TIMEOUT)
            except grpc.RpcError:
                pass  # the node_server fixture unmounts whatever is left


def test_node_service__should_work(kubelet, controller_server, volumes, s3, bucket):
    """node.go: Node Service / "should work" (runControllerTest, count 1): CreateVolume →
    NodePublishVolume → NodeUnpublishVolume → DeleteVolume, the volume_context of
    CreateVolume being all the node gets (plus kubelet's pod info)."""
    _run_controller_test(kubelet, volumes, s3, bucket, 1)


def test_node_service__should_be_idempotent(kubelet, controller_server, volumes, s3, bucket):
    """node.go: Node Service / "should be idempotent" (runControllerTest with
    IdempotentCount, 10 by default): NodePublishVolume repeated 10 times, one mount."""
    _run_controller_test(kubelet, volumes, s3, bucket, IDEMPOTENT_COUNT)


# Sanity skips these Describes when the capability is not advertised
# (Skip("NodeStageVolume not supported") etc.). Pail answers UNIMPLEMENTED.
UNADVERTISED_NODE_RPCS = [
    ("NodeStageVolume", csi_pb2.NodeStageVolumeRequest(
        volume_id="fake-vol-id", staging_target_path="/tmp/csi-staging", volume_capability=sanity_capability())),
    ("NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest(volume_id="fake-vol-id",
                                                           staging_target_path="/tmp/csi-staging")),
    ("NodeGetVolumeStats", csi_pb2.NodeGetVolumeStatsRequest(volume_id="fake-vol-id", volume_path="some/path")),
    ("NodeExpandVolume", csi_pb2.NodeExpandVolumeRequest(volume_id="fake-vol-id", volume_path="some/path")),
]


@pytest.mark.parametrize("method,request_", UNADVERTISED_NODE_RPCS, ids=[m for m, _ in UNADVERTISED_NODE_RPCS])
def test_node_service__unadvertised_rpc_is_unimplemented(node, method, request_):
    """node.go: Node Service / NodeStageVolume, NodeUnstageVolume, NodeGetVolumeStats,
    NodeExpandVolume: skipped by sanity ("... not supported") since Pail advertises
    neither STAGE_UNSTAGE_VOLUME, GET_VOLUME_STATS nor EXPAND_VOLUME."""
    error = rpc_error(getattr(node, method), request_, timeout=RPC_TIMEOUT)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED, error.details()


# ===========================================================================================
# Controller Service (pkg/sanity/controller.go,
# DescribeSanity("Controller Service [Controller Server]"))
# ===========================================================================================

def test_controller_get_capabilities__should_return_appropriate_capabilities(controller):
    """controller.go: Controller Service [Controller Server] / ControllerGetCapabilities /
    "should return appropriate capabilities"."""
    response = controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest(), timeout=RPC_TIMEOUT)
    known = {ControllerRPC.CREATE_DELETE_VOLUME, ControllerRPC.PUBLISH_UNPUBLISH_VOLUME, ControllerRPC.LIST_VOLUMES,
             ControllerRPC.GET_CAPACITY, ControllerRPC.CREATE_DELETE_SNAPSHOT, ControllerRPC.LIST_SNAPSHOTS,
             ControllerRPC.PUBLISH_READONLY, ControllerRPC.CLONE_VOLUME, ControllerRPC.EXPAND_VOLUME,
             ControllerRPC.MODIFY_VOLUME, ControllerRPC.LIST_VOLUMES_PUBLISHED_NODES, ControllerRPC.GET_VOLUME,
             ControllerRPC.VOLUME_CONDITION, ControllerRPC.SINGLE_NODE_MULTI_WRITER}
    assert response.capabilities
    for cap in response.capabilities:
        assert cap.HasField("rpc")
        assert cap.rpc.type in known, f"Unknown capability: {cap.rpc.type}"
    # Pail: CREATE_DELETE_VOLUME only.
    assert [c.rpc.type for c in response.capabilities] == [ControllerRPC.CREATE_DELETE_VOLUME]


def test_create_volume__should_fail_when_no_name_is_provided(volumes):
    """controller.go: Controller Service / CreateVolume / "should fail when no name is
    provided" (with the test parameters, no capabilities)."""
    request = csi_pb2.CreateVolumeRequest(parameters=volumes.parameters)
    error = rpc_error(volumes.create, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()


def test_create_volume__should_fail_when_no_volume_capabilities_are_provided(volumes):
    """controller.go: Controller Service / CreateVolume / "should fail when no volume
    capabilities are provided"."""
    request = csi_pb2.CreateVolumeRequest(name=unique_string("sanity-controller-create-no-volume-capabilities"),
                                          parameters=volumes.parameters)
    error = rpc_error(volumes.create, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()


def test_create_volume__should_return_appropriate_values_single_node_writer_no_capacity(volumes):
    """controller.go: Controller Service / CreateVolume / "should return appropriate values
    SingleNodeWriter NoCapacity". Deviation: today's controller.go sends
    RequiredBytes: TestVolumeSize despite the name (its comment: "whether CreateVolume
    request with no capacity should fail or not depends on driver implementation");
    earlier versions sent no capacity_range. Here: none, as the name says — the case with
    a capacity is the next one."""
    volumes.must_create(unique_string("sanity-controller-create-single-no-capacity"))


def test_create_volume__should_return_appropriate_values_single_node_writer_with_capacity_1gi(volumes):
    """controller.go: Controller Service / CreateVolume / "should return appropriate values
    SingleNodeWriter WithCapacity 1Gi" (RequiredBytes: TestVolumeSize). Sanity skips on
    OUT_OF_RANGE or UNIMPLEMENTED; an S3 prefix has no size, so Pail must accept it and
    report either at least the size asked for or 0 (unknown)."""
    response = volumes.must_create(unique_string("sanity-controller-create-single-with-capacity"),
                                   capacity_range=csi_pb2.CapacityRange(required_bytes=TEST_VOLUME_SIZE))
    capacity = response.volume.capacity_bytes
    assert capacity >= TEST_VOLUME_SIZE or capacity == 0


def test_create_volume__should_not_fail_when_requesting_to_create_a_volume_with_already_existing_name_and_same_capacity(
        volumes):
    """controller.go: Controller Service / CreateVolume / "should not fail when requesting
    to create a volume with already existing name and same capacity": the same id."""
    name = unique_string("sanity-controller-create-twice")
    capacity = csi_pb2.CapacityRange(required_bytes=TEST_VOLUME_SIZE)
    first = volumes.must_create(name, capacity_range=capacity)
    assert first.volume.capacity_bytes >= TEST_VOLUME_SIZE or first.volume.capacity_bytes == 0
    second = volumes.must_create(name, capacity_range=capacity)
    assert second.volume.capacity_bytes >= TEST_VOLUME_SIZE or second.volume.capacity_bytes == 0
    assert first.volume.volume_id == second.volume.volume_id
    assert dict(first.volume.volume_context) == dict(second.volume.volume_context)  # Pail


def test_create_volume__should_fail_when_requesting_to_create_a_volume_with_already_existing_name_and_different_capacity(
        volumes):
    """controller.go: Controller Service / CreateVolume / "should fail when requesting to
    create a volume with already existing name and different capacity": ALREADY_EXISTS
    (required = limit = 10 GiB, then 20 GiB)."""
    name = unique_string("sanity-controller-create-twice-different")
    size1, size2 = TEST_VOLUME_SIZE, 2 * TEST_VOLUME_SIZE
    volumes.must_create(name, capacity_range=csi_pb2.CapacityRange(required_bytes=size1, limit_bytes=size1))
    request = volumes.request(name, capacity_range=csi_pb2.CapacityRange(required_bytes=size2, limit_bytes=size2))
    error = rpc_error(volumes.create, request)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS, error.details()


def test_create_volume__should_not_fail_when_creating_volume_with_maximum_length_name(volumes):
    """controller.go: Controller Service / CreateVolume / "should not fail when creating
    volume with maximum-length name" (UniqueStringWithLength("sanity-controller-create-
    maxlen", 128)). Pail's ids hold the bucket and the volume's prefix
    (``pail1:-:<bucket>/<name>/``), which a 128-character name cannot fit in 128 bytes:
    the controller must still succeed, and still keep its id within the CSI guidance."""
    name = unique_string_with_length("sanity-controller-create-maxlen", MAX_NAME_LENGTH)
    assert len(name) == MAX_NAME_LENGTH
    response = volumes.must_create(name, capacity_range=csi_pb2.CapacityRange(required_bytes=TEST_VOLUME_SIZE))
    assert response.volume.capacity_bytes >= TEST_VOLUME_SIZE or response.volume.capacity_bytes == 0
    assert len(response.volume.volume_id.encode()) <= MAX_VOLUME_ID_BYTES


def test_delete_volume__should_fail_when_no_volume_id_is_provided(controller):
    """controller.go: Controller Service / DeleteVolume / "should fail when no volume id is
    provided"."""
    error = rpc_error(controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(secrets={}), timeout=RPC_TIMEOUT)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()


@pytest.mark.parametrize("volume_id", [
    "fake-vol-id",  # sanity's DefaultIDGenerator.GenerateInvalidVolumeID
    "pail1:d:pail-sanity-no-such-bucket/sanity/",  # Pail's own format; nothing there to delete
], ids=["sanity-invalid-id", "pail-id-of-nothing"])
def test_delete_volume__should_succeed_when_an_invalid_volume_id_is_used(controller, volume_id):
    """controller.go: Controller Service / DeleteVolume / "should succeed when an invalid
    volume id is used" (DeleteVolume is idempotent: a volume that is not there is
    deleted). Pail adds an id in its own format whose bucket does not exist."""
    controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=RPC_TIMEOUT)


def test_delete_volume__should_return_appropriate_values_no_optional_values_added(volumes):
    """controller.go: Controller Service / DeleteVolume / "should return appropriate values
    (no optional values added)"; Pail: deleting it again succeeds too."""
    response = volumes.must_create(unique_string("sanity-controller-create-appropriate"),
                                   capacity_range=csi_pb2.CapacityRange(required_bytes=TEST_VOLUME_SIZE))
    volume_id = response.volume.volume_id
    volumes.delete(volume_id)
    volumes.delete(volume_id)


def test_validate_volume_capabilities__should_fail_when_no_volume_id_is_provided(controller):
    """controller.go: Controller Service / ValidateVolumeCapabilities / "should fail when no
    volume id is provided"."""
    error = rpc_error(controller.ValidateVolumeCapabilities, csi_pb2.ValidateVolumeCapabilitiesRequest(secrets={}),
                      timeout=RPC_TIMEOUT)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()


def test_validate_volume_capabilities__should_fail_when_no_volume_capabilities_are_provided(volumes):
    """controller.go: Controller Service / ValidateVolumeCapabilities / "should fail when no
    volume capabilities are provided" (of a volume that exists)."""
    response = volumes.must_create(unique_string("sanity-controller-validate-nocaps"),
                                   capacity_range=csi_pb2.CapacityRange(required_bytes=TEST_VOLUME_SIZE))
    request = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=response.volume.volume_id)
    error = rpc_error(volumes.stub.ValidateVolumeCapabilities, request, timeout=RPC_TIMEOUT)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()


def test_validate_volume_capabilities__should_return_appropriate_values_no_optional_values_added(volumes):
    """controller.go: Controller Service / ValidateVolumeCapabilities / "should return
    appropriate values (no optional values added)": if confirmed, the capabilities are
    listed. Pail: SINGLE_NODE_WRITER mount is one it supports, so it is confirmed."""
    response = volumes.must_create(unique_string("sanity-controller-validate"),
                                   capacity_range=csi_pb2.CapacityRange(required_bytes=TEST_VOLUME_SIZE))
    result = volumes.stub.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=response.volume.volume_id, volume_capabilities=[sanity_capability()]), timeout=RPC_TIMEOUT)
    if result.HasField("confirmed"):
        assert result.confirmed.volume_capabilities
    assert result.HasField("confirmed"), result.message  # Pail


@pytest.mark.parametrize("volume_id", [
    "fake-vol-id-" + uuid.uuid4().hex[:10],  # sanity's GenerateUniqueValidVolumeID
    "pail1:-:pail-sanity-no-such-bucket/sanity/",  # Pail's own format, for a bucket that is not there
], ids=["sanity-valid-id", "pail-id-of-nothing"])
def test_validate_volume_capabilities__should_fail_when_the_requested_volume_does_not_exist(controller, volume_id):
    """controller.go: Controller Service / ValidateVolumeCapabilities / "should fail when
    the requested volume does not exist": NOT_FOUND."""
    request = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volume_id, volume_capabilities=[sanity_capability()])
    error = rpc_error(controller.ValidateVolumeCapabilities, request, timeout=RPC_TIMEOUT)
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()


# Sanity skips these when the capability is not advertised: GetCapacity, ListVolumes,
# ControllerPublishVolume / ControllerUnpublishVolume / "volume lifecycle"
# (PUBLISH_UNPUBLISH_VOLUME), the snapshot Describes (CREATE_DELETE_SNAPSHOT,
# LIST_SNAPSHOTS), ExpandVolume (EXPAND_VOLUME) and ModifyVolume (MODIFY_VOLUME). Pail
# answers UNIMPLEMENTED; likewise GetVolume and GetSnapshot, and the GroupController
# service, which it does not serve.
UNADVERTISED_CONTROLLER_RPCS = [
    ("ListVolumes", csi_pb2.ListVolumesRequest()),
    ("GetCapacity", csi_pb2.GetCapacityRequest()),
    ("ControllerPublishVolume", csi_pb2.ControllerPublishVolumeRequest(
        volume_id="fake-vol-id", node_id="fake-node-id", volume_capability=sanity_capability())),
    ("ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(volume_id="fake-vol-id",
                                                                           node_id="fake-node-id")),
    ("CreateSnapshot", csi_pb2.CreateSnapshotRequest(name="name", source_volume_id="testId")),
    ("DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id="reallyfakesnapshotid")),
    ("ListSnapshots", csi_pb2.ListSnapshotsRequest()),
    ("GetSnapshot", csi_pb2.GetSnapshotRequest(snapshot_id="reallyfakesnapshotid")),
    ("ControllerExpandVolume", csi_pb2.ControllerExpandVolumeRequest(
        volume_id="fake-vol-id", capacity_range=csi_pb2.CapacityRange(required_bytes=2 * TEST_VOLUME_SIZE))),
    ("ControllerGetVolume", csi_pb2.ControllerGetVolumeRequest(volume_id="fake-vol-id")),
    ("ControllerModifyVolume", csi_pb2.ControllerModifyVolumeRequest(volume_id="fake-vol-id",
                                                                     mutable_parameters={"XXX_FakeKey": "x"})),
]


@pytest.mark.parametrize("method,request_", UNADVERTISED_CONTROLLER_RPCS,
                         ids=[m for m, _ in UNADVERTISED_CONTROLLER_RPCS])
def test_controller_service__unadvertised_rpc_is_unimplemented(controller, method, request_):
    """controller.go: the Describes sanity skips for want of a capability (see above)."""
    error = rpc_error(getattr(controller, method), request_, timeout=RPC_TIMEOUT)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED, error.details()


def test_group_controller_service__is_unimplemented(controller_server):
    """groupcontroller.go: DescribeSanity("GroupController Service") runs only when the
    plugin advertises GROUP_CONTROLLER_SERVICE, which Pail does not."""
    stub = csi_pb2_grpc.GroupControllerStub(controller_server.channel())
    error = rpc_error(stub.GroupControllerGetCapabilities, csi_pb2.GroupControllerGetCapabilitiesRequest(),
                      timeout=RPC_TIMEOUT)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED, error.details()


# ===========================================================================================
# Idempotency rules (issue 4; DESIGN.md "CSI wiring"): not sanity cases, Pail's own.
# ===========================================================================================

def test_idempotency__republish_of_the_same_target_succeeds_without_a_second_mount(kubelet, attributes, s3, bucket):
    """kubelet republishes every live volume (requiresRepublish) with fresh tokens: each
    call succeeds, the same mount (one FUSE mount at the target, the same mount process)
    keeps serving."""
    s3.put_object(Bucket=bucket, Key="kept.txt", Body=b"still here")
    pod = kubelet.new_pod()
    target = kubelet.publish(pod, "pv-republish", attributes)
    assert fuse_mounts_at(target) == 1
    pid = mount_pid(kubelet.server, target)
    for n in range(3):
        token = {"token": f"token-{n}", "expirationTimestamp": "2030-01-01T00:00:00Z"}
        tokens = json.dumps({"sts.amazonaws.com": token})
        context = {**attributes, "csi.storage.k8s.io/serviceAccount.tokens": tokens}
        assert kubelet.publish(pod, "pv-republish", context) == target
        assert fuse_mounts_at(target) == 1
        assert mount_pid(kubelet.server, target) == pid
    assert (target / "kept.txt").read_bytes() == b"still here"


INCOMPATIBLE_REPUBLISH = {
    "readonly-flag": {"readonly": True},
    "capability-access-mode": {"cap": capability(AccessMode.MULTI_NODE_READER_ONLY)},
    "capability-mount-flags": {"cap": capability(flags=["uid=1001"])},
    "capability-volume-mount-group": {"fs_group": "2000"},
    "volume-attribute": {"attributes": {"prefix": "elsewhere/"}},
    "volume-id": {"volume_id": "another-volume"},
}


@pytest.mark.parametrize("change", list(INCOMPATIBLE_REPUBLISH), ids=list(INCOMPATIBLE_REPUBLISH))
def test_idempotency__republish_of_the_same_target_with_an_incompatible_request_is_already_exists(
        kubelet, attributes, change):
    """The same target published again with another readonly flag, capability or volume
    attribute (or another volume): ALREADY_EXISTS, and the mount that is there stays,
    alone and live."""
    pod = kubelet.new_pod()
    target = kubelet.publish(pod, "pv-incompatible", attributes)
    pid = mount_pid(kubelet.server, target)
    kwargs = dict(INCOMPATIBLE_REPUBLISH[change])
    changed_attributes = {**attributes, **kwargs.pop("attributes", {})}
    request = kubelet.publish_request(pod, "pv-incompatible", changed_attributes, **kwargs)
    error = rpc_error(kubelet.stub.NodePublishVolume, request, timeout=MOUNT_TIMEOUT)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS, error.details()
    assert fuse_mounts_at(target) == 1 and mount_pid(kubelet.server, target) == pid
    assert os.listdir(target) is not None  # still answers
    kubelet.publish(pod, "pv-incompatible", attributes)  # the original request still succeeds


@pytest.mark.parametrize("state", ["no-volume-directory", "no-target", "empty-target-directory", "unpublished"])
def test_idempotency__unpublish_of_a_target_that_is_not_mounted_succeeds(kubelet, attributes, state):
    """NodeUnpublishVolume of a target that does not exist, or exists unmounted, or was
    unpublished already: OK, and nothing is mounted there afterwards."""
    pod = kubelet.new_pod()
    volume_dir = kubelet.server.kubelet_dir / "pods" / pod.uid / "volumes" / "kubernetes.io~csi" / "pv-gone"
    target = volume_dir / "mount"
    if state != "no-volume-directory":
        volume_dir.mkdir(parents=True)
    if state == "empty-target-directory":
        target.mkdir()
    if state == "unpublished":
        kubelet.publish(pod, "pv-gone", attributes)
        kubelet.unpublish(pod, "pv-gone")
    kubelet.stub.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="pv-gone", target_path=str(target)),
                                     timeout=MOUNT_TIMEOUT)
    assert fuse_mounts_at(target) == 0


def _node_request(kubelet: Kubelet, attributes: dict[str, str], method: str, missing: str):
    pod = kubelet.new_pod()
    if method == "NodePublishVolume":
        request = kubelet.publish_request(pod, "pv-missing-field", attributes)
    else:
        request = csi_pb2.NodeUnpublishVolumeRequest(volume_id="pv-missing-field",
                                                     target_path=str(kubelet.target(pod, "pv-missing-field")))
    request.ClearField(missing)
    return request


MISSING_NODE_FIELDS = [("NodePublishVolume", "volume_id"), ("NodePublishVolume", "target_path"),
                       ("NodePublishVolume", "volume_capability"), ("NodeUnpublishVolume", "volume_id"),
                       ("NodeUnpublishVolume", "target_path")]


@pytest.mark.parametrize("method,missing", MISSING_NODE_FIELDS, ids=[f"{m}-{f}" for m, f in MISSING_NODE_FIELDS])
def test_idempotency__node_request_without_a_required_field_is_invalid_argument_naming_it(
        kubelet, attributes, method, missing):
    """Every other field present: INVALID_ARGUMENT, the message names the missing one,
    and nothing is mounted."""
    request = _node_request(kubelet, attributes, method, missing)
    error = rpc_error(getattr(kubelet.stub, method), request, timeout=MOUNT_TIMEOUT)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert re.search(rf"\b{missing}\b", error.details()), f"{missing} is not named: {error.details()}"
    assert not list(kubelet.server.kubelet_dir.glob("pods/*/volumes/kubernetes.io~csi/*/mount"))


MISSING_CONTROLLER_FIELDS = [("CreateVolume", "name"), ("CreateVolume", "volume_capabilities"),
                             ("DeleteVolume", "volume_id"), ("ValidateVolumeCapabilities", "volume_id"),
                             ("ValidateVolumeCapabilities", "volume_capabilities")]


@pytest.mark.parametrize("method,missing", MISSING_CONTROLLER_FIELDS,
                         ids=[f"{m}-{f}" for m, f in MISSING_CONTROLLER_FIELDS])
def test_idempotency__controller_request_without_a_required_field_is_invalid_argument_naming_it(
        volumes, method, missing):
    """Every other field present: INVALID_ARGUMENT, and the message names the missing one."""
    existing = volumes.must_create(unique_string("sanity-missing-field")).volume.volume_id
    if method == "CreateVolume":
        request = volumes.request(unique_string("sanity-missing-field"))
    elif method == "DeleteVolume":
        request = csi_pb2.DeleteVolumeRequest(volume_id=existing)
    else:
        request = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=existing,
                                                            volume_capabilities=[sanity_capability()])
    request.ClearField(missing)
    error = rpc_error(getattr(volumes.stub, method), request, timeout=RPC_TIMEOUT)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert re.search(rf"\b{missing}\b", error.details()), f"{missing} is not named: {error.details()}"
