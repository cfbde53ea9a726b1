"""NOTES.txt, what `helm install` prints: where the semantics are, and how upgrades hurt."""

from __future__ import annotations

import pytest

from driver.csi.identity import DRIVER_NAME
from tests.chart import helm as h


def notes(*values: str) -> str:
    args = ["install", h.RELEASE, str(h.CHART), "--namespace", h.NAMESPACE, "--dry-run=client"]
    for v in values:
        args += ["--values", str(h.VALUES / v)]
    result = h.run_helm(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("NOTES:", 1)[1]


def test_notes_point_to_semantics_and_static_pvs(helm):
    text = notes("defaults.yaml")
    assert "https://github.com/pail-csi/pail/blob/main/docs/SEMANTICS.md" in text
    assert f"driver: {DRIVER_NAME}" in text
    assert "kubectl drain NODE --ignore-daemonsets" in text
    assert "none was created with this release" in text


@pytest.mark.parametrize("values,expected,absent", [
    ("irsa.yaml", "IAM role arn:aws:iam::111122223333:role/pail-node (IRSA)", "no IAM role"),
    ("storage-classes.yaml", "  - s3-bucket-each", "none was"),
    ("resources.yaml", "update strategy is RollingUpdate", "kubectl drain"),
    ("static-only.yaml", "volumeName: s3-data", "StorageClass (provisioner"),
])
def test_notes_follow_values(helm, values, expected, absent):
    text = notes(values)
    assert expected in text
    assert absent not in text
