"""What every S3 request carries besides its own parameters: requester pays, the expected
bucket owner, storage class, server-side encryption and upload checksums.

One table says which operation takes which option, for both clients: boto3 parameters
and the HTTP headers awscrt requests are built with. A test asserts them on the wire.
"""

from __future__ import annotations

import base64

import awscrt.checksums

from driver.config import S3Settings

# Operations that accept x-amz-request-payer (HeadBucket does not).
_PAYER_OPERATIONS = {"GetObject", "HeadObject", "ListObjectsV2", "PutObject", "CreateMultipartUpload",
                     "UploadPart", "CompleteMultipartUpload", "AbortMultipartUpload", "DeleteObject"}
# Operations that create an object and so take its storage class and encryption.
_CREATE_OPERATIONS = {"PutObject", "CreateMultipartUpload"}


def boto_params(settings: S3Settings, operation: str) -> dict[str, str]:
    params: dict[str, str] = {}
    if settings.expected_bucket_owner:
        params["ExpectedBucketOwner"] = settings.expected_bucket_owner
    if settings.requester_pays and operation in _PAYER_OPERATIONS:
        params["RequestPayer"] = "requester"
    if operation in _CREATE_OPERATIONS:
        if settings.storage_class:
            params["StorageClass"] = settings.storage_class
        if settings.sse:
            params["ServerSideEncryption"] = settings.sse
        if settings.sse_kms_key_id:
            params["SSEKMSKeyId"] = settings.sse_kms_key_id
    if operation == "CreateMultipartUpload" and settings.upload_checksum:
        params["ChecksumAlgorithm"] = settings.upload_checksum
    return params


def headers(settings: S3Settings, operation: str) -> list[tuple[str, str]]:
    """The same options as HTTP headers, for requests awscrt sends."""
    out: list[tuple[str, str]] = []
    if settings.expected_bucket_owner:
        out.append(("x-amz-expected-bucket-owner", settings.expected_bucket_owner))
    if settings.requester_pays and operation in _PAYER_OPERATIONS:
        out.append(("x-amz-request-payer", "requester"))
    if operation in _CREATE_OPERATIONS:
        if settings.storage_class:
            out.append(("x-amz-storage-class", settings.storage_class))
        if settings.sse:
            out.append(("x-amz-server-side-encryption", settings.sse))
        if settings.sse_kms_key_id:
            out.append(("x-amz-server-side-encryption-aws-kms-key-id", settings.sse_kms_key_id))
    return out


def checksum(settings: S3Settings, data: bytes | memoryview) -> str | None:
    """The base64 CRC32C S3 checks an upload against, or None when checksums are off."""
    if not settings.upload_checksum:
        return None
    return base64.b64encode(awscrt.checksums.crc32c(data).to_bytes(4, "big")).decode()
