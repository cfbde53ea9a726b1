"""Whose credentials a volume's mount uses: the node's own, a secret's, or the pod's.

- ``authenticationSource: driver`` (default) without secrets: the mount process uses the
  node pod's standard AWS chain (IRSA web identity, EKS Pod Identity, environment keys,
  instance profile). Nothing is written.
- ``driver`` with secrets (``nodePublishSecretRef``, or the StorageClass's node-publish
  secret): the secret's ``key_id``, ``access_key`` and optional ``session_token``.
- ``pod``: the workload's projected service-account token, which kubelet puts in
  ``csi.storage.k8s.io/serviceAccount.tokens`` on every (re)publish. If the pod's
  ServiceAccount carries ``eks.amazonaws.com/role-arn``, the token for audience
  ``sts.amazonaws.com`` is exchanged at STS (AssumeRoleWithWebIdentity, IRSA-style);
  otherwise, when the node has an EKS Pod Identity Agent, the token for
  ``pods.eks.amazonaws.com`` is traded there for the pod's association's role.

Anything but the node's own chain becomes a driver.credentials source, which
driver.csi.mounts writes to a 0600 file for the mount process. Every refusal names what
to fix and never quotes a secret or a token.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
import structlog

from driver import credentials
from driver.csi import context as ctx
from driver.csi.errors import CsiError, invalid

log = structlog.get_logger("pail.csi.credentials")

# Keys of a credentials secret.
SECRET_KEY_ID = "key_id"
SECRET_ACCESS_KEY = "access_key"
SECRET_SESSION_TOKEN = "session_token"
SECRET_KEYS = (SECRET_KEY_ID, SECRET_ACCESS_KEY, SECRET_SESSION_TOKEN)

STS_AUDIENCE = "sts.amazonaws.com"
POD_IDENTITY_AUDIENCE = "pods.eks.amazonaws.com"
ROLE_ARN_ANNOTATION = "eks.amazonaws.com/role-arn"
MAX_TOKENS_BYTES = 64 * 1024
_ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}")
_SESSION_NAME_UNSAFE = re.compile(r"[^\w+=,.@-]")

# (namespace, name) -> the ServiceAccount's annotations; raises CsiError.
ServiceAccountLookup = Callable[[str, str], Mapping[str, str]]


@dataclass(frozen=True)
class PodIdentitySettings:
    """Node-level settings for pod-level credentials."""

    sts_endpoint: str | None = None  # None: the regional STS endpoint
    sts_region: str | None = None  # default when the volume sets no stsRegion
    pod_identity_agent_url: str | None = None  # None: EKS Pod Identity is not offered


def credential_source(attributes: Mapping[str, str], secrets: Mapping[str, str],
                      service_account: ServiceAccountLookup | None,
                      settings: PodIdentitySettings) -> dict | None:
    """The driver.credentials source for this publish, or None for the node's own chain."""
    source = attributes.get(ctx.AUTHENTICATION_SOURCE, ctx.AUTH_SOURCE_DRIVER)
    if source == ctx.AUTH_SOURCE_DRIVER:
        return _from_secrets(secrets) if secrets else None
    if secrets:
        raise invalid(f"secrets: a volume with {ctx.AUTHENTICATION_SOURCE}=pod uses the pod's identity; "
                      "remove the secret reference or use authenticationSource=driver")
    return _from_pod(attributes, service_account, settings)


def _from_secrets(secrets: Mapping[str, str]) -> dict:
    unknown = sorted(k for k in secrets if k not in SECRET_KEYS)
    if unknown:
        raise invalid(f"secrets: unknown key {unknown[0]!r} (expected {', '.join(SECRET_KEYS)})")
    for key in (SECRET_KEY_ID, SECRET_ACCESS_KEY):
        if not secrets.get(key):
            raise invalid(f"secrets: {key} is missing or empty")
    source = {"source": credentials.STATIC, "access_key_id": secrets[SECRET_KEY_ID],
              "secret_access_key": secrets[SECRET_ACCESS_KEY]}
    if secrets.get(SECRET_SESSION_TOKEN):
        source["session_token"] = secrets[SECRET_SESSION_TOKEN]
    return source


def _from_pod(attributes: Mapping[str, str], service_account: ServiceAccountLookup | None,
              settings: PodIdentitySettings) -> dict:
    namespace = attributes.get(ctx.POD_NAMESPACE)
    name = attributes.get(ctx.SERVICE_ACCOUNT_NAME)
    if not namespace or not name:
        raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                       "pod-level credentials need the pod's namespace and service account: "
                       "the CSIDriver must set podInfoOnMount: true")
    tokens = _tokens(attributes.get(ctx.SERVICE_ACCOUNT_TOKENS))
    if service_account is None:
        raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                       "pod-level credentials are not available: the node server has no access "
                       "to the Kubernetes API")
    annotations = service_account(namespace, name)
    who = f"service account {namespace}/{name}"
    role_arn = annotations.get(ROLE_ARN_ANNOTATION, "").strip()
    if role_arn:
        if not _ROLE_ARN.fullmatch(role_arn):
            raise invalid(f"{who}: annotation {ROLE_ARN_ANNOTATION} is not an IAM role ARN")
        token = _token(tokens, STS_AUDIENCE)
        region = attributes.get(ctx.STS_REGION) or settings.sts_region or attributes.get(ctx.REGION)
        source = {"source": credentials.WEB_IDENTITY, "role_arn": role_arn, "web_identity_token": token,
                  "role_session_name": _session_name(namespace, name)}
        if region:
            source["sts_region"] = region
        if settings.sts_endpoint:
            source["sts_endpoint"] = settings.sts_endpoint
        return source
    if POD_IDENTITY_AUDIENCE in tokens and settings.pod_identity_agent_url:
        return {"source": credentials.CONTAINER, "endpoint": settings.pod_identity_agent_url,
                "authorization_token": _token(tokens, POD_IDENTITY_AUDIENCE)}
    raise CsiError(grpc.StatusCode.PERMISSION_DENIED,
                   f"{who} has no {ROLE_ARN_ANNOTATION} annotation"
                   + (" and no EKS Pod Identity token" if settings.pod_identity_agent_url else "")
                   + ": give it an IAM role for its pods to use")


def _tokens(raw: str | None) -> dict:
    if not raw:
        raise CsiError(grpc.StatusCode.UNAUTHENTICATED,
                       f"no service-account token in {ctx.SERVICE_ACCOUNT_TOKENS}: the CSIDriver must "
                       f"request tokens for audience {STS_AUDIENCE} (tokenRequests)")
    if len(raw) > MAX_TOKENS_BYTES:
        raise invalid(f"volume_context: {ctx.SERVICE_ACCOUNT_TOKENS} is larger than {MAX_TOKENS_BYTES} bytes")
    try:
        tokens = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deep ("[[[[...")
        raise invalid(f"volume_context: {ctx.SERVICE_ACCOUNT_TOKENS} is not valid JSON") from None
    if not isinstance(tokens, dict) or not all(isinstance(v, dict) for v in tokens.values()):
        raise invalid(f"volume_context: {ctx.SERVICE_ACCOUNT_TOKENS} must map audiences to "
                      "{token, expirationTimestamp}")
    return tokens


def _token(tokens: dict, audience: str) -> str:
    entry = tokens.get(audience)
    if entry is None:
        raise CsiError(grpc.StatusCode.UNAUTHENTICATED,
                       f"no service-account token for audience {audience}: add it to the CSIDriver's tokenRequests")
    token = entry.get("token")
    if not isinstance(token, str) or not token or "\0" in token:
        raise invalid(f"volume_context: the {audience} token in {ctx.SERVICE_ACCOUNT_TOKENS} is empty or malformed")
    expires = entry.get("expirationTimestamp")
    if isinstance(expires, str):
        try:
            when = datetime.datetime.fromisoformat(expires.replace("Z", "+00:00"))
        except ValueError:
            raise invalid(f"volume_context: the {audience} token's expirationTimestamp is not a time") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        if when <= datetime.datetime.now(datetime.timezone.utc):
            raise CsiError(grpc.StatusCode.UNAUTHENTICATED,
                           f"the service-account token for audience {audience} expired at {expires}")
    return token


def _session_name(namespace: str, name: str) -> str:
    """STS session names show up in CloudTrail: say which pod identity made the calls."""
    return _SESSION_NAME_UNSAFE.sub("-", f"pail-{namespace}-{name}")[:64]


class KubernetesServiceAccounts:
    """Reads ServiceAccounts with the kubernetes client: in the cluster (the node pod's
    own service account, which the chart lets read ServiceAccounts and nothing more), or
    through ``kubeconfig``."""

    def __init__(self, kubeconfig: str | None = None, timeout: float = 10.0) -> None:
        self._kubeconfig = kubeconfig
        self._timeout = timeout
        self._api = None

    def __call__(self, namespace: str, name: str) -> Mapping[str, str]:
        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException

        if self._api is None:
            try:
                if self._kubeconfig:
                    api_client = config.new_client_from_config(config_file=self._kubeconfig)
                else:
                    config.load_incluster_config()
                    api_client = client.ApiClient()
            except Exception as exc:  # noqa: BLE001 - any configuration problem is the same answer
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"cannot reach the Kubernetes API: {type(exc).__name__}") from None
            self._api = client.CoreV1Api(api_client)
        try:
            account = self._api.read_namespaced_service_account(name, namespace, _request_timeout=self._timeout)
        except ApiException as exc:
            if exc.status == 404:
                raise CsiError(grpc.StatusCode.PERMISSION_DENIED,
                               f"service account {namespace}/{name} does not exist") from None
            if exc.status in (401, 403):
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"the node server may not read service account {namespace}/{name} "
                               f"(HTTP {exc.status}): check its RBAC") from None
            raise CsiError(grpc.StatusCode.UNAVAILABLE,
                           f"the Kubernetes API answered HTTP {exc.status} for service account "
                           f"{namespace}/{name}") from None
        except Exception as exc:  # noqa: BLE001 - urllib3 connection and timeout errors
            raise CsiError(grpc.StatusCode.UNAVAILABLE,
                           f"the Kubernetes API did not answer: {type(exc).__name__}") from None
        return dict(account.metadata.annotations or {})
