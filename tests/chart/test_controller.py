"""The controller Deployment: pail csi controller next to csi-provisioner."""

from __future__ import annotations

import pytest

from driver.cli import _controller_settings, build_parser
from driver.csi.server import socket_path
from tests.chart import helm as h
from tests.chart.conftest import VALUE_FILES

WITH_CONTROLLER = [v for v in VALUE_FILES if v != "static-only.yaml"]


def controller(r: h.Rendered) -> dict:
    return r.one("Deployment", "pail-controller")


def parse_controller_args(deployment: dict):
    pail = h.container(deployment, "pail")
    assert pail["command"] == ["pail"]
    parsed = build_parser(strict=True).parse_args(pail["args"])
    assert (parsed.command, parsed.role) == ("csi", "controller")
    # What `pail csi controller` checks before serving (the endpoint URL's form).
    return parsed, _controller_settings(parsed, node=False)


@pytest.mark.parametrize("values", WITH_CONTROLLER)
def test_controller_args_are_accepted(rendered, values):
    _, settings = parse_controller_args(controller(rendered(values)))
    assert settings is not None


def test_s3_settings_reach_the_controller(rendered):
    _, settings = parse_controller_args(controller(rendered("s3-compatible.yaml")))
    assert settings.endpoint_url == "https://minio.storage.svc:9000"
    assert settings.region == "garage"
    assert settings.force_path_style is True
    _, default = parse_controller_args(controller(rendered("defaults.yaml")))
    assert (default.endpoint_url, default.region, default.force_path_style) == (None, None, False)


def test_provisioner_dials_the_controllers_socket(defaults):
    deployment = controller(defaults)
    pail = h.container(deployment, "pail")
    parsed, _ = parse_controller_args(deployment)
    endpoint = str(socket_path(parsed.endpoint))
    where = h.volume_at(deployment, pail, endpoint)
    assert "emptyDir" in h.volume(deployment, where[0])  # shared by this pod's containers only
    for name in ("csi-provisioner", "liveness-probe"):
        sidecar = h.container(deployment, name)
        assert h.volume_at(deployment, sidecar, h.flag(sidecar["args"], "--csi-address")) == where, name


def test_provisioner_flags(rendered):
    args = h.container(controller(rendered("defaults.yaml")), "csi-provisioner")["args"]
    # Replicas share the work through a lease; PVC names reach CreateVolume for the logs.
    assert "--leader-election" in args
    assert "--extra-create-metadata" in args
    assert h.flag(args, "--timeout") == "60s"
    args = h.container(controller(rendered("resources.yaml")), "csi-provisioner")["args"]
    assert h.flag(args, "--timeout") == "2m"


def test_replicas_spread_and_health(rendered):
    deployment = controller(rendered("defaults.yaml"))
    assert deployment["spec"]["replicas"] == 2
    anti = h.pod_spec(deployment)["affinity"]["podAntiAffinity"]
    term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    pail = h.container(deployment, "pail")
    probe = h.container(deployment, "liveness-probe")
    ports = {p["name"]: p["containerPort"] for p in pail["ports"]}
    assert ports[pail["livenessProbe"]["httpGet"]["port"]] == int(h.flag(probe["args"], "--health-port"))
    assert controller(rendered("resources.yaml"))["spec"]["replicas"] == 1


def test_controller_runs_unprivileged(defaults):
    spec = h.pod_spec(controller(defaults))
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert "hostPID" not in spec and "hostNetwork" not in spec
    for c in spec["containers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert not [v for v in spec["volumes"] if "hostPath" in v]


def test_controller_can_be_left_out(rendered):
    r = rendered("static-only.yaml")
    assert not r.of_kind("Deployment")
    names = [o["metadata"]["name"] for o in r.objects]
    assert not [n for n in names if "controller" in n], names
    assert not [o for o in r.objects if h.is_hook(o)]  # helmTest.enabled: false
    assert r.one("DaemonSet", "pail-node")
