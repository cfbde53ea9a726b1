from __future__ import annotations

import pytest

from tests.support.kubelet import Kubelet, NodeServer


@pytest.fixture(scope="module")
def _node_servers():
    servers: dict[str, NodeServer] = {}
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture
def node_server(s3_server, _node_servers, tmp_path_factory):
    """A node server with the S3 server's credentials as its own (driver-level).

    Shared by the tests of a module that use the same S3 server: starting one costs two
    interpreters, and sharing is what a node does. The ``kubelet`` fixture unpublishes
    whatever a test left published, so each test starts with no mounts."""
    server = _node_servers.get(s3_server.name)
    if server is None or not server.running:
        if server is not None:
            server.stop()
        server = NodeServer(root=tmp_path_factory.mktemp("node"), env=s3_server.env()).start()
        _node_servers[s3_server.name] = server
    return server


@pytest.fixture
def kubelet(node_server):
    kubelet = Kubelet(node_server)
    try:
        yield kubelet
    finally:
        kubelet.unpublish_all()


@pytest.fixture
def attributes(s3_server, bucket):
    """A static PV's volumeAttributes for the test bucket."""
    return {"bucketName": bucket, "endpoint": s3_server.endpoint, "region": "us-east-1"}
