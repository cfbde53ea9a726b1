"""`pail mount` and `pail unmount` as a user runs them: errors are one clear line, and a
failed mount leaves nothing behind."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.mounts import is_mounted, pail_cli, start_pail_cli
from tests.support.processes import wait_until
from tests.support.s3server import free_port


def mount_processes(path: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mount" in cmdline and str(path).encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def wait_gone(path: Path, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not mount_processes(path):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def mountpoint(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
    for pid in mount_processes(path):
        os.kill(pid, 9)


def assert_nothing_left(path: Path):
    assert not is_mounted(path)
    assert wait_gone(path), "no mount process may stay behind"


def test_background_mount_returns_live_and_unmount_ends_it(s3_server, s3, bucket, mountpoint):
    s3.put_object(Bucket=bucket, Key="hello.txt", Body=b"hi\n")
    result = pail_cli("mount", bucket, str(mountpoint), "--endpoint-url", s3_server.endpoint,
                      env=s3_server.env())
    assert result.returncode == 0, result.stderr
    # Returned only once live: the file is there at once, no waiting.
    assert (mountpoint / "hello.txt").read_bytes() == b"hi\n"
    pids = mount_processes(mountpoint)
    assert len(pids) == 1
    assert os.getsid(pids[0]) == pids[0], "the mount leads its own session: a closed terminal does not end it"
    cmdline = Path(f"/proc/{pids[0]}/cmdline").read_bytes()
    assert s3_server.secret_key.encode() not in cmdline
    assert s3_server.access_key.encode() not in cmdline

    result = pail_cli("unmount", str(mountpoint), env={})
    assert result.returncode == 0, result.stderr
    assert_nothing_left(mountpoint)
    assert os.listdir(mountpoint) == []


def test_missing_bucket_is_one_line_and_nothing_mounted(s3_server, mountpoint):
    result = pail_cli("mount", "no-such-bucket-here", str(mountpoint), "--endpoint-url",
                      s3_server.endpoint, env=s3_server.env())
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "bucket 'no-such-bucket-here' does not exist" in result.stderr
    assert_nothing_left(mountpoint)


@pytest.mark.s3_servers("seaweedfs")  # moto accepts any credentials
def test_refused_credentials(s3_server, bucket, mountpoint):
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    result = pail_cli("mount", bucket, str(mountpoint), "--endpoint-url", s3_server.endpoint, env=env)
    assert result.returncode == 1
    assert "was refused (403" in result.stderr
    assert "check the credentials" in result.stderr
    assert "not-the-secret" not in result.stderr
    assert_nothing_left(mountpoint)


@pytest.mark.s3_servers("seaweedfs")
def test_unsigned_requests_are_refused_by_a_private_bucket(s3_server, bucket, mountpoint):
    result = pail_cli("mount", bucket, str(mountpoint), "--endpoint-url", s3_server.endpoint,
                      "--no-sign-request", env={})
    assert result.returncode == 1
    assert "was refused" in result.stderr
    assert_nothing_left(mountpoint)


@pytest.mark.s3_servers("moto")  # moto serves unsigned requests, as a public bucket does
def test_public_bucket_with_no_sign_request(s3_server, s3, bucket, mountpoint):
    s3.put_object(Bucket=bucket, Key="open-data.csv", Body=b"a,b\n", ACL="public-read")
    result = pail_cli("mount", bucket, str(mountpoint), "--endpoint-url", s3_server.endpoint,
                      "--no-sign-request", "--region", "us-east-1", env={"AWS_EC2_METADATA_DISABLED": "true"})
    assert result.returncode == 0, result.stderr
    try:
        assert (mountpoint / "open-data.csv").read_bytes() == b"a,b\n"
    finally:
        pail_cli("unmount", str(mountpoint), env={})
    assert_nothing_left(mountpoint)


@pytest.mark.s3_servers("moto")
@pytest.mark.parametrize("setting, named", [
    ("AWS_CONFIG_FILE", "Unable to parse config file"),
    ("AWS_PROFILE", "The config profile (no-such) could not be found"),
])
def test_a_broken_aws_configuration_is_one_line(s3_server, bucket, mountpoint, tmp_path, setting, named):
    config = tmp_path / "config"
    config.write_text("[profile half\nregion = \n")
    value = str(config) if setting == "AWS_CONFIG_FILE" else "no-such"
    result = pail_cli("mount", bucket, str(mountpoint), "--endpoint-url", s3_server.endpoint,
                      env={**s3_server.env(), setting: value})
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert f"AWS configuration: {named}" in result.stderr
    assert_nothing_left(mountpoint)


@pytest.mark.s3_servers("moto")
def test_a_broken_aws_configuration_is_one_line_with_a_credentials_file_too(s3_server, bucket, mountpoint,
                                                                              tmp_path):
    # The file gives the keys; the configuration still gives everything else (retries,
    # addressing), so a broken one is not skipped.
    config = tmp_path / "config"
    config.write_text("[profile half\nregion = \n")
    credentials = tmp_path / "credentials.json"
    credentials.write_text(json.dumps({"source": "static", "access_key_id": s3_server.access_key,
                                       "secret_access_key": s3_server.secret_key}))
    credentials.chmod(0o600)
    result = pail_cli("mount", bucket, str(mountpoint), "--endpoint-url", s3_server.endpoint,
                      "--credentials-file", str(credentials),
                      env={"AWS_CONFIG_FILE": str(config), "AWS_EC2_METADATA_DISABLED": "true"})
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "AWS configuration: Unable to parse config file" in result.stderr
    assert_nothing_left(mountpoint)


@pytest.mark.s3_servers("moto")
def test_endpoint_that_does_not_answer(s3_server, mountpoint):
    closed = f"http://127.0.0.1:{free_port()}"
    result = pail_cli("mount", "some-bucket", str(mountpoint), "--endpoint-url", closed,
                      "--region", "us-east-1", env=s3_server.env())
    assert result.returncode == 1
    assert f"cannot reach {closed}" in result.stderr
    assert_nothing_left(mountpoint)


@pytest.mark.s3_servers("moto")
def test_a_mount_process_that_dies_before_answering_is_one_line(s3_server, mountpoint):
    silent = socket.socket()  # accepts connections (the kernel does), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    command = start_pail_cli("mount", "some-bucket", str(mountpoint), "--region", "us-east-1",
                             "--endpoint-url", f"http://127.0.0.1:{silent.getsockname()[1]}",
                             env=s3_server.env())
    try:
        deadline = time.monotonic() + 30
        while not (forked := [p for p in mount_processes(mountpoint) if p != command.pid]):
            assert time.monotonic() < deadline, "no mount process was forked"
            time.sleep(0.05)
        os.kill(forked[0], 9)  # waiting on the silent endpoint, before a word to the command
        _, stderr = command.communicate(timeout=30)
    finally:
        command.kill()
        silent.close()
    assert command.returncode == 1
    assert stderr.strip() == "pail mount: the mount process exited with status -9"
    assert_nothing_left(mountpoint)


@pytest.mark.s3_servers("moto")
def test_a_mount_process_that_never_answers_is_stopped(s3_server, mountpoint):
    """`pail mount` waits READY_TIMEOUT (60 s) for its mount process; here the same
    command with 3 s, against an endpoint whose HeadBucket never returns."""
    silent = socket.socket()  # accepts connections (the kernel does), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        result = pail_cli("mount", "some-bucket", str(mountpoint), "--region", "us-east-1", "--endpoint-url",
                          f"http://127.0.0.1:{silent.getsockname()[1]}", env=s3_server.env(), timeout=60,
                          after="cli.READY_TIMEOUT = 3.0")
    finally:
        silent.close()
    assert result.returncode == 1
    assert result.stderr.strip() == "pail mount: the mount did not answer within 3 s"
    assert_nothing_left(mountpoint)


# The mount process mounts, serves, and never says it is live.
NEVER_READY = """
import driver.fuse.session, trio
async def never(*args):
    await trio.sleep_forever()
driver.fuse.session._report_ready = never
"""


@pytest.mark.s3_servers("moto")
def test_a_mount_that_never_says_it_is_live_is_taken_down(s3_server, bucket, mountpoint):
    result = pail_cli("mount", bucket, str(mountpoint), "--endpoint-url", s3_server.endpoint, env=s3_server.env(),
                      timeout=60, after=NEVER_READY + "cli.READY_TIMEOUT = 3.0")
    assert result.returncode == 1
    assert result.stderr.strip() == "pail mount: the mount did not answer within 3 s"
    assert_nothing_left(mountpoint)  # no mount left whose process is gone
    assert os.listdir(mountpoint) == []


@pytest.mark.s3_servers("moto")
def test_a_mount_process_killed_after_mounting_leaves_no_dead_mount(s3_server, bucket, mountpoint):
    command = start_pail_cli("mount", bucket, str(mountpoint), "--endpoint-url", s3_server.endpoint,
                             env=s3_server.env(), after=NEVER_READY)
    try:
        wait_until(lambda: is_mounted(mountpoint) or command.poll() is not None, "the mount", timeout=30)
        assert command.poll() is None, "the command ended before its process had mounted"
        [forked] = [p for p in mount_processes(mountpoint) if p != command.pid]
        os.kill(forked, 9)
        _, stderr = command.communicate(timeout=30)
    finally:
        command.kill()
    assert command.returncode == 1
    assert stderr.strip() == "pail mount: the mount process exited with status -9"
    assert_nothing_left(mountpoint)
    assert os.listdir(mountpoint) == []


@pytest.mark.s3_servers("moto")
def test_bad_directories(s3_server, bucket, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = {tmp_path / "missing": "no such directory", full: "directory is not empty",
             a_file: "not a directory"}
    for path, message in cases.items():
        result = pail_cli("mount", bucket, str(path), "--endpoint-url", s3_server.endpoint,
                          env=s3_server.env())
        assert result.returncode == 1, path
        assert message in result.stderr
        assert not is_mounted(path)


@pytest.mark.s3_servers("moto")
def test_mounting_twice_on_one_directory_is_refused(s3_server, bucket, mountpoint, mount_bucket):
    first = mount_bucket(bucket)
    result = pail_cli("mount", bucket, str(first.path), "--endpoint-url", s3_server.endpoint,
                      env=s3_server.env())
    assert result.returncode == 1
    assert "already a mount point" in result.stderr


@pytest.mark.s3_servers("moto")
@pytest.mark.parametrize("options,named", [
    (["--file-mode", "0999"], "--file-mode"),
    (["--dir-mode", "rwx"], "--dir-mode"),
    (["--uid", "alice"], "--uid"),
    (["--gid", "-5"], "--gid"),
    (["--metadata-ttl", "forever"], "--metadata-ttl"),
    (["--max-memory", "lots"], "--max-memory"),
    (["--prefix", "/abs"], "--prefix"),
    (["--endpoint-url", "ftp://x"], "--endpoint-url"),
    (["--ca-bundle", "/nonexistent.pem"], "--ca-bundle"),
    (["--allow-other", "--allow-root"], "--allow-root"),
    (["--log-format", "xml"], "--log-format"),
    (["--write-part-size", "6GiB"], "--write-part-size"),
    (["--write-part-size", "big"], "--write-part-size"),
    (["--storage-class", "COLD"], "--storage-class"),
    (["--sse", "rot13"], "--sse"),
    (["--sse-kms-key-id", "k"], "--sse-kms-key-id"),
    (["--expected-bucket-owner", "alice"], "--expected-bucket-owner"),
    (["--upload-checksums", "md5"], "--upload-checksums"),
    (["--request-timeout", "0"], "--request-timeout"),
    (["--max-cache-size", "1GiB"], "--max-cache-size"),  # without --cache
    (["--cache", "/tmp/pail-test-cache", "--max-cache-size", "1MiB"], "--max-cache-size"),
    (["--cache", "/tmp/pail-test-cache", "--max-cache-size", "much"], "--max-cache-size"),
])
def test_bad_options_name_the_option(s3_server, bucket, mountpoint, options, named):
    args = ["mount", bucket, str(mountpoint)] + (
        [] if "--endpoint-url" in options else ["--endpoint-url", s3_server.endpoint]) + options
    result = pail_cli(*args, env=s3_server.env())
    assert result.returncode == 2
    assert named in result.stderr
    assert_nothing_left(mountpoint)


def test_an_unknown_data_path_is_refused_by_name(s3_server, bucket, mountpoint):
    env = {**s3_server.env(), "PAIL_DATA_PATH": "fastest"}
    result = pail_cli("mount", bucket, str(mountpoint), "--endpoint-url", s3_server.endpoint, env=env)
    assert result.returncode == 2
    assert "PAIL_DATA_PATH: expected one of direct, crt, boto3, not 'fastest'" in result.stderr
    assert_nothing_left(mountpoint)


@pytest.mark.s3_servers("moto")
def test_bad_bucket_name(s3_server, mountpoint):
    result = pail_cli("mount", "Not_A_Bucket!", str(mountpoint), "--endpoint-url", s3_server.endpoint,
                      env=s3_server.env())
    assert result.returncode == 2
    assert "BUCKET" in result.stderr


def test_unmount_of_a_directory_that_is_not_mounted(mountpoint):
    result = pail_cli("unmount", str(mountpoint), env={})
    assert result.returncode == 1
    assert "not mounted" in result.stderr


@pytest.mark.s3_servers("moto")  # moto answers HeadBucket with the bucket's region
def test_region_is_asked_of_the_bucket(s3_server, s3, mount_bucket):
    s3.create_bucket(Bucket="pail-in-ireland", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3.put_object(Bucket="pail-in-ireland", Key="f", Body=b"1")
    mount = mount_bucket("pail-in-ireland")
    assert (mount.path / "f").read_bytes() == b"1"
    starting = [e for e in mount.log() if e.get("event") == "starting"]
    assert starting and starting[0]["region"] == "eu-west-1"


def test_path_style_with_a_host_name(s3_server, s3, bucket, mountpoint):
    s3.put_object(Bucket=bucket, Key="f", Body=b"path style")
    endpoint = s3_server.endpoint.replace("127.0.0.1", "localhost")
    result = pail_cli("mount", bucket, str(mountpoint), "--endpoint-url", endpoint, "--force-path-style",
                      env=s3_server.env())
    assert result.returncode == 0, result.stderr
    try:
        assert (mountpoint / "f").read_bytes() == b"path style"
    finally:
        pail_cli("unmount", str(mountpoint), env={})
    assert_nothing_left(mountpoint)


@pytest.mark.s3_servers("moto")
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_foreground_mount_unmounts_on_signal(s3, bucket, mount_bucket, signal_name):
    import signal

    s3.put_object(Bucket=bucket, Key="f", Body=b"1")
    mount = mount_bucket(bucket)
    busy = os.open(mount.path / "f", os.O_RDONLY)  # an open file does not stop the unmount
    mount.process.send_signal(getattr(signal, signal_name))
    assert mount.process.wait(timeout=30) == 0
    assert not is_mounted(mount.path)
    with pytest.raises(OSError) as gone:
        os.read(busy, 1)
    assert gone.value.errno == errno.ENOTCONN, "the mount's server is gone"
    try:
        os.close(busy)
    except OSError:
        pass  # closing a descriptor of a detached FUSE mount reports ENOTCONN too
    assert [e["event"] for e in mount.log()][-1] == "unmounted"


@pytest.mark.s3_servers("moto")
def test_unmount_refuses_while_a_file_is_open(s3, bucket, mount_bucket):
    s3.put_object(Bucket=bucket, Key="f", Body=b"1")
    mount = mount_bucket(bucket)
    with open(mount.path / "f", "rb"):
        result = pail_cli("unmount", str(mount.path), env={})
        assert result.returncode == 1
        assert "busy" in result.stderr
        assert is_mounted(mount.path)
    result = pail_cli("unmount", str(mount.path), env={})
    assert result.returncode == 0, result.stderr
    assert mount.process.wait(timeout=30) == 0


def test_every_log_line_of_a_node_started_mount_names_its_volume(s3_server, s3, bucket, mountpoint, tmp_path):
    """The node server passes the CSI volume id in PAIL_VOLUME_ID (tests/csi checks that it
    does); every line the mount process logs then carries it, errors included."""
    s3.put_object(Bucket=bucket, Key="hello.txt", Body=b"hi\n")
    log_file = tmp_path / "mount.log"
    result = pail_cli("mount", bucket, str(mountpoint), "--endpoint-url", s3_server.endpoint,
                      "--log-format", "json", "--log-file", str(log_file),
                      env={**s3_server.env(), "PAIL_VOLUME_ID": "pv-42"})
    assert result.returncode == 0, result.stderr
    assert (mountpoint / "hello.txt").read_bytes() == b"hi\n"
    with pytest.raises(PermissionError):  # a refused write: logged as an error
        os.remove(mountpoint / "hello.txt")
    assert pail_cli("unmount", str(mountpoint), env={}).returncode == 0
    assert_nothing_left(mountpoint)
    events = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert {"starting", "mounted", "unmounted"} <= {e["event"] for e in events}
    assert [e for e in events if e.get("volume_id") != "pv-42"] == []
