"""One table from failures to gRPC status codes, applied by one decorator.

Servicer methods raise; ``@grpc_errors`` turns what they raise into ``context.abort``
with the code from ``_status`` (INTERNAL for anything unexpected, logged with its
traceback), so every RPC answers the same way and no exception leaks as UNKNOWN.
``require`` checks the fields an RPC cannot do without, with one message shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import structlog

from driver import readiness
from driver.config import ConfigError

log = structlog.get_logger("pail.csi")
_F = TypeVar("_F", bound=Callable[..., Any])

# Longest status message sent, in UTF-8 bytes. Messages quote what was wrong, and a
# request can carry megabytes: gRPC clients refuse trailers over 8-16 KiB (grpc-message
# is percent-encoded, up to 3 bytes per byte), which would turn the answer into
# RESOURCE_EXHAUSTED without the message. Kubernetes events keep 1 KiB anyway.
MAX_MESSAGE_BYTES = 1024


class CsiError(Exception):
    """Answer the RPC with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


# What a mount process said when it would not mount (driver.readiness kinds).
MOUNT_ERROR_CODES = {
    readiness.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    readiness.ACCESS_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    readiness.UNREACHABLE: grpc.StatusCode.UNAVAILABLE,
    readiness.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    readiness.DIRECTORY: grpc.StatusCode.FAILED_PRECONDITION,
    readiness.MOUNT_FAILED: grpc.StatusCode.INTERNAL,
    readiness.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    readiness.INTERNAL: grpc.StatusCode.INTERNAL,
}


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, CsiError):
        return exc.code, exc.message
    if isinstance(exc, (ConfigError, ValueError)):
        # ConfigError, and the input parsers' errors (ContextError, MountFlagError): all
        # name the attribute or option that is wrong.
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def grpc_errors(method: _F) -> _F:
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:
            code, message = _status(exc)
            message = _shorten(message)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("rpc failed", method=method.__name__)
            context.abort(code, message)
    return wrapper  # type: ignore[return-value]


def _shorten(message: str) -> str:
    data = message.encode("utf-8", "replace")
    if len(data) <= MAX_MESSAGE_BYTES:
        return message
    return data[:MAX_MESSAGE_BYTES - 3].decode("utf-8", "ignore") + "..."


def require(request: Any, *fields: str) -> None:
    """INVALID_ARGUMENT naming the first missing field."""
    for name in fields:
        value = getattr(request, name)
        present = request.HasField(name) if hasattr(value, "ListFields") else bool(value)
        if not present:
            raise invalid(f"{name} is required")
