"""One log event per CSI call: method, volume, duration and status, secrets stripped.

kubelet and the sidecars retry quietly, so without this a failing NodePublishVolume
leaves no trace on the node. The interceptor wraps every unary-unary handler (all CSI
RPCs the driver serves are unary-unary) and logs when the handler finishes, before grpc
sends the reply, so the line is there when the caller sees the status.

The status is read from the public ``ServicerContext.code()``/``details()`` (grpcio >=
1.38): ``context.abort(code, details)`` stores them and raises a bare ``Exception``, which
the wrapper re-raises untouched. Any other exception becomes UNKNOWN in grpc with
"Exception calling application: ..." unless a code/details were set before it: the
wrapper reports what grpc will send, and logs the traceback (it is a bug, not a status).

Probe is logged at debug when it succeeds: livenessprobe calls it every few seconds.
The request goes into the event only when debug logging is on, through strip_secrets.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import grpc
import structlog

from driver.csi.sanitize import strip_secrets

PROBE = "/csi.v1.Identity/Probe"
_ERROR_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
_FIELDS = ("volume_id", "target_path")

log = structlog.get_logger("pail.csi")


class LoggingInterceptor(grpc.ServerInterceptor):
    """Log every unary-unary call as one ``grpc call`` event on completion."""

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary
        method = handler_call_details.method

        def logged(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.monotonic()
            try:
                response = behavior(request, context)
            except Exception as exc:
                explicit = context.code() is not None  # abort(), or set_code() then raise
                code = context.code() or grpc.StatusCode.UNKNOWN
                details = _text(context.details()) if context.details() is not None else (
                    "RPC Aborted" if explicit else f"Exception calling application: {exc}")
                _emit(method, request, start, code, details, None if explicit else exc)
                raise
            _emit(method, request, start, context.code() or grpc.StatusCode.OK,
                  _text(context.details()), None)
            return response

        return grpc.unary_unary_rpc_method_handler(
            logged, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def _emit(method: str, request: Any, start: float, code: grpc.StatusCode,
          details: str | None, exc: BaseException | None) -> None:
    fields: dict[str, Any] = {"method": method}
    for name in _FIELDS:
        value = getattr(request, name, None) if name in request.DESCRIPTOR.fields_by_name else None
        if value:
            fields[name] = value
    fields["duration_ms"] = round((time.monotonic() - start) * 1000, 3)
    fields["code"] = code.name
    if code != grpc.StatusCode.OK:
        fields["details"] = details or ""
    if exc is not None:
        fields["exc_info"] = exc
    if _debug_enabled():
        fields["request"] = strip_secrets(request)
    if code == grpc.StatusCode.OK:
        level = logging.DEBUG if method == PROBE else logging.INFO
    else:
        level = logging.ERROR if code in _ERROR_CODES else logging.WARNING
    log.log(level, "grpc call", **fields)


def _debug_enabled() -> bool:
    bound = log.bind()
    check = getattr(bound, "is_enabled_for", None)
    if check is not None:
        return bool(check(logging.DEBUG))
    return logging.getLogger("pail.csi").isEnabledFor(logging.DEBUG)


def _text(details: bytes | str | None) -> str | None:
    if isinstance(details, bytes):
        return details.decode("utf-8", "replace")
    return details
