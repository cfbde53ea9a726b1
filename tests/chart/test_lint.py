"""helm lint --strict: the chart is well-formed with its defaults and with every values file."""

from __future__ import annotations

import pytest

from tests.chart import helm as h
from tests.chart.conftest import VALUE_FILES


def test_lint_strict_with_default_values(helm):
    result = h.run_helm("lint", "--strict", str(h.CHART))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", VALUE_FILES)
def test_lint_strict_with_values_file(helm, values):
    result = h.run_helm("lint", "--strict", str(h.CHART), "--values", str(h.VALUES / values))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_default_render_is_what_deploy_manifests_use(helm):
    """`helm template pail charts/pail --namespace kube-system` with no values at all (how
    deploy/ is generated) renders the same objects as the defaults values file."""
    bare = h.render(None)
    assert bare.objects == h.render(h.VALUES / "defaults.yaml").objects
    kinds = sorted({o["kind"] for o in bare.objects if not h.is_hook(o)})
    assert kinds == ["CSIDriver", "ClusterRole", "ClusterRoleBinding", "DaemonSet", "Deployment",
                     "Role", "RoleBinding", "Service", "ServiceAccount"]


@pytest.mark.parametrize("version,ok", [("1.27.9", False), ("1.28.0", True), ("1.35.2", True)])
def test_kube_version_floor(helm, version, ok):
    """Chart.yaml's kubeVersion refuses clusters older than the features it relies on."""
    result = h.run_helm(*h.template_args(None, "--kube-version", version))
    assert (result.returncode == 0) == ok, result.stderr
    if not ok:
        assert "kubeVersion" in result.stderr or ">=1.28.0-0" in result.stderr, result.stderr
