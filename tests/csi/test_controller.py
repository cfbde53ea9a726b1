"""The controller server driven as csi-provisioner drives it: CreateVolume from a
StorageClass, DeleteVolume with only the volume id, ValidateVolumeCapabilities; and a
provisioned volume mounted by the node server."""

from __future__ import annotations

import subprocess
import sys

import botocore.exceptions
import grpc
import pytest

from csi import csi_pb2
from driver.csi import context as ctx
from driver.csi.volume_id import VolumeRef, decode, encode
from tests.support.fixtures import _delete_bucket
from tests.support.provisioner import (
    AccessMode,
    ControllerServer,
    GiB,
    Provisioner,
    capability,
)


@pytest.fixture
def controller(s3_server, tmp_path):
    server = ControllerServer(root=tmp_path / "ctl", env=s3_server.env(),
                              args=["--s3-endpoint-url", s3_server.endpoint, "--s3-force-path-style"])
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def provisioner(controller):
    return Provisioner(controller)


@pytest.fixture
def new_buckets(s3_server):
    """Names of buckets a test expects the controller to create: removed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        _delete_bucket(s3_server, name)


def error_of(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(*args, timeout=60)
    return error.value


def keys(s3, bucket: str) -> set[str]:
    return {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])}


def bucket_exists(s3, bucket: str) -> bool:
    try:
        s3.head_bucket(Bucket=bucket)
        return True
    except botocore.exceptions.ClientError as exc:
        if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
            return False
        raise


def test_capabilities_and_unimplemented_calls(controller):
    stub = controller.controller()
    caps = stub.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest()).capabilities
    assert [c.rpc.type for c in caps] == [csi_pb2.ControllerServiceCapability.RPC.CREATE_DELETE_VOLUME]
    info = controller.identity().GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "s3.csi.pail.dev"
    assert controller.identity().Probe(csi_pb2.ProbeRequest()).ready.value is True
    for call, request in ((stub.ControllerPublishVolume, csi_pb2.ControllerPublishVolumeRequest(volume_id="v")),
                          (stub.ListVolumes, csi_pb2.ListVolumesRequest()),
                          (stub.CreateSnapshot, csi_pb2.CreateSnapshotRequest(name="s")),
                          (stub.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(volume_id="v"))):
        assert error_of(call, request).code() == grpc.StatusCode.UNIMPLEMENTED


def test_create_in_a_shared_bucket(s3_server, bucket, provisioner):
    request = provisioner.create_request({"bucketName": bucket, "basePrefix": "/volumes//team/",
                                          "authenticationSource": "pod", "stsRegion": "eu-west-1",
                                          "csi.storage.k8s.io/provisioner-secret-name": "ignored"},
                                         size=5 * GiB)
    volume = provisioner.create(request)
    prefix = f"volumes/team/{request.name}/"
    assert decode(volume.volume_id) == VolumeRef(bucket=bucket, prefix=prefix, delete_objects=False,
                                                 bucket_per_volume=False)
    assert dict(volume.volume_context) == {
        "bucketName": bucket, "prefix": prefix, "endpoint": s3_server.endpoint, "forcePathStyle": "true",
        "authenticationSource": "pod", "stsRegion": "eu-west-1"}
    assert set(volume.volume_context) <= ctx.VOLUME_ATTRIBUTES, "what the node server accepts"
    assert volume.capacity_bytes == 5 * GiB, "S3 has no capacity: the request is echoed"

    plain = provisioner.provision({"bucketName": bucket, "deletePolicy": "delete"})
    ref = decode(plain.volume_id)
    assert ref.prefix.startswith("pvc-") and ref.prefix.count("/") == 1 and ref.delete_objects


def test_create_is_idempotent_by_name(bucket, provisioner):
    parameters = {"bucketName": bucket, "basePrefix": "v"}
    request = provisioner.create_request(parameters)
    first = provisioner.create(request)
    assert provisioner.create(request) == first, "csi-provisioner retries: the same volume"

    for other in ({**parameters, "deletePolicy": "delete"}, {**parameters, "basePrefix": "w"},
                  {**parameters, "region": "eu-west-1"}):
        error = error_of(provisioner.stub.CreateVolume, provisioner.create_request(other, name=request.name))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS and request.name in error.details()
    bigger = provisioner.create_request(parameters, name=request.name, size=2 * GiB)
    assert error_of(provisioner.stub.CreateVolume, bigger).code() == grpc.StatusCode.ALREADY_EXISTS
    assert provisioner.create(request) == first


def test_long_names_are_shortened_the_same_way_each_time(s3, bucket, provisioner, new_buckets):
    """CSI names may be 128 characters (csi-sanity tries that); ids have 128 bytes, bucket
    names 63 characters. A long name keeps its start and gains a hash of the whole name."""
    name = "pvc-" + "a" * 124
    request = provisioner.create_request({"bucketName": bucket, "basePrefix": "volumes"}, name=name)
    volume = provisioner.create(request)
    prefix = volume.volume_context["prefix"]
    assert len(volume.volume_id.encode()) <= 128 and decode(volume.volume_id).prefix == prefix
    assert prefix.startswith("volumes/pvc-aaaa") and prefix.count("/") == 2
    assert provisioner.create(request) == volume
    similar = provisioner.provision({"bucketName": bucket, "basePrefix": "volumes"}, name=name[:-1] + "b")
    assert similar.volume_context["prefix"] != prefix

    request = provisioner.create_request({"bucketPerVolume": "true", "deletePolicy": "delete"},
                                         name="pvc-" + "B" * 124)
    volume = provisioner.create(request)
    own = volume.volume_context["bucketName"]
    new_buckets.append(own)
    assert own.startswith("pail-pvc-bbbb") and len(own) <= 63 and bucket_exists(s3, own)
    assert provisioner.create(request) == volume
    provisioner.delete(volume.volume_id)
    assert not bucket_exists(s3, own)


def test_invalid_requests_name_the_field(bucket, provisioner):
    good = {"bucketName": bucket}
    base = provisioner.create_request(good)

    def variant(**fields):
        request = csi_pb2.CreateVolumeRequest()
        request.CopyFrom(base)
        for name, value in fields.items():
            request.ClearField(name)
            if name == "name":
                request.name = value
            elif name == "parameters":
                request.parameters.update(value)
            elif name == "volume_capabilities":
                request.volume_capabilities.extend(value)
            else:
                getattr(request, name).CopyFrom(value)
        return request

    cases = [
        (variant(name=""), "name is required"),
        (variant(volume_capabilities=[]), "volume_capabilities is required"),
        (variant(volume_capabilities=[capability(block=True)]), "block"),
        (variant(volume_capabilities=[capability(AccessMode.UNKNOWN)]), "access mode"),
        (variant(volume_capabilities=[capability(flags=["prefix=elsewhere"])]), "prefix"),
        (variant(volume_capabilities=[capability(flags=["endpoint-url=http://x"])]), "endpoint-url"),
        (variant(parameters={**good, "bukcetName": "typo"}), "bukcetName"),
        (variant(parameters={**good, "endpoint": "http://elsewhere:9000"}), "endpoint"),
        (variant(parameters={**good, "prefix": "a/"}), "basePrefix"),
        (variant(parameters={**good, "bucketPerVolume": "yes"}), "bucketPerVolume"),
        (variant(parameters={**good, "forcePathStyle": "1"}), "forcePathStyle"),
        (variant(parameters={**good, "deletePolicy": "recycle"}), "deletePolicy"),
        (variant(parameters={**good, "authenticationSource": "node"}), "authenticationSource"),
        (variant(parameters={**good, "basePrefix": "a/../b"}), "basePrefix"),
        (variant(parameters={"basePrefix": "a"}), "bucketName is required"),
        (variant(parameters={**good, "bucketNamePrefix": "x-"}), "bucketPerVolume"),
        (variant(parameters={**good, "bucketPerVolume": "true"}), "bucketName cannot be combined"),
        (variant(parameters={"bucketPerVolume": "true", "bucketNamePrefix": "Upper_"}), "not a valid bucket name"),
        (variant(parameters={**good, "basePrefix": "x" * 100}), "128 bytes"),
        (variant(parameters={"bucketName": "arn:aws:s3:us-east-1:123456789012:accesspoint/ap"}), "bucket"),
        (variant(volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id="s"))), "volume_content_source"),
        (variant(capacity_range=csi_pb2.CapacityRange(required_bytes=2, limit_bytes=1)), "capacity_range"),
    ]
    for request, expected in cases:
        error = error_of(provisioner.stub.CreateVolume, request)
        assert (error.code(), expected in error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, True), \
            (expected, error.details())
    assert provisioner.create(base).volume_id, "the request all variants came from is fine"


def test_missing_bucket_is_failed_precondition(provisioner):
    error = error_of(provisioner.stub.CreateVolume, provisioner.create_request({"bucketName": "pail-no-such-bucket"}))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'pail-no-such-bucket' does not exist" in error.details()


@pytest.mark.s3_servers("seaweedfs")  # moto checks no signatures
def test_refused_credentials_are_permission_denied(s3_server, bucket, tmp_path):
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    server = ControllerServer(root=tmp_path / "ctl", env=env, args=["--s3-endpoint-url", s3_server.endpoint])
    try:
        provisioner = Provisioner(server.start())
        error = error_of(provisioner.stub.CreateVolume, provisioner.create_request({"bucketName": bucket}))
    finally:
        server.stop()
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and bucket in error.details()
    assert "wrong-secret" not in server.log()


def test_bucket_per_volume(s3, s3_server, provisioner, new_buckets):
    request = provisioner.create_request({"bucketPerVolume": "true", "deletePolicy": "delete"})
    bucket = f"pail-{request.name}"
    new_buckets.append(bucket)
    volume = provisioner.create(request)
    assert bucket_exists(s3, bucket)
    assert decode(volume.volume_id) == VolumeRef(bucket=bucket, prefix="", delete_objects=True,
                                                 bucket_per_volume=True)
    assert dict(volume.volume_context) == {"bucketName": bucket, "endpoint": s3_server.endpoint,
                                           "forcePathStyle": "true", "region": "us-east-1"}
    assert provisioner.create(request) == volume, "the bucket exists already: the same volume"

    s3.put_object(Bucket=bucket, Key="a/b.txt", Body=b"x")
    s3.create_multipart_upload(Bucket=bucket, Key="unfinished")
    provisioner.delete(volume.volume_id)
    assert not bucket_exists(s3, bucket)
    provisioner.delete(volume.volume_id)  # again: the bucket is gone, which is success

    retained = provisioner.create_request({"bucketPerVolume": "true", "bucketNamePrefix": "pail-kept-"})
    new_buckets.append(f"pail-kept-{retained.name}")
    volume = provisioner.create(retained)
    provisioner.delete(volume.volume_id)
    assert bucket_exists(s3, f"pail-kept-{retained.name}"), "deletePolicy retain keeps the bucket"


def test_delete_with_retain_leaves_the_objects(s3, bucket, provisioner):
    volume = provisioner.provision({"bucketName": bucket, "basePrefix": "vols"})
    prefix = volume.volume_context["prefix"]
    s3.put_object(Bucket=bucket, Key=prefix + "result.csv", Body=b"1")
    provisioner.delete(volume.volume_id)
    provisioner.delete(volume.volume_id)
    assert keys(s3, bucket) == {prefix + "result.csv"}


def test_delete_removes_only_the_volumes_objects(s3, s3_server, bucket, provisioner):
    policy = {"bucketName": bucket, "basePrefix": "vols", "deletePolicy": "delete"}
    name = provisioner.pv_name()
    doomed = provisioner.provision(policy, name=name)
    sibling = provisioner.provision(policy, name=name + "-2")  # its prefix starts with the same name
    prefix, other = doomed.volume_context["prefix"], sibling.volume_context["prefix"]
    inside = [f"{prefix}part-{i:04d}" for i in range(1005)] + [prefix + "deep/er/file"]  # > one batch
    s3_server.put_many(bucket, inside, body=b"x")
    survivors = {other + "keep.txt", f"vols/{name}.txt", f"vols/{name}x/file", "outside.txt", "vols/other/file"}
    for key in survivors:
        s3.put_object(Bucket=bucket, Key=key, Body=b"keep")
    upload = s3.create_multipart_upload(Bucket=bucket, Key=prefix + "uploading")["UploadId"]
    kept_upload = s3.create_multipart_upload(Bucket=bucket, Key=other + "uploading")["UploadId"]

    provisioner.delete(doomed.volume_id)
    assert keys(s3, bucket) == survivors
    uploads = {(u["Key"], u["UploadId"]) for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    assert (other + "uploading", kept_upload) in uploads and (prefix + "uploading", upload) not in uploads
    assert bucket_exists(s3, bucket), "a shared bucket is never deleted"
    provisioner.delete(doomed.volume_id)  # again: nothing left, still success
    assert keys(s3, bucket) == survivors


def test_delete_of_ids_pail_did_not_make_succeeds(provisioner):
    for volume_id in ("static-pv-handle", "pail1:zz:bucket/x/", "pail1:-:no/such/bucket/", "pail1:d:gone-bucket/p/"):
        provisioner.delete(volume_id)
    error = error_of(provisioner.stub.DeleteVolume, csi_pb2.DeleteVolumeRequest())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "volume_id" in error.details()


def test_validate_volume_capabilities(bucket, provisioner):
    stub = provisioner.stub
    volume = provisioner.provision({"bucketName": bucket})
    caps = [capability(AccessMode.MULTI_NODE_MULTI_WRITER), capability(AccessMode.SINGLE_NODE_READER_ONLY)]
    answer = stub.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=volume.volume_id, volume_context=volume.volume_context, volume_capabilities=caps,
        parameters={"bucketName": bucket}))
    assert list(answer.confirmed.volume_capabilities) == caps
    assert dict(answer.confirmed.volume_context) == dict(volume.volume_context)
    assert dict(answer.confirmed.parameters) == {"bucketName": bucket}

    answer = stub.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=volume.volume_id, volume_capabilities=[capability(block=True)]))
    assert not answer.HasField("confirmed") and "block" in answer.message

    for request, code, field in (
            (csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id="static-pv", volume_capabilities=caps),
             grpc.StatusCode.NOT_FOUND, "static-pv"),
            (csi_pb2.ValidateVolumeCapabilitiesRequest(
                volume_id=encode(VolumeRef("pail-gone-bucket", "p/", False, False)), volume_capabilities=caps),
             grpc.StatusCode.NOT_FOUND, "pail-gone-bucket"),
            (csi_pb2.ValidateVolumeCapabilitiesRequest(volume_capabilities=caps),
             grpc.StatusCode.INVALID_ARGUMENT, "volume_id"),
            (csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volume.volume_id),
             grpc.StatusCode.INVALID_ARGUMENT, "volume_capabilities")):
        error = error_of(stub.ValidateVolumeCapabilities, request)
        assert error.code() == code and field in error.details()


def test_unreachable_endpoint_is_unavailable(tmp_path):
    from tests.support.s3server import free_port

    server = ControllerServer(root=tmp_path / "ctl", env={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"},
                              args=["--s3-endpoint-url", f"http://127.0.0.1:{free_port()}"])
    try:
        provisioner = Provisioner(server.start())
        error = error_of(provisioner.stub.CreateVolume, provisioner.create_request({"bucketName": "pail-x"}))
    finally:
        server.stop()
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "cannot reach" in error.details()


def test_bad_controller_flags_are_refused_before_serving(tmp_path):
    for args in (["controller", "--s3-endpoint-url", "ftp://x"],
                 ["node", "--node-id", "n", "--s3-endpoint-url", "http://x:9000"]):
        result = subprocess.run([sys.executable, "-m", "driver", "csi", *args, "--endpoint",
                                 f"unix://{tmp_path}/csi.sock"], check=False, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2 and "--s3-endpoint-url" in result.stderr


def test_provisioned_volume_is_mounted_by_the_node(s3, bucket, provisioner, kubelet):
    request = provisioner.create_request({"bucketName": bucket, "basePrefix": "team", "deletePolicy": "delete"},
                                         mount_options=["allow-delete"])
    volume = provisioner.create(request)
    s3.put_object(Bucket=bucket, Key="team/not-this-volume.txt", Body=b"other")
    pod = kubelet.new_pod()
    target = kubelet.publish(pod, request.name, volume.volume_context, volume_id=volume.volume_id,
                             cap=request.volume_capabilities[0])
    assert list(target.iterdir()) == [], "a new volume is an empty directory"
    (target / "out.txt").write_bytes(b"written in the pod")
    key = f"team/{request.name}/out.txt"
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"written in the pod"
    kubelet.unpublish(pod, request.name, volume_id=volume.volume_id)

    provisioner.delete(volume.volume_id)
    assert keys(s3, bucket) == {"team/not-this-volume.txt"}
