"""Least privilege: each ServiceAccount gets exactly the API access its component uses."""

from __future__ import annotations

import pytest

from driver.csi.identity import DRIVER_NAME
from tests.chart import helm as h
from tests.chart.conftest import VALUE_FILES


def rules(role: dict) -> set[tuple]:
    """(apiGroup, resource, verb, resourceName) for every permission a role grants."""
    granted = set()
    for rule in role["rules"]:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or ["*"]:
                        granted.add((group, resource, verb, name))
    return granted


def bound_roles(r: h.Rendered, service_account: str, *, hooks: bool = False) -> list[dict]:
    """Every Role and ClusterRole bound to a ServiceAccount of the release."""
    found = []
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        for binding in r.of_kind(kind, hooks=hooks):
            subjects = [s for s in binding["subjects"]
                        if s["kind"] == "ServiceAccount" and s["name"] == service_account]
            if not subjects:
                continue
            assert subjects[0]["namespace"] == h.NAMESPACE
            ref = binding["roleRef"]
            role = r.find(ref["kind"], ref["name"])
            assert role is not None, f"{kind} {binding['metadata']['name']} binds missing {ref}"
            found.append(role)
    return found


def grants(r: h.Rendered, service_account: str, *, hooks: bool = False) -> dict[str, set]:
    by_scope: dict[str, set] = {"cluster": set(), "namespace": set()}
    for role in bound_roles(r, service_account, hooks=hooks):
        by_scope["cluster" if role["kind"] == "ClusterRole" else "namespace"] |= rules(role)
    return by_scope


@pytest.mark.parametrize("values", VALUE_FILES)
def test_node_may_only_read_service_accounts(rendered, values):
    """The node server's one API call: get the workload's ServiceAccount (pod-level
    credentials). No secrets, no tokens, no pods."""
    assert grants(rendered(values), "pail-node") == {
        "cluster": {("", "serviceaccounts", "get", "*")}, "namespace": set()}


CONTROLLER_CLUSTER = {
    *{("", "persistentvolumes", v, "*") for v in ("get", "list", "watch", "create", "patch", "delete")},
    *{("", "persistentvolumeclaims", v, "*") for v in ("get", "list", "watch", "update")},
    *{("storage.k8s.io", "storageclasses", v, "*") for v in ("get", "list", "watch")},
    *{("", "events", v, "*") for v in ("list", "watch", "create", "update", "patch")},
    *{("storage.k8s.io", "csinodes", v, "*") for v in ("get", "list", "watch")},
    *{("", "nodes", v, "*") for v in ("get", "list", "watch")},
}
CONTROLLER_NAMESPACE = {("coordination.k8s.io", "leases", v, "*")
                        for v in ("get", "watch", "list", "delete", "update", "create")}


@pytest.mark.parametrize("values", [v for v in VALUE_FILES if v != "static-only.yaml"])
def test_controller_grants_are_csi_provisioners_needs(rendered, values):
    assert grants(rendered(values), "pail-controller") == {
        "cluster": CONTROLLER_CLUSTER, "namespace": CONTROLLER_NAMESPACE}


def test_nobody_reads_secrets_or_uses_wildcards(rendered):
    for values in VALUE_FILES:
        for kind in ("Role", "ClusterRole"):
            for role in rendered(values).of_kind(kind) + rendered(values).of_kind(kind, hooks=True):
                for group, resource, verb, _ in rules(role):
                    assert "*" not in (group, resource, verb), role["metadata"]["name"]
                    assert resource not in ("secrets", "serviceaccounts/token", "volumeattachments", "pods"), \
                        (role["metadata"]["name"], resource)


def test_helm_test_reads_only_what_it_checks(defaults):
    """The test pod's own ServiceAccount: the driver's CSIDriver, CSINodes, and the
    provisioner's lease by name."""
    lease = DRIVER_NAME.replace(".", "-")
    assert grants(defaults, "pail-test", hooks=True) == {
        "cluster": {("storage.k8s.io", "csidrivers", "get", DRIVER_NAME), ("storage.k8s.io", "csinodes", "get", "*")},
        "namespace": {("coordination.k8s.io", "leases", "get", lease)}}


def test_workloads_use_their_own_service_accounts(defaults):
    assert h.pod_spec(defaults.one("DaemonSet", "pail-node"))["serviceAccountName"] == "pail-node"
    assert h.pod_spec(defaults.one("Deployment", "pail-controller"))["serviceAccountName"] == "pail-controller"
    assert {sa["metadata"]["name"] for sa in defaults.of_kind("ServiceAccount")} == {"pail-node", "pail-controller"}


def test_irsa_annotation_lands_on_the_right_service_account(rendered):
    r = rendered("irsa.yaml")
    node = r.one("ServiceAccount", "pail-node")["metadata"]["annotations"]
    controller = r.one("ServiceAccount", "pail-controller")["metadata"]["annotations"]
    assert node == {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/pail-node",
                    "eks.amazonaws.com/sts-regional-endpoints": "true"}
    assert controller == {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/pail-controller"}


def test_no_role_annotation_by_default(defaults):
    for sa in defaults.of_kind("ServiceAccount"):
        assert "annotations" not in sa["metadata"], sa["metadata"]
