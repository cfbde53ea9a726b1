"""AWS identity stand-ins for credential tests, all on 127.0.0.1.

* ``PodIdentityAgent``: the EKS Pod Identity Agent (``http://169.254.170.23/v1/credentials``
  on a node). It checks the ``Authorization`` header (the pod's projected token for
  audience ``pods.eks.amazonaws.com``) against the tokens it was told to accept and
  answers ``{AccessKeyId, SecretAccessKey, Token, Expiration}`` from a callable (so the
  keys can be real keys of the S3 server under test), 401 otherwise; ``refuse(403)``
  makes it answer 403 as the agent does for a pod without an association.
* ``IamMoto``: a moto server started with IAM enforcement (``INITIAL_NO_AUTH_ACTION_COUNT=0``:
  every S3 and STS request must be signed by known keys, and the signer's policies are
  evaluated against the action and resource). Moto has no root keys: it opens a window
  without authentication (``/moto-api/reset-auth``) just long enough to create an admin
  IAM user, and everything after that (buckets, roles) is done with that user's keys.
* ``StsFront``: real STS answers AssumeRoleWithWebIdentity without a signature (the token
  is the credential). Moto under IAM enforcement requires every request to be signed and
  fails an unsigned one (a KeyError on the missing Authorization header, HTTP 500), so the
  front signs the unsigned request with the admin keys and forwards it unchanged
  otherwise, and records the tokens it saw and the keys moto issued. Moto does not
  check the token nor the role's trust policy for AssumeRoleWithWebIdentity (any token is
  accepted); refusals are injected with an S3Proxy in front.
"""

from __future__ import annotations

import datetime
import http.client
import json
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from xml.etree import ElementTree

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.config
import botocore.credentials

from .s3server import S3Server, start_moto

__all__ = [
    "POD_IDENTITY_TRUST",
    "IamMoto",
    "IssuedKeys",
    "PodIdentityAgent",
    "StsFront",
    "bucket_policy",
    "issued_by",
    "start_iam_moto",
    "web_identity_trust",
]

ACCOUNT = "123456789012"  # moto's default account
OIDC_PROVIDER = "oidc.eks.us-east-1.amazonaws.com/id/PAILTEST"
_STS_NS = {"s": "https://sts.amazonaws.com/doc/2011-06-15/"}


@dataclass(frozen=True)
class IssuedKeys:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None


# --------------------------------------------------------------- Pod Identity Agent
class PodIdentityAgent:
    """``credentials(token)`` gives the keys handed out for an accepted token."""

    def __init__(self, credentials: Callable[[str], IssuedKeys], tokens: set[str] | None = None,
                 host: str = "127.0.0.1") -> None:
        self.credentials = credentials
        self.tokens: set[str] = set(tokens or ())
        self.requests: list[tuple[str, bool]] = []  # (path, token accepted)
        self.issued: list[IssuedKeys] = []
        self._refusal: int | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), _agent_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1/credentials"

    def accept(self, token: str) -> None:
        with self._lock:
            self.tokens.add(token)

    def refuse(self, status: int | None) -> None:
        """Answer every request with ``status``, or normally again with None."""
        with self._lock:
            self._refusal = status

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def start(self) -> PodIdentityAgent:
        self._thread = threading.Thread(target=self._server.serve_forever, name="pod-identity-agent",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _answer(self, path: str, authorization: str | None) -> tuple[int, dict]:
        with self._lock:
            accepted = authorization is not None and authorization in self.tokens
            self.requests.append((path, accepted))
            refusal = self._refusal
        if path.split("?")[0] != "/v1/credentials":
            return 404, {"message": "not found"}
        if refusal is not None:
            return refusal, {"message": f"refused ({refusal})"}
        if not authorization:
            return 401, {"message": "missing Authorization header"}
        if not accepted:
            return 401, {"message": "invalid token"}
        keys = self.credentials(authorization)
        with self._lock:
            self.issued.append(keys)
        expiration = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=6)
        return 200, {"AccessKeyId": keys.access_key_id, "SecretAccessKey": keys.secret_access_key,
                     "Token": keys.session_token, "AccountId": ACCOUNT,
                     "Expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ")}


def _agent_handler(agent: PodIdentityAgent) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            code, body = agent._answer(self.path, self.headers.get("Authorization"))
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:
            pass

    return Handler


# ------------------------------------------------------------------ moto with IAM on
def start_iam_moto(workdir: Path) -> IamMoto:
    server = start_moto(workdir, extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        return IamMoto(server)
    except BaseException:
        server.stop()
        raise


def bucket_policy(bucket: str) -> dict:
    """What a read-write Pail mount of ``bucket`` needs (docs/CREDENTIALS.md), plus
    ``s3:HeadBucket``: moto checks HEAD bucket as that action, which real IAM does not
    have (S3 checks s3:ListBucket)."""
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:HeadBucket"], "Resource": f"arn:aws:s3:::{bucket}"},
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload",
                                       "s3:DeleteObject"], "Resource": f"arn:aws:s3:::{bucket}/*"},
    ]}


def web_identity_trust(namespace: str, name: str) -> dict:
    """The trust policy of a pod-level IRSA role (moto stores it, does not evaluate it)."""
    return {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow",
        "Principal": {"Federated": f"arn:aws:iam::{ACCOUNT}:oidc-provider/{OIDC_PROVIDER}"},
        "Action": "sts:AssumeRoleWithWebIdentity",
        "Condition": {"StringEquals": {f"{OIDC_PROVIDER}:sub": f"system:serviceaccount:{namespace}:{name}",
                                       f"{OIDC_PROVIDER}:aud": "sts.amazonaws.com"}}}]}


POD_IDENTITY_TRUST = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "pods.eks.amazonaws.com"},
    "Action": ["sts:AssumeRole", "sts:TagSession"]}]}


class IamMoto:
    """Admin access to a moto server that enforces IAM."""

    def __init__(self, server: S3Server) -> None:
        self.server = server
        self._reset_auth("inf")  # moto has no root keys: create an admin while nothing is checked
        try:
            iam = self._client("iam", "unused", "unused")
            iam.create_user(UserName="pail-admin")
            key = iam.create_access_key(UserName="pail-admin")["AccessKey"]
            iam.put_user_policy(UserName="pail-admin", PolicyName="admin", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        finally:
            self._reset_auth("0")
        self.admin = IssuedKeys(key["AccessKeyId"], key["SecretAccessKey"])

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def _reset_auth(self, count: str) -> None:
        request = urllib.request.Request(self.endpoint + "/moto-api/reset-auth", data=count.encode(),
                                         method="POST", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def _client(self, service: str, key_id: str, secret: str, token: str | None = None):
        return boto3.session.Session().client(
            service, endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=key_id,
            aws_secret_access_key=secret, aws_session_token=token,
            config=botocore.config.Config(s3={"addressing_style": "path"},
                                          retries={"total_max_attempts": 2, "mode": "standard"}))

    def client(self, service: str, keys: IssuedKeys | None = None):
        """A client signing with ``keys`` (default: the admin's)."""
        keys = keys or self.admin
        return self._client(service, keys.access_key_id, keys.secret_access_key, keys.session_token)

    def create_role(self, name: str, policy: dict, trust: dict) -> str:
        iam = self.client("iam")
        arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
        iam.put_role_policy(RoleName=name, PolicyName=f"{name}-s3", PolicyDocument=json.dumps(policy))
        return arn

    def create_user(self, name: str, policy: dict) -> IssuedKeys:
        """An IAM user with ``policy`` and a static key pair (AKIA...)."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return IssuedKeys(key["AccessKeyId"], key["SecretAccessKey"])

    def role_keys(self, role_arn: str, token: str = "agent-issued-token", session: str = "pail-test") -> IssuedKeys:
        """Fresh keys of ``role_arn`` from moto's STS (what an agent or STS would hand out)."""
        body = urllib.parse.urlencode({"Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15",
                                       "RoleArn": role_arn, "WebIdentityToken": token,
                                       "RoleSessionName": session})
        status, _, answer = _signed_forward(self.endpoint, "/", body.encode(),
                                            {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
                                            self.admin)
        keys = _issued(answer)
        if status != 200 or keys is None:
            raise RuntimeError(f"moto STS answered {status}: {answer[:300]!r}")
        return keys

    def issued(self) -> list[IssuedKeys]:
        """Every key pair moto's STS ever issued."""
        return issued_by(self.endpoint)


def issued_by(endpoint: str) -> list[IssuedKeys]:
    """Keys issued by the STS of any moto server (``/moto-api/data.json``)."""
    with urllib.request.urlopen(endpoint + "/moto-api/data.json", timeout=10) as response:
        data = json.load(response)
    return [IssuedKeys(r["access_key_id"], r["secret_access_key"], r.get("session_token"))
            for r in data.get("sts", {}).get("AssumedRole", [])]


def _issued(body: bytes) -> IssuedKeys | None:
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None
    credentials = root.find(".//s:Credentials", _STS_NS)
    if credentials is None:
        return None
    return IssuedKeys(*(credentials.findtext(f"s:{name}", namespaces=_STS_NS)
                        for name in ("AccessKeyId", "SecretAccessKey", "SessionToken")))


def _signed_forward(upstream: str, path: str, body: bytes, headers: dict[str, str],
                    keys: IssuedKeys) -> tuple[int, str, bytes]:
    request = botocore.awsrequest.AWSRequest(method="POST", url=upstream + path, data=body,
                                             headers=dict(headers))
    botocore.auth.SigV4Auth(botocore.credentials.Credentials(keys.access_key_id, keys.secret_access_key),
                            "sts", "us-east-1").add_auth(request)
    prepared = request.prepare()
    parts = urllib.parse.urlsplit(upstream)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers=dict(prepared.headers))
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", "text/xml"), response.read()
    finally:
        connection.close()


class StsFront:
    """Unsigned STS requests in, admin-signed requests out to the IAM-enforcing moto.

    ``calls`` records (role_arn, web_identity_token, session_name) of every
    AssumeRoleWithWebIdentity; ``issued`` the keys moto answered with."""

    def __init__(self, iam: IamMoto, host: str = "127.0.0.1") -> None:
        self.iam = iam
        self.calls: list[tuple[str, str, str]] = []
        self.issued: list[IssuedKeys] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), _front_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def tokens(self) -> list[str]:
        with self._lock:
            return [token for _, token, _ in self.calls]

    def start(self) -> StsFront:
        self._thread = threading.Thread(target=self._server.serve_forever, name="sts-front", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _forward(self, path: str, headers, body: bytes) -> tuple[int, str, bytes]:
        form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
        if form.get("Action") == "AssumeRoleWithWebIdentity":
            with self._lock:
                self.calls.append((form.get("RoleArn", ""), form.get("WebIdentityToken", ""),
                                   form.get("RoleSessionName", "")))
        content_type = headers.get("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")
        status, answer_type, answer = _signed_forward(self.iam.endpoint, path, body,
                                                      {"Content-Type": content_type}, self.iam.admin)
        keys = _issued(answer) if status == 200 else None
        if keys is not None:
            with self._lock:
                self.issued.append(keys)
        return status, answer_type, answer


def _front_handler(front: StsFront) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                status, content_type, answer = front._forward(self.path, self.headers, body)
            except OSError as exc:
                status, content_type, answer = 502, "text/plain", f"upstream: {exc}".encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args) -> None:
            pass

    return Handler
