"""Every object the chart renders is valid for the Kubernetes API, strictly (no unknown
fields), from the oldest Kubernetes the chart allows to the newest the schemas cover."""

from __future__ import annotations

import functools

import kubernetes_validate
import pytest
from kubernetes_validate import utils

from tests.chart.conftest import VALUE_FILES

# Chart.yaml's kubeVersion floor, the kubectl the tools ship (v1.35), and the newest schema.
VERSIONS = ["1.28", "1.35", "1.37"]

# Custom resources the chart may render, which kubernetes-validate has no schema for:
# (apiVersion, kind) -> the test that checks them structurally instead.
CUSTOM_RESOURCES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "tests/chart/test_metrics.py",
}


@pytest.fixture(scope="module", autouse=True)
def cached_schemas():
    """kubernetes_validate reads and parses its (large) schema files on every call; the
    files do not change, so parse each once."""
    original = utils.schema_contents
    utils.schema_contents = functools.lru_cache(maxsize=None)(original)
    yield
    utils.schema_contents = original


def test_newest_schema_is_covered():
    assert utils.latest_version().startswith(VERSIONS[-1]), "kubernetes-validate has newer schemas: add them"


@pytest.mark.parametrize("values", VALUE_FILES)
@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid(rendered, values, version):
    problems = []
    for obj in rendered(values).objects:
        where = f"{obj['kind']} {obj['metadata'].get('name')}"
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_RESOURCES:
            continue  # no Kubernetes schema: checked against its CRD's fields in its own test
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            # Built-in kinds only, besides CUSTOM_RESOURCES.
            problems.append(f"{where}: no Kubernetes {version} schema for {obj['apiVersion']}")
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{where}: {exc.caught.message} at {list(exc.caught.absolute_path)}")
    assert not problems, "\n".join(problems)


def test_validation_catches_an_unknown_field():
    """The check above can fail: a field Kubernetes does not know is refused."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {"containers": [{"name": "a", "image": "b", "mountPropagaton": "Bidirectional"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, VERSIONS[1], strict=True)
