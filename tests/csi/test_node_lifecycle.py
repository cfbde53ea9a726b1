"""What kubelet relies on across calls: concurrent calls, parallel pods, a broken mount
repaired, inline ephemeral volumes refused, and no credential in any log line."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time

import grpc
import pytest

from csi import csi_pb2
from tests.support.kubelet import Kubelet, NodeServer, mounted
from tests.support.proxy import S3Proxy, Stall


def _mount_pid(server: NodeServer, target) -> int:
    records = [json.loads(p.read_text()) for p in server.state_dir.glob("mounts/*.json")]
    return next(r["pid"] for r in records if r["target"] == str(target))


def _fuse_mounts_at(target) -> int:
    with open("/proc/self/mountinfo") as mountinfo:
        return sum(1 for line in mountinfo if line.split()[4] == str(target))


@pytest.mark.s3_servers("seaweedfs")
def test_a_second_call_for_a_target_in_progress_is_aborted(s3_server, bucket, kubelet, attributes):
    pod = kubelet.new_pod()
    with S3Proxy(s3_server.endpoint) as proxy:
        # Hold the mount process's first request so the first publish stays in progress.
        gate = proxy.inject(Stall(None), op="HeadBucket")
        first: dict[str, object] = {}
        thread = threading.Thread(target=lambda: first.update(
            target=kubelet.publish(pod, "pv-slow", {**attributes, "endpoint": proxy.endpoint})))
        thread.start()
        try:
            assert gate.wait(timeout=30), "the mount process never asked for the bucket"
            for call in (lambda: kubelet.publish(pod, "pv-slow", {**attributes, "endpoint": proxy.endpoint}),
                         lambda: kubelet.unpublish(pod, "pv-slow")):
                with pytest.raises(grpc.RpcError) as error:
                    call()
                assert error.value.code() == grpc.StatusCode.ABORTED
        finally:
            gate.remove()
            thread.join(timeout=90)
        assert mounted(first["target"]) and _fuse_mounts_at(first["target"]) == 1
        kubelet.unpublish(pod, "pv-slow")


@pytest.mark.s3_servers("seaweedfs")
def test_two_pods_of_one_volume_publish_in_parallel(s3, bucket, kubelet, attributes, s3_server):
    s3.put_object(Bucket=bucket, Key="shared.txt", Body=b"both")
    pods = [kubelet.new_pod(f"app-{i}") for i in range(2)]
    with S3Proxy(s3_server.endpoint) as proxy:
        # Both mount processes wait at the same point: neither publish waits for the other.
        gate = proxy.inject(Stall(None), op="HeadBucket", times=None)
        results: dict[int, object] = {}
        threads = [threading.Thread(target=lambda i=i: results.update(
            {i: kubelet.publish(pods[i], "pv-shared", {**attributes, "endpoint": proxy.endpoint})}))
            for i in range(2)]
        for thread in threads:
            thread.start()
        try:
            assert gate.wait(hits=2, timeout=30), "the publishes did not run side by side"
        finally:
            gate.remove()
            for thread in threads:
                thread.join(timeout=90)
        assert [(results[i] / "shared.txt").read_bytes() for i in range(2)] == [b"both", b"both"]
        pids = {_mount_pid(kubelet.server, results[i]) for i in range(2)}
        assert len(pids) == 2, "one mount process per target"
        for pod in pods:
            kubelet.unpublish(pod, "pv-shared")


@pytest.mark.s3_servers("seaweedfs")
def test_a_dead_mount_is_repaired_on_republish_and_removed_on_unpublish(s3, bucket, kubelet, attributes):
    s3.put_object(Bucket=bucket, Key="f.txt", Body=b"still here")
    pod = kubelet.new_pod()
    for unpublish_first in (False, True):
        target = kubelet.publish(pod, "pv-crash", attributes)
        os.kill(_mount_pid(kubelet.server, target), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.stat(target)
            except OSError as exc:
                assert exc.errno == 107  # ENOTCONN: what the pod sees
                break
            time.sleep(0.1)
        else:
            pytest.fail("the mount still answers after its process was killed")
        if unpublish_first:
            kubelet.unpublish(pod, "pv-crash")
            assert not mounted(target) and not target.exists()
        else:
            kubelet.publish(pod, "pv-crash", attributes)
            assert (target / "f.txt").read_bytes() == b"still here"
            assert _fuse_mounts_at(target) == 1, "the dead mount was replaced, not stacked"
            kubelet.unpublish(pod, "pv-crash")
    assert not list(kubelet.server.state_dir.glob("mounts/*.json"))


SA_TOKEN = "eyJhbGciOiJSUzI1NiJ9.pail-service-account-token-0001.sig"


@pytest.fixture
def debug_node_server(s3_server, tmp_path):
    server = NodeServer(root=tmp_path / "node", env=s3_server.env(), extra_args=["--debug"])
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.mark.s3_servers("seaweedfs")  # checks signatures: the secret's keys are the ones used
def test_secrets_and_tokens_never_reach_the_logs(s3_server, s3, bucket, debug_node_server, attributes):
    kubelet = Kubelet(debug_node_server)
    secrets = {"key_id": s3_server.access_key, "access_key": s3_server.secret_key}
    tokens = json.dumps({"sts.amazonaws.com": {"token": SA_TOKEN, "expirationTimestamp": "2030-01-01T00:00:00Z"}})
    context = {**attributes, "csi.storage.k8s.io/serviceAccount.tokens": tokens}
    pod = kubelet.new_pod()
    target = kubelet.publish(pod, "pv-secret", context, secrets=secrets)
    (target / "out.txt").write_bytes(b"x")
    assert s3.get_object(Bucket=bucket, Key="out.txt")["Body"].read() == b"x"
    files = list(debug_node_server.state_dir.glob("credentials/*.json"))
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(files[0].parent.stat().st_mode) == 0o700
    kubelet.publish(pod, "pv-secret", context, secrets=secrets)  # republish: fresh tokens
    with pytest.raises(grpc.RpcError):  # a failing call logs its details too
        kubelet.publish(kubelet.new_pod(), "pv-secret-bad", {**context, "bucketName": "no-such-bucket-x1"},
                        secrets=secrets)
    kubelet.unpublish(pod, "pv-secret")
    assert not list(debug_node_server.state_dir.glob("credentials/*")), "deleted on unpublish"
    log = debug_node_server.log()
    assert "NodePublishVolume" in log and "pv-secret" in log, "the calls were logged"
    for value in (s3_server.access_key, s3_server.secret_key, SA_TOKEN):
        assert value not in log
    # The requests themselves were logged (debug), with the credentials replaced.
    assert '"csi.storage.k8s.io/serviceAccount.tokens": "***stripped***"' in log


@pytest.fixture
def ephemeral_node_server(s3_server, tmp_path):
    server = NodeServer(root=tmp_path / "node", env=s3_server.env(), extra_args=["--enable-ephemeral"])
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.mark.s3_servers("seaweedfs")
def test_inline_ephemeral_volumes_are_refused_unless_enabled(kubelet, bucket):
    pod = kubelet.new_pod()
    with pytest.raises(grpc.RpcError) as error:
        kubelet.publish(pod, "inline-data", {"bucketName": bucket, "authenticationSource": "pod"},
                        volume_id="csi-0123abcd", ephemeral=True)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "ephemeral" in error.value.details()
    assert not mounted(kubelet.target(pod, "inline-data"))


@pytest.mark.s3_servers("seaweedfs")
@pytest.mark.parametrize("extra,code,named", [
    ({"endpoint": "http://127.0.0.1:1"}, grpc.StatusCode.INVALID_ARGUMENT, "endpoint"),
    ({"forcePathStyle": "true"}, grpc.StatusCode.INVALID_ARGUMENT, "forcePathStyle"),
    ({"authenticationSource": "driver"}, grpc.StatusCode.FAILED_PRECONDITION, "authenticationSource=pod"),
    ({}, grpc.StatusCode.FAILED_PRECONDITION, "authenticationSource=pod"),
])
def test_inline_ephemeral_volumes_may_not_pick_the_endpoint_or_use_the_nodes_credentials(
        ephemeral_node_server, bucket, extra, code, named):
    kubelet = Kubelet(ephemeral_node_server)
    pod = kubelet.new_pod()
    with pytest.raises(grpc.RpcError) as error:
        kubelet.publish(pod, "inline-data", {"bucketName": bucket, **extra}, volume_id="csi-0123abcd",
                        ephemeral=True)
    assert error.value.code() == code
    assert named in error.value.details()
    target = kubelet.target(pod, "inline-data")
    assert not mounted(target) and not target.exists()
    assert not list(ephemeral_node_server.state_dir.glob("mounts/*.json"))


def test_missing_fields_are_invalid_argument_naming_the_field(kubelet, attributes):
    pod = kubelet.new_pod()
    full = kubelet.publish_request(pod, "pv-fields", attributes)
    for field in ("volume_id", "target_path", "volume_capability"):
        request = csi_pb2.NodePublishVolumeRequest()
        request.CopyFrom(full)
        request.ClearField(field)
        with pytest.raises(grpc.RpcError) as error:
            kubelet.stub.NodePublishVolume(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in error.value.details()
    for field in ("volume_id", "target_path"):
        request = csi_pb2.NodeUnpublishVolumeRequest(volume_id="pv-fields", target_path=full.target_path)
        request.ClearField(field)
        with pytest.raises(grpc.RpcError) as error:
            kubelet.stub.NodeUnpublishVolume(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in error.value.details()
    assert not mounted(kubelet.target(pod, "pv-fields"))
