"""Object options on the wire: each request type carries the options that apply to it,
whichever client (Pail's own sockets, awscrt or boto3) sends it, as the recording proxy sees them."""

from __future__ import annotations

import os

import pytest

MiB = 1024 * 1024
OWNER = "123456789012"  # moto's account: the bucket-owner check passes
OPTIONS = ["--expected-bucket-owner", OWNER, "--requester-pays", "--storage-class", "STANDARD_IA",
           "--sse", "AES256", "--allow-delete"]


def exercise(s3, bucket, mount):
    s3.put_object(Bucket=bucket, Key="remote.bin", Body=os.urandom(300_000))
    os.listdir(mount.path)
    os.stat(mount.path / "remote.bin")
    assert len((mount.path / "remote.bin").read_bytes()) == 300_000
    (mount.path / "small.txt").write_bytes(b"one request")
    (mount.path / "large.bin").write_bytes(os.urandom(9 * MiB))  # two parts
    os.unlink(mount.path / "small.txt")


@pytest.mark.s3_servers("moto")  # SeaweedFS does not take storage classes and SSE
@pytest.mark.parametrize("data_path", ["direct", "crt", "boto3"])
def test_every_request_carries_its_options(s3, bucket, proxy, mount_bucket, data_path):
    mount = mount_bucket(bucket, *OPTIONS, endpoint=proxy.endpoint, env={"PAIL_DATA_PATH": data_path})
    exercise(s3, bucket, mount)
    seen = {}
    for record in proxy.records():
        seen.setdefault(record.op, []).append(record.request_headers)
    expected_ops = {"HeadBucket", "ListObjectsV2", "HeadObject", "GetObject", "PutObject",
                    "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "DeleteObject"}
    assert expected_ops <= set(seen), sorted(seen)
    for op in expected_ops:
        for headers in seen[op]:
            assert headers.get("x-amz-expected-bucket-owner") == OWNER, op
            if op != "HeadBucket":
                assert headers.get("x-amz-request-payer") == "requester", op
            creates = op in ("PutObject", "CreateMultipartUpload")
            assert (headers.get("x-amz-storage-class") == "STANDARD_IA") == creates, op
            assert (headers.get("x-amz-server-side-encryption") == "AES256") == creates, op
            uploads = op in ("PutObject", "UploadPart")
            assert ("x-amz-checksum-crc32c" in headers) == uploads, op
            if uploads:  # the body is not hashed for the signature, over plain HTTP too
                assert headers.get("x-amz-content-sha256") == "UNSIGNED-PAYLOAD", op
    assert all(h.get("x-amz-checksum-algorithm") == "CRC32C" for h in seen["CreateMultipartUpload"])
    head = s3.head_object(Bucket=bucket, Key="large.bin")
    assert head.get("StorageClass") == "STANDARD_IA" and head.get("ServerSideEncryption") == "AES256"


@pytest.mark.s3_servers("moto")
def test_checksums_off_and_kms(s3, bucket, proxy, mount_bucket):
    mount = mount_bucket(bucket, "--upload-checksums", "off", "--sse", "aws:kms", "--sse-kms-key-id",
                         "alias/pail-test", endpoint=proxy.endpoint)
    try:
        (mount.path / "f.txt").write_bytes(b"x")
    except OSError:
        pass  # the store may refuse the key; what was sent is the point here
    puts = proxy.records("PutObject")
    assert puts, "the upload was attempted"
    for record in puts:
        assert "x-amz-checksum-crc32c" not in record.request_headers
        assert record.request_headers.get("x-amz-server-side-encryption") == "aws:kms"
        assert record.request_headers.get("x-amz-server-side-encryption-aws-kms-key-id") == "alias/pail-test"
