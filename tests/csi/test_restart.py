"""Restarts, as a node sees them.

The node plugin container is PID 1 of its own PID namespace (``pail csi node``, the
supervisor) and has its own mount namespace, with kubelet's directory shared with the
host (Bidirectional propagation); a pod's container is a mount namespace of its own holding
a bind of the volume's target path, taken when the container started
(tests.support.namespaces).

1. The gRPC server crashes: the supervisor starts it again, the new server adopts the live
   mount, and the pod notices nothing.
2. The whole node container dies (SIGKILL to its PID 1: the kernel kills every process in
   the namespace, mount processes included): the pod's volume answers ENOTCONN. A new node
   container cleans up the dead mount; kubelet's republish mounts the target again, which
   a container started after it sees, while the running container keeps its bind of the
   dead mount (ENOTCONN) because pod volume mounts do not propagate.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.support.kubelet import Kubelet, NodeServer, mounted
from tests.support.namespaces import (PodContainer, SharedDirectory, alive, children, cmdline, fuse_mounts_at,
                                      mount_process, namespace_pid, node_container_prefix)
from tests.support.processes import errno_of, wait_until

pytestmark = pytest.mark.s3_servers("seaweedfs")

WAIT = 60.0  # bound of every wait; nothing here asserts how long anything took
wait = functools.partial(wait_until, timeout=WAIT)


class NodeContainer:
    """A node plugin container: ``pail csi node`` as PID 1 of a PID namespace."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.server = NodeServer(root=root, env=env, command_prefix=node_container_prefix(root / "kubelet"))

    def start(self) -> NodeContainer:
        self.server.start()
        return self

    @property
    def pid1(self) -> int:
        """The supervisor's pid (on the host): unshare's only child."""
        found = children(self.server.process.pid)
        assert len(found) == 1, found
        return found[0]

    def server_pid(self) -> int | None:
        """The gRPC server's pid (on the host): the supervisor's child running it."""
        return next((pid for pid in children(self.pid1)
                     if b"--no-supervisor" in cmdline(pid) and alive(pid)), None)

    def ready(self) -> bool:
        return self.server.answers_probe()

    def wait_restarted(self, crashed: int) -> None:
        """Until a new server process answers Probe."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.server.process.poll() is not None:
                pytest.fail(f"the node container ended: {self.server.log()[-3000:]}")
            pid = self.server_pid()
            if pid not in (None, crashed) and self.ready():
                return
            time.sleep(0.02)
        pytest.fail(f"the server was not restarted within {WAIT} s: {self.server.log()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL to PID 1: the kernel kills everything in the PID namespace."""
        os.kill(self.pid1, signal.SIGKILL)
        self.server.process.wait(timeout=WAIT)

    def kill_all(self) -> None:
        process = self.server.process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # unshare, PID 1 and the server
            process.wait(timeout=WAIT)

    def events(self, name: str) -> list[dict]:
        return self.server.events(name)


class Node:
    """kubelet's directory shared with the host, node containers over one state
    directory, and pods; everything stopped, unmounted and unshared at the end."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.kubelet_dir = SharedDirectory(root / "node" / "kubelet")
        self.containers: list[NodeContainer] = []
        self.pods: list[PodContainer] = []

    def start_container(self) -> NodeContainer:
        container = NodeContainer(self.root / "node", self.env)
        self.containers.append(container)
        return container.start()

    def pod(self, target: Path, name: str, propagation: str = "private") -> PodContainer:
        pod = PodContainer(target, self.root / "pods" / f"{name}-{len(self.pods)}", propagation)
        self.pods.append(pod)
        return pod

    def close(self) -> None:
        """Pods first, then node containers (their namespaces end, and with them every
        mount process), then whatever is still mounted under kubelet's directory, dead
        mounts included, and the shared bind itself."""
        errors = []
        for stop in [pod.stop for pod in self.pods] + [c.kill_all for c in self.containers]:
            try:
                stop()
            except Exception as exc:  # clean up the rest regardless
                errors.append(exc)
        self.kubelet_dir.remove()
        for container in self.containers:
            container.server.stop()  # nothing left to stop or unmount: it checks
        if errors:
            raise errors[0]


@pytest.fixture
def node(s3_server, tmp_path):
    node = Node(tmp_path, s3_server.env())
    try:
        yield node
    finally:
        node.close()


def _object(s3, bucket: str, key: str) -> bytes | None:
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None


def _seconds(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def test_the_grpc_server_crashes_and_comes_back_without_any_mount_noticing(node, s3, bucket, attributes):
    s3.put_object(Bucket=bucket, Key="input.txt", Body=b"before the crash")
    container = node.start_container()
    kubelet = Kubelet(container.server)
    pod = kubelet.new_pod()
    target = kubelet.publish(pod, "pv-data", attributes)
    app = node.pod(target, "app")
    assert app.read("input.txt") == b"before the crash"
    mounter = mount_process(target)
    recorded = container.server.record(target)["pid"]
    assert mounter is not None and namespace_pid(mounter) == recorded

    reader = app.keep_reading("input.txt")  # the pod uses its volume all along
    crashed = container.server_pid()
    assert crashed is not None
    killed = time.time()
    os.kill(crashed, signal.SIGKILL)
    container.wait_restarted(crashed)
    answered = time.time()
    reads, errors = reader.finish()
    assert errors == [] and reads > 0, "the pod noticed the crash"

    adopted = container.events("mounts adopted")
    assert [(e["kept"], e["cleaned"]) for e in adopted] == [(0, 0), (1, 0)], "the restarted server kept the mount"
    exited = container.events("server exited; restarting")[-1]
    serving = container.events("serving")[-1]
    print(f"\nrestart: kill → supervisor saw the exit {_seconds(exited) - killed:.2f} s "
          f"(waits {exited['delay']} s) → mounts adopted {_seconds(adopted[-1]) - killed:.2f} s → "
          f"serving {_seconds(serving) - killed:.2f} s → Probe ready {answered - killed:.2f} s")

    # The same mount process serves the pod, which reads and writes as before.
    assert mount_process(target) == mounter and container.server.record(target)["pid"] == recorded
    assert app.read("input.txt") == b"before the crash"
    app.write("after-the-crash.txt", b"written by the pod")
    # The pod's processes are not in the mount process's PID namespace: the upload
    # completes at release, just after close() returned.
    assert wait(lambda: _object(s3, bucket, "after-the-crash.txt"), "the pod's file in S3") == b"written by the pod"

    kubelet = Kubelet(container.server)  # a new connection, as kubelet's is after a restart
    kubelet.publish(pod, "pv-data", attributes)  # the periodic republish: nothing to do
    assert fuse_mounts_at(target) == 1 and mount_process(target) == mounter
    assert app.read("after-the-crash.txt") == b"written by the pod"

    app.stop()  # kubelet unpublishes once the pod's containers are gone
    kubelet.unpublish(pod, "pv-data")
    assert not mounted(target) and not target.exists()
    wait(lambda: not Path(f"/proc/{mounter}").exists(), "the mount process ends and the supervisor reaps it")
    assert container.server.record(target) is None


def test_a_container_restart_leaves_running_pods_a_dead_volume(node, s3, bucket, attributes):
    s3.put_object(Bucket=bucket, Key="input.txt", Body=b"kept in S3")
    container = node.start_container()
    kubelet = Kubelet(container.server)
    app_pod, deleted_pod = kubelet.new_pod("app"), kubelet.new_pod("deleted")
    target = kubelet.publish(app_pod, "pv-data", attributes)
    other = kubelet.publish(deleted_pod, "pv-data", attributes)
    app = node.pod(target, "app")
    watching = node.pod(target, "app-host-to-container", propagation="slave")  # mountPropagation: HostToContainer
    deleted = node.pod(other, "deleted")
    assert app.read("input.txt") == b"kept in S3" and deleted.read("input.txt") == b"kept in S3"
    mounters = [mount_process(target), mount_process(other)]
    assert None not in mounters

    container.kill()  # the node container restarts (crash, OOM kill, DaemonSet upgrade)
    wait(lambda: not any(alive(pid) for pid in mounters), "the mount processes die with the namespace")
    assert wait(lambda: errno_of(lambda: app.read("input.txt")), "the pod sees an error") == errno.ENOTCONN
    # On the host the target is still mounted, dead, and its record is still there.
    assert mounted(target) and errno_of(lambda: os.listdir(target)) == errno.ENOTCONN
    assert container.server.record(target) is not None

    started = time.time()
    container = node.start_container()  # a new node container, the same state directory
    answered = time.time()
    adopted = container.events("mounts adopted")[-1]
    assert (adopted["kept"], adopted["cleaned"]) == (0, 2)
    print(f"\ncontainer restart: start → dead mounts cleaned up {_seconds(adopted) - started:.2f} s → "
          f"Probe ready {answered - started:.2f} s")
    for path in (target, other):  # unmounted in the node container; propagated to the host
        assert not mounted(path) and not path.exists()
        assert container.server.record(path) is None

    kubelet = Kubelet(container.server)
    deleted.stop()
    kubelet.unpublish(deleted_pod, "pv-data")  # a pod deleted meanwhile: its broken target is gone
    assert not mounted(other) and not other.exists()

    kubelet.publish(app_pod, "pv-data", attributes)  # the periodic republish mounts it again
    assert fuse_mounts_at(target) == 1 and (target / "input.txt").read_bytes() == b"kept in S3"
    restarted = node.pod(target, "app")  # a container started now binds the new mount
    assert restarted.read("input.txt") == b"kept in S3"
    # The running container's volume is its bind of the dead mount, whatever is mounted at
    # the target now: mount propagation does not replace it.
    assert errno_of(lambda: app.read("input.txt")) == errno.ENOTCONN
    # HostToContainer does not help either: the dead mount was unmounted before the new one
    # was mounted, so the new mount propagates to the target path's copies, not onto the
    # container's bind of the old one. (Mounted on top of the dead mount instead, it would
    # reach that bind: docs/ARCHITECTURE.md.)
    assert errno_of(lambda: watching.read("input.txt")) == errno.ENOTCONN

    watching.stop()
    app.stop()
    restarted.stop()
    kubelet.unpublish(app_pod, "pv-data")
    assert not mounted(target) and not target.exists()
