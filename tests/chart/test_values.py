"""values.yaml and values.schema.json: a mistake in values fails the install with a message
naming the key, and every key a user can set is documented."""

from __future__ import annotations

import json
import re

import pytest

from driver import log as driver_log
from driver.csi import context as ctx
from driver.csi.controller import PARAMETERS
from tests.chart import helm as h

SCHEMA = json.loads((h.CHART / "values.schema.json").read_text())

# (values file, what the error must name)
REJECTED = [
    ("typo.yaml", "kubeletDr"),
    ("wrong-type.yaml", "/node/healthPort"),
    ("storage-class-parameter.yaml", "'bucket'"),
    ("rolling-update-with-on-delete.yaml", "/node/updateStrategy/rollingUpdate"),
]


@pytest.mark.parametrize("values,named", REJECTED)
def test_template_rejects_bad_values(helm, values, named):
    result = h.run_helm(*h.template_args(h.VALUES / "invalid" / values))
    assert result.returncode != 0, f"helm template accepted invalid/{values}"
    assert "don't meet the specifications of the schema" in result.stderr, result.stderr
    assert named in result.stderr, result.stderr


@pytest.mark.parametrize("values,named", REJECTED)
def test_lint_rejects_bad_values(helm, values, named):
    result = h.run_helm("lint", "--strict", str(h.CHART), "--values", str(h.VALUES / "invalid" / values))
    assert result.returncode != 0, f"helm lint accepted invalid/{values}"
    assert named in result.stdout + result.stderr


@pytest.mark.parametrize("setting,named", [
    ("node.kubeletDir=var/lib/kubelet", "/node/kubeletDir"),        # relative
    ("node.kubeletDir=/var/lib/kubelet/", "/node/kubeletDir"),      # trailing slash
    ("node.kubeletDir=/var/lib/../kubelet", "/node/kubeletDir"),    # a .. segment
    ("node.serviceAccount.roleArn=arn:aws:iam::1234:role/x", "/node/serviceAccount/roleArn"),
    ("controller.serviceAccount.roleArn=pail-controller", "/controller/serviceAccount/roleArn"),
    ("logging.format=text", "/logging/format"),
    ("controller.s3.endpointUrl=minio:9000", "/controller/s3/endpointUrl"),
    ("credentials.podLevel.podIdentityAgentUrl=off", "/credentials/podLevel/podIdentityAgentUrl"),
    ("node.resources.limits.memroy=1Gi", "memroy"),
    ("sidecars.csiProvisioner.timeout=60", "/sidecars/csiProvisioner/timeout"),
    ("node.cache.medium=memory", "/node/cache/medium"),
    ("node.cache.medium=HugePages", "/node/cache/medium"),
    ("node.cache.sizeLimit=20GB", "/node/cache/sizeLimit"),
    ("node.cache.sizeLimit=-1Gi", "/node/cache/sizeLimit"),
    ("node.cache.sizeLimit=0Gi", "/node/cache/sizeLimit"),        # kubelet would evict at once
    # A number, not a quantity string: in a values file it is a float, printed 1.073741824e+10.
    ("node.cache.sizeLimit=10737418240", "/node/cache/sizeLimit"),
    ("node.cache.size=1Gi", "size"),
])
def test_set_rejects_bad_values(helm, setting, named):
    result = h.run_helm(*h.template_args(None, "--set", setting))
    assert result.returncode != 0, f"helm template accepted --set {setting}"
    assert named in result.stderr, result.stderr


@pytest.mark.parametrize("setting", [
    "node.kubeletDir=/var/snap/microk8s/common/var/lib/kubelet",
    "node.serviceAccount.roleArn=arn:aws-us-gov:iam::111122223333:role/path/pail-node",
    "credentials.podLevel.podIdentityAgentUrl=none",
    "controller.s3.endpointUrl=http://10.0.0.5:9000",
    "node.cache.sizeLimit=512Mi",
    "node.cache.sizeLimit=1.5Ti",
    "node.cache.medium=Memory",
])
def test_set_accepts_valid_values(helm, setting):
    result = h.run_helm(*h.template_args(None, "--set", setting))
    assert result.returncode == 0, result.stderr


def test_every_object_level_refuses_unknown_keys():
    """additionalProperties: false wherever the keys are the chart's own (free-form maps
    such as annotations and StorageClass parameters list what they accept instead)."""
    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                yield path, node.get("additionalProperties")
            for key, child in node.items():
                yield from walk(child, f"{path}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                yield from walk(child, f"{path}/{i}")

    levels = list(walk(SCHEMA, ""))
    assert len(levels) > 20
    open_levels = [p for p, extra in levels if extra is not False
                   and not p.endswith("/storageClass/properties/parameters")]
    assert not open_levels, open_levels


def test_storage_class_parameters_are_the_controllers():
    """The schema's StorageClass parameter names are exactly what `pail csi controller`
    accepts, so a parameter the driver would refuse at the first PVC fails the install."""
    parameters = SCHEMA["$defs"]["storageClass"]["properties"]["parameters"]
    named = next(a["enum"] for a in parameters["propertyNames"]["anyOf"] if "enum" in a)
    assert set(named) == set(PARAMETERS)
    prefix = next(a["pattern"] for a in parameters["propertyNames"]["anyOf"] if "pattern" in a)
    assert re.match(prefix, ctx.PROVISIONER_PREFIX + "node-publish-secret-name")
    assert set(parameters["properties"]["deletePolicy"]["enum"]) == set(ctx.DELETE_POLICIES)


def test_logging_formats_are_the_drivers():
    assert set(SCHEMA["properties"]["logging"]["properties"]["format"]["enum"]) == set(driver_log.FORMATS)


def test_iam_role_pattern_matches_the_drivers():
    """The role ARN pattern accepts what the node server accepts on a pod's ServiceAccount."""
    from driver.csi.volume_credentials import _ROLE_ARN

    pattern = re.compile(SCHEMA["$defs"]["roleArn"]["pattern"])
    for arn in ["arn:aws:iam::111122223333:role/pail-node", "arn:aws-cn:iam::111122223333:role/a/b/c",
                "arn:aws:iam::111122223333:role/with+=,.@_-chars"]:
        assert _ROLE_ARN.fullmatch(arn) and pattern.search(arn), arn
    for arn in ["arn:aws:iam::1111:role/x", "arn:aws:iam::111122223333:user/x", "pail-node"]:
        assert not _ROLE_ARN.fullmatch(arn) and not pattern.search(arn), arn


def test_every_values_key_has_a_comment():
    """Each key in values.yaml is preceded by a comment saying what it is for."""
    lines = (h.CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for n, line in enumerate(lines):
        key = re.match(r"^(\s*)([A-Za-z][\w./-]*):", line)
        if not key:
            continue  # comments, list items (their key is documented) and blank lines
        previous = next((p for p in reversed(lines[:n]) if p.strip()), "")
        if not previous.lstrip().startswith("#"):
            undocumented.append(f"values.yaml:{n + 1}: {line.strip()}")
    assert not undocumented, "\n".join(undocumented)


def test_values_yaml_follows_its_schema(chart_values):
    """Every top-level group the schema knows is in values.yaml (so users see it), and
    values.yaml holds no key the schema does not (helm lint would also fail on that)."""
    assert set(chart_values) == set(SCHEMA["properties"]) - {"global"}
