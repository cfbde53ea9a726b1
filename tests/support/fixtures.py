"""pytest plugin: real S3 servers, fresh buckets, and the recording proxy.

Enable with ``pytest_plugins = ["tests.support.fixtures"]`` in ``tests/conftest.py``.

* ``moto_server`` / ``seaweedfs_server`` (session): started on first use, stopped at
  the end of the session (also when tests fail, and at interpreter exit).
* ``s3_server``: parametrized over ``seaweedfs`` and ``moto`` (test ids ``test_x[moto]``);
  ``@pytest.mark.s3_servers("moto")`` restricts a test to the listed servers (the
  others are not generated at all, not skipped).
* ``bucket``: a fresh bucket ``pail-test-<8 hex>`` on ``s3_server``.
* ``s3``: a boto3 client for ``s3_server``; ``proxy``: an ``S3Proxy`` in front of
  ``s3_server``; ``proxied_s3``: a boto3 client that goes through ``proxy``.
"""

from __future__ import annotations

import atexit
import uuid

import pytest

from .proxy import S3Proxy
from .s3server import SERVER_NAMES, S3Server, start_server

__all__ = ["SERVER_NAMES"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "s3_servers(*names): run the test only against these S3 servers "
        f"(any of {', '.join(SERVER_NAMES)}; default: all)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "s3_server" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("s3_servers")
    names = list(marker.args) if marker is not None else list(SERVER_NAMES)
    unknown = [n for n in names if n not in SERVER_NAMES]
    if unknown or not names:
        raise pytest.UsageError(
            f"{metafunc.definition.nodeid}: s3_servers{tuple(names)}: "
            f"expected names among {SERVER_NAMES}"
        )
    metafunc.parametrize("s3_server", names, indirect=True, ids=names)


def _session_server(name: str, tmp_path_factory: pytest.TempPathFactory):
    server = start_server(name, tmp_path_factory.mktemp(name))
    atexit.register(server.stop)
    return server


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    server = _session_server("moto", tmp_path_factory)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory):
    server = _session_server("seaweedfs", tmp_path_factory)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_server(request) -> S3Server:
    name = getattr(request, "param", None)
    if name is None:
        raise pytest.UsageError("s3_server is parametrized by pytest_generate_tests")
    server: S3Server = request.getfixturevalue(f"{name}_server")
    if not server.running:
        pytest.fail(f"{name} server is not running any more; log tail:\n{server.log_tail()}")
    return server


@pytest.fixture
def s3(s3_server: S3Server):
    return s3_server.client()


@pytest.fixture
def bucket(s3_server: S3Server):
    name = f"pail-test-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(name)
    yield name
    _delete_bucket(s3_server, name)


def _delete_bucket(server: S3Server, name: str) -> None:
    """Best effort: the bucket and everything in it (S3Server.delete_bucket)."""
    if not server.running:
        return
    try:
        server.delete_bucket(name)
    except Exception:  # noqa: BLE001 - cleanup must not fail the test
        pass


@pytest.fixture
def proxy(s3_server: S3Server):
    p = S3Proxy(s3_server.endpoint).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def proxied_s3(s3_server: S3Server, proxy: S3Proxy):
    return s3_server.client(endpoint_url=proxy.endpoint)
