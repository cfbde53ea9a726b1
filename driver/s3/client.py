"""The real object client: boto3 for metadata requests, awscrt for object data.

Listing, HEAD and bucket checks are few and small: boto3, in worker threads, is the
simplest correct client for them. Object bytes are the data path: awscrt's S3 client runs
the HTTP requests on native threads without the GIL and hands each response body to
Python in one piece, so the FUSE loop keeps the interpreter (measured in docs/ARCHITECTURE.md).
Both use one credential source: boto3's provider chain, read by awscrt through a delegate.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import structlog
import trio
from botocore import UNSIGNED

from driver.config import S3Settings
from driver.s3 import api
from driver.s3.crt import CrtDataPath

log = structlog.get_logger("pail.s3")
_T = TypeVar("_T")

DEFAULT_REGION = "us-east-1"
# Request sizes above this would be split by awscrt into parts; the prefetcher keeps its

def _boto_config(settings: S3Settings, region: str) -> botocore.config.Config:
    return botocore.config.Config(
        region_name=region,
        signature_version=UNSIGNED if settings.no_sign_request else None,
        s3={"addressing_style": "path" if settings.force_path_style else "auto"},
        retries={"mode": "standard", "max_attempts": settings.max_attempts},
        connect_timeout=min(settings.connect_timeout, settings.request_timeout),
        read_timeout=settings.request_timeout,
        max_pool_connections=32,
        user_agent_extra=settings.user_agent_extra,
        tcp_keepalive=True,
    )


def make_boto_client(settings: S3Settings, region: str, session: boto3.Session | None = None):
    session = session or boto3.Session()
    return session.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        verify=settings.ca_bundle if settings.ca_bundle else None,
        config=_boto_config(settings, region),
    )


def _error_from_boto(exc: Exception, operation: str, what: str) -> api.ObjectClientError:
    """One mapping from botocore failures to the interface's errors."""
    if isinstance(exc, botocore.exceptions.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = exc.response.get("Error", {}).get("Code")
        message = f"{operation} {what}: {status} {code or ''}".rstrip()
        if code == "NoSuchBucket":
            return api.NoSuchBucket(message, operation=operation, status=status, code=code)
        if status == 404 or code in ("NoSuchKey", "NotFound"):
            return api.NoSuchKey(message, operation=operation, status=status, code=code)
        if status in (401, 403):
            return api.AccessDenied(message, operation=operation, status=status, code=code)
        if status == 412:
            return api.PreconditionFailed(message, operation=operation, status=status, code=code)
        return api.ObjectClientError(message, operation=operation, status=status, code=code)
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return api.AccessDenied(f"{operation} {what}: no credentials found", operation=operation)
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError,
                        botocore.exceptions.ConnectionClosedError,
                        botocore.exceptions.ConnectTimeoutError,
                        botocore.exceptions.ReadTimeoutError)):
        return api.Unreachable(f"{operation} {what}: {type(exc).__name__}", operation=operation)
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return api.ObjectClientError(f"{operation} {what}: {exc}", operation=operation)
    raise exc


def detect_region(settings: S3Settings, session: boto3.Session | None = None) -> str:
    """The bucket's region: --region when given, else what S3 says (the
    x-amz-bucket-region header of HeadBucket, sent even with a 301 or 403), else the
    environment's default region, else us-east-1 (stores that do not say)."""
    if settings.region:
        return settings.region
    session = session or boto3.Session()
    fallback = session.region_name or DEFAULT_REGION
    arn = re.match(r"^arn:[^:]+:s3[^:]*:([a-z0-9-]+):", settings.bucket)
    if arn and arn.group(1):
        return arn.group(1)
    client = make_boto_client(settings, fallback, session)
    try:
        response = client.head_bucket(Bucket=settings.bucket)
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    except botocore.exceptions.ClientError as exc:
        headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    except botocore.exceptions.BotoCoreError:
        return fallback  # the bucket check that follows reports the connection problem
    return headers.get("x-amz-bucket-region") or fallback


class S3ObjectClient:
    """ObjectClient for one bucket. Create it inside ``trio.run``; ``aclose`` when done."""

    def __init__(self, settings: S3Settings, region: str, *, session: boto3.Session | None = None,
                 metadata_threads: int = 16) -> None:
        self.settings = settings
        self.region = region
        self._session = session or boto3.Session()
        self._boto = make_boto_client(settings, region, self._session)
        self._limiter = trio.CapacityLimiter(metadata_threads)
        # PAIL_DATA_PATH=boto3 switches object reads to boto3 in threads: kept to compare
        # the two data paths (bench/) and as a fallback should awscrt misbehave somewhere.
        self._data: CrtDataPath | _BotoDataPath
        if os.environ.get("PAIL_DATA_PATH", "crt") == "boto3":
            self._data = _BotoDataPath(self._boto, settings.bucket)
        else:
            self._data = CrtDataPath(settings, region, self._session)

    # -- metadata: boto3 in threads ------------------------------------------------------

    async def _call(self, operation: str, what: str, fn: Callable[[], _T]) -> _T:
        def run() -> _T:
            try:
                return fn()
            except api.ObjectClientError:
                raise
            except Exception as exc:  # mapped here, in the thread, with the traceback intact
                raise _error_from_boto(exc, operation, what) from None
        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    async def head_bucket(self) -> None:
        await self._call("HeadBucket", self.settings.bucket,
                         lambda: _head_bucket(self._boto, self.settings.bucket))

    async def head_object(self, key: str) -> api.ObjectInfo:
        response = await self._call(
            "HeadObject", key, lambda: self._boto.head_object(Bucket=self.settings.bucket, Key=key))
        return api.ObjectInfo(key=key, size=response["ContentLength"], etag=response["ETag"],
                              mtime=response["LastModified"].timestamp())

    async def list_objects(self, prefix: str, *, delimiter: str = "/",
                           continuation_token: str | None = None, max_keys: int = 1000) -> api.ListPage:
        params: dict[str, Any] = {"Bucket": self.settings.bucket, "Prefix": prefix, "MaxKeys": max_keys}
        if delimiter:
            params["Delimiter"] = delimiter
        if continuation_token:
            params["ContinuationToken"] = continuation_token
        response = await self._call("ListObjectsV2", prefix or "/",
                                    lambda: self._boto.list_objects_v2(**params))
        objects = [
            api.ObjectInfo(key=o["Key"], size=o["Size"], etag=o.get("ETag", ""),
                           mtime=o["LastModified"].timestamp())
            for o in response.get("Contents", [])
        ]
        prefixes = [p["Prefix"] for p in response.get("CommonPrefixes", [])]
        token = response.get("NextContinuationToken") if response.get("IsTruncated") else None
        return api.ListPage(objects=objects, prefixes=prefixes, next_token=token)

    # -- data: awscrt (driver.s3.crt) ------------------------------------------------------

    async def get_range(self, key: str, start: int, length: int, *, etag: str) -> bytes:
        return await self._data.get_range(key, start, length, etag=etag)

    async def aclose(self) -> None:
        self._data.close()
        self._boto.close()


class _BotoDataPath:
    """Ranged GETs with boto3, one worker thread each."""

    def __init__(self, boto_client, bucket: str, threads: int = 16) -> None:
        self._boto = boto_client
        self._bucket = bucket
        self._limiter = trio.CapacityLimiter(threads)

    async def get_range(self, key: str, start: int, length: int, *, etag: str) -> bytes:
        def get() -> bytes:
            try:
                response = self._boto.get_object(Bucket=self._bucket, Key=key, IfMatch=etag,
                                                 Range=f"bytes={start}-{start + length - 1}")
                return response["Body"].read()
            except Exception as exc:
                raise _error_from_boto(exc, "GetObject", key) from None
        return await trio.to_thread.run_sync(get, limiter=self._limiter)

    def close(self) -> None:
        pass


def _head_bucket(client, bucket: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        # HeadBucket has no body, so no error code: a 404 can only mean the bucket.
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            raise api.NoSuchBucket(f"HeadBucket {bucket}: 404", operation="HeadBucket",
                                   status=404, code="NoSuchBucket") from None
        raise _error_from_boto(exc, "HeadBucket", bucket) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise _error_from_boto(exc, "HeadBucket", bucket) from None


def check_bucket(settings: S3Settings, region: str, session: boto3.Session | None = None) -> None:
    """HeadBucket, synchronously, for checks before anything is mounted."""
    client = make_boto_client(settings, region, session)
    try:
        _head_bucket(client, settings.bucket)
    finally:
        client.close()


def describe_bucket_error(exc: api.ObjectClientError, settings: S3Settings) -> str:
    """One line for a person: what is wrong with the bucket or the way to it."""
    bucket = settings.bucket
    where = settings.endpoint_url or "S3"
    if isinstance(exc, api.NoSuchBucket):
        return f"bucket {bucket!r} does not exist at {where}"
    if isinstance(exc, api.AccessDenied):
        detail = f" ({exc.status} {exc.code})" if exc.status else ""
        return (f"access to bucket {bucket!r} was refused{detail}: check the credentials "
                "and the bucket policy")
    if isinstance(exc, api.Unreachable):
        return f"cannot reach {where}: {exc}"
    return f"checking bucket {bucket!r} failed: {exc}"
