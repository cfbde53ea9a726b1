from __future__ import annotations

import pytest

from tests.support.kubelet import Kubelet, NodeServer


@pytest.fixture
def node_server(s3_server, tmp_path):
    """A node server with the S3 server's credentials as its own (driver-level)."""
    server = NodeServer(root=tmp_path / "node", env=s3_server.env())
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def kubelet(node_server):
    return Kubelet(node_server)


@pytest.fixture
def attributes(s3_server, bucket):
    """A static PV's volumeAttributes for the test bucket."""
    return {"bucketName": bucket, "endpoint": s3_server.endpoint, "region": "us-east-1"}
