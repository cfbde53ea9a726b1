"""--credentials-file: a mount's credentials from a 0600 file, refreshed when the file is
replaced, never falling back to the environment's."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.support.mounts import MountFailed, PailMount
from tests.support.proxy import S3Proxy

NO_KEYS_ENV = {"AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1,localhost"}


def write_credentials(path, **source) -> None:
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(source, f)
    os.replace(temporary, path)  # as the node server does: a reader sees old or new


def static(server, secret=None):
    return {"source": "static", "access_key_id": server.access_key,
            "secret_access_key": secret or server.secret_key}


def access_keys(proxy: S3Proxy) -> list[str]:
    """The access key id of every signed request, in order."""
    keys = []
    for record in proxy.records():
        authorization = record.request_headers.get("Authorization", "") if "Authorization" in record.request_headers else ""
        if "Credential=" in authorization:
            keys.append(authorization.split("Credential=")[1].split("/")[0])
    return keys


@pytest.mark.s3_servers("seaweedfs")  # SeaweedFS checks signatures
def test_static_keys_from_the_file_and_a_replaced_file_takes_over(s3_server, bucket, s3, tmp_path):
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"one")
    s3.put_object(Bucket=bucket, Key="b.txt", Body=b"two")
    credentials = tmp_path / "credentials.json"
    write_credentials(credentials, **static(s3_server))
    mount = PailMount(bucket=bucket, path=tmp_path / "mnt", endpoint=s3_server.endpoint, env=NO_KEYS_ENV,
                      args=["--credentials-file", str(credentials), "--metadata-ttl", "0"])
    mount.start()
    try:
        assert (mount.path / "a.txt").read_bytes() == b"one"
        write_credentials(credentials, **static(s3_server, secret="wrong-secret"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the file is looked at again within a second
            try:
                (mount.path / "b.txt").read_bytes()
            except OSError as exc:
                assert exc.errno == 5  # EIO: the server refused the new keys
                break
            time.sleep(0.2)
        else:
            pytest.fail("the replaced credentials file was never used")
        write_credentials(credentials, **static(s3_server))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                assert (mount.path / "b.txt").read_bytes() == b"two"
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("the mount did not recover with good credentials")
        assert mount.alive, "one mount all along"
    finally:
        mount.stop()


@pytest.mark.s3_servers("seaweedfs")
def test_refused_keys_fail_the_mount_without_falling_back_to_the_environment(s3_server, bucket, tmp_path):
    credentials = tmp_path / "credentials.json"
    write_credentials(credentials, **static(s3_server, secret="wrong-secret"))
    # The environment has good keys: they must not be used instead.
    mount = PailMount(bucket=bucket, path=tmp_path / "mnt", endpoint=s3_server.endpoint, env=s3_server.env(),
                      args=["--credentials-file", str(credentials)])
    with pytest.raises(MountFailed) as failure:
        mount.start()
    assert "error access_denied" in str(failure.value)
    assert "wrong-secret" not in str(failure.value) + mount.stderr()


@pytest.mark.s3_servers("moto")  # moto implements STS AssumeRoleWithWebIdentity
def test_web_identity_token_is_exchanged_at_sts_and_a_new_token_gives_new_keys(s3_server, bucket, s3, tmp_path):
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"one")
    s3.put_object(Bucket=bucket, Key="b.txt", Body=b"two")
    credentials = tmp_path / "credentials.json"
    source = {"source": "web_identity", "role_arn": "arn:aws:iam::123456789012:role/pail-test",
              "web_identity_token": "token-1", "sts_endpoint": s3_server.endpoint, "sts_region": "us-east-1"}
    write_credentials(credentials, **source)
    with S3Proxy(s3_server.endpoint) as proxy:
        mount = PailMount(bucket=bucket, path=tmp_path / "mnt", endpoint=proxy.endpoint, env=NO_KEYS_ENV,
                          args=["--credentials-file", str(credentials), "--metadata-ttl", "0"])
        mount.start()
        try:
            assert (mount.path / "a.txt").read_bytes() == b"one"
            first = set(access_keys(proxy))
            assert len(first) == 1 and next(iter(first)) != s3_server.access_key, "STS's keys, not the server's"
            write_credentials(credentials, **{**source, "web_identity_token": "token-2"})
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and set(access_keys(proxy)) == first:
                (mount.path / "b.txt").read_bytes()
                time.sleep(0.2)
            assert access_keys(proxy)[-1] not in first, "a new token brought new keys, without a remount"
            assert mount.alive
        finally:
            mount.stop()
