"""Session fixtures of the chart tests: helm (fetched if missing) and one render per values
file, shared by every test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chart import helm as h

VALUE_FILES = sorted(p.name for p in h.VALUES.glob("*.yaml"))
INVALID_FILES = sorted(p.name for p in (h.VALUES / "invalid").glob("*.yaml"))


@pytest.fixture(scope="session")
def helm() -> Path:
    return h.ensure_helm()


@pytest.fixture(scope="session")
def rendered(helm):
    """rendered("irsa.yaml") -> Rendered; each values file is rendered once per session."""
    cache: dict[str, h.Rendered] = {}

    def get(name: str) -> h.Rendered:
        if name not in cache:
            cache[name] = h.render(h.VALUES / name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def defaults(rendered) -> h.Rendered:
    return rendered("defaults.yaml")


@pytest.fixture(scope="session")
def chart_values() -> dict:
    import yaml

    return yaml.safe_load((h.CHART / "values.yaml").read_text())
