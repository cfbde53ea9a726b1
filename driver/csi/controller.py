"""The Controller service: CreateVolume and DeleteVolume for dynamic provisioning
(csi-provisioner calls them for PVCs of a StorageClass), and ValidateVolumeCapabilities.

A dynamic volume is a prefix ``<basePrefix>/<pv name>/`` of a shared bucket, or a bucket
``<bucketNamePrefix><pv name>`` of its own (``bucketPerVolume``); a name too long for the
128-byte id or a 63-character bucket name is shortened with a hash (``_fit``). The volume
id says which, and whether DeleteVolume deletes the objects (driver.csi.volume_id),
because DeleteVolume gets nothing else.
For the same reason the S3 endpoint is the controller's own (``--s3-endpoint-url``),
not a StorageClass parameter: a volume is deleted where it was created, and CreateVolume
hands that endpoint to the nodes in the volume context.

Idempotency: the id is a function of the name and the parameters, so a repeated
CreateVolume returns the same volume, also after a restart. A repeated name with other
parameters or an incompatible capacity is ALREADY_EXISTS only while this process
remembers the first call (in memory, not persisted): after a restart the second call
gets the volume its own parameters describe. S3 has no capacity: capacity_bytes echoes
the requested size, which is never enforced.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import botocore.exceptions
import botocore.session
import grpc
import structlog

from csi import csi_pb2, csi_pb2_grpc
from driver import credentials
from driver.config import REGION_NAME, S3Settings
from driver.csi import capabilities
from driver.csi import context as ctx
from driver.csi.errors import CsiError, grpc_errors, invalid, require
from driver.csi.mount_flags import parse_mount_flags
from driver.csi.volume_id import MAGIC, MAX_VOLUME_ID_BYTES, VolumeRef, decode, encode
from driver.s3.client import DEFAULT_REGION, make_boto_client

log = structlog.get_logger("pail.csi.controller")

DEFAULT_BUCKET_NAME_PREFIX = "pail-"
MAX_BUCKET_NAME = 63
NAME_HASH_CHARS = 16  # of a long name's SHA-256, in the shortened form (see _fit)
DELETE_BATCH = 1000  # keys per DeleteObjects request: S3's maximum
# One DeleteVolume works at most this long. It goes on after csi-provisioner's own call
# timeout (its retries meanwhile are ABORTED), so a large volume is deleted once rather
# than restarted by every retry; what is left when time runs out, the next retry deletes.
DELETE_TIME_LIMIT = 600.0
# StorageClass parameters CreateVolume reads (besides csi.storage.k8s.io/ metadata).
PARAMETERS = frozenset({ctx.BUCKET_NAME, ctx.BASE_PREFIX, ctx.DELETE_POLICY, ctx.BUCKET_PER_VOLUME,
                        ctx.BUCKET_NAME_PREFIX, ctx.REGION, ctx.FORCE_PATH_STYLE,
                        ctx.AUTHENTICATION_SOURCE, ctx.STS_REGION})
# What a bucket Pail creates may be called: S3's rules for new general-purpose buckets.
_NEW_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP_ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+")


@dataclass(frozen=True)
class ControllerSettings:
    """Where the controller's S3 requests go; credentials come from the standard chain."""

    endpoint_url: str | None = None
    region: str | None = None  # None: AWS_REGION, else us-east-1
    force_path_style: bool = False


class _BucketMissing(Exception):
    pass


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, settings: ControllerSettings = ControllerSettings(),
                 session: botocore.session.Session | None = None) -> None:
        self._settings = settings
        self._session = session or credentials.new_session()
        self._region = settings.region or self._session.get_config_variable("region") or DEFAULT_REGION
        self._lock = threading.Lock()
        self._clients: dict[str, object] = {}
        self._created: dict[str, csi_pb2.Volume] = {}  # name -> volume, for ALREADY_EXISTS
        self._busy: set[str] = set()

    @grpc_errors
    def ControllerGetCapabilities(self, request, context):
        rpc = csi_pb2.ControllerServiceCapability.RPC
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=rpc(type=rpc.CREATE_DELETE_VOLUME)),
        ])

    @grpc_errors
    def CreateVolume(self, request, context):
        require(request, "name", "volume_capabilities")
        _check_capabilities(request.volume_capabilities)
        if request.HasField("volume_content_source"):
            raise invalid("volume_content_source: Pail volumes cannot be created from a snapshot or volume")
        if request.mutable_parameters:
            raise invalid("mutable_parameters are not supported")
        ref, volume_context, region = self._plan(request.name, dict(request.parameters))
        try:
            volume_id = encode(ref)
        except ValueError as exc:  # VolumeIdTooLong, or a bucket an id cannot hold (an ARN)
            raise invalid(f"parameters: {exc}") from None
        volume = csi_pb2.Volume(volume_id=volume_id, capacity_bytes=_capacity(request.capacity_range),
                                volume_context=volume_context)
        with self._guard(request.name):
            with self._lock:
                earlier = self._created.get(request.name)
            if earlier is not None:
                _check_repeat(request, earlier, volume)
                volume = earlier
            if ref.bucket_per_volume:
                self._create_bucket(ref.bucket, region)
            else:
                try:
                    self._head_bucket(ref.bucket, region)
                except _BucketMissing:
                    raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"bucket {ref.bucket!r} does not exist at {self._where}: create it, or set "
                                   f"{ctx.BUCKET_PER_VOLUME}: \"true\"") from None
            with self._lock:
                self._created[request.name] = volume
        claim = {"pvc": f"{request.parameters[ctx.PVC_NAMESPACE]}/{request.parameters[ctx.PVC_NAME]}"} \
            if ctx.PVC_NAME in request.parameters and ctx.PVC_NAMESPACE in request.parameters else {}
        log.info("volume created", operation="CreateVolume", volume_id=volume_id, name=request.name,
                 capacity_bytes=volume.capacity_bytes, **claim)
        return csi_pb2.CreateVolumeResponse(volume=volume)

    @grpc_errors
    def DeleteVolume(self, request, context):
        require(request, "volume_id")
        volume_id = request.volume_id
        ref = decode(volume_id)
        if ref is None:  # a static PV's handle, or not ours: there is nothing to delete
            log.info("volume not provisioned by Pail; nothing to delete", operation="DeleteVolume",
                     volume_id=volume_id)
        elif not ref.delete_objects:
            log.info("volume retained: objects left in place", operation="DeleteVolume", volume_id=volume_id)
        else:
            with self._guard(volume_id):
                self._delete(ref, volume_id)
        with self._lock:
            for name in [n for n, v in self._created.items() if v.volume_id == volume_id]:
                del self._created[name]
        return csi_pb2.DeleteVolumeResponse()

    @grpc_errors
    def ValidateVolumeCapabilities(self, request, context):
        require(request, "volume_id", "volume_capabilities")
        ref = decode(request.volume_id)
        if ref is None:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {request.volume_id!r} was not provisioned by Pail")
        try:
            self._head_bucket(ref.bucket, self._region)
        except _BucketMissing:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"bucket {ref.bucket!r} of volume {request.volume_id!r} "
                                                      f"does not exist at {self._where}") from None
        problems = [p for p in map(capabilities.unsupported, request.volume_capabilities) if p]
        problems += [f"unknown volume attribute {k!r}" for k in request.volume_context
                     if k not in ctx.VOLUME_ATTRIBUTES and not k.startswith(ctx.PROVISIONER_PREFIX)]
        problems += [f"unknown parameter {k!r}" for k in request.parameters
                     if k not in PARAMETERS and not k.startswith(ctx.PROVISIONER_PREFIX)]
        if request.mutable_parameters:
            problems.append("mutable parameters are not supported")
        if problems:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message="; ".join(problems))
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context, volume_capabilities=request.volume_capabilities,
            parameters=request.parameters))

    # -- CreateVolume ------------------------------------------------------------------------

    def _plan(self, name: str, params: dict[str, str]) -> tuple[VolumeRef, dict[str, str], str]:
        """The volume ``params`` describe for ``name``, its volume context, and the region
        its bucket is (or will be created) in."""
        for key in sorted(params):
            if key == ctx.ENDPOINT:
                raise invalid(f"parameters: {ctx.ENDPOINT!r} cannot be set in a StorageClass: dynamic volumes "
                              "live on the controller's endpoint (pail csi controller --s3-endpoint-url)")
            if key == ctx.PREFIX:
                raise invalid(f"parameters: {ctx.PREFIX!r} is a PV attribute; a StorageClass sets "
                              f"{ctx.BASE_PREFIX!r} (each volume gets '<basePrefix>/<pv name>/')")
            if key not in PARAMETERS and not key.startswith(ctx.PROVISIONER_PREFIX):
                raise invalid(f"parameters: unknown parameter {key!r}")
        if "/" in name or name in (".", "..") or not name.isprintable():
            raise invalid(f"name {name!r} cannot be a key prefix segment (a '/', '.', '..' or unprintable)")
        policy = params.get(ctx.DELETE_POLICY, ctx.DELETE_POLICY_RETAIN).lower()
        if policy not in ctx.DELETE_POLICIES:
            raise invalid(f"parameters: {ctx.DELETE_POLICY} must be retain or delete, not {policy!r}")
        own_bucket = ctx.parse_bool(params.get(ctx.BUCKET_PER_VOLUME, "false"), ctx.BUCKET_PER_VOLUME)
        region = params.get(ctx.REGION) or self._region
        if not REGION_NAME.fullmatch(region):
            raise invalid(f"parameters: {ctx.REGION} {region!r} is not a region name")
        if own_bucket:
            for key in (ctx.BUCKET_NAME, ctx.BASE_PREFIX):
                if key in params:
                    raise invalid(f"parameters: {key} cannot be combined with {ctx.BUCKET_PER_VOLUME}=true")
            bucket, prefix = _bucket_name(params.get(ctx.BUCKET_NAME_PREFIX, DEFAULT_BUCKET_NAME_PREFIX), name), ""
        else:
            if ctx.BUCKET_NAME_PREFIX in params:
                raise invalid(f"parameters: {ctx.BUCKET_NAME_PREFIX} needs {ctx.BUCKET_PER_VOLUME}=true")
            bucket = params.get(ctx.BUCKET_NAME)
            if not bucket:
                raise invalid(f"parameters: {ctx.BUCKET_NAME} is required (or {ctx.BUCKET_PER_VOLUME}: \"true\")")
            base = params.get(ctx.BASE_PREFIX, "").split("/")
            if any(segment in (".", "..") for segment in base):
                raise invalid(f"parameters: {ctx.BASE_PREFIX} must not have a '.' or '..' segment")
            base_prefix = "".join(f"{segment}/" for segment in base if segment)  # "/a//b/" is a/b/
            flags = "d" if policy == ctx.DELETE_POLICY_DELETE else "-"
            room = MAX_VOLUME_ID_BYTES - len(f"{MAGIC}{flags}:{bucket}/{base_prefix}/".encode())
            prefix = f"{base_prefix}{_fit(name, room)}/"
        ref = VolumeRef(bucket=bucket, prefix=prefix, delete_objects=policy == ctx.DELETE_POLICY_DELETE,
                        bucket_per_volume=own_bucket)

        # What NodePublishVolume mounts: this bucket and prefix, at the controller's endpoint.
        volume_context = {ctx.BUCKET_NAME: bucket}
        if prefix:
            volume_context[ctx.PREFIX] = prefix
        if self._settings.endpoint_url:
            volume_context[ctx.ENDPOINT] = self._settings.endpoint_url
        path_style = ctx.parse_bool(params.get(ctx.FORCE_PATH_STYLE, "false"), ctx.FORCE_PATH_STYLE)
        if path_style or self._settings.force_path_style:  # the way the controller reaches it works
            volume_context[ctx.FORCE_PATH_STYLE] = "true"
        if ctx.REGION in params or own_bucket:  # else nodes ask the bucket, as for a static PV
            volume_context[ctx.REGION] = region
        source = params.get(ctx.AUTHENTICATION_SOURCE)
        if source is not None and source not in ctx.AUTH_SOURCES:
            raise invalid(f"parameters: {ctx.AUTHENTICATION_SOURCE} must be driver or pod, not {source!r}")
        for key in (ctx.AUTHENTICATION_SOURCE, ctx.STS_REGION):
            if params.get(key):
                volume_context[key] = params[key]
        return ref, volume_context, region

    def _create_bucket(self, bucket: str, region: str) -> None:
        params: dict = {"Bucket": bucket}
        if region != "us-east-1":  # us-east-1 is S3's default and refuses to be named
            params["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._call(region, "CreateBucket", bucket, **params)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "BucketAlreadyOwnedByYou":
                return  # a repeated CreateVolume
            if code == "BucketAlreadyExists":
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"bucket {bucket!r} belongs to someone else: bucket names are global; "
                               f"choose another {ctx.BUCKET_NAME_PREFIX}") from None
            raise _s3_error(exc, "CreateBucket", bucket, self._where) from None

    def _head_bucket(self, bucket: str, region: str) -> None:
        """Nothing when the bucket is there; _BucketMissing when it is not."""
        try:
            self._call(region, "HeadBucket", bucket, Bucket=bucket)
        except botocore.exceptions.ClientError as exc:
            raise _s3_error(exc, "HeadBucket", bucket, self._where) from None

    # -- DeleteVolume ------------------------------------------------------------------------

    def _delete(self, ref: VolumeRef, volume_id: str) -> None:
        """Every object and upload under the volume's prefix, then a bucket of its own."""
        if not ref.prefix and not ref.bucket_per_volume:  # CreateVolume never makes such an id
            raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"volume {volume_id!r} is a whole shared bucket: Pail deletes only volume prefixes")
        bucket, prefix = ref.bucket, ref.prefix
        deadline = time.monotonic() + DELETE_TIME_LIMIT
        deleted = aborted = 0
        try:
            # Uploads first: one completed after the listing would leave an object behind.
            for upload in self._pages(deadline, "ListMultipartUploads", bucket, prefix, "Uploads",
                                      "KeyMarker", "UploadIdMarker"):
                self._call(self._region, "AbortMultipartUpload", bucket, Bucket=bucket, Key=upload["Key"],
                           UploadId=upload["UploadId"], ok_codes=("NoSuchUpload",))
                aborted += 1
            batch: list[str] = []
            for item in self._pages(deadline, "ListObjectsV2", bucket, prefix, "Contents", "ContinuationToken"):
                batch.append(item["Key"])
                if len(batch) == DELETE_BATCH:
                    deleted += self._delete_batch(bucket, batch)
                    batch = []
            deleted += self._delete_batch(bucket, batch)
            if ref.bucket_per_volume:
                self._call(self._region, "DeleteBucket", bucket, Bucket=bucket)
        except _BucketMissing:
            log.info("bucket already gone", operation="DeleteVolume", volume_id=volume_id, bucket=bucket)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "BucketNotEmpty":
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"bucket {bucket!r} is not empty after deleting its objects: a versioned "
                               "bucket keeps old versions, or something wrote to it meanwhile") from None
            raise _s3_error(exc, exc.operation_name, bucket, self._where) from None
        log.info("volume deleted", operation="DeleteVolume", volume_id=volume_id, objects=deleted,
                 uploads_aborted=aborted, bucket_deleted=ref.bucket_per_volume)

    def _pages(self, deadline: float, operation: str, bucket: str, prefix: str, items: str, *markers: str):
        """Every listed item under ``prefix``, page by page; the next page is asked for after
        the caller has used this one (and perhaps deleted its keys), from the markers."""
        params: dict = {"Bucket": bucket, "Prefix": prefix}
        while True:
            if time.monotonic() > deadline:
                raise CsiError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"deleting the volume took over {DELETE_TIME_LIMIT:.0f} s; the next call goes on")
            page = self._call(self._region, operation, bucket, **params)
            for item in page.get(items, []):
                if item["Key"].startswith(prefix):  # never outside the prefix, whatever the store says
                    yield item
            if not page.get("IsTruncated"):
                return
            nexts = {m: page.get(f"Next{m}") for m in markers}
            if not any(nexts.values()):
                return  # a store that says "truncated" without a marker: do not loop forever
            params.update({m: v for m, v in nexts.items() if v})

    def _delete_batch(self, bucket: str, keys: list[str]) -> int:
        if not keys:
            return 0
        response = self._call(self._region, "DeleteObjects", bucket, Bucket=bucket,
                              Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})
        errors = response.get("Errors") or []
        if errors:
            first = errors[0]
            code = grpc.StatusCode.PERMISSION_DENIED if first.get("Code") == "AccessDenied" else \
                grpc.StatusCode.INTERNAL
            raise CsiError(code, f"DeleteObjects in bucket {bucket!r}: {len(errors)} keys not deleted, "
                                 f"first {first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')}")
        return len(keys)

    # -- S3 ----------------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return self._settings.endpoint_url or "S3"

    def _client(self, region: str):
        with self._lock:  # botocore clients are thread-safe; making them is not
            client = self._clients.get(region)
            if client is None:
                # Few attempts: csi-provisioner times out each call and retries it itself.
                settings = S3Settings(bucket="", endpoint_url=self._settings.endpoint_url, region=region,
                                      force_path_style=self._settings.force_path_style, max_attempts=3)
                client = self._clients[region] = make_boto_client(settings, region, self._session)
            return client

    def _call(self, region: str, operation: str, bucket: str, *, ok_codes: tuple[str, ...] = (), **params) -> dict:
        """One S3 request. _BucketMissing when the bucket does not exist; S3's other
        refusals as botocore ClientError; no answer at all as a CsiError."""
        method = getattr(self._client(region), re.sub(r"(?<!^)(?=[A-Z])", "_", operation).lower())
        try:
            return method(**params)
        except botocore.exceptions.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = exc.response.get("Error", {}).get("Code")
            if code in ok_codes:
                return {}
            # HeadBucket has no body, so no error code: its 404 can only mean the bucket.
            if code == "NoSuchBucket" or (operation == "HeadBucket" and status == 404):
                raise _BucketMissing(bucket) from None
            raise
        except botocore.exceptions.NoCredentialsError:
            raise CsiError(grpc.StatusCode.UNAUTHENTICATED,
                           "the controller has no AWS credentials (environment, IRSA or Pod Identity)") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise CsiError(grpc.StatusCode.UNAVAILABLE,
                           f"{operation} {bucket}: cannot reach {self._where}: {type(exc).__name__}") from None

    @contextmanager
    def _guard(self, key: str):
        """One call at a time per volume: csi-provisioner retries a call that timed out
        while the first may still be working; the retry is ABORTED until it is done."""
        with self._lock:
            if key in self._busy:
                raise CsiError(grpc.StatusCode.ABORTED, f"an operation on volume {key} is in progress")
            self._busy.add(key)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(key)


def _fit(name: str, room: int) -> str:
    """``name``, or when it is longer than ``room`` bytes (CSI names may have 128
    characters; ids and bucket names have less room), its start, '-' and a hash of all of
    it: the same for the same name, so CreateVolume stays idempotent, and still readable.
    Left as it is when even the hash does not fit: then the caller refuses the name."""
    data = name.encode()
    if len(data) <= room or room < NAME_HASH_CHARS:
        return name
    digest = hashlib.sha256(data).hexdigest()[:NAME_HASH_CHARS]
    head = data[:max(room - NAME_HASH_CHARS - 1, 0)].decode(errors="ignore").rstrip(".-")
    return f"{head}-{digest}" if head else digest


def _bucket_name(name_prefix: str, name: str) -> str:
    bucket = name_prefix + _fit(name.lower(), MAX_BUCKET_NAME - len(name_prefix))
    if (not _NEW_BUCKET.fullmatch(bucket) or ".." in bucket or _IP_ADDRESS.fullmatch(bucket)
            or bucket.startswith("xn--") or bucket.endswith("-s3alias")):
        raise invalid(f"parameters: {ctx.BUCKET_NAME_PREFIX} {name_prefix!r} with volume name {name!r} "
                      f"makes {bucket!r}, not a valid bucket name (3-63 lowercase letters, digits, '.' "
                      "and '-', starting and ending with a letter or digit)")
    return bucket


def _check_capabilities(volume_capabilities) -> None:
    for capability in volume_capabilities:
        problem = capabilities.unsupported(capability)
        if problem:
            raise invalid(f"volume_capabilities: {problem}")
        # The StorageClass's mountOptions: refused now rather than at every mount. A prefix
        # option would mount something other than the volume DeleteVolume deletes.
        flags = parse_mount_flags(capability.mount.mount_flags)
        if any(f == "--prefix" or f.startswith("--prefix=") for f in flags):
            raise invalid("volume_capabilities: mount option 'prefix' cannot be set on a dynamically "
                          "provisioned volume: each volume is its own prefix")


def _capacity(capacity_range: csi_pb2.CapacityRange) -> int:
    """S3 has no capacity to reserve: the requested size is echoed, and never enforced."""
    required, limit = capacity_range.required_bytes, capacity_range.limit_bytes
    if required < 0 or limit < 0:
        raise invalid("capacity_range: sizes must not be negative")
    if limit and required > limit:
        raise invalid("capacity_range: required_bytes exceeds limit_bytes")
    return required


def _check_repeat(request, earlier: csi_pb2.Volume, volume: csi_pb2.Volume) -> None:
    """A second CreateVolume of a name this process created: the same volume, or ALREADY_EXISTS."""
    if earlier.volume_id != volume.volume_id or dict(earlier.volume_context) != dict(volume.volume_context):
        raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                       f"volume {request.name!r} already exists with other parameters ({earlier.volume_id})")
    required, limit = request.capacity_range.required_bytes, request.capacity_range.limit_bytes
    if earlier.capacity_bytes < required or (limit and earlier.capacity_bytes > limit):
        raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                       f"volume {request.name!r} already exists with capacity {earlier.capacity_bytes} bytes")


def _s3_error(exc: botocore.exceptions.ClientError, operation: str, bucket: str, where: str) -> CsiError:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = exc.response.get("Error", {}).get("Code") or ""
    detail = f"{operation} {bucket}: {status}" + (f" {code}" if code and code != str(status) else "")
    if status in (401, 403):
        return CsiError(grpc.StatusCode.PERMISSION_DENIED,
                        f"{detail}: access to bucket {bucket!r} at {where} was refused: check the "
                        "controller's credentials and the bucket policy")
    if status is not None and status >= 500:
        return CsiError(grpc.StatusCode.UNAVAILABLE, detail)
    return CsiError(grpc.StatusCode.INTERNAL, detail)
