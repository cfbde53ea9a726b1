"""The real object client: Pail's own sockets and awscrt for reads, botocore for the rest.

Reads are what a mount does most: ranged GETs of object data, HEADs and listings.
awscrt's S3 client runs them on native threads without the GIL (driver.s3.crt), so the
FUSE loop keeps the interpreter and a request costs a quarter of boto3's CPU (measured in
docs/ARCHITECTURE.md and docs/PERFORMANCE.md). Uploads, deletes and bucket checks go
through botocore (boto3's core) in worker threads: it knows their rules, and for uploads
it is as fast. All use one credential source: botocore's provider chain, read by awscrt
through a delegate. boto3 itself is not imported: a mount needs none of what it adds.
"""

from __future__ import annotations

import re
import time
from typing import Any

import botocore.config
import botocore.exceptions
import botocore.session
import structlog
import trio
from botocore import UNSIGNED
from botocore.retries import standard as standard_retries

from driver import config, credentials, metrics
from driver.config import S3Settings
from driver.credentials import CredentialError
from driver.s3 import api, options
from driver.s3.crt import CrtRequests
from driver.s3.direct import SocketGets

log = structlog.get_logger("pail.s3")

DEFAULT_REGION = "us-east-1"


def _boto_config(settings: S3Settings, region: str) -> botocore.config.Config:
    return botocore.config.Config(
        region_name=region,
        signature_version=UNSIGNED if settings.no_sign_request else None,
        # Bodies are not hashed for the signature (UNSIGNED-PAYLOAD): TLS protects them
        # and the CRC32C checksum lets S3 verify them, for a fraction of SHA-256's CPU.
        # Set explicitly, this holds over plain HTTP too (botocore would otherwise hash
        # every body there: about 0.6 CPU-s per GiB here).
        s3={"addressing_style": "path" if settings.force_path_style else "auto",
            "payload_signing_enabled": False},
        retries={"mode": "standard", "max_attempts": settings.max_attempts},
        connect_timeout=min(settings.connect_timeout, settings.request_timeout),
        # Checksums only where S3 requires them: with --upload-checksums Pail sends its
        # own CRC32C; boto3 would otherwise add CRC32 to every upload by itself.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        read_timeout=settings.request_timeout,
        max_pool_connections=32,
        user_agent_extra=settings.user_agent_extra,
        tcp_keepalive=True,
    )


def make_boto_client(settings: S3Settings, region: str, session: botocore.session.Session):
    """``session``: from driver.credentials, whose loader knows Pail's services and keeps
    the models parsed."""
    client = session.create_client(
        "s3",
        endpoint_url=settings.endpoint_url,
        verify=settings.ca_bundle if settings.ca_bundle else None,
        config=_boto_config(settings, region),
    )
    _RetryDeadline(settings.request_timeout, settings.max_attempts).register(client)
    return client


class _RetryDeadline:
    """Keeps botocore's retries of one call within the request timeout, as awscrt's are.

    botocore bounds each attempt (read_timeout) but not the call: five attempts at a server
    that stopped answering took five timeouts (25 s for a 3 s --request-timeout), and
    throttling backoff (up to 1+2+4+8 s of sleep) ignores the timeout altogether, so a
    failed upload reached close() as EIO far later than --request-timeout. botocore still
    decides whether and how long to back off; this only refuses a retry whose longest
    possible backoff would end past the timeout, counted from the call's start. So no
    attempt starts after the timeout, and the call ends within two timeouts at worst (a
    last attempt that goes unanswered).
    """

    def __init__(self, timeout: float, max_attempts: int) -> None:
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._adapter = standard_retries.RetryEventAdapter()
        try:  # the backoff botocore would choose, without jitter: its upper bound
            self._longest = standard_retries.ExponentialBackoff(
                random=lambda: 1.0,
                throttling_detector=standard_retries.ThrottlingErrorDetector(self._adapter))
        except TypeError:  # older botocore: one backoff scale for every error
            self._longest = standard_retries.ExponentialBackoff(random=lambda: 1.0)

    def register(self, client) -> None:
        client.meta.events.register("before-call.s3", self._started)
        # First, so that its refusal (False) wins over botocore's own retry handler.
        client.meta.events.register_first("needs-retry.s3", self._needs_retry)

    @staticmethod
    def _started(context: dict, **_: Any) -> None:
        context["pail_call_started"] = time.monotonic()

    def _needs_retry(self, request_dict: dict, **kwargs: Any) -> bool | None:
        started = request_dict["context"].get("pail_call_started")
        if started is None or kwargs["attempts"] >= self._max_attempts:
            # botocore stops by itself. (botocore before 1.43.3 reads False as "retry at
            # once"; pyproject.toml requires a newer one.)
            return None
        retry = self._adapter.create_retry_context(request_dict=request_dict, **kwargs)
        if time.monotonic() + self._longest.delay_amount(retry) - started >= self._timeout:
            return False  # no retry: the last error is the call's
        return None  # botocore's standard rules decide


def _error_from_boto(exc: Exception, operation: str, what: str) -> api.ObjectClientError:
    """One mapping from botocore failures to the interface's errors."""
    if isinstance(exc, botocore.exceptions.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = exc.response.get("Error", {}).get("Code")
        message = f"{operation} {what}: {status} {code or ''}".rstrip()
        if code == "NoSuchBucket":
            return api.NoSuchBucket(message, operation=operation, status=status, code=code)
        if code == "NoSuchUpload":
            # A 404 about the upload (aborted by another client or a lifecycle rule), not
            # the object: a failed upload, EIO to the writer, not a file deleted under it.
            return api.ObjectClientError(message, operation=operation, status=status, code=code)
        if status == 404 or code in ("NoSuchKey", "NotFound"):
            return api.NoSuchKey(message, operation=operation, status=status, code=code)
        if status in (401, 403):
            return api.AccessDenied(message, operation=operation, status=status, code=code)
        if status == 412:
            return api.PreconditionFailed(message, operation=operation, status=status, code=code)
        return api.ObjectClientError(message, operation=operation, status=status, code=code)
    if isinstance(exc, CredentialError):  # fetching fresh credentials failed
        error = api.Unreachable if exc.kind == "unreachable" else api.AccessDenied
        return error(f"{operation} {what}: {exc}", operation=operation)
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return api.AccessDenied(f"{operation} {what}: no credentials found", operation=operation)
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError,
                        botocore.exceptions.ConnectionClosedError,
                        botocore.exceptions.ConnectTimeoutError,
                        botocore.exceptions.ReadTimeoutError)):
        return api.Unreachable(f"{operation} {what}: {type(exc).__name__}", operation=operation)
    if isinstance(exc, botocore.exceptions.SSLError):  # the endpoint's certificate, most often
        return api.Unreachable(f"{operation} {what}: TLS failed: {exc.kwargs.get('error', exc)}",
                               operation=operation, code=_TLS_FAILED)
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return api.ObjectClientError(f"{operation} {what}: {exc}", operation=operation)
    raise exc


_TLS_FAILED = "TLSFailed"


def detect_region(settings: S3Settings, session: botocore.session.Session) -> str:
    """The bucket's region: --region when given, else what S3 says (the
    x-amz-bucket-region header of HeadBucket, sent even with a 301 or 403), else the
    environment's default region, else us-east-1 (stores that do not say)."""
    if settings.region:
        return settings.region
    fallback = session.get_config_variable("region") or DEFAULT_REGION
    arn = re.match(r"^arn:[^:]+:s3[^:]*:([a-z0-9-]+):", settings.bucket)
    if arn and arn.group(1):
        return arn.group(1)
    client = make_boto_client(settings, fallback, session)
    try:
        response = client.head_bucket(Bucket=settings.bucket, **options.boto_params(settings, "HeadBucket"))
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    except botocore.exceptions.ClientError as exc:
        headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    except botocore.exceptions.BotoCoreError:
        return fallback  # the bucket check that follows reports the connection problem
    return headers.get("x-amz-bucket-region") or fallback


class S3ObjectClient:
    """ObjectClient for one bucket. Create it inside ``trio.run``; ``aclose`` when done."""

    def __init__(self, settings: S3Settings, region: str, *, session: botocore.session.Session | None = None,
                 metadata_threads: int = 16) -> None:
        self.settings = settings
        self.region = region
        self._session = session or credentials.session(settings.credentials_file)
        self._boto = make_boto_client(settings, region, self._session)
        self._limiter = trio.CapacityLimiter(metadata_threads)
        # Object data comes over Pail's own sockets (driver.s3.direct), http or https;
        # HEAD and ListObjectsV2 through awscrt. PAIL_DATA_PATH=crt sends reads through
        # awscrt too, =boto3 every request through boto3 in threads: to compare them
        # (bench/), and as a fallback should one misbehave somewhere.
        # Uploads go through boto3: as fast here, and awscrt keeps each upload's body in
        # its buffer pool besides ours, which doubled a writer's memory (ARCHITECTURE.md).
        self._uploads = _BotoDataPath(self)
        self._crt: CrtRequests | None = None
        self._data: CrtRequests | _BotoDataPath = self._uploads
        self._sockets: SocketGets | None = None
        data_path = config.data_path()
        if data_path != "boto3":
            self._crt = self._data = CrtRequests(settings, region, self._session)
            if data_path != "crt":
                self._sockets = SocketGets(settings, region, self._session, scheme=self._crt.scheme,
                                           host=self._crt.host, base_path=self._crt.base_path)
        # Pail's own sockets receive a body into the buffer they return; awscrt and boto3
        # into their own first.
        self.copies_in_flight = 1 if self._sockets is not None else 2

    # -- boto3, in threads -----------------------------------------------------------------

    async def call(self, operation: str, what: str, **params: Any) -> dict:
        """One boto3 call with the bucket and the mount's options (driver.s3.options)."""
        method = getattr(self._boto, _snake(operation))
        params = {"Bucket": self.settings.bucket, **params, **options.boto_params(self.settings, operation)}

        def run() -> dict:
            with metrics.timed_s3_request(operation) as status:
                try:
                    response = method(**params)
                except Exception as exc:  # mapped here, in the thread, with the traceback intact
                    raise _error_from_boto(exc, operation, what) from None
                status.append(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 200))
                return response
        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    async def head_bucket(self) -> None:
        await trio.to_thread.run_sync(_head_bucket, self._boto, self.settings, limiter=self._limiter)

    async def head_object(self, key: str) -> api.ObjectInfo:
        if self._crt is not None:
            return await self._crt.head_object(key)
        response = await self.call("HeadObject", key, Key=key)
        return api.ObjectInfo(key=key, size=response["ContentLength"], etag=response["ETag"],
                              mtime=response["LastModified"].timestamp())

    async def list_objects(self, prefix: str, *, delimiter: str = "/",
                           continuation_token: str | None = None, max_keys: int = 1000) -> api.ListPage:
        if self._crt is not None:
            return await self._crt.list_objects(prefix, delimiter=delimiter, continuation_token=continuation_token,
                                                max_keys=max_keys)
        params: dict[str, Any] = {"Prefix": prefix, "MaxKeys": max_keys}
        if delimiter:
            params["Delimiter"] = delimiter
        if continuation_token:
            params["ContinuationToken"] = continuation_token
        response = await self.call("ListObjectsV2", prefix or "/", **params)
        objects = [
            api.ObjectInfo(key=o["Key"], size=o["Size"], etag=o.get("ETag", ""),
                           mtime=o["LastModified"].timestamp())
            for o in response.get("Contents", [])
        ]
        prefixes = [p["Prefix"] for p in response.get("CommonPrefixes", [])]
        token = response.get("NextContinuationToken") if response.get("IsTruncated") else None
        return api.ListPage(objects=objects, prefixes=prefixes, next_token=token)

    async def create_multipart_upload(self, key: str) -> str:
        return (await self.call("CreateMultipartUpload", key, Key=key))["UploadId"]

    async def complete_multipart_upload(self, key: str, upload_id: str, parts: list[api.UploadedPart],
                                        size: int) -> api.ObjectInfo:
        listed = []
        for part in parts:
            entry = {"PartNumber": part.number, "ETag": part.etag}
            if part.checksum:
                entry["ChecksumCRC32C"] = part.checksum
            listed.append(entry)
        response = await self.call("CompleteMultipartUpload", key, Key=key, UploadId=upload_id,
                                   MultipartUpload={"Parts": listed})
        return api.ObjectInfo(key=key, size=size, etag=response.get("ETag", ""), mtime=time.time())

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        await self.call("AbortMultipartUpload", key, Key=key, UploadId=upload_id)

    async def delete_object(self, key: str) -> None:
        await self.call("DeleteObject", key, Key=key)

    # -- object data: on our sockets (driver.s3.direct), through awscrt, or boto3 ---------------

    async def get_range(self, key: str, start: int, length: int, *, etag: str) -> bytes | bytearray:
        if self._sockets is not None:
            return await self._sockets.get_range(key, start, length, etag=etag)
        return await self._data.get_range(key, start, length, etag=etag)

    async def put_object(self, key: str, data: bytes | memoryview) -> api.ObjectInfo:
        etag, _ = await self._uploads.put(key, data)
        return api.ObjectInfo(key=key, size=len(data), etag=etag, mtime=time.time())

    async def upload_part(self, key: str, upload_id: str, number: int,
                          data: bytes | memoryview) -> api.UploadedPart:
        etag, checksum = await self._uploads.put(key, data, part=(number, upload_id))
        return api.UploadedPart(number, etag, checksum)

    async def aclose(self) -> None:
        if self._sockets is not None:
            self._sockets.close()
        self._data.close()
        self._boto.close()


class _BotoDataPath:
    """Object data with boto3, one worker thread a request."""

    def __init__(self, client: S3ObjectClient) -> None:
        self._client = client

    async def get_range(self, key: str, start: int, length: int, *, etag: str) -> bytes:
        response = await self._client.call("GetObject", key, Key=key, IfMatch=etag,
                                           Range=f"bytes={start}-{start + length - 1}")
        return await trio.to_thread.run_sync(response["Body"].read)

    async def put(self, key: str, data: bytes | memoryview, *,
                  part: tuple[int, str] | None = None) -> tuple[str, str | None]:
        """PutObject, or UploadPart of ``part`` (number, upload id); returns the ETag and
        the CRC32C sent (computed in a worker thread: it reads every byte)."""
        crc = await trio.to_thread.run_sync(options.checksum, self._client.settings, data)
        params: dict[str, Any] = {"Key": key, "Body": bytes(data)}
        if crc:
            params["ChecksumCRC32C"] = crc
        operation = "PutObject"
        if part is not None:
            operation = "UploadPart"
            params.update(PartNumber=part[0], UploadId=part[1])
        response = await self._client.call(operation, key, **params)
        return response.get("ETag", ""), crc

    def close(self) -> None:
        pass


def _snake(operation: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", operation).lower()


def _head_bucket(client, settings: S3Settings) -> None:
    bucket = settings.bucket
    with metrics.timed_s3_request("HeadBucket") as status:
        try:
            client.head_bucket(Bucket=bucket, **options.boto_params(settings, "HeadBucket"))
        except botocore.exceptions.ClientError as exc:
            # HeadBucket has no body, so no error code: a 404 can only mean the bucket.
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                raise api.NoSuchBucket(f"HeadBucket {bucket}: 404", operation="HeadBucket",
                                       status=404, code="NoSuchBucket") from None
            raise _error_from_boto(exc, "HeadBucket", bucket) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise _error_from_boto(exc, "HeadBucket", bucket) from None
        status.append(200)


def check_bucket(settings: S3Settings, region: str, session: botocore.session.Session) -> None:
    """HeadBucket, synchronously, for checks before anything is mounted."""
    client = make_boto_client(settings, region, session)
    try:
        _head_bucket(client, settings)
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
    if exc.code == _TLS_FAILED and "CERTIFICATE_VERIFY_FAILED" in str(exc) and not settings.ca_bundle:
        return (f"cannot reach {where}: {exc}; if a private authority signed its certificate, "
                "name that authority's certificate with --ca-bundle")
    if isinstance(exc, api.Unreachable):
        return f"cannot reach {where}: {exc}"
    return f"checking bucket {bucket!r} failed: {exc}"
