"""Pail over https, against a store whose certificate a private authority signed (an
on-premises store): trusted with --ca-bundle, refused without it. Reads of every size
(small ranges over Pail's own TLS connections, larger ones over awscrt's), listings and a
multipart upload, through a real mount."""

from __future__ import annotations

import os

import pytest

from tests.support.mounts import is_mounted, pail_cli
from tests.support.tls import TlsFront, certificates

MiB = 1024 * 1024

pytestmark = pytest.mark.s3_servers("seaweedfs")  # the TLS front relays bytes: the store does not matter


@pytest.fixture
def tls(s3_server, tmp_path):
    certs = certificates(tmp_path / "certs")
    with TlsFront(s3_server.endpoint, certs) as front:
        yield front, certs


def test_a_store_with_a_private_authority_is_read_and_written_with_ca_bundle(s3, bucket, tls, mount_bucket):
    front, certs = tls
    big = os.urandom(20 * MiB + 123)
    s3.put_object(Bucket=bucket, Key="dir/big.bin", Body=big)
    s3.put_object(Bucket=bucket, Key="dir/small.txt", Body=b"small")
    mount = mount_bucket(bucket, "--ca-bundle", str(certs.ca), endpoint=front.endpoint)

    assert sorted(os.listdir(mount.path / "dir")) == ["big.bin", "small.txt"]
    assert (mount.path / "dir" / "small.txt").read_bytes() == b"small"
    with open(mount.path / "dir" / "big.bin", "rb") as f:  # a read within: small ranged GETs, Pail's own TLS
        f.seek(13 * MiB + 5)
        assert f.read(4096) == big[13 * MiB + 5:13 * MiB + 5 + 4096]
    assert (mount.path / "dir" / "big.bin").read_bytes() == big  # prefetched in requests of up to 8 MiB: awscrt's
    written = os.urandom(9 * MiB)  # more than one 8 MiB part: a multipart upload
    (mount.path / "new.bin").write_bytes(written)
    assert s3.get_object(Bucket=bucket, Key="new.bin")["Body"].read() == written
    assert front.handshakes > 0


def test_a_certificate_no_trusted_authority_signed_is_refused_and_nothing_mounted(s3_server, bucket, tls, tmp_path):
    front, _ = tls
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = pail_cli("mount", bucket, str(mountpoint), "--endpoint-url", front.endpoint, env=s3_server.env())
    assert result.returncode == 1
    assert "certificate" in result.stderr.lower(), result.stderr
    assert "--ca-bundle" in result.stderr, result.stderr
    assert not is_mounted(mountpoint)
