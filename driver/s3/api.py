"""The interface between the filesystem core and an object store.

Every method is async (trio). Implementations raise the errors below and nothing else;
the core maps them to errnos in one place (``driver.fs.errors``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What the store says about one object."""

    key: str
    size: int
    etag: str
    mtime: float  # seconds since the epoch (S3 LastModified)


@dataclass(frozen=True, slots=True)
class ListPage:
    """One page of ListObjectsV2: objects and common prefixes, each sorted by key."""

    objects: list[ObjectInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)  # full keys, ending with the delimiter
    next_token: str | None = None


@dataclass(frozen=True, slots=True)
class UploadedPart:
    """One part of a multipart upload, as CompleteMultipartUpload needs it."""

    number: int
    etag: str
    checksum: str | None = None  # base64 CRC32C when upload checksums are on


# S3's limits on multipart uploads.
MAX_PARTS = 10_000
MIN_PART_SIZE = 5 * 1024 * 1024  # every part but the last


class ObjectClientError(Exception):
    """An S3 request failed after the client's own retries.

    ``status`` is the HTTP status (None when no response arrived), ``code`` the S3 error
    code when the store sent one, ``operation`` the S3 operation name.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.status = status
        self.code = code

    def log_fields(self) -> dict[str, object]:
        return {"s3_operation": self.operation, "s3_status": self.status, "s3_code": self.code}


class NoSuchKey(ObjectClientError):
    """The object does not exist (404 on HEAD or GET)."""


class NoSuchBucket(ObjectClientError):
    """The bucket does not exist."""


class AccessDenied(ObjectClientError):
    """The store refused the credentials or the request (401/403)."""


class PreconditionFailed(ObjectClientError):
    """An If-Match condition failed: the object was replaced since its ETag was read."""


class Unreachable(ObjectClientError):
    """No answer: connection refused, reset or timed out after the retries."""


def error_for_status(operation: str, key: str, status: int, body: bytes | bytearray | None) -> ObjectClientError:
    """The error for an S3 error answer: its status and the <Code> of its XML body."""
    match = re.search(rb"<Code>([^<]+)</Code>", body or b"")
    code = match.group(1).decode(errors="replace") if match else None
    message = f"{operation} {key}: {status} {code or ''}".rstrip()
    cls = ObjectClientError
    if status == 404:
        cls = NoSuchBucket if code == "NoSuchBucket" else NoSuchKey
    elif status == 412:
        cls = PreconditionFailed
    elif status in (401, 403):
        cls = AccessDenied
    return cls(message, operation=operation, status=status, code=code)


class ObjectClient(Protocol):
    """The operations the filesystem needs, on one bucket.

    Keys are full object keys; the mount's prefix is the core's business.
    """

    # How many copies of a body exist while its GET is in flight: 2 for a client that
    # receives into buffers of its own and hands over a copy (awscrt, boto3), 1 for one
    # that receives into the buffer it returns. The core's memory budget charges a request
    # that many times its size until it is delivered.
    copies_in_flight: int

    async def head_bucket(self) -> None:
        """Check that the bucket exists and the credentials may use it."""

    async def head_object(self, key: str) -> ObjectInfo:
        """Raise NoSuchKey when there is no object with exactly this key."""

    async def list_objects(
        self,
        prefix: str,
        *,
        delimiter: str = "/",
        continuation_token: str | None = None,
        max_keys: int = 1000,
    ) -> ListPage:
        """One ListObjectsV2 page."""

    async def get_range(self, key: str, start: int, length: int, *, etag: str) -> bytes | bytearray:
        """Bytes [start, start + length) of the object, only if its ETag is still ``etag``
        (a bytearray where that saves a copy: callers only read it).

        Raise PreconditionFailed when the object changed, NoSuchKey when it is gone.
        May return fewer bytes only at the end of the object.
        """

    async def put_object(self, key: str, data: bytes | memoryview) -> ObjectInfo:
        """Create or replace ``key`` with ``data`` in one request."""

    async def create_multipart_upload(self, key: str) -> str:
        """Start a multipart upload of ``key``; returns its upload id."""

    async def upload_part(self, key: str, upload_id: str, number: int, data: bytes | memoryview) -> UploadedPart:
        """Upload part ``number`` (1-based) of an upload."""

    async def complete_multipart_upload(self, key: str, upload_id: str, parts: list[UploadedPart],
                                        size: int) -> ObjectInfo:
        """Make the object from ``parts``; ``size`` is their total, for the result."""

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        """Discard an upload and its parts."""

    async def delete_object(self, key: str) -> None:
        """Delete ``key`` (no error when it does not exist)."""

    async def aclose(self) -> None:
        """Release connections and threads."""
