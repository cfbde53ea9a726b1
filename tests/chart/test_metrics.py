"""Prometheus metrics of the node plugin: the node server's --metrics-port, the pod's
`metrics` port, the headless Service that lists the node pods, and the optional
ServiceMonitor that points the Prometheus Operator at it."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.chart import helm as h
from tests.chart.test_kubernetes_schemas import CUSTOM_RESOURCES
from tests.chart.test_node import node_ds, parse_node_args

SERVICE = "pail-node-metrics"

# The part of the Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1) CRD that
# the chart uses, strictly: kubernetes-validate has no schema for custom resources, so
# test_kubernetes_schemas skips this kind and this checks it instead. Field names, types
# and patterns are the CRD's (Duration and LabelName patterns of prometheus-operator).
DURATION = "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
LABEL_NAME = "^[a-zA-Z_][a-zA-Z0-9_]*$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "namespace"],
            "properties": {
                "name": {"type": "string", "maxLength": 253, "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": STRING_MAP,
                "annotations": STRING_MAP,
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": STRING_MAP, "matchExpressions": {"type": "array"}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"},
                                   "matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": DURATION},
                            "relabelings": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "sourceLabels": {"type": "array",
                                                         "items": {"type": "string", "pattern": LABEL_NAME}},
                                        "targetLabel": {"type": "string"},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def render_with(*settings: str) -> h.Rendered:
    args: list[str] = []
    for s in settings:
        args += ["--set", s]
    return h.render(None, *args)


def metrics_ports(ds: dict) -> list[dict]:
    return [p for p in h.container(ds, "pail").get("ports", []) if p["name"] == "metrics"]


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_defaults(chart_values):
    assert chart_values["node"]["metrics"] == {
        "enabled": True,
        "port": 9811,
        "serviceMonitor": {"enabled": False, "interval": "30s", "labels": {}},
    }


@pytest.mark.parametrize("values,port", [("defaults.yaml", 9811), ("metrics.yaml", 19811)])
def test_node_server_serves_metrics_on_the_named_port(rendered, values, port):
    ds = node_ds(rendered(values))
    pail = h.container(ds, "pail")
    assert h.flag(pail["args"], "--metrics-port") == str(port)
    assert metrics_ports(ds) == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    # No other container of the pod (one network namespace) declares that port.
    others = [p["containerPort"] for c in h.pod_spec(ds)["containers"] for p in c.get("ports", [])
              if p["name"] != "metrics"]
    assert port not in others


@pytest.mark.parametrize("values,port", [("defaults.yaml", 9811), ("metrics.yaml", 19811)])
def test_node_server_parses_the_metrics_port(rendered, values, port):
    """The real `pail` parser reads --metrics-port as the port number."""
    assert parse_node_args(node_ds(rendered(values))).metrics_port == port


@pytest.mark.parametrize("values,port", [("defaults.yaml", 9811), ("metrics.yaml", 19811)])
def test_service_lists_the_node_pods(rendered, values, port):
    r = rendered(values)
    ds = node_ds(r)
    service = r.one("Service", SERVICE)
    assert service["metadata"]["namespace"] == ds["metadata"]["namespace"] == h.NAMESPACE
    spec = service["spec"]
    assert spec["clusterIP"] == "None"  # headless: one endpoint per node pod
    # Selects the node pods, and nothing but them (the controller's pods differ).
    assert matches(spec["selector"], ds["spec"]["template"]["metadata"]["labels"])
    assert spec["selector"] == ds["spec"]["selector"]["matchLabels"]
    controller = r.find("Deployment", "pail-controller")
    if controller is not None:
        assert not matches(spec["selector"], controller["spec"]["template"]["metadata"]["labels"])
    assert spec["ports"] == [{"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}]
    assert [p["name"] for p in metrics_ports(ds)] == [spec["ports"][0]["targetPort"]]


def test_no_service_monitor_by_default(defaults):
    assert defaults.of_kind("ServiceMonitor") == []


def test_service_monitor(rendered):
    r = rendered("metrics.yaml")
    service = r.one("Service", SERVICE)
    monitor = r.one("ServiceMonitor", SERVICE)
    jsonschema.validate(monitor, SERVICE_MONITOR)
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    # Extra labels for the Prometheus's serviceMonitorSelector, next to the chart's own.
    labels = monitor["metadata"]["labels"]
    assert labels["release"] == "kube-prometheus-stack"
    assert labels["app.kubernetes.io/component"] == "node"
    spec = monitor["spec"]
    # Selects the metrics Service, and no other Service of the release.
    selector = spec["selector"]["matchLabels"]
    assert [s["metadata"]["name"] for s in r.of_kind("Service")
            if matches(selector, s["metadata"]["labels"])] == [SERVICE]
    assert spec["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
    [endpoint] = spec["endpoints"]
    assert endpoint["port"] == "metrics" in [p["name"] for p in service["spec"]["ports"]]
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "1m30s"
    # Series of each node pod carry the node's name.
    assert endpoint["relabelings"] == [{"sourceLabels": ["__meta_kubernetes_pod_node_name"],
                                        "targetLabel": "node"}]


def test_service_monitor_default_interval_and_labels():
    monitor = render_with("node.metrics.serviceMonitor.enabled=true").one("ServiceMonitor", SERVICE)
    jsonschema.validate(monitor, SERVICE_MONITOR)
    assert monitor["spec"]["endpoints"][0]["interval"] == "30s"
    assert "release" not in monitor["metadata"]["labels"]


def test_service_monitor_check_can_fail(rendered):
    """The structural check refuses a field the CRD does not have and a malformed interval."""
    monitor = rendered("metrics.yaml").one("ServiceMonitor", SERVICE)
    misspelt = json.loads(json.dumps(monitor))
    misspelt["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(misspelt, SERVICE_MONITOR)
    bad_interval = json.loads(json.dumps(monitor))
    bad_interval["spec"]["endpoints"][0]["interval"] = "30 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_interval, SERVICE_MONITOR)


def test_service_monitor_is_checked_here_not_by_kubernetes_validate():
    assert CUSTOM_RESOURCES == {("monitoring.coreos.com/v1", "ServiceMonitor"): "tests/chart/test_metrics.py"}


def test_disabled_metrics_render_nothing_of_them(helm):
    r = render_with("node.metrics.enabled=false")
    ds = node_ds(r)
    pail = h.container(ds, "pail")
    assert not [a for a in pail["args"] if a.startswith("--metrics")]
    assert metrics_ports(ds) == []
    assert "metrics" not in json.dumps(ds)
    assert r.of_kind("Service") == [] and r.of_kind("ServiceMonitor") == []
    # Not serving, its port cannot clash with the health port.
    assert node_ds(render_with("node.metrics.enabled=false", "node.metrics.port=9810")) is not None


def test_host_network_keeps_the_named_port(helm):
    """With hostNetwork the port is the node's; the Service still finds it by name."""
    r = render_with("node.hostNetwork=true")
    ds = node_ds(r)
    assert h.pod_spec(ds)["hostNetwork"] is True
    assert metrics_ports(ds) == [{"name": "metrics", "containerPort": 9811, "protocol": "TCP"}]
    assert r.one("Service", SERVICE)["spec"]["ports"][0]["targetPort"] == "metrics"


@pytest.mark.parametrize("setting,named", [
    ("node.metrics.port=0", "/node/metrics/port"),
    ("node.metrics.port=65536", "/node/metrics/port"),
    ("node.metrics.port=metrics", "/node/metrics/port"),
    ("node.metrics.enabled=yes", "/node/metrics/enabled"),
    ("node.metrics.serviceMonitor.enabled=1", "/node/metrics/serviceMonitor/enabled"),
    ("node.metrics.serviceMonitor.interval=30", "/node/metrics/serviceMonitor/interval"),
    ("node.metrics.serviceMonitor.interval=30 seconds", "/node/metrics/serviceMonitor/interval"),
    ("node.metrics.serviceMonitor.labels.release=1", "/node/metrics/serviceMonitor/labels/release"),
    ("node.metrics.prot=9811", "prot"),
])
def test_bad_values_are_refused(helm, setting, named):
    result = h.run_helm(*h.template_args(None, "--set", setting))
    assert result.returncode != 0, f"helm template accepted --set {setting}"
    assert "don't meet the specifications of the schema" in result.stderr, result.stderr
    assert named in result.stderr, result.stderr


def test_service_monitor_needs_metrics(helm):
    """A ServiceMonitor without the endpoint would scrape nothing: refused, not ignored."""
    result = h.run_helm(*h.template_args(None, "--set", "node.metrics.enabled=false",
                                         "--set", "node.metrics.serviceMonitor.enabled=true"))
    assert result.returncode != 0
    assert "/node/metrics/serviceMonitor/enabled" in result.stderr, result.stderr


@pytest.mark.parametrize("setting", [
    "node.metrics.port=9810",                              # the default healthPort
    "node.metrics.port=9809",                              # the default registrarHealthPort
    "node.healthPort=9811",                                # the default metrics port
])
def test_port_clash_in_the_pod_is_refused(helm, setting):
    """The pod's containers share one network namespace: the node server could not bind."""
    result = h.run_helm(*h.template_args(None, "--set", setting))
    assert result.returncode != 0, f"helm template accepted --set {setting}"
    assert "node.metrics.port" in result.stderr, result.stderr


@pytest.mark.parametrize("setting", [
    "node.metrics.serviceMonitor.interval=15s",
    "node.metrics.serviceMonitor.interval=1m",
    "node.metrics.serviceMonitor.interval=500ms",
    "node.metrics.port=65535",
])
def test_good_values_are_accepted(helm, setting):
    result = h.run_helm(*h.template_args(None, "--set", "node.metrics.serviceMonitor.enabled=true",
                                         "--set", setting))
    assert result.returncode == 0, result.stderr
