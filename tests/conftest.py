"""Fixtures shared by every tier: S3 servers, buckets and the proxy come from
tests.support.fixtures; real `pail mount` mounts from here."""

from __future__ import annotations

import pytest

from tests.support.mounts import PailMount

pytest_plugins = ["tests.support.fixtures"]


@pytest.fixture
def mount_bucket(s3_server, tmp_path):
    """Mount a bucket with `pail mount`: ``mount_bucket(bucket, *options, endpoint=...)``.

    The endpoint defaults to the server's; pass ``proxy.endpoint`` to count requests.
    Every mount is unmounted and its process ended after the test, pass or fail.
    """
    mounts: list[PailMount] = []

    def start(bucket: str, *options: str, endpoint: str | None = None, env: dict | None = None) -> PailMount:
        n = len(mounts)
        mount = PailMount(bucket=bucket, path=tmp_path / f"mnt{n}", endpoint=endpoint or s3_server.endpoint,
                          env={**s3_server.env(), **(env or {})}, args=list(options),
                          log_path=tmp_path / f"mnt{n}.log")
        mounts.append(mount)
        return mount.start()

    yield start
    for mount in mounts:
        mount.stop()
