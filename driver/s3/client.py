"""The real object client: boto3 for metadata requests, awscrt for object data.

Listing, HEAD and bucket checks are few and small: boto3, in worker threads, is the
simplest correct client for them. Object bytes are the data path: awscrt's S3 client runs
the HTTP requests on native threads without the GIL and hands each response body to
Python in one piece, so the FUSE loop keeps the interpreter (measured in docs/ARCHITECTURE.md).
Both use one credential source: boto3's provider chain, read by awscrt through a delegate.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import awscrt.auth
import awscrt.exceptions
import awscrt.http
import awscrt.io
import awscrt.s3
import boto3
import botocore.config
import botocore.exceptions
import structlog
import trio
from botocore import UNSIGNED

from driver.config import S3Settings
from driver.s3 import api

log = structlog.get_logger("pail.s3")
_T = TypeVar("_T")

DEFAULT_REGION = "us-east-1"
# Request sizes above this would be split by awscrt into parts; the prefetcher keeps its
# requests at or below it, so one request of ours is one HTTP GET.
CRT_PART_SIZE = 8 * 1024 * 1024
# awscrt refuses a lower memory limit; Pail bounds its own buffering (MemoryBudget).
CRT_MEMORY_LIMIT = 1024 * 1024 * 1024


def _boto_config(settings: S3Settings, region: str) -> botocore.config.Config:
    return botocore.config.Config(
        region_name=region,
        signature_version=UNSIGNED if settings.no_sign_request else None,
        s3={"addressing_style": "path" if settings.force_path_style else "auto"},
        retries={"mode": "standard", "max_attempts": settings.max_attempts},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
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
        self._data = _CrtDataPath(settings, region, self._session)

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

    # -- data: awscrt ------------------------------------------------------------------------

    async def get_range(self, key: str, start: int, length: int, *, etag: str) -> bytes:
        return await self._data.get_range(key, start, length, etag=etag)

    async def aclose(self) -> None:
        self._data.close()
        self._boto.close()


class _CrtDataPath:
    """Ranged GETs through awscrt's S3 client, awaited from trio without a thread each."""

    def __init__(self, settings: S3Settings, region: str, session: boto3.Session) -> None:
        self._settings = settings
        # Address objects exactly as boto3 would (path or virtual-hosted style, access
        # points, custom endpoints): ask it for a URL and keep everything but the key.
        unsigned = make_boto_client(dataclasses.replace(settings, no_sign_request=True), region, session)
        url = urlsplit(unsigned.generate_presigned_url(
            "get_object", Params={"Bucket": settings.bucket, "Key": "K"}, ExpiresIn=60))
        unsigned.close()
        if not url.path.endswith("/K"):
            raise ValueError(f"cannot derive the object URL layout from {url.path!r}")
        self._scheme = url.scheme
        self._host = url.netloc
        self._base_path = url.path[:-1]
        event_loops = awscrt.io.EventLoopGroup(max(2, min(8, os.cpu_count() or 2)))
        resolver = awscrt.io.DefaultHostResolver(event_loops)
        bootstrap = awscrt.io.ClientBootstrap(event_loops, resolver)
        signing = None
        if not settings.no_sign_request:
            provider = awscrt.auth.AwsCredentialsProvider.new_delegate(_credentials_from(session))
            signing = awscrt.s3.create_default_s3_signing_config(region=region, credential_provider=provider)
        tls_mode = awscrt.s3.S3RequestTlsMode.ENABLED if url.scheme == "https" else awscrt.s3.S3RequestTlsMode.DISABLED
        tls_options = None
        if url.scheme == "https":
            tls = awscrt.io.TlsContextOptions()
            if settings.ca_bundle:
                tls.override_default_trust_store_from_path(None, settings.ca_bundle)
            tls_options = awscrt.io.ClientTlsContext(tls).new_connection_options()
            tls_options.set_server_name(url.hostname or "")
        self._client = awscrt.s3.S3Client(
            bootstrap=bootstrap,
            region=region,
            signing_config=signing,
            tls_mode=tls_mode,
            tls_connection_options=tls_options,
            part_size=CRT_PART_SIZE,
            memory_limit=CRT_MEMORY_LIMIT,
            throughput_target_gbps=10.0,
            retry_config=awscrt.s3.S3RetryConfig(max_retries=max(0, settings.max_attempts - 1)),
            connect_timeout_ms=int(settings.connect_timeout * 1000),
        )
        # One data request may not take longer than this in all, retries included.
        self._deadline = settings.read_timeout * 2

    async def get_range(self, key: str, start: int, length: int, *, etag: str) -> bytes:
        headers = awscrt.http.HttpHeaders([
            ("Host", self._host),
            ("Range", f"bytes={start}-{start + length - 1}"),
            ("If-Match", etag),
        ])
        request = awscrt.http.HttpRequest("GET", self._base_path + quote(key, safe="/~"), headers)
        parts: list[tuple[int, bytes]] = []

        def on_body(chunk: bytes, offset: int, **_: Any) -> None:
            parts.append((offset, chunk))  # on an awscrt thread; list.append is atomic

        meta = self._client.make_request(type=awscrt.s3.S3RequestType.GET_OBJECT, request=request,
                                         on_body=on_body, operation_name="GetObject")
        with trio.move_on_after(self._deadline) as timeout:
            try:
                await _wait(meta.finished_future, meta.cancel)
            except awscrt.exceptions.AwsCrtError as exc:
                raise _error_from_crt(exc, key) from None
        if timeout.cancelled_caught:
            meta.cancel()
            raise api.Unreachable(f"GetObject {key}: no answer within {self._deadline:.0f} s",
                                  operation="GetObject")
        if len(parts) == 1:
            return parts[0][1]
        parts.sort(key=lambda p: p[0])
        return b"".join(chunk for _, chunk in parts)

    def close(self) -> None:
        self._client = None  # awscrt shuts its threads down when the last reference goes


def _credentials_from(session: boto3.Session) -> Callable[[], awscrt.auth.AwsCredentials]:
    """awscrt asks this for credentials before signing; boto3's chain refreshes them."""
    def get() -> awscrt.auth.AwsCredentials:
        credentials = session.get_credentials()
        if credentials is None:
            raise RuntimeError("no AWS credentials found")
        frozen = credentials.get_frozen_credentials()
        return awscrt.auth.AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token)
    return get


def _error_from_crt(exc: awscrt.exceptions.AwsCrtError, key: str) -> api.ObjectClientError:
    if isinstance(exc, awscrt.s3.S3ResponseError):
        status = exc.status_code
        match = re.search(rb"<Code>([^<]+)</Code>", exc.body or b"")
        code = match.group(1).decode() if match else None
        message = f"GetObject {key}: {status} {code or ''}".rstrip()
        if status == 404:
            cls = api.NoSuchBucket if code == "NoSuchBucket" else api.NoSuchKey
            return cls(message, operation="GetObject", status=status, code=code)
        if status == 412:
            return api.PreconditionFailed(message, operation="GetObject", status=status, code=code)
        if status in (401, 403):
            return api.AccessDenied(message, operation="GetObject", status=status, code=code)
        return api.ObjectClientError(message, operation="GetObject", status=status, code=code)
    return api.Unreachable(f"GetObject {key}: {exc.name}", operation="GetObject")


async def _wait(future: concurrent.futures.Future, cancel: Callable[[], None]) -> Any:
    """Await a concurrent future from trio: a callback wakes the trio loop, no thread waits."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: concurrent.futures.Future) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    future.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:
        cancel()
        raise
    return future.result()


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
