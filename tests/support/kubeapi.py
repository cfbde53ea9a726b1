"""A stand-in for the Kubernetes API, serving ServiceAccounts to the node server's real
kubernetes client (``pail csi node --kubeconfig``).

``KubeApi`` listens on a free port of 127.0.0.1 (http.server in a thread) and answers
``GET /api/v1/namespaces/<ns>/serviceaccounts/<name>`` from ``service_accounts``, a dict
``{(namespace, name): annotations}``, as the API server does: a ServiceAccount object, or a
404 ``Status`` object for an unknown one. Requests without the kubeconfig's bearer token get
401. ``fail(status)`` makes every request answer that status (500, 403, ...) until
``fail(None)``; ``requests`` records every request (method, path, whether the token was
right) so tests can count lookups. ``write_kubeconfig`` writes a kubeconfig (plain HTTP,
a dummy bearer token) that points at it.

Example::

    with KubeApi() as kube:
        kube.add_service_account("team-a", "reader", {"eks.amazonaws.com/role-arn": arn})
        NodeServer(..., extra_args=["--kubeconfig", str(kube.write_kubeconfig(tmp / "kc"))])
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

__all__ = ["KubeApi", "KubeRequest"]

TOKEN = "pail-test-kube-api-token"  # a dummy: the stand-in only checks it is the one configured
_SERVICE_ACCOUNT_PATH = re.compile(r"/api/v1/namespaces/([^/]+)/serviceaccounts/([^/?]+)")
_REASONS = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 500: "InternalError",
            503: "ServiceUnavailable"}


@dataclass(frozen=True)
class KubeRequest:
    method: str
    path: str
    authorized: bool


class KubeApi:
    def __init__(self, host: str = "127.0.0.1", token: str = TOKEN) -> None:
        self.token = token
        self.service_accounts: dict[tuple[str, str], dict[str, str]] = {}
        self.requests: list[KubeRequest] = []
        self._failing: int | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> KubeApi:
        self._thread = threading.Thread(target=self._server.serve_forever, name="kube-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port (idempotent): afterwards the API is 'down'."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- what it serves --------------------------------------------------------------------

    def add_service_account(self, namespace: str, name: str, annotations: dict[str, str] | None = None) -> None:
        with self._lock:
            self.service_accounts[(namespace, name)] = dict(annotations or {})

    def fail(self, status: int | None) -> None:
        """Answer every request with ``status`` (a Status object), or normally again with None."""
        with self._lock:
            self._failing = status

    def reset(self) -> None:
        with self._lock:
            self.service_accounts.clear()
            self.requests.clear()
            self._failing = None

    def count(self, namespace: str | None = None, name: str | None = None) -> int:
        """ServiceAccount GETs seen (of this one, if named)."""
        with self._lock:
            requests = list(self.requests)
        found = 0
        for request in requests:
            match = _SERVICE_ACCOUNT_PATH.fullmatch(request.path.split("?")[0])
            if request.method == "GET" and match and (namespace is None or match[1] == namespace) \
                    and (name is None or match[2] == name):
                found += 1
        return found

    def write_kubeconfig(self, path: Path, *, server: str | None = None) -> Path:
        """A kubeconfig for this stand-in (or ``server``): no TLS, the dummy bearer token.
        JSON is YAML, so the kubernetes client reads it as it reads any kubeconfig."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": server or self.endpoint}}],
            "users": [{"name": "pail-node", "user": {"token": self.token}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "pail-node"}}],
            "current-context": "stand-in",
        }
        path.write_text(json.dumps(config, indent=2))
        return path

    # -- answers -----------------------------------------------------------------------------

    def _answer(self, method: str, path: str, authorization: str | None) -> tuple[int, dict]:
        authorized = authorization == f"Bearer {self.token}"
        with self._lock:
            self.requests.append(KubeRequest(method, path, authorized))
            failing = self._failing
            if failing is not None:
                return failing, _status(failing, "injected failure")
            if not authorized:
                return 401, _status(401, "Unauthorized")
            match = _SERVICE_ACCOUNT_PATH.fullmatch(path.split("?")[0])
            if method != "GET" or match is None:
                return 404, _status(404, "the server could not find the requested resource")
            namespace, name = match[1], match[2]
            annotations = self.service_accounts.get((namespace, name))
        if annotations is None:
            return 404, _status(404, f'serviceaccounts "{name}" not found',
                                details={"name": name, "kind": "serviceaccounts"})
        return 200, {
            "kind": "ServiceAccount",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{name}")),
                "resourceVersion": "1",
                "creationTimestamp": "2025-01-01T00:00:00Z",
                "annotations": annotations,
            },
        }


def _status(code: int, message: str, details: dict | None = None) -> dict:
    status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
              "message": message, "reason": _REASONS.get(code, "Unknown"), "code": code}
    if details:
        status["details"] = details
    return status


def _handler(api: KubeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            code, body = api._answer(self.command, self.path, self.headers.get("Authorization"))
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _reply

        def log_message(self, format: str, *args) -> None:
            pass

    return Handler
