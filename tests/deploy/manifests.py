"""Reading and checking Kubernetes manifests for the tests of examples/ and deploy/."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
# The oldest Kubernetes minor still in upstream support when the manifests were written;
# strict schemas refuse unknown fields, which is what catches a misplaced key.
KUBERNETES_VERSION = "1.35"


def load_all(text: str) -> list[dict]:
    """The objects of a multi-document YAML text, without empty documents."""
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def load_file(path: Path) -> list[dict]:
    return load_all(path.read_text())


def schema_errors(obj: dict) -> str | None:
    """Why ``obj`` is not a valid object of its kind, or None."""
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path)
        return f"{exc.message} (at {path or 'top level'}, Kubernetes {exc.version})"
    except kubernetes_validate.SchemaNotFoundError as exc:
        return f"no schema: {exc}"
    return None


def describe(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {ns}{meta.get('name')}"
