"""The node server driven as kubelet drives it: publish, use, republish, unpublish."""

from __future__ import annotations

import errno
import mmap
import os
import stat

import grpc
import pytest

from csi import csi_pb2
from tests.support.kubelet import AccessMode, capability, mounted


def test_identity(node_server):
    identity = node_server.identity()
    info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "s3.csi.pail.dev" and info.vendor_version
    caps = identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    assert [c.service.type for c in caps] == [csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE]
    assert identity.Probe(csi_pb2.ProbeRequest()).ready.value is True
    node = node_server.node()
    node_caps = node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest()).capabilities
    assert [c.rpc.type for c in node_caps] == [csi_pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP]
    assert node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()).node_id == "test-node"


def test_everything_else_is_unimplemented(node_server):
    with pytest.raises(grpc.RpcError) as error:
        node_server.node().NodeStageVolume(csi_pb2.NodeStageVolumeRequest(volume_id="v"))
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_publish_read_write_republish_unpublish(s3, bucket, kubelet, attributes):
    s3.put_object(Bucket=bucket, Key="input.csv", Body=b"a,b\n")
    pod = kubelet.new_pod()
    target = kubelet.publish(pod, "pv-data", attributes)
    assert mounted(target)
    assert (target / "input.csv").read_bytes() == b"a,b\n"
    (target / "output.txt").write_bytes(b"result")
    assert s3.get_object(Bucket=bucket, Key="output.txt")["Body"].read() == b"result"

    kubelet.publish(pod, "pv-data", attributes)  # kubelet republishes (requiresRepublish)
    assert (target / "input.csv").read_bytes() == b"a,b\n", "the same mount, still live"

    kubelet.unpublish(pod, "pv-data")
    assert not mounted(target) and not target.exists()
    kubelet.unpublish(pod, "pv-data")  # again: nothing there is not an error


def test_other_users_can_use_the_mount_and_fs_group_gets_write_access(s3, bucket, kubelet, attributes):
    s3.put_object(Bucket=bucket, Key="f", Body=b"1")
    pod = kubelet.new_pod()
    target = kubelet.publish(pod, "pv-group", attributes, fs_group="2000")
    st = os.stat(target / "f")
    assert st.st_gid == 2000 and stat.S_IMODE(st.st_mode) == 0o664
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o775
    # allow_other: a non-root process of the pod's group reads and writes in it. (It
    # starts from a descriptor of the target: the test's own directories are root's.)
    volume = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(2000)
            os.setuid(1000)
            with open(os.open("f", os.O_RDONLY, dir_fd=volume), "rb") as f:
                ok = f.read() == b"1"
            with open(os.open("by-the-pod.txt", os.O_WRONLY | os.O_CREAT, 0o664, dir_fd=volume), "wb") as f:
                f.write(b"written by uid 1000")
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    os.close(volume)
    assert os.waitpid(pid, 0)[1] == 0
    assert s3.get_object(Bucket=bucket, Key="by-the-pod.txt")["Body"].read() == b"written by uid 1000"


def test_readonly_and_reader_only_modes_are_read_only(bucket, kubelet, attributes):
    pod = kubelet.new_pod()
    for pv, kwargs in (("pv-ro", {"readonly": True}),
                       ("pv-reader", {"cap": capability(AccessMode.MULTI_NODE_READER_ONLY)})):
        target = kubelet.publish(pod, pv, attributes, **kwargs)
        with pytest.raises(OSError) as error:
            (target / "x").write_bytes(b"x")
        assert error.value.errno == 30  # EROFS


def test_mount_options_from_the_pv(s3, bucket, kubelet, attributes):
    s3.put_object(Bucket=bucket, Key="a/b.txt", Body=b"1")
    pod = kubelet.new_pod()
    cap = capability(flags=["uid=1001", "--gid 1002", "allow-delete", "--metadata-ttl=indefinite", "prefix=a",
                            "direct-io"])
    target = kubelet.publish(pod, "pv-opts", attributes, cap=cap)
    st = os.stat(target / "b.txt")
    assert (st.st_uid, st.st_gid) == (1001, 1002)
    with open(target / "b.txt", "rb") as f:
        assert f.read() == b"1"
        with pytest.raises(OSError) as refused:  # direct-io: no shared map
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        assert refused.value.errno == errno.ENODEV
    os.unlink(target / "b.txt")
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


@pytest.mark.parametrize("flags,named", [
    (["endpoint-url=http://evil.example"], "endpoint-url"),
    (["--ca-bundle", "/etc/passwd"], "ca-bundle"),
    (["log-file=/etc/cron.d/x"], "log-file"),
    (["credentials-file=/etc/shadow"], "credentials-file"),
    (["allow-root"], "allow-root"),
    (["no-such-option"], "no-such-option"),
    (["uid=alice"], "--uid"),
    (["metadata-ttl=forever"], "--metadata-ttl"),
    (["cache=/etc"], "cache"),  # the cache's directory is the node server's
    (["--cache", "/etc"], "'/etc'"),  # two entries: the flag, then no option at all
    (["cache /tmp/x"], "cache"),
    (["cache", "max-cache-size=bogus"], "--max-cache-size"),
    (["cache", "max-cache-size=8MiB"], "--max-cache-size"),  # below the smallest cache
    (["max-cache-size=1GiB"], "max-cache-size"),
])
def test_bad_mount_options_are_invalid_argument_and_mount_nothing(kubelet, attributes, flags, named):
    pod = kubelet.new_pod()
    with pytest.raises(grpc.RpcError) as error:
        kubelet.publish(pod, "pv-bad", attributes, cap=capability(flags=flags))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in error.value.details()
    assert not mounted(kubelet.target(pod, "pv-bad"))
    assert list((kubelet.server.state_dir / "cache").iterdir()) == []


def test_missing_bucket_is_not_found_and_leaves_nothing(s3_server, kubelet, attributes):
    pod = kubelet.new_pod()
    with pytest.raises(grpc.RpcError) as error:
        kubelet.publish(pod, "pv-missing", {**attributes, "bucketName": "no-such-bucket-anywhere"})
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "does not exist" in error.value.details()
    target = kubelet.target(pod, "pv-missing")
    assert not mounted(target) and not target.exists()
    assert not list(kubelet.server.state_dir.glob("mounts/*.json"))


def test_the_mount_process_logs_with_the_volume_id(bucket, kubelet, attributes):
    pod = kubelet.new_pod()
    target = kubelet.publish(pod, "pv-logged", attributes)
    pids = [p for p in os.listdir("/proc") if p.isdigit() and _serves(int(p), target)]
    assert len(pids) == 1
    with open(f"/proc/{pids[0]}/environ", "rb") as environ:
        assert b"PAIL_VOLUME_ID=pv-logged" in environ.read().split(b"\0")
    kubelet.unpublish(pod, "pv-logged")


def _serves(pid: int, target) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            args = cmdline.read().split(b"\0")
    except OSError:
        return False
    return b"mount" in args and str(target).encode() in args
