"""The `helm test` pod: its script run against a stand-in for the Kubernetes API, with the
real kubernetes client, as the pod would run it (no cluster here)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from driver.csi.identity import DRIVER_NAME
from tests.chart import helm as h

LEASE = DRIVER_NAME.replace(".", "-")

# Points the kubernetes client at the stand-in instead of the in-cluster API.
PRELUDE = """
import os, kubernetes.client, kubernetes.config
def _stand_in():
    c = kubernetes.client.Configuration()
    c.host = os.environ["STAND_IN_API"]
    kubernetes.client.Configuration.set_default(c)
kubernetes.config.load_incluster_config = _stand_in
"""


class FakeApi(BaseHTTPRequestHandler):
    objects: ClassVar[dict[str, dict]] = {}

    def do_GET(self):
        body = self.objects.get(self.path)
        status = 200 if body else 404
        body = body or {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def api():
    FakeApi.objects = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeApi.objects
    server.shutdown()
    server.server_close()


def test_pod(defaults):
    pod = defaults.one("Pod", "pail-test", hooks=True)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["serviceAccountName"] == "pail-test"
    check = h.container(pod, "check")
    assert check["image"] == h.container(defaults.one("DaemonSet", "pail-node"), "pail")["image"]
    # It runs where the node plugin runs.
    node_spec = h.pod_spec(defaults.one("DaemonSet", "pail-node"))
    assert pod["spec"]["nodeSelector"] == node_spec["nodeSelector"]
    assert pod["spec"]["tolerations"] == node_spec["tolerations"]


def run_check(rendered_pod: dict, api_url: str) -> subprocess.CompletedProcess:
    check = h.container(rendered_pod, "check")
    assert check["command"] == ["python3", "-c"]
    env = {e["name"]: e.get("value", "") for e in check["env"]}
    env.update(NODE_NAME="node-1", STAND_IN_API=api_url, CHECK_SECONDS="0")
    return subprocess.run([sys.executable, "-c", PRELUDE + check["args"][0]], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def registered_cluster(objects: dict, *, drivers: list[str], holder: str | None = "pail-controller-7d9f"):
    objects[f"/apis/storage.k8s.io/v1/csidrivers/{DRIVER_NAME}"] = {
        "apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver", "metadata": {"name": DRIVER_NAME}, "spec": {}}
    objects["/apis/storage.k8s.io/v1/csinodes/node-1"] = {
        "apiVersion": "storage.k8s.io/v1", "kind": "CSINode", "metadata": {"name": "node-1"},
        "spec": {"drivers": [{"name": d, "nodeID": "node-1"} for d in drivers]}}
    if holder is not None:
        objects[f"/apis/coordination.k8s.io/v1/namespaces/{h.NAMESPACE}/leases/{LEASE}"] = {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": LEASE},
            "spec": {"holderIdentity": holder}}


def test_passes_when_the_driver_is_registered_and_provisioner_leads(defaults, api):
    url, objects = api
    registered_cluster(objects, drivers=["ebs.csi.aws.com", DRIVER_NAME])
    result = run_check(defaults.one("Pod", "pail-test", hooks=True), url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok:") == 3
    assert f"kubelet on node node-1 has registered {DRIVER_NAME}" in result.stdout


def test_fails_when_kubelet_has_not_registered_the_driver(defaults, api):
    url, objects = api
    registered_cluster(objects, drivers=["ebs.csi.aws.com"])
    result = run_check(defaults.one("Pod", "pail-test", hooks=True), url)
    assert result.returncode == 1
    assert f"FAILED: registered: kubelet on node node-1 has not registered {DRIVER_NAME}" in result.stdout


def test_fails_without_a_provisioner_leader(defaults, api):
    url, objects = api
    registered_cluster(objects, drivers=[DRIVER_NAME], holder=None)
    result = run_check(defaults.one("Pod", "pail-test", hooks=True), url)
    assert result.returncode == 1
    assert "FAILED: provisioner: HTTP 404" in result.stdout


def test_skips_the_provisioner_without_a_controller(helm, api):
    url, objects = api
    registered_cluster(objects, drivers=[DRIVER_NAME], holder=None)
    pod = h.render(None, "--set", "controller.enabled=false").one("Pod", "pail-test", hooks=True)
    result = run_check(pod, url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok:") == 2
