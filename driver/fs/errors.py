"""Filesystem errors and the one place where store errors become errnos."""

from __future__ import annotations

import errno

import structlog

from driver.s3 import api

log = structlog.get_logger("pail.fs")


class FsError(Exception):
    """An operation failed with ``errno``; ``reason`` says why, for the log."""

    def __init__(self, errno_: int, reason: str, **fields: object) -> None:
        super().__init__(f"{errno.errorcode.get(errno_, errno_)}: {reason}")
        self.errno = errno_
        self.reason = reason
        self.fields = fields


def from_store(exc: api.ObjectClientError, *, during: str) -> FsError:
    """Map a failed S3 request to the errno the application sees.

    The semantics table promises EIO for S3 and network failures; the two exceptions are
    about what the object became, not about the request failing.
    """
    fields = exc.log_fields()
    if isinstance(exc, api.PreconditionFailed):
        # The object was replaced while open: the handle's view is stale. Returning new
        # bytes would mix two versions of the object.
        return FsError(errno.ESTALE, f"object replaced in S3 during {during}", **fields)
    if isinstance(exc, api.NoSuchKey):
        # Deleted in S3 after we looked it up: from the handle's point of view the file it
        # opened no longer exists, which ESTALE expresses; a fresh lookup gives ENOENT.
        return FsError(errno.ESTALE, f"object deleted in S3 during {during}", **fields)
    # Access denied, missing bucket, throttling that outlasted the retries, timeouts,
    # resets: the application cannot tell these apart usefully, and EIO is what a disk
    # gives for "the device failed". The log line carries the S3 status and code.
    return FsError(errno.EIO, f"S3 request failed during {during}: {exc}", **fields)


def unexpected(exc: Exception, *, during: str, **fields: object) -> FsError:
    """EIO for a failure that is not an answer of S3's (a library's error we do not map, or
    a bug of ours) in work the mount does in the background: the one read, write or lookup
    fails, logged with its traceback, rather than the loop that serves the whole mount."""
    log.error("failed unexpectedly", op=during, exc_info=exc, **fields)
    return FsError(errno.EIO, f"unexpected {type(exc).__name__} during {during}", **fields)
