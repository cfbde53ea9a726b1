"""The node DaemonSet: what kubelet, the sidecars and the node server must agree on."""

from __future__ import annotations

import json
import tomllib

import pytest
import yaml

from driver.cli import _controller_settings, build_parser
from driver.config import parse_quantity
from driver.csi.identity import DRIVER_NAME
from driver.csi.server import socket_path
from driver.csi.volume_credentials import SECRET_ACCESS_KEY, SECRET_KEY_ID, SECRET_SESSION_TOKEN
from tests.chart import helm as h
from tests.chart.conftest import VALUE_FILES


def node_ds(r: h.Rendered) -> dict:
    return r.one("DaemonSet", "pail-node")


def parse_node_args(ds: dict):
    """The pail container's command line, parsed by the real `pail` parser (strict: a
    flag it does not know raises instead of exiting), with $(NODE_NAME) as kubelet would
    expand it."""
    pail = h.container(ds, "pail")
    assert pail["command"] == ["pail"]
    args = [a.replace("$(NODE_NAME)", "node-1") for a in pail["args"]]
    parsed = build_parser(strict=True).parse_args(args)
    assert (parsed.command, parsed.role) == ("csi", "node")
    # The same checks `pail csi node` makes before it serves: flags that need --controller.
    assert _controller_settings(parsed, node=True) is None
    return parsed


@pytest.mark.parametrize("values", VALUE_FILES)
def test_node_args_are_accepted_by_the_node_server(rendered, values):
    parsed = parse_node_args(node_ds(rendered(values)))
    assert parsed.node_id == "node-1"
    assert parsed.controller is False


def test_node_id_is_the_nodes_name(defaults):
    pail = h.container(node_ds(defaults), "pail")
    assert "--node-id=$(NODE_NAME)" in pail["args"]
    env = {e["name"]: e for e in pail["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


@pytest.mark.parametrize("values,kubelet", [("defaults.yaml", "/var/lib/kubelet"),
                                            ("custom-kubelet-dir.yaml", "/var/lib/k0s/kubelet")])
def test_socket_paths_agree(rendered, values, kubelet):
    """The node server listens where the sidecars dial, and kubelet is told the host path
    of that same file: <kubeletDir>/plugins/<driver name>/csi.sock."""
    ds = node_ds(rendered(values))
    pail = h.container(ds, "pail")
    parsed = parse_node_args(ds)
    endpoint = str(socket_path(parsed.endpoint))
    socket_volume = h.volume_at(ds, pail, endpoint)

    registrar = h.container(ds, "node-driver-registrar")
    probe = h.container(ds, "liveness-probe")
    for sidecar in (registrar, probe):
        address = h.flag(sidecar["args"], "--csi-address")
        assert h.volume_at(ds, sidecar, address) == socket_volume, sidecar["name"]

    volume_name, inside = socket_volume
    host_dir = h.volume(ds, volume_name)["hostPath"]["path"]
    assert host_dir == f"{kubelet}/plugins/{DRIVER_NAME}"
    registration = h.flag(registrar["args"], "--kubelet-registration-path")
    assert registration == f"{host_dir}/{inside}" == f"{kubelet}/plugins/{DRIVER_NAME}/csi.sock"

    # kubelet's plugin watcher directory, where the registrar announces the driver.
    assert h.volume_at(ds, registrar, "/registration/x")[0] == "registration-dir"
    assert h.volume(ds, "registration-dir")["hostPath"]["path"] == f"{kubelet}/plugins_registry"


@pytest.mark.parametrize("values,kubelet", [("defaults.yaml", "/var/lib/kubelet"),
                                            ("custom-kubelet-dir.yaml", "/var/lib/k0s/kubelet")])
def test_kubelet_dir_is_mounted_where_targets_are(rendered, values, kubelet):
    """kubelet's target paths are host paths under --kubelet-dir: the container sees that
    directory at the same path, with mounts propagating back to the host."""
    ds = node_ds(rendered(values))
    pail = h.container(ds, "pail")
    parsed = parse_node_args(ds)
    assert parsed.kubelet_dir == kubelet
    target = f"{kubelet}/pods/0f6c/volumes/kubernetes.io~csi/pv-1/mount"
    volume_name, inside = h.volume_at(ds, pail, target)
    mount = next(m for m in pail["volumeMounts"] if m["name"] == volume_name)
    assert mount["mountPropagation"] == "Bidirectional"
    assert h.volume(ds, volume_name)["hostPath"]["path"] + "/" + inside == target


@pytest.mark.parametrize("values,kubelet", [("defaults.yaml", "/var/lib/kubelet"),
                                            ("custom-kubelet-dir.yaml", "/var/lib/k0s/kubelet")])
def test_state_dir_survives_container_restarts(rendered, values, kubelet):
    """The mount records live on the host (under the plugin directory), so a restarted node
    container finds and cleans up the mounts the old one made."""
    ds = node_ds(rendered(values))
    pail = h.container(ds, "pail")
    state = parse_node_args(ds).state_dir
    assert state == f"{kubelet}/plugins/{DRIVER_NAME}/state"
    volume_name, inside = h.volume_at(ds, pail, state)
    assert "hostPath" in h.volume(ds, volume_name)
    assert h.volume(ds, volume_name)["hostPath"]["path"] + "/" + inside == state


@pytest.mark.parametrize("values,cache", [
    ("defaults.yaml", {}),
    ("cache.yaml", {"medium": "Memory", "sizeLimit": "20Gi"}),
])
def test_cache_dir_is_an_empty_dir_of_the_node_pod(rendered, values, cache):
    """Volumes with the `cache` mount option keep data in --cache-dir: an emptyDir in the
    pail container (mount processes run there), with the medium and size limit of values."""
    ds = node_ds(rendered(values))
    pail = h.container(ds, "pail")
    args = parse_node_args(ds)
    cache_dir = args.cache_dir
    assert cache_dir == "/var/cache/pail"
    # Publishes whose caches would not fit are refused (by the node server), before kubelet
    # would evict the pod for its emptyDir.
    assert args.cache_capacity == cache.get("sizeLimit")
    if args.cache_capacity:
        assert parse_quantity(args.cache_capacity, "--cache-capacity") == 20 * 1024 ** 3
    volume_name, inside = h.volume_at(ds, pail, f"{cache_dir}/0123abcd")
    assert (volume_name, inside) == ("cache", "0123abcd")
    assert h.volume(ds, "cache") == {"name": "cache", "emptyDir": cache}
    for name in ("node-driver-registrar", "liveness-probe"):
        assert "cache" not in [m["name"] for m in h.container(ds, name)["volumeMounts"]]


def test_custom_kubelet_dir_moves_every_host_path(rendered):
    ds = node_ds(rendered("custom-kubelet-dir.yaml"))
    host_paths = [v["hostPath"]["path"] for v in h.pod_spec(ds)["volumes"] if "hostPath" in v]
    assert len(host_paths) == 3
    assert all(p.startswith("/var/lib/k0s/kubelet") for p in host_paths), host_paths
    assert "/var/lib/kubelet" not in json.dumps(ds)


def test_health_port_agrees(rendered):
    for values, port in (("defaults.yaml", 9810), ("s3-compatible.yaml", 19810)):
        ds = node_ds(rendered(values))
        pail = h.container(ds, "pail")
        probe = h.container(ds, "liveness-probe")
        assert h.flag(probe["args"], "--health-port") == str(port)
        http = pail["livenessProbe"]["httpGet"]
        ports = {p["name"]: p["containerPort"] for p in pail["ports"]}
        assert http["path"] == "/healthz"
        assert ports[http["port"]] == port


def test_registrar_health_endpoint_agrees(rendered):
    for values, port in (("defaults.yaml", 9809), ("s3-compatible.yaml", 19809)):
        registrar = h.container(node_ds(rendered(values)), "node-driver-registrar")
        assert h.flag(registrar["args"], "--http-endpoint") == f":{port}"
        ports = {p["name"]: p["containerPort"] for p in registrar["ports"]}
        assert ports[registrar["livenessProbe"]["httpGet"]["port"]] == port


def test_liveness_probe_is_lenient(defaults):
    """A failed probe restarts the container and kills every mount on the node: it takes
    well over the supervisor's restart of a crashed gRPC server (about 2 s, at most 30 s of
    backoff) before kubelet gives up."""
    probe = h.container(node_ds(defaults), "pail")["livenessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 60
    assert probe["timeoutSeconds"] > 3  # the sidecar's own --probe-timeout


def test_privileged_host_pid_and_priority(defaults):
    ds = node_ds(defaults)
    spec = h.pod_spec(ds)
    assert spec["hostPID"] is True
    assert h.container(ds, "pail")["securityContext"] == {"privileged": True, "runAsUser": 0}
    assert spec["priorityClassName"] == "system-node-critical"
    assert "hostNetwork" not in spec
    # Sidecars need no privileges.
    for name in ("node-driver-registrar", "liveness-probe"):
        assert "privileged" not in h.container(ds, name)["securityContext"]


def test_host_network_only_when_asked(rendered):
    spec = h.pod_spec(node_ds(rendered("s3-compatible.yaml")))
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"


def test_default_update_strategy_is_on_delete(defaults):
    assert node_ds(defaults)["spec"]["updateStrategy"] == {"type": "OnDelete"}


def test_rolling_update_from_values(rendered):
    assert node_ds(rendered("resources.yaml"))["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}}


def test_tolerates_every_taint_by_default(defaults):
    assert h.pod_spec(node_ds(defaults))["tolerations"] == [{"operator": "Exists"}]


def test_default_resources_have_a_memory_limit(defaults):
    resources = h.container(node_ds(defaults), "pail")["resources"]
    assert resources["requests"] == {"cpu": "50m", "memory": "192Mi"}
    assert resources["limits"] == {"memory": "2Gi"}


def test_resources_from_values(rendered):
    ds = node_ds(rendered("resources.yaml"))
    assert h.container(ds, "pail")["resources"] == {"requests": {"cpu": "200m", "memory": "512Mi"},
                                                    "limits": {"memory": "8Gi"}}
    assert h.container(ds, "node-driver-registrar")["resources"]["limits"] == {"memory": "32Mi"}
    assert h.container(ds, "liveness-probe")["resources"]["requests"] == {"cpu": "5m", "memory": "10Mi"}


@pytest.mark.parametrize("values,enabled", [("defaults.yaml", False), ("ephemeral.yaml", True)])
def test_ephemeral_volumes_only_when_enabled(rendered, values, enabled):
    r = rendered(values)
    modes = r.one("CSIDriver", DRIVER_NAME)["spec"]["volumeLifecycleModes"]
    assert modes == (["Persistent", "Ephemeral"] if enabled else ["Persistent"])
    assert parse_node_args(node_ds(r)).enable_ephemeral is enabled


def test_pod_level_identity_settings_reach_the_node_server(rendered):
    parsed = parse_node_args(node_ds(rendered("pod-level-identity.yaml")))
    assert parsed.sts_region == "eu-central-1"
    assert parsed.sts_endpoint_url == "https://sts.eu-central-1.amazonaws.com"
    assert parsed.pod_identity_agent_url == "http://169.254.170.23/v1/credentials"


def test_defaults_leave_pod_identity_settings_to_the_driver(defaults):
    args = h.container(node_ds(defaults), "pail")["args"]
    assert not [a for a in args if a.startswith(("--sts-", "--pod-identity-agent-url", "--debug"))]
    assert parse_node_args(node_ds(defaults)).log_format == "json"


def test_debug_and_console_logs(rendered):
    parsed = parse_node_args(node_ds(rendered("s3-compatible.yaml")))
    assert parsed.debug is True and parsed.log_format == "console"


@pytest.mark.parametrize("workload", [("DaemonSet", "pail-node"), ("Deployment", "pail-controller")])
def test_static_keys_come_from_the_secret(rendered, workload):
    """credentials.secretName: the standard AWS variables, from a Secret with the same keys
    as a volume's secret; no key value is ever written into the manifests."""
    pail = h.container(rendered("secrets.yaml").one(*workload), "pail")
    env = {e["name"]: e for e in pail["env"]}
    refs = {name: env[name]["valueFrom"]["secretKeyRef"]
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    assert {n: r["key"] for n, r in refs.items()} == {"AWS_ACCESS_KEY_ID": SECRET_KEY_ID,
                                                       "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
                                                       "AWS_SESSION_TOKEN": SECRET_SESSION_TOKEN}
    assert {r["name"] for r in refs.values()} == {"pail-aws-keys"}
    assert refs["AWS_SESSION_TOKEN"].get("optional") is True
    assert "optional" not in refs["AWS_ACCESS_KEY_ID"]
    assert env["AWS_REGION"]["value"] == "us-west-2"
    assert all("value" not in e for n, e in env.items() if n.startswith("AWS_") and n != "AWS_REGION")


def test_no_credentials_env_by_default(defaults):
    for workload in (("DaemonSet", "pail-node"), ("Deployment", "pail-controller")):
        env = h.container(defaults.one(*workload), "pail").get("env", [])
        assert not [e["name"] for e in env if e["name"].startswith("AWS_")]


def test_command_is_the_pail_console_script():
    """Both workloads run `pail` (the image's console script): the name pyproject declares."""
    project = tomllib.loads((h.REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["pail"] == "driver.cli:main"


def test_images(rendered):
    project = tomllib.loads((h.REPO / "pyproject.toml").read_text())["project"]
    chart = yaml.safe_load((h.CHART / "Chart.yaml").read_text())
    # The chart's appVersion is the Pail release it deploys, and the default image tag.
    assert chart["appVersion"] == project["version"]
    ds = node_ds(rendered("defaults.yaml"))
    assert h.container(ds, "pail")["image"] == f"ghcr.io/pail-csi/pail:{chart['appVersion']}"
    # Sidecars are pinned to releases, never a moving tag.
    for c in h.pod_spec(ds)["containers"]:
        tag = c["image"].rsplit(":", 1)[1]
        assert tag not in ("latest", ""), c["image"]
    mirror = node_ds(rendered("s3-compatible.yaml"))
    assert h.container(mirror, "pail")["image"] == "registry.example.com/mirror/pail:0.1.0-rc1"
    assert h.pod_spec(mirror)["imagePullSecrets"] == [{"name": "mirror-credentials"}]
    assert {c["imagePullPolicy"] for c in h.pod_spec(mirror)["containers"]} == {"Always"}
