"""Structured logging: one event per line, JSON for machines or console for people.

Every component logs through structlog with key-value fields (``op``, ``key``, S3 status);
a mount process binds ``bucket``, ``prefix`` and, when the node server started it, the
CSI ``volume_id`` (passed in VOLUME_ID_ENV), so each line says which volume it is about.
Nothing here formats secrets: callers never pass them.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import TextIO

import structlog

FORMATS = ("json", "console")
# The environment, not an option: `pail mount` by hand has no CSI volume.
VOLUME_ID_ENV = "PAIL_VOLUME_ID"


def configure(fmt: str = "console", *, debug: bool = False, stream: TextIO | None = None,
              path: str | None = None, syslog: bool = False) -> None:
    """Send Pail's events to ``path``, syslog, or ``stream`` (stderr by default)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    level = logging.DEBUG if debug else logging.INFO
    if path:
        handler: logging.Handler = logging.FileHandler(path)
    elif syslog and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.ident = "pail: "
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        # Lines of libraries (botocore, pyfuse3) get the same context: the volume id too.
        foreign_pre_chain=[structlog.contextvars.merge_contextvars, structlog.stdlib.add_log_level,
                           structlog.processors.TimeStamper(fmt="iso", utc=True)]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries log at DEBUG with request details (and botocore with signing inputs): keep
    # them at WARNING even when Pail itself is at DEBUG.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "pyfuse3", "trio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("pyfuse3").addFilter(_abandoned_reply_filter)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=False,
    )


def _abandoned_reply_filter(record: logging.LogRecord) -> bool:
    """pyfuse3 logs an error when it replies to a request the kernel has already given up
    on (the reader was interrupted or went away): nothing failed, so it is not an error."""
    return not ("fuse_reply_" in record.getMessage() and "No such file or directory" in record.getMessage())
