"""Whose credentials a volume uses, through the node server as kubelet drives it.

- Secrets (`nodePublishSecretRef`): `key_id`, `access_key` and optional `session_token`
  in NodePublishVolume's secrets, used for that volume only (SeaweedFS, which checks
  signatures; rotation on moto with IAM enforcement, where a deleted key stops working).
- Pod-level IRSA (`authenticationSource: pod`): the pod's ServiceAccount is read from a
  stand-in Kubernetes API through the real kubernetes client (`--kubeconfig`), its
  `eks.amazonaws.com/role-arn` role is assumed at STS with the pod's projected token. The
  server is moto with IAM enforcement (INITIAL_NO_AUTH_ACTION_COUNT=0): role A's keys are
  refused on bucket B by moto itself. Moto's STS needs every request signed under
  enforcement, so STS is reached through tests.support.pod_identity.StsFront, and through
  a fault-injecting proxy in front of that (refusals are injected there: moto accepts any
  token).
- Pod-level EKS Pod Identity: no role annotation, a `pods.eks.amazonaws.com` token, and the
  node's Pod Identity Agent (a stand-in handing out keys of a role moto enforces).
- Failures mount nothing and say what to fix; inline ephemeral volumes with pod-level
  credentials leave nothing behind.

Every node server here runs with --debug. At the end of every test, no secret value (keys
from secrets, service-account tokens, keys and session tokens issued by STS or the agent)
may appear in its log or in any gRPC error detail, and while mounted none may appear in a
mount process's command line or environment.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import stat
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from tests.support.kubeapi import KubeApi
from tests.support.kubelet import Kubelet, NodeServer, Pod, mounted
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
from tests.support.proxy import S3Proxy, Status
from tests.support.s3server import free_port

TOKENS = "csi.storage.k8s.io/serviceAccount.tokens"
ROLE_ARN = "eks.amazonaws.com/role-arn"
STS_AUDIENCE, POD_IDENTITY_AUDIENCE = "sts.amazonaws.com", "pods.eks.amazonaws.com"
NODE_ENV = {"AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1,localhost"}
# What the mount process of a volume with its own credentials must not inherit.
NODE_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN",
                             "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                             "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
WAIT = 30.0  # seconds for a republished credential to show at the proxy


# ------------------------------------------------------------------------ the world
@dataclass
class World:
    iam: IamMoto
    sts: StsFront
    sts_proxy: S3Proxy  # kubelet's nodes point --sts-endpoint-url here
    kube: KubeApi
    kubeconfig: Path
    agent: PodIdentityAgent
    bucket_a: str
    bucket_b: str
    shared: str
    role_a: str
    role_b: str
    role_pod_identity: str


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("credentials")
    with contextlib.ExitStack() as stack:
        iam = start_iam_moto(root / "moto")
        stack.callback(iam.server.stop)
        suffix = uuid.uuid4().hex[:6]
        bucket_a, bucket_b, shared = f"team-a-{suffix}", f"team-b-{suffix}", f"shared-{suffix}"
        s3 = iam.client("s3")
        for bucket in (bucket_a, bucket_b, shared):
            s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key="readme.txt", Body=f"this is {bucket}\n".encode())

        def both(first: str, second: str) -> dict:
            policy = bucket_policy(first)
            policy["Statement"] += bucket_policy(second)["Statement"]
            return policy

        role_a = iam.create_role("team-a-s3", both(bucket_a, shared), web_identity_trust("team-a", "sa-a"))
        role_b = iam.create_role("team-b-s3", both(bucket_b, shared), web_identity_trust("team-b", "sa-b"))
        role_pod_identity = iam.create_role("team-p-pod-identity", bucket_policy(bucket_a), POD_IDENTITY_TRUST)
        sts = stack.enter_context(StsFront(iam))
        sts_proxy = stack.enter_context(S3Proxy(sts.endpoint))
        kube = stack.enter_context(KubeApi())
        kubeconfig = kube.write_kubeconfig(root / "kubeconfig")
        agent = stack.enter_context(PodIdentityAgent(
            lambda _token: iam.role_keys(role_pod_identity, session="eks-pod-identity")))
        yield World(iam, sts, sts_proxy, kube, kubeconfig, agent, bucket_a, bucket_b, shared,
                    role_a, role_b, role_pod_identity)


@pytest.fixture(autouse=True)
def fresh(request):
    """Service accounts as the tests expect them, and no fault left from another test."""
    if "world" not in request.fixturenames:
        yield
        return
    world: World = request.getfixturevalue("world")
    world.kube.reset()
    world.kube.add_service_account("team-a", "sa-a", {ROLE_ARN: world.role_a})
    world.kube.add_service_account("team-b", "sa-b", {ROLE_ARN: world.role_b})
    world.kube.add_service_account("team-a", "no-role", {"owner": "team-a"})
    world.kube.add_service_account("team-p", "sa-pi")  # EKS Pod Identity: no annotation
    yield
    world.kube.fail(None)
    world.agent.refuse(None)
    world.sts_proxy.clear_faults()


# ------------------------------------------------------------------ secrets watched
@dataclass
class Leaks:
    """Every secret value a test handles; none may show where an operator can look."""

    world: World | None = None
    values: set[str] = field(default_factory=set)
    details: list[str] = field(default_factory=list)  # gRPC error details seen

    def add(self, *values: str | None) -> None:
        self.values.update(v for v in values if v)

    def issued(self) -> set[str]:
        """Secret keys and session tokens STS or the agent handed out (not key ids)."""
        if self.world is None:
            return set()
        keys: list[IssuedKeys] = [*self.world.iam.issued(), *self.world.agent.issued, *self.world.sts.issued]
        return {v for k in keys for v in (k.secret_access_key, k.session_token) if v}

    def all(self) -> set[str]:
        return self.values | self.issued()

    def check_text(self, text: str, where: str, values: set[str] | None = None) -> None:
        for value in self.all() if values is None else values:
            assert value not in text, f"a secret value ({value[:4]}...) appears in {where}"

    def check_processes(self, target: Path, *, own_credentials: bool = True) -> None:
        """The mount process of ``target``: nothing secret in its command line or
        environment, and none of the node's credential variables when it has its own."""
        pids = mount_processes(target)
        assert pids, f"no mount process for {target}"
        values = self.all()
        for pid in pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            self.check_text(cmdline, f"the command line of mount process {pid}", values)
            self.check_text(environ, f"the environment of mount process {pid}", values)
            if own_credentials:
                names = {entry.split("=", 1)[0] for entry in environ.split("\0")}
                assert not names & set(NODE_CREDENTIAL_VARIABLES), names & set(NODE_CREDENTIAL_VARIABLES)


@pytest.fixture
def leaks(request):
    watch = Leaks(request.getfixturevalue("world") if "world" in request.fixturenames else None)
    yield watch
    values = watch.all()
    for details in watch.details:
        watch.check_text(details, "a gRPC error detail", values)


@pytest.fixture
def nodes(world, tmp_path, leaks):
    """``nodes(**options)``: a node server with --debug, pointed at the stand-ins; its log
    is checked for secrets once it has stopped."""
    started: list[NodeServer] = []

    def start(*, sts_endpoint: str | None = None, kubeconfig: Path | None = None, agent_url: str | None = None,
              ephemeral: bool = False, env: dict[str, str] | None = None) -> Kubelet:
        args = ["--debug", "--kubeconfig", str(kubeconfig or world.kubeconfig),
                "--sts-endpoint-url", sts_endpoint or world.sts_proxy.endpoint, "--sts-region", "us-east-1",
                "--pod-identity-agent-url", agent_url or world.agent.endpoint]
        if ephemeral:
            args.append("--enable-ephemeral")
        server = NodeServer(root=tmp_path / f"node{len(started)}", env={**NODE_ENV, **(env or {})},
                            extra_args=args)
        started.append(server)
        return Kubelet(server.start())

    yield start
    values = leaks.all()
    try:
        for server in started:  # whatever is still mounted at the end of the test
            for pid in processes_under(server.kubelet_dir):
                for part in ("cmdline", "environ"):
                    with contextlib.suppress(OSError):
                        text = Path(f"/proc/{pid}/{part}").read_bytes().decode(errors="replace")
                        leaks.check_text(text, f"/proc/{pid}/{part}", values)
    finally:
        for server in started:
            stop_like_kubernetes(server)
    for server in started:
        log = server.log()
        assert "NodePublishVolume" in log, "the calls were logged"
        leaks.check_text(log, f"the node server's log {server.log_path}", values)


def stop_like_kubernetes(server: NodeServer) -> None:
    """SIGTERM to the container's main process (the supervisor) only, as the container
    runtime sends it, then NodeServer.stop for whatever is left. (NodeServer.stop signals
    the whole process group: the server then gets SIGTERM twice, from the group signal and
    from its supervisor, and a second signal while its handler runs can deadlock it in
    threading.Event.set until it is killed.)"""
    if server.process is not None and server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=20)
    server.stop()


@pytest.fixture
def node(nodes) -> Kubelet:
    return nodes()


# ---------------------------------------------------------------------------- helpers
def sa_token(label: str) -> str:
    """A fresh projected-token look-alike (JWT shaped, unique)."""
    return f"eyJhbGciOiJSUzI1NiIsImtpZCI6InBhaWwifQ.{label}-{uuid.uuid4().hex}.c2lnbmF0dXJl"


def in_an_hour() -> str:
    return (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


def token_map(sts: str | None = None, pods: str | None = None, expires: str | None = None) -> str:
    """kubelet's serviceAccount.tokens value."""
    tokens = {}
    for audience, token in ((STS_AUDIENCE, sts), (POD_IDENTITY_AUDIENCE, pods)):
        if token:
            tokens[audience] = {"token": token, "expirationTimestamp": expires or in_an_hour()}
    return json.dumps(tokens)


def pod(namespace: str, service_account: str, name: str = "app") -> Pod:
    return Pod(uid=str(uuid.uuid4()), name=name, namespace=namespace, service_account=service_account)


def pod_volume(bucket: str, endpoint: str, tokens: str, **extra: str) -> dict[str, str]:
    return {"bucketName": bucket, "endpoint": endpoint, "region": "us-east-1", "authenticationSource": "pod",
            TOKENS: tokens, **extra}


def mount_processes(target: Path) -> list[int]:
    """Pids of the processes with ``target`` as an argument (the mount process)."""
    return _processes(lambda args: str(target).encode() in args and b"mount" in args)


def processes_under(kubelet_dir: Path) -> list[int]:
    """Pids of the mount processes of any target under ``kubelet_dir``."""
    marker = str(kubelet_dir).encode()
    return _processes(lambda args: b"mount" in args and any(marker in arg for arg in args))


def _processes(matches) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if matches(args):
                found.append(int(entry.name))
    return found


def credentials_file(target: Path) -> Path:
    """The --credentials-file the mount process of ``target`` was started with."""
    (pid,) = mount_processes(target)
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return Path(args[args.index("--credentials-file") + 1])


def mount_pid(kubelet: Kubelet, target: Path) -> int:
    records = [json.loads(p.read_text()) for p in kubelet.server.state_dir.glob("mounts/*.json")]
    return next(r["pid"] for r in records if r["target"] == str(target))


def signers(proxy: S3Proxy, since: int = 0) -> set[str]:
    """Access key ids that signed the requests the proxy saw (from record ``since`` on)."""
    keys = set()
    for record in proxy.records()[since:]:
        headers = record.request_headers
        authorization = headers.get("Authorization", "")
        if "Credential=" in authorization:
            keys.add(authorization.split("Credential=")[1].split("/")[0])
    return keys


def refused(kubelet: Kubelet, leaks: Leaks, the_pod: Pod, pv: str, attributes: dict[str, str],
            code: grpc.StatusCode, *needles: str, **kwargs) -> str:
    """Publish, expect ``code`` with every needle in the message; nothing may be mounted
    or left behind. Returns the message."""
    state = kubelet.server.state_dir
    before = set((state / "credentials").glob("*")) if (state / "credentials").exists() else set()
    with pytest.raises(grpc.RpcError) as error:
        kubelet.publish(the_pod, pv, attributes, **kwargs)
    details = error.value.details() or ""
    leaks.details.append(details)
    assert error.value.code() == code, f"{error.value.code()}: {details}"
    for needle in needles:
        assert needle in details, f"{needle!r} not in {details!r}"
    target = kubelet.target(the_pod, pv)
    assert not mounted(target) and not target.exists(), "nothing mounted"
    assert not mount_processes(target), "no mount process left"
    records = [json.loads(p.read_text()) for p in state.glob("mounts/*.json")]
    assert str(target) not in {r["target"] for r in records}, "no record"
    after = set((state / "credentials").glob("*")) if (state / "credentials").exists() else set()
    assert after <= before, f"credentials left behind: {after - before}"
    return details


def writer(target: Path):
    """Each call writes a new file (one sure S3 request each)."""
    run = uuid.uuid4().hex[:8]
    counter = iter(range(10_000))
    return lambda: (target / f"probe-{run}-{next(counter)}.txt").write_bytes(b"x")


def until(condition, action=lambda: None, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        action()
        if condition():
            return True
        time.sleep(0.2)
    return condition()


# ---------------------------------------------------------------------------- secrets
@pytest.mark.s3_servers("seaweedfs")  # checks signatures
def test_a_secret_s_keys_are_used_for_that_volume_only(s3_server, s3, bucket, nodes, leaks):
    # The node has keys of its own, which SeaweedFS refuses: a mount that fell back on
    # them would fail.
    kubelet = nodes(env={"AWS_ACCESS_KEY_ID": "node-own-key", "AWS_SECRET_ACCESS_KEY": "node-own-secret"})
    leaks.add(s3_server.access_key, s3_server.secret_key, "node-own-secret")
    s3.put_object(Bucket=bucket, Key="in.txt", Body=b"from the secret")
    secrets = {"key_id": s3_server.access_key, "access_key": s3_server.secret_key}
    the_pod = kubelet.new_pod()
    target = kubelet.publish(the_pod, "pv-secret", {"bucketName": bucket, "endpoint": s3_server.endpoint,
                                                     "region": "us-east-1"}, secrets=secrets)
    assert (target / "in.txt").read_bytes() == b"from the secret"
    (target / "out.txt").write_bytes(b"written with the secret")
    assert s3.get_object(Bucket=bucket, Key="out.txt")["Body"].read() == b"written with the secret"

    path = credentials_file(target)
    assert path.parent == kubelet.server.state_dir / "credentials"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {"source": "static", "access_key_id": s3_server.access_key,
                                            "secret_access_key": s3_server.secret_key}
    leaks.check_processes(target)

    kubelet.unpublish(the_pod, "pv-secret")
    assert not path.exists() and not mounted(target) and not target.exists()
    assert not list((kubelet.server.state_dir / "credentials").iterdir())


@pytest.mark.s3_servers("seaweedfs")
def test_a_secret_without_access_key_is_invalid_argument_and_a_wrong_one_permission_denied(
        s3_server, bucket, node, leaks):
    attributes = {"bucketName": bucket, "endpoint": s3_server.endpoint, "region": "us-east-1"}
    leaks.add(s3_server.secret_key, "wrong-secret-0123456789")
    refused(node, leaks, node.new_pod(), "pv-half-secret", attributes, grpc.StatusCode.INVALID_ARGUMENT,
            "access_key", secrets={"key_id": s3_server.access_key})
    message = refused(node, leaks, node.new_pod(), "pv-wrong-secret", attributes,
                      grpc.StatusCode.PERMISSION_DENIED, bucket, "refused", "check the credentials",
                      secrets={"key_id": s3_server.access_key, "access_key": "wrong-secret-0123456789"})
    assert "SignatureDoesNotMatch" in message or "403" in message


def test_a_rotated_secret_is_written_on_republish_and_used_without_a_remount(world, node, leaks):
    iam = world.iam
    name = f"rotating-{uuid.uuid4().hex[:6]}"
    user = iam.create_user(name, bucket_policy(world.bucket_a))
    leaks.add(user.secret_access_key)
    with S3Proxy(iam.endpoint) as proxy:
        attributes = {"bucketName": world.bucket_a, "endpoint": proxy.endpoint, "region": "us-east-1"}
        the_pod = node.new_pod()
        target = node.publish(the_pod, "pv-rotate", attributes,
                              secrets={"key_id": user.access_key_id, "access_key": user.secret_access_key})
        assert (target / "readme.txt").read_bytes() == f"this is {world.bucket_a}\n".encode()
        pid, path = mount_pid(node, target), credentials_file(target)
        first_inode = path.stat().st_ino
        assert signers(proxy) == {user.access_key_id}

        # Rotation as IAM does it: a second key for the user, the secret updated, the old key deleted.
        new = iam.client("iam").create_access_key(UserName=name)["AccessKey"]
        leaks.add(new["SecretAccessKey"])
        mark = len(proxy.records())
        node.publish(the_pod, "pv-rotate", attributes,
                     secrets={"key_id": new["AccessKeyId"], "access_key": new["SecretAccessKey"]})
        assert path.stat().st_ino != first_inode, "the file was replaced"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert json.loads(path.read_text())["access_key_id"] == new["AccessKeyId"]
        assert until(lambda: new["AccessKeyId"] in signers(proxy, mark), writer(target)), \
            "the new key was never used"
        iam.client("iam").delete_access_key(UserName=name, AccessKeyId=user.access_key_id)
        (target / "after-rotation.txt").write_bytes(b"still writing")
        assert iam.client("s3").get_object(Bucket=world.bucket_a, Key="after-rotation.txt")["Body"].read() \
            == b"still writing"
        assert mount_pid(node, target) == pid and mounted(target), "the same mount all along"
        leaks.check_processes(target)
        node.unpublish(the_pod, "pv-rotate")
        assert not path.exists()


# ------------------------------------------------------------------- pod-level IRSA
def test_each_service_account_s_role_reaches_only_its_own_bucket(world, node, leaks):
    endpoint = world.iam.endpoint
    token_a, token_a2, token_b = sa_token("team-a"), sa_token("team-a"), sa_token("team-b")
    leaks.add(token_a, token_a2, token_b)
    calls = len(world.sts.calls)

    pod_a = pod("team-a", "sa-a")
    target_a = node.publish(pod_a, "pv-a", pod_volume(world.bucket_a, endpoint, token_map(sts=token_a)))
    assert (target_a / "readme.txt").read_bytes() == f"this is {world.bucket_a}\n".encode()
    (target_a / "from-a.txt").write_bytes(b"team a")
    assert world.sts.calls[calls:] == [(world.role_a, token_a, "pail-team-a-sa-a")]
    assert json.loads(credentials_file(target_a).read_text())["role_arn"] == world.role_a
    assert world.kube.count("team-a", "sa-a") >= 1, "the ServiceAccount was read from the API"
    assert all(r.authorized for r in world.kube.requests), "with the kubeconfig's token"
    leaks.check_processes(target_a)

    # Role A's keys on bucket B: moto refuses them, so the publish does.
    refused(node, leaks, pod("team-a", "sa-a", "other"), "pv-b", pod_volume(world.bucket_b, endpoint,
            token_map(sts=token_a2)), grpc.StatusCode.PERMISSION_DENIED, world.bucket_b, "refused")

    pod_b = pod("team-b", "sa-b")
    target_b = node.publish(pod_b, "pv-b", pod_volume(world.bucket_b, endpoint, token_map(sts=token_b)))
    assert (target_b / "readme.txt").read_bytes() == f"this is {world.bucket_b}\n".encode()
    assert world.sts.calls[-1] == (world.role_b, token_b, "pail-team-b-sa-b")
    leaks.check_processes(target_b)
    assert {k.secret_access_key for k in world.sts.issued[-2:]} <= leaks.issued(), "STS's secrets are watched too"
    node.unpublish(pod_a, "pv-a")
    node.unpublish(pod_b, "pv-b")
    assert not list((node.server.state_dir / "credentials").iterdir())


def test_two_service_accounts_mounting_one_bucket_get_separate_mounts_and_keys(world, node, leaks):
    token_a, token_b = sa_token("team-a"), sa_token("team-b")
    leaks.add(token_a, token_b)
    with S3Proxy(world.iam.endpoint) as proxy:
        volume = {"volume_id": f"shared-{uuid.uuid4().hex[:6]}"}
        pod_a, pod_b = pod("team-a", "sa-a"), pod("team-b", "sa-b")
        target_a = node.publish(pod_a, "pv-shared", pod_volume(world.shared, proxy.endpoint,
                                                               token_map(sts=token_a)), **volume)
        issued_a = world.sts.issued[-1]
        mark = len(proxy.records())
        target_b = node.publish(pod_b, "pv-shared", pod_volume(world.shared, proxy.endpoint,
                                                               token_map(sts=token_b)), **volume)
        issued_b = world.sts.issued[-1]
        (target_a / "by-a.txt").write_bytes(b"written by team a")
        assert until(lambda: (target_b / "by-a.txt").exists()), "one bucket seen by both"
        assert (target_b / "by-a.txt").read_bytes() == b"written by team a"

        assert target_a != target_b and mount_pid(node, target_a) != mount_pid(node, target_b)
        file_a, file_b = credentials_file(target_a), credentials_file(target_b)
        assert file_a != file_b
        assert json.loads(file_a.read_text())["role_arn"] == world.role_a
        assert json.loads(file_b.read_text())["role_arn"] == world.role_b
        assert issued_a.access_key_id != issued_b.access_key_id
        assert signers(proxy, mark) == {issued_a.access_key_id, issued_b.access_key_id}, \
            "each mount signs with its own service account's keys"
        for target in (target_a, target_b):
            leaks.check_processes(target)
        node.unpublish(pod_a, "pv-shared", volume_id=volume["volume_id"])
        assert (target_b / "readme.txt").read_bytes() == f"this is {world.shared}\n".encode(), \
            "the other service account's mount is its own"
        node.unpublish(pod_b, "pv-shared", volume_id=volume["volume_id"])


def test_a_republished_token_brings_new_keys_without_a_remount(world, node, leaks):
    first, second = sa_token("team-a"), sa_token("team-a")
    leaks.add(first, second)
    with S3Proxy(world.iam.endpoint) as proxy:
        the_pod = pod("team-a", "sa-a")
        target = node.publish(the_pod, "pv-refresh", pod_volume(world.bucket_a, proxy.endpoint, token_map(sts=first)))
        assert (target / "readme.txt").exists()
        pid, before = mount_pid(node, target), signers(proxy)
        assert len(before) == 1

        mark = len(proxy.records())
        node.publish(the_pod, "pv-refresh", pod_volume(world.bucket_a, proxy.endpoint, token_map(sts=second)))
        assert json.loads(credentials_file(target).read_text())["web_identity_token"] == second
        assert until(lambda: signers(proxy, mark) - before, writer(target)), \
            "the republished token never brought new keys"
        assert second in world.sts.tokens(), "the new token went to STS"
        assert mount_pid(node, target) == pid and mounted(target), "no remount"
        leaks.check_processes(target)
        node.unpublish(the_pod, "pv-refresh")


# ----------------------------------------------------------------- EKS Pod Identity
def test_eks_pod_identity_agent_keys_are_used_when_the_account_has_no_role(world, node, leaks):
    sts_token, pods_token = sa_token("team-p-sts"), sa_token("team-p-pods")
    leaks.add(sts_token, pods_token)
    world.agent.accept(pods_token)
    calls, asked = len(world.sts.calls), world.agent.count()
    with S3Proxy(world.iam.endpoint) as proxy:
        the_pod = pod("team-p", "sa-pi")
        target = node.publish(the_pod, "pv-pi", pod_volume(world.bucket_a, proxy.endpoint,
                                                           token_map(sts=sts_token, pods=pods_token)))
        assert (target / "readme.txt").read_bytes() == f"this is {world.bucket_a}\n".encode()
        (target / "by-pod-identity.txt").write_bytes(b"ok")
        assert world.agent.count() > asked and all(ok for _, ok in world.agent.requests[asked:])
        assert signers(proxy) == {world.agent.issued[-1].access_key_id}
        assert len(world.sts.calls) == calls, "no AssumeRoleWithWebIdentity"
        source = json.loads(credentials_file(target).read_text())
        assert source["source"] == "container" and source["endpoint"] == world.agent.endpoint
        leaks.check_processes(target)
        node.unpublish(the_pod, "pv-pi")


def test_a_refusing_pod_identity_agent_mounts_nothing(world, node, leaks):
    unknown, known = sa_token("team-p-pods"), sa_token("team-p-pods")
    leaks.add(unknown, known)
    world.agent.accept(known)

    def volume(token: str) -> dict[str, str]:
        return pod_volume(world.bucket_a, world.iam.endpoint, token_map(pods=token))

    refused(node, leaks, pod("team-p", "sa-pi"), "pv-pi", volume(unknown), grpc.StatusCode.UNAUTHENTICATED,
            "Pod Identity Agent", "401")
    world.agent.refuse(403)  # as for a service account without an association
    refused(node, leaks, pod("team-p", "sa-pi"), "pv-pi", volume(known), grpc.StatusCode.PERMISSION_DENIED,
            "Pod Identity Agent", "403")


# -------------------------------------------------------------------------- failures
@dataclass(frozen=True)
class Failure:
    service_account: tuple[str, str] = ("team-a", "sa-a")
    tokens: str = "good"  # good, expired, malformed, none
    sts_refuses: bool = False
    kube_status: int | None = None
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    needles: tuple[str, ...] = ()
    sts_called: bool = False


FAILURES = {
    "expired-token": Failure(tokens="expired", code=grpc.StatusCode.UNAUTHENTICATED,
                             needles=("sts.amazonaws.com", "expired")),
    "sts-refuses-token": Failure(sts_refuses=True, code=grpc.StatusCode.UNAUTHENTICATED, sts_called=True,
                                 needles=("AssumeRoleWithWebIdentity", "team-a-s3", "InvalidIdentityToken",
                                          "trust policy")),
    "no-role-annotation": Failure(service_account=("team-a", "no-role"), code=grpc.StatusCode.PERMISSION_DENIED,
                                  needles=("team-a/no-role", ROLE_ARN)),
    "unknown-service-account": Failure(service_account=("team-a", "ghost"), code=grpc.StatusCode.PERMISSION_DENIED,
                                       needles=("team-a/ghost", "does not exist")),
    "malformed-token-json": Failure(tokens="malformed", code=grpc.StatusCode.INVALID_ARGUMENT,
                                    needles=(TOKENS, "JSON")),
    "no-token-for-sts": Failure(tokens="none", code=grpc.StatusCode.UNAUTHENTICATED,
                                needles=("sts.amazonaws.com", "tokenRequests")),
    "kube-api-error": Failure(kube_status=500, code=grpc.StatusCode.UNAVAILABLE,
                              needles=("Kubernetes API", "500", "team-a/sa-a")),
    "kube-api-forbidden": Failure(kube_status=403, code=grpc.StatusCode.FAILED_PRECONDITION,
                                  needles=("RBAC", "team-a/sa-a")),
}


@pytest.mark.parametrize("case", list(FAILURES.values()), ids=list(FAILURES))
def test_pod_level_failures_mount_nothing_and_say_what_to_fix(world, node, leaks, case):
    token = sa_token("failure")
    leaks.add(token)
    tokens = {"good": token_map(sts=token), "expired": token_map(sts=token, expires="2020-01-01T00:00:00Z"),
              "malformed": '{"sts.amazonaws.com": {"token": "' + token,  # cut off
              "none": token_map(pods=token)}[case.tokens]
    if case.sts_refuses:
        world.sts_proxy.inject(Status(400, "InvalidIdentityToken", "Incorrect token audience"), times=None)
    if case.kube_status:
        world.kube.fail(case.kube_status)
    sts_requests = world.sts_proxy.count()
    refused(node, leaks, pod(*case.service_account), "pv-fail", pod_volume(world.bucket_a, world.iam.endpoint, tokens),
            case.code, *case.needles)
    assert (world.sts_proxy.count() > sts_requests) == case.sts_called


def test_sts_unreachable_is_unavailable(world, nodes, leaks):
    kubelet = nodes(sts_endpoint=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    token = sa_token("team-a")
    leaks.add(token)
    refused(kubelet, leaks, pod("team-a", "sa-a"), "pv-no-sts", pod_volume(world.bucket_a, world.iam.endpoint,
            token_map(sts=token)), grpc.StatusCode.UNAVAILABLE, "STS", "did not answer")


def test_kubernetes_api_down_is_unavailable(world, nodes, leaks, tmp_path):
    kubeconfig = world.kube.write_kubeconfig(tmp_path / "down.kubeconfig", server=f"http://127.0.0.1:{free_port()}")
    kubelet = nodes(kubeconfig=kubeconfig)
    token = sa_token("team-a")
    leaks.add(token)
    refused(kubelet, leaks, pod("team-a", "sa-a"), "pv-no-api", pod_volume(world.bucket_a, world.iam.endpoint,
            token_map(sts=token)), grpc.StatusCode.UNAVAILABLE, "Kubernetes API", "did not answer")


# ------------------------------------------------------------ inline ephemeral volume
def test_an_inline_ephemeral_volume_with_pod_credentials_leaves_nothing_behind(world, nodes, leaks):
    # An inline volume cannot name its endpoint: the node's environment points S3 at moto.
    kubelet = nodes(ephemeral=True, env={"AWS_ENDPOINT_URL_S3": world.iam.endpoint})
    token = sa_token("team-a")
    leaks.add(token)
    the_pod = pod("team-a", "sa-a")
    volume_id = f"csi-{uuid.uuid4().hex}"
    attributes = {"bucketName": world.bucket_a, "region": "us-east-1", "authenticationSource": "pod",
                  TOKENS: token_map(sts=token)}
    target = kubelet.publish(the_pod, "scratch", attributes, ephemeral=True, volume_id=volume_id)
    assert (target / "readme.txt").read_bytes() == f"this is {world.bucket_a}\n".encode()
    (target / "inline.txt").write_bytes(b"from an inline volume")
    assert world.iam.client("s3").get_object(Bucket=world.bucket_a, Key="inline.txt")["Body"].read() \
        == b"from an inline volume"
    pid, path = mount_pid(kubelet, target), credentials_file(target)
    assert json.loads(path.read_text())["role_arn"] == world.role_a
    leaks.check_processes(target)

    kubelet.unpublish(the_pod, "scratch", volume_id=volume_id)
    assert not mounted(target) and not target.exists()
    assert not path.exists() and not list((kubelet.server.state_dir / "credentials").iterdir())
    assert not list(kubelet.server.state_dir.glob("mounts/*.json"))
    assert not os.path.exists(f"/proc/{pid}/cmdline") or not mount_processes(target), "the mount process ended"
