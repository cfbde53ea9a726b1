"""Mount processes forked by the node server's launcher (driver.csi.launcher): they look
and behave like mount processes started afresh, and publishing does not depend on it."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest

import driver.csi.launcher as launcher_module
from driver.csi.launcher import ROOM, Launcher
from tests.support.kubelet import Kubelet, NodeServer, mounted
from tests.support.namespaces import alive, cmdline
from tests.support.processes import wait_until

WAIT = 30.0


def _wait(condition, what: str):
    return wait_until(condition, what, WAIT)


def launcher_of(server: NodeServer) -> int | None:
    server_pid = server.grpc_server_pid()
    if server_pid is None:
        return None
    # Not /proc/PID/task/PID/children: that lists the main thread's, and a launcher started
    # again is a gRPC worker thread's child.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            if parent(pid) == server_pid and b"driver.csi.launcher" in cmdline(pid) and alive(pid):
                return pid
    return None


def parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def mount_pid(server: NodeServer, target: Path) -> int:
    record = server.record(target)
    assert record is not None, f"no record of {target}"
    return record["pid"]


def test_a_forked_mount_process_shows_its_own_command_line_and_environment(s3, bucket, kubelet, attributes):
    s3.put_object(Bucket=bucket, Key="hello.txt", Body=b"hello")
    launcher = _wait(lambda: launcher_of(kubelet.server), "the node server starts a launcher")
    pod = kubelet.new_pod()
    target = kubelet.publish(pod, "pv-forked", attributes)
    pid = mount_pid(kubelet.server, target)
    assert parent(pid) == launcher, "forked by the launcher"
    assert (target / "hello.txt").read_bytes() == b"hello"

    args = [arg for arg in cmdline(pid) if arg]
    assert args[1:6] == [b"-m", b"driver", b"mount", bucket.encode(), str(target).encode()]
    assert args[-4:] == [b"--log-format", b"json", b"--ready-fd", b"3"]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"PAIL_VOLUME_ID=pv-forked" in environ
    assert not [entry for entry in environ if entry.startswith(b"PAIL_LAUNCHER_ROOM=")]
    # The launcher's own command line without the room it keeps for its children's.
    assert [arg for arg in cmdline(launcher) if arg][1:] == [b"-m", b"driver.csi.launcher"]

    kubelet.unpublish(pod, "pv-forked")
    assert not mounted(target)
    _wait(lambda: not alive(pid), "the mount process ends")
    assert alive(launcher), "the launcher stays for the next publish"


def test_publish_starts_the_mount_afresh_while_no_launcher_answers(s3, bucket, kubelet, attributes):
    s3.put_object(Bucket=bucket, Key="data.txt", Body=b"data")
    launcher = _wait(lambda: launcher_of(kubelet.server), "the node server starts a launcher")
    first = kubelet.publish(kubelet.new_pod("first"), "pv-first", attributes)
    assert parent(mount_pid(kubelet.server, first)) == launcher

    os.kill(launcher, signal.SIGKILL)
    _wait(lambda: not alive(launcher), "the launcher is gone")
    assert (first / "data.txt").read_bytes() == b"data", "its mounts keep serving"

    second = kubelet.publish(kubelet.new_pod("second"), "pv-second", attributes)
    assert parent(mount_pid(kubelet.server, second)) == kubelet.server.grpc_server_pid(), "started afresh"
    assert (second / "data.txt").read_bytes() == b"data"

    # That publish started another launcher, for the publishes after it.
    again = _wait(lambda: launcher_of(kubelet.server), "a new launcher")
    assert again != launcher
    third = kubelet.publish(kubelet.new_pod("third"), "pv-third", attributes)
    assert parent(mount_pid(kubelet.server, third)) == again
    assert (third / "data.txt").read_bytes() == b"data"


def test_the_launcher_ends_with_the_node_server_and_its_mounts_do_not(s3_server, bucket, attributes, tmp_path):
    server = NodeServer(root=tmp_path / "node", env=s3_server.env()).start()
    try:
        kubelet = Kubelet(server)
        launcher = _wait(lambda: launcher_of(server), "the node server starts a launcher")
        pod = kubelet.new_pod()
        target = kubelet.publish(pod, "pv-outlives", attributes)
        pid = mount_pid(server, target)
        os.kill(server.grpc_server_pid(), signal.SIGKILL)  # the supervisor starts another
        _wait(lambda: not alive(launcher), "the launcher ends with its server")
        assert alive(pid) and mounted(target), "the mount outlives both"
        os.listdir(target)
        # The new server starts its launcher before it listens: wait until it answers too.
        _wait(lambda: launcher_of(server) not in (None, launcher) and server.answers_probe(),
              "a new server, answering, with a new launcher")
        kubelet = Kubelet(server)  # a new connection, as kubelet's after a restart
        kubelet.unpublish(pod, "pv-outlives")  # the new server adopted the mount
        assert not mounted(target)
        _wait(lambda: not alive(pid), "the mount process ends")
    finally:
        server.stop()


def test_a_launcher_that_takes_a_request_and_never_answers_fails_that_publish_only(s3, bucket, kubelet,
                                                                                  attributes):
    s3.put_object(Bucket=bucket, Key="data.txt", Body=b"data")
    launcher = _wait(lambda: launcher_of(kubelet.server), "the node server starts a launcher")
    first = kubelet.publish(kubelet.new_pod("first"), "pv-first", attributes)
    assert parent(mount_pid(kubelet.server, first)) == launcher
    os.kill(launcher, signal.SIGSTOP)  # it takes the next request and does nothing with it
    pod = kubelet.new_pod("stalled")
    with pytest.raises(grpc.RpcError) as error:
        kubelet.publish(pod, "pv-stalled", attributes)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "the mount launcher did not answer" in error.value.details()
    target = kubelet.target(pod, "pv-stalled")
    assert not mounted(target) and not target.exists() and kubelet.server.record(target) is None
    assert not alive(launcher), "the stalled launcher is stopped for good"
    assert (first / "data.txt").read_bytes() == b"data", "mounts it forked before keep serving"

    # kubelet tries again: one mount, started afresh.
    target = kubelet.publish(pod, "pv-stalled", attributes)
    assert (target / "data.txt").read_bytes() == b"data"
    assert parent(mount_pid(kubelet.server, target)) == kubelet.server.grpc_server_pid()


# -- the node server's end (driver.csi.launcher.Launcher), with a real launcher process ------


def _launch(launcher: Launcher, *args: str, env: dict | None = None) -> int | None:
    """What the node server asks for a mount process, here one that prints the version."""
    read_end, write_end = os.pipe()
    try:
        return launcher.launch([sys.executable, "-m", "driver", "--version", *args],
                               env if env is not None else dict(os.environ), write_end)
    finally:
        os.close(read_end)
        os.close(write_end)


def launchers_of_this_process() -> set[int]:
    return {int(entry.name) for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and parent(int(entry.name)) == os.getpid()
            and b"driver.csi.launcher" in cmdline(int(entry.name)) and alive(int(entry.name))}


class WatchedLauncher(Launcher):
    """A launcher whose processes a test can tell from any other this test process started
    before (a MountManager's in an earlier test, on its way out)."""

    def __init__(self) -> None:
        super().__init__(dict(os.environ))
        self.others = launchers_of_this_process()

    def processes(self) -> set[int]:
        return launchers_of_this_process() - self.others


@pytest.fixture
def launcher():
    launcher = WatchedLauncher()
    yield launcher
    launcher.close()


def test_a_mount_whose_command_line_or_environment_does_not_fit_is_started_afresh(launcher):
    launcher.start()
    assert _launch(launcher) is not None, "a short command line is forked"
    [process] = launcher.processes()
    # The launcher keeps about 8 KiB of room in each (ROOM): more would not show in /proc as the mount's own.
    assert _launch(launcher, "x" * 2 * ROOM) is None
    assert _launch(launcher, env={**os.environ, "PAIL_TEST_LONG": "x" * 2 * ROOM}) is None
    assert launcher.processes() == {process}, "the launcher stays"
    assert _launch(launcher, "x" * 100) is not None, "and forks the next that fits"


def test_a_launcher_that_never_gets_ready_is_given_up_and_not_started_again_for_a_while(launcher, monkeypatch):
    monkeypatch.setattr(launcher_module, "HELLO_TIMEOUT", 1.0)
    monkeypatch.setattr(launcher_module, "RETRY_AFTER", 4.0)
    launcher.start()
    # Until it has exec'd, the launcher's command line is still this process's.
    _wait(lambda: launcher.processes(), "the launcher started")
    [process] = launcher.processes()
    os.kill(process, signal.SIGSTOP)  # still importing: a launcher stuck before it answers
    assert _launch(launcher) is None, "the publish starts its mount afresh"
    _wait(lambda: not alive(process), "the stuck launcher is stopped")
    # Another started at once would likely get stuck too: publishes start mounts afresh.
    assert _launch(launcher) is None
    assert launcher.processes() == set()
    time.sleep(4.0)
    assert _launch(launcher) is None, "this publish starts one, and does not wait for it"
    _wait(lambda: launcher.processes(), "a launcher started again")
    assert len(launcher.processes()) == 1
    monkeypatch.setattr(launcher_module, "HELLO_TIMEOUT", 30.0)  # its imports get their usual time
    assert _launch(launcher) is not None, "the next is forked by it"
