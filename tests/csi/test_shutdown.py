"""Stopping parts of the node server, as kubelet's node sees it.

1. SIGTERM to the gRPC server alone (not to the supervisor, `pail csi node`): the server
   stops gracefully and exits 0; the mount processes, in sessions of their own, are not
   touched and pass to the supervisor, which starts a new server; that server adopts
   them. Open files keep reading, republish is a no-op, a new publish mounts.
   (tests/csi/test_restart.py covers SIGKILL to the server inside a node container.)
2. SIGKILL to a mount process: readers, also those holding the file open, get ENOTCONN; a
   file being written is lost and its multipart upload stays in S3 (docs/SEMANTICS.md:
   only a lifecycle rule removes it); the next NodePublishVolume of the same target
   mounts it again with a new process, which new opens reach, while descriptors opened
   on the dead mount stay ENOTCONN. (tests/csi/test_node_lifecycle.py covers the repair
   itself, seen through stat and a fresh read.)
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import time

import pytest

from tests.support.kubelet import Kubelet, NodeServer, mounted
from tests.support.namespaces import (
    alive,
    children,
    fuse_mounts_at,
    mount_process,
)
from tests.support.processes import errno_of, wait_until

pytestmark = pytest.mark.s3_servers("seaweedfs")

WAIT = 60.0  # bound of every wait
wait = functools.partial(wait_until, timeout=WAIT, interval=0.02)
MiB = 1024 * 1024


@pytest.fixture
def server(s3_server, tmp_path):
    """A node server of this test's own: the test signals its processes."""
    server = NodeServer(root=tmp_path / "node", env=s3_server.env())
    try:
        yield server.start()
    finally:
        try:
            Kubelet(server).unpublish_all()
        finally:
            server.stop()  # also unmounts and kills whatever mount is left


def test_sigterm_to_the_grpc_server_alone_leaves_the_mounts_alone(server, s3, bucket, attributes):
    data = os.urandom(2 * MiB)
    s3.put_object(Bucket=bucket, Key="input.bin", Body=data)
    kubelet = Kubelet(server)
    pod = kubelet.new_pod()
    target = kubelet.publish(pod, "pv-data", attributes)
    mounter = mount_process(target)
    assert mounter is not None and server.record(target)["pid"] == mounter
    held = os.open(target / "input.bin", os.O_RDONLY)  # a pod's open file, across the restart
    try:
        assert os.pread(held, MiB, 0) == data[:MiB]
        old = server.grpc_server_pid()
        assert old is not None

        signalled = time.monotonic()
        os.kill(old, signal.SIGTERM)
        wait(lambda: not alive(old), "the gRPC server exits on SIGTERM")
        exited = time.monotonic()
        new = wait(lambda: (pid := server.grpc_server_pid()) not in (None, old) and server.answers_probe() and pid,
                    "the supervisor starts a new server, which answers Probe")
        answered = time.monotonic()
        print(f"\nSIGTERM to the gRPC server: exited {exited - signalled:.2f} s, "
              f"new server answers Probe {answered - signalled:.2f} s after the signal")

        assert server.running, "the supervisor itself carries on"
        restarts = server.events("server exited; restarting")
        assert [e["status"] for e in restarts] == [0], "a graceful exit, restarted all the same"
        adopted = server.events("mounts adopted")
        assert [(e["kept"], e["cleaned"]) for e in adopted] == [(0, 0), (1, 0)]
        # The same mount process serves the same mount; it is the supervisor's child now.
        assert alive(mounter) and mount_process(target) == mounter and server.record(target)["pid"] == mounter
        assert mounter in children(server.process.pid)
        assert fuse_mounts_at(target) == 1
        assert os.pread(held, MiB, MiB) == data[MiB:], "the open file reads on"
        assert (target / "input.bin").read_bytes() == data

        kubelet = Kubelet(server)  # a new connection, as kubelet's after a restart
        kubelet.publish(pod, "pv-data", attributes)  # the periodic republish: nothing to do
        assert mount_process(target) == mounter and fuse_mounts_at(target) == 1
        other_pod = kubelet.new_pod("other")
        other = kubelet.publish(other_pod, "pv-data", attributes)  # a new mount works
        assert (other / "input.bin").read_bytes() == data
        (other / "written-after.txt").write_bytes(b"after the restart")
        assert s3.get_object(Bucket=bucket, Key="written-after.txt")["Body"].read() == b"after the restart"
        assert server.grpc_server_pid() == new
    finally:
        os.close(held)
    kubelet.unpublish(pod, "pv-data")  # the adopted mount is stopped by the new server
    kubelet.unpublish(other_pod, "pv-data")
    assert not mounted(target) and not mounted(other)
    wait(lambda: not alive(mounter), "the adopted mount process ends and is reaped")


def test_a_killed_mount_process_is_enotconn_to_readers_and_repaired_by_republish(server, s3, bucket, attributes):
    data = os.urandom(MiB)
    s3.put_object(Bucket=bucket, Key="input.bin", Body=data)
    kubelet = Kubelet(server)
    pod = kubelet.new_pod()
    target = kubelet.publish(pod, "pv-data", attributes)
    writer_target = kubelet.publish(pod, "pv-writes", attributes)
    killed = mount_process(target)
    assert killed is not None
    reader = os.open(target / "input.bin", os.O_RDONLY)
    writer = os.open(writer_target / "unfinished.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.pread(reader, 4096, 0) == data[:4096]
        os.write(writer, os.urandom(9 * MiB))  # past one part (8 MiB): a multipart upload is open
        assert [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == ["unfinished.bin"]

        writer_mounter = mount_process(writer_target)
        os.kill(killed, signal.SIGKILL)
        os.kill(writer_mounter, signal.SIGKILL)
        wait(lambda: not alive(killed) and not alive(writer_mounter), "the mount processes die")
        # Every request to the dead mount: ENOTCONN, through the open file too.
        assert errno_of(lambda: os.pread(reader, 4096, MiB // 2)) == errno.ENOTCONN
        assert errno_of(lambda: os.listdir(target)) == errno.ENOTCONN
        # Only what the kernel still has cached answers, until the metadata TTL (1 s) ends.
        wait(lambda: errno_of(lambda: os.stat(target)) == errno.ENOTCONN, "stat of the dead mount: ENOTCONN")
        # ENOTCONN, or ECONNABORTED when the kernel still had a request of this writer queued
        # as the connection went down (seen once in a full run).
        assert errno_of(lambda: os.write(writer, b"more")) in (errno.ENOTCONN, errno.ECONNABORTED)
        assert mounted(target) and mounted(writer_target), "a dead mount stays until the server repairs it"

        started = time.monotonic()
        kubelet.publish(pod, "pv-data", attributes)  # kubelet's periodic republish
        print(f"\nrepublish of a killed mount (unmount, new mount process): {time.monotonic() - started:.2f} s")
        repaired = mount_process(target)
        assert repaired not in (None, killed) and server.record(target)["pid"] == repaired
        assert fuse_mounts_at(target) == 1, "the dead mount was replaced, not stacked"
        assert (target / "input.bin").read_bytes() == data, "a new open reads"
        # A descriptor opened on the dead mount belongs to it for good: ENOTCONN, or the
        # page the kernel still caches of it (read before the kill), never the new mount.
        try:
            cached = os.pread(reader, 4096, 0)
        except OSError as exc:
            assert exc.errno == errno.ENOTCONN
        else:
            assert cached == data[:4096]
        assert [e["target"] for e in server.events("repairing a dead mount")] == [str(target)]
    finally:
        assert errno_of(lambda: os.close(reader)) in (None, errno.ENOTCONN)
        assert errno_of(lambda: os.close(writer)) == errno.ENOTCONN
    # The killed writer's data is lost: no object, and its multipart upload stays behind,
    # for a lifecycle rule (AbortIncompleteMultipartUpload) to remove.
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="unfinished")
    assert [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == ["unfinished.bin"]
    kubelet.unpublish(pod, "pv-data")
    kubelet.unpublish(pod, "pv-writes")  # a dead mount: unmounted and forgotten
    assert not mounted(target) and not mounted(writer_target)
    assert not list(server.state_dir.glob("mounts/*.json"))
