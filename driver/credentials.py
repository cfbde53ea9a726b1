"""Credentials handed to a mount process in a file, refreshed without remounting.

The node server decides whose credentials a volume uses and writes them to a file only
root can read (``--credentials-file``, JSON, mode 0600); the mount process never gets
them on its command line or in its environment. The file holds one *source*:

- ``static``: ``access_key_id``, ``secret_access_key`` and optional ``session_token``
  (a Kubernetes secret's ``key_id``, ``access_key``, ``session_token``).
- ``web_identity``: ``role_arn`` and ``web_identity_token`` (a pod's projected
  service-account token), exchanged with STS AssumeRoleWithWebIdentity at
  ``sts_endpoint`` or the regional endpoint of ``sts_region``.
- ``container``: ``endpoint`` and ``authorization_token`` (EKS Pod Identity: the node's
  Pod Identity Agent trades the pod's token for the role's credentials).

kubelet republishes with a fresh token before the old one expires, and the node server
replaces the file (atomically); the next signed request notices the new file and fetches
credentials from it, so a mount outlives any one token. Expiring credentials are fetched
again ahead of time, as botocore does for its own providers.

Without a credentials file the mount uses the standard AWS chain of its environment.
Either way one botocore session supplies both botocore's clients and awscrt (through a delegate in
driver.s3.crt), so both sign with the same, current keys.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import botocore.config
import botocore.credentials
import botocore.exceptions
import botocore.loaders
import botocore.session
import structlog

log = structlog.get_logger("pail.credentials")

STATIC, WEB_IDENTITY, CONTAINER = "static", "web_identity", "container"
SOURCES = (STATIC, WEB_IDENTITY, CONTAINER)
# Static keys do not expire; look at the file again this often anyway.
STATIC_LIFETIME = datetime.timedelta(hours=1)
CHECK_INTERVAL = 1.0  # seconds between stats of the credentials file
REQUEST_TIMEOUT = 10.0  # seconds for one STS or Pod Identity Agent request
SESSION_NAME = "pail"
_REFUSED_CODES = ("InvalidIdentityToken", "ExpiredTokenException", "IDPRejectedClaim", "IDPCommunicationError")
_THROTTLED = ("Throttling", "ThrottlingException", "RequestLimitExceeded")


class CredentialError(Exception):
    """Credentials could not be obtained. ``kind`` says whose move it is:
    ``refused`` (the token or keys were rejected or are missing: UNAUTHENTICATED),
    ``denied`` (the role may not be assumed: PERMISSION_DENIED), ``unreachable`` (STS or
    the agent did not answer: UNAVAILABLE), ``invalid`` (the file is malformed)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def read_source(path: str) -> dict[str, Any]:
    """The credential source in ``path``; CredentialError ``invalid`` naming what is wrong
    (never quoting a value: they are secrets)."""
    try:
        with open(path, encoding="utf-8") as f:
            source = json.load(f)
    except FileNotFoundError:
        raise CredentialError("invalid", f"credentials file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise CredentialError("invalid", f"credentials file {path} is unreadable: {type(exc).__name__}") from None
    if not isinstance(source, dict) or source.get("source") not in SOURCES:
        raise CredentialError("invalid", f"credentials file {path}: 'source' must be one of {', '.join(SOURCES)}")
    required = {STATIC: ("access_key_id", "secret_access_key"), WEB_IDENTITY: ("role_arn", "web_identity_token"),
                CONTAINER: ("endpoint", "authorization_token")}[source["source"]]
    for key in required:
        if not isinstance(source.get(key), str) or not source[key]:
            raise CredentialError("invalid", f"credentials file {path}: {key} is missing")
    return source


def fetch(source: dict[str, Any]) -> dict[str, str]:
    """Credentials from ``source`` in botocore's refresh format."""
    kind = source["source"]
    if kind == STATIC:
        expiry = datetime.datetime.now(datetime.timezone.utc) + STATIC_LIFETIME
        return {"access_key": source["access_key_id"], "secret_key": source["secret_access_key"],
                "token": source.get("session_token") or None, "expiry_time": expiry.isoformat()}
    if kind == WEB_IDENTITY:
        return _assume_role_with_web_identity(source)
    return _from_container_endpoint(source)


def _assume_role_with_web_identity(source: dict[str, Any]) -> dict[str, str]:
    region = source.get("sts_region") or "us-east-1"
    sts = new_session().create_client(
        "sts", region_name=region, endpoint_url=source.get("sts_endpoint") or None,
        config=botocore.config.Config(signature_version=botocore.UNSIGNED, connect_timeout=REQUEST_TIMEOUT,
                                      read_timeout=REQUEST_TIMEOUT, retries={"mode": "standard", "max_attempts": 3}))
    try:
        answer = sts.assume_role_with_web_identity(
            RoleArn=source["role_arn"], WebIdentityToken=source["web_identity_token"],
            RoleSessionName=source.get("role_session_name") or SESSION_NAME)
    except botocore.exceptions.ClientError as exc:
        # An <Error> document without the <ErrorResponse> wrapper (S3's shape) parses to a
        # top-level Code.
        code = exc.response.get("Error", {}).get("Code") or exc.response.get("Code") or ""
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _REFUSED_CODES:
            kind = "refused"
        elif status == 403:
            kind = "denied"
        elif isinstance(status, int) and 400 <= status < 500 and code not in _THROTTLED:
            # Any other 4xx is an answer too (ValidationError, InvalidParameterValue, a code
            # botocore could not read): the request was refused, STS is not unreachable.
            kind = "refused"
        else:
            kind = "unreachable"
        if code == "ExpiredTokenException":
            hint = ": the token expired; kubelet sends a fresh one when it republishes"
        else:
            hint = {"refused": ": check the role's trust policy (the cluster's OIDC provider, sub "
                               "system:serviceaccount:NAMESPACE:NAME, aud sts.amazonaws.com)",
                    "denied": ": the role may not be assumed with this token"}.get(kind, "")
        raise CredentialError(kind, f"STS AssumeRoleWithWebIdentity for {source['role_arn']} failed: "
                                    f"HTTP {status} {code}".rstrip() + hint) from None
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectionClosedError) as exc:
        where = source.get("sts_endpoint") or f"the {region} regional endpoint"
        raise CredentialError("unreachable", f"STS ({where}) did not answer: {type(exc).__name__}: check the "
                                             "node's network path to STS (or --sts-endpoint-url)") from None
    credentials = answer["Credentials"]
    return {"access_key": credentials["AccessKeyId"], "secret_key": credentials["SecretAccessKey"],
            "token": credentials["SessionToken"], "expiry_time": _iso(credentials["Expiration"])}


def _from_container_endpoint(source: dict[str, Any]) -> dict[str, str]:
    request = urllib.request.Request(source["endpoint"],
                                     headers={"Authorization": source["authorization_token"]})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:  # noqa: S310
            answer = json.load(response)
    except urllib.error.HTTPError as exc:
        kind = "refused" if exc.code in (400, 401) else "denied" if exc.code == 403 else "unreachable"
        raise CredentialError(kind, f"the Pod Identity Agent refused the token: HTTP {exc.code}") from None
    except (OSError, ValueError) as exc:
        raise CredentialError("unreachable", f"the Pod Identity Agent did not answer: {type(exc).__name__}") from None
    try:
        return {"access_key": answer["AccessKeyId"], "secret_key": answer["SecretAccessKey"],
                "token": answer.get("Token"), "expiry_time": answer["Expiration"]}
    except (KeyError, TypeError):
        raise CredentialError("unreachable", "the Pod Identity Agent answered without credentials") from None


def _parse_time(value: str) -> datetime.datetime:
    parsed = datetime.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def _iso(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime.datetime) else str(value)


class FileCredentials(botocore.credentials.RefreshableCredentials):
    """botocore's refreshable credentials, also refreshed when the file is replaced."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._stamp = _stamp(path)
        self._checked = time.monotonic()
        self._stamp_lock = threading.Lock()
        self._pending = False  # a replaced file was seen and not loaded yet
        first = fetch(read_source(path))
        super().__init__(first["access_key"], first["secret_key"], first["token"],
                         _parse_time(first["expiry_time"]),
                         self._load, "pail-credentials-file")

    def _load(self) -> dict[str, str]:
        with self._stamp_lock:
            # Seen, even if fetching fails: a broken file is not asked again and again.
            self._stamp = _stamp(self._path)
            self._pending = False
        fresh = fetch(read_source(self._path))
        log.info("credentials refreshed", source_file=self._path)
        return fresh

    def refresh_needed(self, refresh_in: int | None = None) -> bool:
        if refresh_in is None:  # as botocore's: the advisory refresh (driver.s3.direct asks so)
            refresh_in = self._advisory_refresh_timeout
        if super().refresh_needed(refresh_in):
            return True
        # A replaced file is an advisory refresh: if fetching fails, botocore keeps the
        # current keys while they are valid.
        return refresh_in == self._advisory_refresh_timeout and self._replaced()

    def _replaced(self) -> bool:
        now = time.monotonic()
        with self._stamp_lock:
            if not self._pending and now - self._checked >= CHECK_INTERVAL:
                self._checked = now
                self._pending = _stamp(self._path) != self._stamp
            return self._pending


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def session(credentials_file: str | None) -> botocore.session.Session:
    """The botocore session of a mount: the credentials file alone when given (never falling
    back to the node's own credentials), else the standard chain."""
    try:
        core = new_session()
        core.get_scoped_config()  # now, not at the first request: a broken config is one line
    except (botocore.exceptions.ProfileNotFound, botocore.exceptions.ConfigParseError) as exc:
        raise CredentialError("invalid", f"AWS configuration: {exc}") from None
    if credentials_file:
        core.register_component("credential_provider", botocore.credentials.CredentialResolver(
            [_Fixed(FileCredentials(credentials_file))]))
    return core


# The services Pail makes clients for.
SERVICES = ("s3", "sts")


class _ServicesLoader(botocore.loaders.Loader):
    """botocore's loader of its JSON models, told which services there are. Before loading
    a model it checks that the service exists by listing every one botocore ships (over
    400 directories, a stat of each) for each kind of model: 25-45 ms of a mount's start
    on a quiet machine, 0.4 s of 1.9 in a profile beside a busy test suite. The models
    load as before."""

    def list_available_services(self, type_name: str) -> list[str]:
        return list(SERVICES)


def new_session() -> botocore.session.Session:
    """A botocore session whose model loader knows the services Pail uses."""
    core = botocore.session.get_session()
    # The search paths botocore's own loader would have (AWS_DATA_PATH first).
    paths = botocore.loaders.create_loader(core.get_config_variable("data_path")).search_paths
    core.register_component("data_loader", _loader(tuple(paths)))
    return core


# One loader per list of search paths, shared by the sessions of a process: a loader keeps
# every model it has parsed, and parsing the JSON of S3's (its API, endpoint rules, and
# botocore's endpoints and partitions) took 0.06-0.13 s of each mount's start. A session's
# clients share their loader's models already; sessions may as well.
_loaders: dict[tuple[str, ...], _ServicesLoader] = {}
_loaders_lock = threading.Lock()


def _loader(paths: tuple[str, ...]) -> _ServicesLoader:
    with _loaders_lock:
        loader = _loaders.get(paths)
        if loader is None:
            loader = _loaders[paths] = _ServicesLoader(extra_search_paths=list(paths),
                                                       include_default_search_paths=False)
        return loader


def load_models() -> None:
    """Parse the models a mount's clients load, for the processes forked after this one
    (driver.csi.launcher)."""
    loader = new_session().get_component("data_loader")
    for name in ("endpoints", "partitions", "sdk-default-configuration"):
        loader.load_data(name)
    for service in SERVICES:
        for kind in ("service-2", "endpoint-rule-set-1"):
            loader.load_service_model(service, kind)


class _Fixed(botocore.credentials.CredentialProvider):
    METHOD = "pail-credentials-file"

    def __init__(self, credentials: FileCredentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> FileCredentials:
        return self._credentials
