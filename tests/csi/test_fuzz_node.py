"""Hostile NodePublishVolume and NodeUnpublishVolume requests (issue 8), generated with
Hypothesis and sent to one real node server process over its unix socket.

Every request here is wrong in at least one way, by construction: a volume-context value,
a mount option, volume_mount_group, the secrets, the service-account token map or the
target path. Each must be refused cleanly: INVALID_ARGUMENT whose message names what is
wrong (or UNAUTHENTICATED, or the refusal gRPC itself gives to an over-sized message),
never UNKNOWN or INTERNAL, never a hang, and within 1 KiB (a longer status message makes
gRPC clients drop it and answer RESOURCE_EXHAUSTED). After every example:

- /proc/self/mountinfo has no new mount of this module's bucket or under its directories;
- the node server (supervisor and server) has exactly the processes it had;
- its state directory and kubelet directory are exactly as they were (no record, no
  credentials file, no target directory, not even one created and removed);
- Probe still answers ready;
- what it logged since is free of errors, tracebacks and secret values.

Secret values and tokens are wrapped in a marker, so that any piece of one that reaches a
status message or the log is seen. The server runs with --debug, so every request is
logged (through driver.csi.sanitize.strip_secrets).

The node server has a stand-in Kubernetes API with one ServiceAccount carrying an IAM
role, so pod-level credentials get as far as reading the token map; STS and the S3
endpoint are closed ports on 127.0.0.1, so a request that got through by mistake would
fail (and be caught by the checks) rather than reach anything.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from csi import csi_pb2
from driver.csi import context as ctx
from driver.csi.mount_flags import ALLOWED, FLAGS, MAX_VALUE_BYTES, REFUSED, VALUE_OPTIONS
from tests.support.csi_server import AccessMode, capability
from tests.support.kubeapi import KubeApi
from tests.support.kubelet import Kubelet, NodeServer, Pod
from tests.support.s3server import free_port

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])
MARKER = "pail-secret-7f3a"  # around every secret value and token
MAX_DETAILS = 1024  # driver.csi.errors.MAX_MESSAGE_BYTES
TOKENS = ctx.SERVICE_ACCOUNT_TOKENS
STS_AUDIENCE = "sts.amazonaws.com"
ROLE_ARN = "arn:aws:iam::123456789012:role/pail-fuzz"
NAMESPACE, SERVICE_ACCOUNT = "fuzz", "sa-fuzz"
RPC_TIMEOUT = 30.0


def secret(text: str = "") -> str:
    return f"{MARKER}{text}{MARKER}"


# ----------------------------------------------------------------------- the harness
def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, size, mode and modification time (so a file made
    and removed again still shows, in its directory's time)."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = Path(directory) / name
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            found[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


@dataclass
class Node:
    server: NodeServer
    kubelet: Kubelet
    kube: KubeApi
    root: Path
    bucket: str
    endpoint: str
    pod: Pod
    log_offset: int = 0
    seen_details: list[str] = field(default_factory=list)

    # -- requests --------------------------------------------------------------------------

    def attributes(self, **extra: str) -> dict[str, str]:
        return {ctx.BUCKET_NAME: self.bucket, ctx.ENDPOINT: self.endpoint, ctx.REGION: "us-east-1", **extra}

    def request(self, attributes: dict[str, str] | None = None, **kwargs) -> csi_pb2.NodePublishVolumeRequest:
        """A publish request as kubelet sends it, for the module's one pod and volume
        (its directories exist; ``mount`` must never be made)."""
        attributes = self.attributes() if attributes is None else attributes
        request = self.kubelet.publish_request(self.pod, "pv-fuzz", attributes, **kwargs)
        request.volume_context.update(attributes)  # also over kubelet's own keys
        return request

    # -- the checks ------------------------------------------------------------------------

    def _mounts(self) -> list[str]:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
            return sorted(line for line in mountinfo if self.bucket in line or str(self.root) in line)

    def snapshot(self) -> tuple:
        return (self._mounts(), _descendants(self.server.process.pid),
                _tree(self.server.state_dir), _tree(self.server.kubelet_dir))

    def refused(self, call, request, codes: set[grpc.StatusCode], *needles: str,
                secrets: tuple[str, ...] = (MARKER,)) -> grpc.RpcError:
        """Send ``request`` with ``call`` (a Node stub method); it must be refused with one
        of ``codes``, naming one of ``needles`` (case-insensitively), and change nothing."""
        before = self.snapshot()
        try:
            call(request, timeout=RPC_TIMEOUT)
        except grpc.RpcError as error:
            caught = error
        else:
            self.kubelet.unpublish_all()
            pytest.fail("accepted: a request that is wrong by construction")
        code, details = caught.code(), caught.details() or ""
        self.seen_details.append(details)
        assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                            grpc.StatusCode.DEADLINE_EXCEEDED), f"{code}: {details[:300]}"
        assert code in codes, f"{code}: {details[:300]}"
        if needles and code != grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert any(n.lower() in details.lower() for n in needles), f"none of {needles} in {details[:300]!r}"
        assert len(details.encode()) <= MAX_DETAILS, f"a status message of {len(details.encode())} bytes"
        for value in secrets:
            assert value not in details, "a secret value in the status message"
        after = self.snapshot()
        assert after[0] == before[0], f"the mount table changed: {set(after[0]) ^ set(before[0])}"
        assert after[1] == before[1], f"the node server's processes changed: {after[1] ^ before[1]}"
        assert after[2] == before[2], "the state directory changed"
        assert after[3] == before[3], "the kubelet directory changed"
        assert self.server.identity().Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value is True
        self.check_log(secrets)
        return caught

    def publish_refused(self, request, codes=frozenset({grpc.StatusCode.INVALID_ARGUMENT}), *needles, **kwargs):
        return self.refused(self.kubelet.stub.NodePublishVolume, request, set(codes), *needles, **kwargs)

    def skip_log(self) -> None:
        self.log_offset = self.server.log_path.stat().st_size

    def check_log(self, secrets: tuple[str, ...] = (MARKER,)) -> None:
        """What the server logged since the last check: no error, no traceback, no secret."""
        with open(self.server.log_path, "rb") as log:
            log.seek(self.log_offset)
            text = log.read().decode("utf-8", "replace")
        complete = text.rfind("\n") + 1
        self.log_offset += len(text[:complete].encode("utf-8", "replace"))
        for line in text[:complete].splitlines():
            for value in secrets:
                assert value not in line, "a secret value in the node server's log"
            assert "Traceback" not in line, line[:2000]
            try:
                event = json.loads(line)
            except ValueError:
                pytest.fail(f"a log line that is not JSON: {line[:500]}")
            assert event.get("level") not in ("error", "critical"), line[:2000]
            assert event.get("code") not in ("INTERNAL", "UNKNOWN"), line[:2000]


def _stop(server: NodeServer) -> None:
    """SIGTERM to the supervisor only, as a container runtime sends it (see
    tests/csi/test_credentials.py: stop_like_kubernetes), then whatever is left."""
    if server.process is not None and server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=20)
    server.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-node")
    with contextlib.ExitStack() as stack:
        kube = stack.enter_context(KubeApi())
        kube.add_service_account(NAMESPACE, SERVICE_ACCOUNT, {"eks.amazonaws.com/role-arn": ROLE_ARN})
        kubeconfig = kube.write_kubeconfig(root / "kubeconfig")
        closed = free_port()
        server = NodeServer(
            root=root / "node",
            env={"AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1",
                 "AWS_ACCESS_KEY_ID": "node-key", "AWS_SECRET_ACCESS_KEY": "node-secret"},
            extra_args=["--debug", "--enable-ephemeral", "--kubeconfig", str(kubeconfig),
                        "--sts-endpoint-url", f"http://127.0.0.1:{free_port(avoid={closed})}",
                        "--sts-region", "us-east-1", "--pod-identity-agent-url", "none"])
        stack.callback(_stop, server)
        server.start()
        kubelet = Kubelet(server)
        pod = Pod(uid=str(uuid.uuid4()), name="fuzz", namespace=NAMESPACE, service_account=SERVICE_ACCOUNT)
        kubelet.target(pod, "pv-fuzz")  # kubelet makes the volume directory
        harness = Node(server, kubelet, kube, root, f"pail-fuzz-{uuid.uuid4().hex[:8]}",
                       f"http://127.0.0.1:{closed}", pod)
        harness.check_log()
        yield harness
        harness.check_log()
        assert not list(server.state_dir.glob("mounts/*.json"))


# ------------------------------------------------------------------------ strategies
def _longer_than_limit(piece: str, extra: int) -> str:
    size = len(piece.encode())
    return piece * (MAX_VALUE_BYTES // size + 1 + extra)


_ANY = st.text(max_size=40)
_PIECE = st.text(min_size=1, max_size=4).filter(lambda t: "\0" not in t)
_HUGE = st.builds(_longer_than_limit, _PIECE, st.integers(0, 60_000))  # 4 KiB .. about 1 MiB
_BREAKS = st.builds(lambda a, bad, b: a + bad + b, _ANY, st.sampled_from(["\0", "\n", "\r", "\r\n"]), _ANY)
_OPTION_LIKE = st.builds(lambda name: "--" + name, st.from_regex(r"[a-z][a-z-]{0,20}", fullmatch=True))
_NOT_BOOL = _ANY.filter(lambda t: t.lower() not in ("true", "false"))

# Bucket names are [a-z0-9._-], 3 to 255, or an access-point ARN: these are neither.
_BAD_BUCKETS = st.one_of(
    st.just(""),
    st.builds(lambda a, bad, b: a + bad + b, st.from_regex(r"[a-z0-9]{0,8}", fullmatch=True),
              st.sampled_from(["A", " ", ",", "/", "é", "%", "\0", "\n", ":", "..", "*", "+", "?", "\t"]),
              st.from_regex(r"[a-z0-9]{0,8}", fullmatch=True)),
    _HUGE, _OPTION_LIKE,
    st.builds(lambda t: "arn:aws:s3:us-east-1:123456789012:accesspoint/ap" + t, _BREAKS),  # an ARN with a NUL
)
# Prefixes: no leading "/", no empty, "." or ".." segment, no NUL or line break, 4 KiB at most.
_SEGMENT = st.from_regex(r"[a-zA-Z0-9 ,=+%é_-]{1,10}", fullmatch=True)
_BAD_PREFIXES = st.one_of(
    st.builds(lambda t: "/" + t, _ANY),
    st.builds(lambda a, bad, b: a + bad + b, _SEGMENT, st.sampled_from(["//", "/./", "/../"]), _SEGMENT),
    st.sampled_from([".", "..", "./a", "../a", "a/..", "a//", "//"]),
    _BREAKS, _HUGE,  # ("--x" is a prefix like any other: it reaches the mount as "--prefix=--x")
)
_BAD_ENDPOINTS = st.one_of(
    st.sampled_from(["ftp://127.0.0.1/", "file:///etc/passwd", "unix:///run/x.sock", "127.0.0.1:9000", "//127.0.0.1",
                     "http://", "https:///path", "http:/127.0.0.1", "javascript:alert(1)", "-", "--foreground"]),
    st.builds(lambda t: "http://127.0.0.1:1/" + t, _BREAKS), _HUGE, _OPTION_LIKE,
)
# Region and stsRegion take any text: only what cannot be an argument is wrong.
_BAD_REGIONS = st.one_of(_BREAKS, _HUGE, _OPTION_LIKE)
_BAD_VALUES = {
    ctx.BUCKET_NAME: (_BAD_BUCKETS, "bucket"),
    ctx.PREFIX: (_BAD_PREFIXES, "prefix"),
    ctx.ENDPOINT: (_BAD_ENDPOINTS, "endpoint"),
    ctx.REGION: (_BAD_REGIONS, "region"),
    ctx.STS_REGION: (st.one_of(_BREAKS, _HUGE), "stsRegion"),
    ctx.FORCE_PATH_STYLE: (st.one_of(_NOT_BOOL, _HUGE), "forcePathStyle"),
    ctx.AUTHENTICATION_SOURCE: (st.one_of(_ANY.filter(lambda t: t not in ctx.AUTH_SOURCES), _HUGE),
                                "authenticationSource"),
    ctx.EPHEMERAL: (st.one_of(_NOT_BOOL, _HUGE), "ephemeral"),
}
_UNKNOWN_KEYS = st.one_of(_ANY, _HUGE, st.sampled_from(["BucketName", "bucketname", "bucketName ", "endpoint\0",
                                                        "csi.storage.k8s.io", "csi.storage.k8s.io\\x"])).filter(
    lambda k: k not in ctx.VOLUME_ATTRIBUTES and not k.startswith(ctx.PROVISIONER_PREFIX))
# Keys kubelet and the provisioner own: accepted and ignored, whatever their values.
_IGNORED = st.dictionaries(st.builds(lambda t: ctx.PROVISIONER_PREFIX + t, _ANY).filter(
    lambda k: k not in ctx.KUBELET_KEYS), st.one_of(_ANY, _BREAKS), max_size=2)


@st.composite
def bad_volume_context(draw):
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(_BAD_VALUES)))
        strategy, needle = _BAD_VALUES[key]
        return key, draw(strategy), needle
    return draw(_UNKNOWN_KEYS), draw(st.one_of(_ANY, _HUGE)), "unknown attribute"


# --- mount options ---
_NUMERIC = sorted({"uid", "gid", "file-mode", "dir-mode", "metadata-ttl", "max-memory", "write-part-size",
                   "request-timeout", "expected-bucket-owner", "storage-class", "sse", "upload-checksums"})
_GOOD_FLAGS = ["read-only", "uid=1000", "gid 1000", "--metadata-ttl=5", "prefix=a,b=c d", "region=eu-west-1",
               "allow-delete", "--write-part-size 16MiB"]
_INJECTIONS = ["ro,allow_other", "allow_other", "-o allow_other", "-o", "--foo", "-x", "rw,suid,dev", "dev", "suid",
               "ro", "nosuid,allow_root", "--allow-other", "allow-root", "--foreground", "--log-file=/etc/cron.d/x",
               "--log-format console", "credentials-file=/etc/shadow", "--ready-fd=0", "ready-fd 1",
               "endpoint-url=http://169.254.169.254", "ca-bundle /etc/passwd", "no-sign-request", "debug=1",
               "read-only=false", "uid", "--uid=", "=1000", "", "  ", "--", "-", "uid=1000 --allow-other=",
               "allow-delete,allow-overwrite", "uid=0,allow_other", "metadata-ttl=1\n--allow-root",
               "prefix=a\0--allow-other", "gid=0\r\n", "--help", "--version", "-h"]
_NAME_CHARS = st.characters(blacklist_categories=("Cs",)).filter(lambda c: not c.isspace() and c != "=")
_UNKNOWN_NAMES = st.builds(lambda dashes, name: dashes + name, st.sampled_from(["", "-", "--", "---"]),
                           st.text(_NAME_CHARS, min_size=1, max_size=30)).filter(
    lambda n: n.removeprefix("--") not in ALLOWED)


@st.composite
def bad_flag(draw) -> str:
    kind = draw(st.integers(0, 6))
    sep = draw(st.sampled_from(["=", " ", " = "]))
    dashes = draw(st.sampled_from(["", "--"]))
    if kind == 0:
        return draw(st.sampled_from(_INJECTIONS))
    if kind == 1:
        name = draw(st.sampled_from(sorted(REFUSED)))
        return dashes + name + draw(st.sampled_from(["", sep + draw(_ANY)]))
    if kind == 2:
        return draw(_UNKNOWN_NAMES) + draw(st.sampled_from(["", sep + draw(_ANY)]))
    if kind == 3:  # a comma, as in "-o uid=1000,allow_other": none of these takes one
        return dashes + draw(st.sampled_from(_NUMERIC)) + sep + draw(_ANY) + "," + draw(_ANY)
    if kind == 4:  # any value option: a NUL or a line break inside, or too long
        value = draw(st.builds(lambda a, bad, b: "x" + a + bad + b + "x", _ANY,
                               st.sampled_from(["\0", "\n", "\r"]), _ANY) | _HUGE.map(lambda v: "x" + v))
        return dashes + draw(st.sampled_from(sorted(VALUE_OPTIONS))) + sep + value
    if kind == 5:  # a flag with a value
        return dashes + draw(st.sampled_from(sorted(FLAGS))) + sep + "x" + draw(_ANY)
    # (surrounding whitespace is not part of a value: a prefix "a//\n" would be "a//")
    return "prefix" + sep + draw(_BAD_PREFIXES.filter(lambda p: p and p == p.strip() and not p.startswith("-")))


@st.composite
def bad_flags(draw) -> list[str]:
    good = draw(st.lists(st.sampled_from(_GOOD_FLAGS), unique=True, max_size=3))
    bad = draw(bad_flag())
    at = draw(st.integers(0, len(good)))
    if draw(st.booleans()) and good:  # or the same option twice
        return [*good, good[0]]
    return [*good[:at], bad, *good[at:]]


def _flag_needles(flags: list[str]) -> tuple[str, ...]:
    names = {re.split(r"[\s=]", f.strip(), maxsplit=1)[0].removeprefix("--") for f in flags}
    return ("mount option", *(f"--{n}" for n in names if n in ALLOWED))


# --- secrets ---
_SECRET_VALUES = _ANY.map(secret)
_ODD_KEYS = st.one_of(_ANY, st.sampled_from(["KEY_ID", "key_id ", "accessKey", "aws_access_key_id", "key-id",
                                             "session_token\0", "", "\n"])).filter(
    lambda k: k not in ("key_id", "access_key", "session_token"))


@st.composite
def bad_secrets(draw) -> tuple[dict[str, str], dict[str, str]]:
    """(secrets, extra volume attributes): never a usable pair of keys for the driver."""
    kind = draw(st.integers(0, 3))
    keys = {"key_id": draw(_SECRET_VALUES), "access_key": draw(_SECRET_VALUES)}
    if draw(st.booleans()):
        keys["session_token"] = draw(_SECRET_VALUES)
    if kind == 0:  # a key that is not one of ours
        odd = draw(st.dictionaries(_ODD_KEYS, _SECRET_VALUES, min_size=1, max_size=3))
        return {**(keys if draw(st.booleans()) else {}), **odd}, {}
    if kind == 1:  # key_id or access_key missing or empty
        missing = draw(st.sampled_from(["key_id", "access_key"]))
        if draw(st.booleans()):
            del keys[missing]
        else:
            keys[missing] = ""
        return keys, {}
    if kind == 2:  # keys, on a volume that takes the pod's identity
        return keys, {ctx.AUTHENTICATION_SOURCE: "pod", TOKENS: json.dumps({STS_AUDIENCE: {"token": secret()}})}
    return {"key_id": draw(_SECRET_VALUES), "access_key": draw(_SECRET_VALUES)[:0]}, {}


# --- service-account tokens ---
_NOT_A_TIME = _ANY.filter(lambda t: not _is_time(t))


def _nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth


_JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _SECRET_VALUES)
_BAD_TOKEN_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.just(""), st.lists(_SECRET_VALUES, max_size=2),
                              st.dictionaries(_ANY, _SECRET_VALUES, max_size=2),
                              st.builds(lambda a, b: secret(a + "\0" + b), _ANY, _ANY))
def _is_time(text: str) -> bool:
    try:
        datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


@st.composite
def bad_tokens(draw) -> tuple[str, tuple[grpc.StatusCode, ...]]:
    """(the tokens value, the codes it may get): never a usable token."""
    invalid, unauthenticated = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED
    kind = draw(st.integers(0, 7))
    token = draw(_SECRET_VALUES)
    if kind == 0:  # not JSON at all
        return draw(_ANY.map(lambda t: MARKER + t)), (invalid,)
    if kind == 1:  # JSON, but not an object of objects
        value = draw(st.one_of(_JSON_LEAVES, st.lists(_JSON_LEAVES, max_size=3),
                               st.dictionaries(_ANY, _JSON_LEAVES, min_size=1, max_size=3)))
        return json.dumps(value), (invalid,)
    if kind == 2:  # the STS audience's token missing, empty, not a string, or with a NUL
        entry = draw(st.dictionaries(st.sampled_from(["expirationTimestamp", "Token", "tokens"]), _JSON_LEAVES,
                                     max_size=2))
        if draw(st.booleans()):
            entry["token"] = draw(_BAD_TOKEN_VALUES)
        return json.dumps({STS_AUDIENCE: entry}), (invalid,)
    if kind == 3:  # a token whose expiry is not a time
        return json.dumps({STS_AUDIENCE: {"token": token, "expirationTimestamp": draw(_NOT_A_TIME)}}), (invalid,)
    if kind == 4:  # expired
        when = draw(st.datetimes(min_value=datetime.datetime(1970, 1, 1), max_value=datetime.datetime(2024, 1, 1)))
        stamp = when.strftime("%Y-%m-%dT%H:%M:%S") + draw(st.sampled_from(["Z", "+00:00", ""]))
        return json.dumps({STS_AUDIENCE: {"token": token, "expirationTimestamp": stamp}}), (unauthenticated,)
    if kind == 5:  # no token for the STS audience
        audience = draw(_ANY.filter(lambda a: a != STS_AUDIENCE))
        tokens = draw(st.sampled_from([{}, {audience: {"token": token}}]))
        return json.dumps(tokens), (unauthenticated,)
    if kind == 6:  # too large
        return json.dumps({STS_AUDIENCE: {"token": secret("x" * draw(st.integers(65_536, 1_000_000)))}}), (invalid,)
    depth = draw(st.integers(2_000, 30_000))  # nested beyond what the JSON parser recurses into
    return _nested(depth, draw(st.sampled_from(["list", "object"]))), (invalid,)


# --- target paths ---
_UID = st.uuids().map(str)
_NAME = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,40}", fullmatch=True).filter(lambda n: n not in (".", ".."))
_LONG_NAME = st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "✓", "\U0001f600"]), st.integers(256, 2000)).filter(
    lambda n: len(n.encode()) > 255)


@st.composite
def bad_target(draw, kubelet_dir: Path) -> str:
    parts = [str(kubelet_dir), "pods", draw(_UID), "volumes", "kubernetes.io~csi", draw(_NAME), "mount"]
    kind = draw(st.integers(0, 9))
    if kind == 0:  # ".." or "." somewhere
        parts.insert(draw(st.integers(1, len(parts))), draw(st.sampled_from(["..", ".", "../..", "../../.."])))
    elif kind == 1:  # a fixed name changed
        at = draw(st.sampled_from([1, 3, 4, 6]))
        parts[at] = draw(_ANY.filter(lambda n: n != parts[at] and "/" not in n and n not in ("", ".", "..")))
    elif kind == 2:  # a name removed, or one too many
        if draw(st.booleans()):
            del parts[draw(st.integers(1, len(parts) - 1))]
        else:
            parts.insert(draw(st.integers(1, len(parts))), draw(_NAME))
    elif kind == 3:  # "//", a trailing "/"
        path = "/".join(parts)
        return draw(st.sampled_from([path + "/", path.replace("/pods/", "/pods//"), "/" + path,
                                     path.replace("/mount", "//mount")]))
    elif kind == 4:  # a NUL or a line break
        at = draw(st.integers(1, len(parts) - 1))
        parts[at] = parts[at] + draw(st.sampled_from(["\0", "\0/../../etc", "\n", "\r"]))
    elif kind == 5:  # a name longer than NAME_MAX
        parts[draw(st.sampled_from([2, 5]))] = draw(_LONG_NAME)
    elif kind == 6:  # not under the kubelet directory (including its look-alikes)
        parts[0] = draw(st.sampled_from(["/", "/etc", "/var/lib/kubelet", "/tmp", str(kubelet_dir) + "-evil",
                                         str(kubelet_dir)[:-1], str(kubelet_dir.parent), "/proc/self/root"
                                         + str(kubelet_dir)]))
        return "/".join(parts).replace("//", "/")
    elif kind == 7:  # relative
        return draw(st.sampled_from(["/".join(parts[1:]), "./" + "/".join(parts[1:]), "mount", ""]))
    elif kind == 8:  # ".." hidden as the uid or the volume name
        parts[draw(st.sampled_from([2, 5]))] = draw(st.sampled_from(["..", "."]))
    else:  # any text that does not start with the kubelet directory
        return draw(_ANY.filter(lambda t: not t.startswith(str(kubelet_dir))))
    return "/".join(parts)


# ---------------------------------------------------------------------------- tests
def test_the_module_s_own_request_is_wrong_only_where_each_test_makes_it(node):
    """The base request reaches the S3 endpoint (a closed port) and so it is refused
    there, after the server checked everything: the examples below are refused for their
    own fault, not the base's. (The only example that starts a mount process.)"""
    request = node.request()
    with pytest.raises(grpc.RpcError) as error:
        node.kubelet.stub.NodePublishVolume(request, timeout=90)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value.details()
    assert not list(node.server.state_dir.glob("mounts/*.json"))
    assert not Path(request.target_path).exists()
    node.skip_log()  # the mount process logged its failure


@FUZZ
@given(bad=bad_volume_context(), ignored=_IGNORED)
@example(bad=(ctx.REGION, "us-east-1\0", "region"), ignored={})
@example(bad=(ctx.ENDPOINT, "http://127.0.0.1:1\0x", "endpoint"), ignored={})
@example(bad=(ctx.PREFIX, "p" * 200_000, "prefix"), ignored={})  # longer than one argument may be
@example(bad=(ctx.BUCKET_NAME, "arn:aws:s3:us-east-1:123456789012:accesspoint/ap\0", "bucket"), ignored={})
@example(bad=(ctx.BUCKET_NAME, "é" * 4000, "bucket"), ignored={})
@example(bad=("k" * 100_000, "v", "unknown attribute"), ignored={})  # echoed: the message is shortened
@example(bad=(ctx.PREFIX, "a,allow_other//b", "prefix"), ignored={ctx.PROVISIONER_PREFIX + "x": "\0"})
def test_bad_volume_context_values_are_invalid_argument(node, bad, ignored):
    key, value, needle = bad
    attributes = {**node.attributes(), **ignored, key: value}
    node.publish_refused(node.request(attributes), {grpc.StatusCode.INVALID_ARGUMENT}, needle)


@pytest.mark.parametrize("size", [1_000_000, 3_900_000])
def test_megabytes_of_volume_context_are_invalid_argument(node, size):
    node.publish_refused(node.request(node.attributes(prefix="p" * size)), {grpc.StatusCode.INVALID_ARGUMENT},
                         "prefix")


def test_a_request_over_grpc_s_message_limit_is_resource_exhausted(node):
    node.publish_refused(node.request(node.attributes(prefix="p" * 5_000_000)),
                         {grpc.StatusCode.RESOURCE_EXHAUSTED})


@FUZZ
@given(flags=bad_flags())
@example(flags=["ro,allow_other"])
@example(flags=["uid=1000,allow_other"])
@example(flags=["--foo"])
@example(flags=["read-only", "metadata-ttl=1\n--allow-root"])
@example(flags=["uid=" + "é" * 2048])  # at the value limit, and quoted in the message
def test_bad_mount_options_are_invalid_argument_naming_the_option(node, flags):
    request = node.request(cap=capability(flags=flags))
    node.publish_refused(request, {grpc.StatusCode.INVALID_ARGUMENT}, *_flag_needles(flags))


def test_a_size_of_too_many_digits_names_the_option(node):
    request = node.request(cap=capability(flags=["max-memory=" + "9" * 4000]))  # int() takes up to 4,300
    node.publish_refused(request, {grpc.StatusCode.INVALID_ARGUMENT}, "--max-memory")


@FUZZ
@given(group=st.one_of(st.text(min_size=1, max_size=30).filter(lambda g: not g.isdigit()),
                       st.integers(2**32 - 1, 10**30).map(str), st.integers(4301, 20_000).map(lambda n: "9" * n),
                       st.sampled_from(["-1", "+1", " 1", "1 ", "0x10", "1e3", "²", "1,000", "1\0", "١٢٣", "1_000"])))
def test_bad_volume_mount_group_is_invalid_argument(node, group):
    request = node.request(cap=capability(fs_group=group))
    node.publish_refused(request, {grpc.StatusCode.INVALID_ARGUMENT}, "volume_mount_group", "--gid")


@pytest.mark.parametrize("change,needle", [
    (lambda r: r.ClearField("volume_capability"), "volume_capability"),
    (lambda r: r.ClearField("volume_id"), "volume_id"),
    (lambda r: r.ClearField("target_path"), "target_path"),
    (lambda r: r.volume_capability.CopyFrom(capability(block=True)), "volume_capability"),
    (lambda r: r.volume_capability.ClearField("mount"), "volume_capability"),
    (lambda r: setattr(r.volume_capability.access_mode, "mode", AccessMode.UNKNOWN), "volume_capability"),
    (lambda r: setattr(r.volume_capability.access_mode, "mode", 99), "volume_capability"),
    (lambda r: setattr(r.volume_capability.access_mode, "mode", -1), "volume_capability"),
])
def test_missing_fields_and_unsupported_capabilities_are_invalid_argument(node, change, needle):
    request = node.request()
    change(request)
    node.publish_refused(request, {grpc.StatusCode.INVALID_ARGUMENT}, needle)


@FUZZ
@given(bad=bad_secrets())
@example(bad=({"key_id": secret("AKIA"), "access_key": secret("x"), "\n": secret("odd")}, {}))
@example(bad=({"key_id": secret("\0"), "access_key": ""}, {}))
def test_bad_secrets_are_invalid_argument_and_never_quoted(node, bad):
    secrets, extra = bad
    request = node.request({**node.attributes(), **extra}, secrets=secrets)
    node.publish_refused(request, {grpc.StatusCode.INVALID_ARGUMENT}, "secrets")


@FUZZ
@given(tokens=bad_tokens(), ephemeral=st.booleans())
@example(tokens=(_nested(60_000, "list")[:65_000], (grpc.StatusCode.INVALID_ARGUMENT,)), ephemeral=False)
@example(tokens=(_nested(20_000, "object"), (grpc.StatusCode.INVALID_ARGUMENT,)), ephemeral=True)
@example(tokens=("", (grpc.StatusCode.UNAUTHENTICATED,)), ephemeral=False)
@example(tokens=(json.dumps({STS_AUDIENCE: {"token": secret(), "expirationTimestamp": "2024-13-45T99:00:00Z"}}),
                 (grpc.StatusCode.INVALID_ARGUMENT,)), ephemeral=False)
def test_bad_service_account_tokens_are_refused_and_never_quoted(node, tokens, ephemeral):
    value, codes = tokens
    attributes = {ctx.BUCKET_NAME: node.bucket, ctx.REGION: "us-east-1", ctx.AUTHENTICATION_SOURCE: "pod",
                  TOKENS: value}
    if not ephemeral:  # an inline volume may not pick the endpoint
        attributes[ctx.ENDPOINT] = node.endpoint
    request = node.request(attributes, ephemeral=ephemeral)
    node.publish_refused(request, set(codes), "serviceAccount.tokens", "token")


@FUZZ
@given(data=st.data())
@example(data=None)
def test_target_paths_outside_kubelet_s_layout_are_invalid_argument(node, data):
    kubelet_dir = node.server.kubelet_dir
    paths = ([str(kubelet_dir / "pods" / ".." / ".." / "state" / "mounts" / "x" / "volumes" / "kubernetes.io~csi"
                  / "v" / "mount"), "/etc/kubernetes.io~csi/pv/mount", "/", str(kubelet_dir)]
             if data is None else [data.draw(bad_target(kubelet_dir))])
    for path in paths:
        request = node.request()
        request.target_path = path
        node.publish_refused(request, {grpc.StatusCode.INVALID_ARGUMENT}, "target_path")
        unpublish = csi_pb2.NodeUnpublishVolumeRequest(volume_id="pv-fuzz", target_path=path)
        node.refused(node.kubelet.stub.NodeUnpublishVolume, unpublish, {grpc.StatusCode.INVALID_ARGUMENT},
                     "target_path")


@pytest.mark.parametrize("where", ["volume", "mount", "pod", "inside"])
def test_a_symbolic_link_on_the_target_path_is_refused(node, tmp_path, where):
    """kubelet makes the directories above the target and never a link: one there (made
    by whoever could write in kubelet's directory) must not move the mount elsewhere."""
    outside = tmp_path / "outside"
    outside.mkdir()
    uid = str(uuid.uuid4())
    pod_dir = node.server.kubelet_dir / "pods" / uid
    volumes = pod_dir / "volumes" / "kubernetes.io~csi"
    if where == "volume":  # .../kubernetes.io~csi/<pv> -> outside
        volumes.mkdir(parents=True)
        (volumes / "pv-link").symlink_to(outside)
    elif where == "mount":  # .../<pv>/mount -> outside
        (volumes / "pv-link").mkdir(parents=True)
        (volumes / "pv-link" / "mount").symlink_to(outside)
    elif where == "pod":  # pods/<uid> -> a look-alike tree outside
        (outside / "volumes" / "kubernetes.io~csi" / "pv-link").mkdir(parents=True)
        pod_dir.symlink_to(outside)
    else:  # a link to another volume's directory, inside kubelet's
        other = node.server.kubelet_dir / "pods" / str(uuid.uuid4()) / "volumes" / "kubernetes.io~csi" / "other"
        other.mkdir(parents=True)
        volumes.mkdir(parents=True)
        (volumes / "pv-link").symlink_to(other)
    outside_before = _tree(outside)
    try:
        path = str(volumes / "pv-link" / "mount")
        request = node.request()
        request.target_path = path
        node.publish_refused(request, {grpc.StatusCode.INVALID_ARGUMENT}, "target_path")
        node.refused(node.kubelet.stub.NodeUnpublishVolume,
                     csi_pb2.NodeUnpublishVolumeRequest(volume_id="pv-fuzz", target_path=path),
                     {grpc.StatusCode.INVALID_ARGUMENT}, "target_path")
        assert _tree(outside) == outside_before, "nothing made outside"
    finally:
        if pod_dir.is_symlink():
            pod_dir.unlink()
        elif (volumes / "pv-link").is_symlink():
            (volumes / "pv-link").unlink()
        elif (volumes / "pv-link" / "mount").is_symlink():
            (volumes / "pv-link" / "mount").unlink()


def test_every_status_message_seen_was_short_and_free_of_secrets(node):
    """Last in the module: what the examples above were told, all together."""
    assert node.seen_details, "the tests above ran"
    for details in node.seen_details:
        assert MARKER not in details
        assert len(details.encode()) <= MAX_DETAILS
    node.check_log()
