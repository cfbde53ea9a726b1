"""Driver-level credentials: `pail mount` without --credentials-file uses the standard AWS
chain of its environment (IRSA web identity, EKS Pod Identity's container endpoint, static
keys), and one provider feeds every client: Pail's own sockets (small object reads),
awscrt (larger reads, HEAD, listing) and boto3 (uploads), so every request is signed
with the same keys.

The server is moto with IAM enforcement (INITIAL_NO_AUTH_ACTION_COUNT=0): a request counts
only if it is signed by keys moto issued, with a valid signature, and the signer's policy
allows the action on the resource. A recording proxy in front of it shows which access key
signed each request.
"""

from __future__ import annotations

import os
import uuid

import pytest

from tests.support.mounts import PailMount
from tests.support.pod_identity import (
    POD_IDENTITY_TRUST,
    IamMoto,
    IssuedKeys,
    PodIdentityAgent,
    StsFront,
    bucket_policy,
    start_iam_moto,
    web_identity_trust,
)
from tests.support.proxy import S3Proxy

BASE_ENV = {"AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost"}


@pytest.fixture(scope="module")
def iam(tmp_path_factory):
    server = start_iam_moto(tmp_path_factory.mktemp("iam-moto"))
    try:
        yield server
    finally:
        server.server.stop()


@pytest.fixture
def data(iam: IamMoto):
    """A fresh bucket with a file and a directory, and a role allowed to use it."""
    name = f"pail-chain-{uuid.uuid4().hex[:8]}"
    s3 = iam.client("s3")
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="hello.txt", Body=b"hello from S3\n")
    s3.put_object(Bucket=name, Key="dir/inner.txt", Body=b"inner")
    return name


@pytest.fixture
def proxy(iam: IamMoto):
    with S3Proxy(iam.endpoint) as p:
        yield p


@pytest.fixture
def mounts(tmp_path):
    started: list[PailMount] = []

    def mount(bucket: str, endpoint: str, env: dict[str, str]) -> PailMount:
        m = PailMount(bucket=bucket, path=tmp_path / f"mnt{len(started)}", endpoint=endpoint,
                      env={**BASE_ENV, **env}, args=["--metadata-ttl", "0"],
                      log_path=tmp_path / f"mnt{len(started)}.log")
        started.append(m)
        return m.start()

    yield mount
    for m in started:
        m.stop()


def signers(proxy: S3Proxy) -> dict[str, set[tuple[str, str | None]]]:
    """Per S3 operation: the (access key id, session token) pairs that signed it."""
    found: dict[str, set[tuple[str, str | None]]] = {}
    for record in proxy.records():
        headers = record.request_headers
        authorization = headers.get("Authorization", "")
        if "Credential=" not in authorization:
            found.setdefault(record.op, set()).add(("<unsigned>", None))
            continue
        key = authorization.split("Credential=")[1].split("/")[0]
        token = headers.get("X-Amz-Security-Token", None)
        found.setdefault(record.op, set()).add((key, token))
    return found


def exercise(mount: PailMount) -> None:
    """Listing, HEAD and a read (awscrt), a small upload (botocore)."""
    assert sorted(os.listdir(mount.path)) == ["dir", "hello.txt"]
    assert os.stat(mount.path / "dir" / "inner.txt").st_size == 5
    assert (mount.path / "hello.txt").read_bytes() == b"hello from S3\n"
    (mount.path / "written.txt").write_bytes(b"written through the mount")


def assert_one_signer(proxy: S3Proxy, keys: IssuedKeys) -> None:
    by_op = signers(proxy)
    assert {"GetObject", "ListObjectsV2", "PutObject"} <= set(by_op), by_op.keys()
    agents = {(r.op, r.request_headers.get("User-Agent", "").split("/")[0]) for r in proxy.records()}
    # Pail's own sockets (small ranged GETs), awscrt (listing) and botocore (uploads)
    assert {("GetObject", "pail"), ("ListObjectsV2", "CRTS3NativeClient"), ("PutObject", "Botocore")} <= agents, \
        f"every client was used: {agents}"
    expected = {(keys.access_key_id, keys.session_token)}
    for op, used in by_op.items():
        assert used == expected, f"{op} was signed by {used}, not by the chain's keys"
    failed = [(r.op, r.status) for r in proxy.records() if r.status not in (200, 204, 206, 404)]
    assert not failed, f"moto refused requests: {failed}"


def test_web_identity_from_the_environment_signs_both_data_paths_with_the_sts_keys(iam, data, proxy, mounts, tmp_path):
    role = iam.create_role(f"chain-wi-{data[-8:]}", bucket_policy(data), web_identity_trust("kube-system", "pail-node"))
    token_file = tmp_path / "token"
    token_file.write_text("eyJhbGciOiJSUzI1NiJ9.node-service-account.sig")
    with StsFront(iam) as sts:
        mount = mounts(data, proxy.endpoint, {
            "AWS_ROLE_ARN": role, "AWS_WEB_IDENTITY_TOKEN_FILE": str(token_file),
            "AWS_ENDPOINT_URL_STS": sts.endpoint})
        exercise(mount)
        assert sts.calls and {(r, t) for r, t, _ in sts.calls} == {(role, token_file.read_text())}
        assert len(set(sts.issued)) == 1, "one AssumeRoleWithWebIdentity for both data paths"
        keys = sts.issued[0]
    assert keys.access_key_id.startswith("ASIA") and keys.session_token
    assert_one_signer(proxy, keys)
    assert iam.client("s3").get_object(Bucket=data, Key="written.txt")["Body"].read() == b"written through the mount"


def test_container_credentials_from_the_environment_sign_both_data_paths(iam, data, proxy, mounts, tmp_path):
    """EKS Pod Identity for the node pod: AWS_CONTAINER_CREDENTIALS_FULL_URI at the agent,
    the token file's contents as the Authorization header."""
    role = iam.create_role(f"chain-pi-{data[-8:]}", bucket_policy(data), POD_IDENTITY_TRUST)
    token = "eyJhbGciOiJSUzI1NiJ9.pods-eks-audience.sig"
    token_file = tmp_path / "eks-pod-identity-token"
    token_file.write_text(token)
    with PodIdentityAgent(lambda _token: iam.role_keys(role), tokens={token}) as agent:
        mount = mounts(data, proxy.endpoint, {
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": agent.endpoint,
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file)})
        exercise(mount)
        assert agent.requests and all(accepted for _, accepted in agent.requests)
        assert len(set(agent.issued)) == 1
        keys = agent.issued[0]
    assert_one_signer(proxy, keys)


def test_static_keys_from_the_environment_sign_both_data_paths(iam, data, proxy, mounts):
    keys = iam.create_user(f"chain-user-{data[-8:]}", bucket_policy(data))
    mount = mounts(data, proxy.endpoint, {"AWS_ACCESS_KEY_ID": keys.access_key_id,
                                          "AWS_SECRET_ACCESS_KEY": keys.secret_access_key})
    exercise(mount)
    assert keys.access_key_id.startswith("AKIA")
    assert_one_signer(proxy, keys)


def test_the_chain_s_identity_is_held_to_its_policy(iam, data, mounts):
    """Enforcement is real: keys whose policy names another bucket cannot mount this one."""
    from tests.support.mounts import MountFailed

    other = iam.create_user(f"chain-other-{data[-8:]}", bucket_policy(data + "-other"))
    with pytest.raises(MountFailed) as failure:
        mounts(data, iam.endpoint, {"AWS_ACCESS_KEY_ID": other.access_key_id,
                                    "AWS_SECRET_ACCESS_KEY": other.secret_access_key})
    assert "error access_denied" in str(failure.value)
    assert other.secret_access_key not in str(failure.value)
