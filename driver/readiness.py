"""The one line a mount process sends whoever started it, on ``--ready-fd``.

``ready`` once the mount answers, or ``error KIND: message`` when it will not: the
message is for people, the kind lets a starter choose its own answer (``pail mount``
prints the message; the CSI node server picks a gRPC status from the kind).
"""

from __future__ import annotations

from driver.s3 import api

READY = "ready"
NOT_FOUND = "not_found"  # the bucket does not exist
ACCESS_DENIED = "access_denied"  # credentials refused
UNREACHABLE = "unreachable"  # the endpoint does not answer
INVALID = "invalid"  # an option or attribute is wrong
DIRECTORY = "directory"  # the mount directory cannot be used
MOUNT_FAILED = "mount_failed"  # the kernel refused the mount
UNAUTHENTICATED = "unauthenticated"  # no credentials could be had: token or keys refused
INTERNAL = "internal"
KINDS = (NOT_FOUND, ACCESS_DENIED, UNREACHABLE, INVALID, DIRECTORY, MOUNT_FAILED, UNAUTHENTICATED, INTERNAL)


def error_line(kind: str, message: str) -> str:
    assert kind in KINDS, kind
    return f"error {kind}: " + " ".join(message.split())  # one line, whatever the message


def parse(line: str) -> tuple[str, str] | None:
    """None for ``ready``; (kind, message) for an error line, INTERNAL for anything else."""
    line = line.strip()
    if line == READY:
        return None
    if line.startswith("error "):
        kind, _, message = line[len("error "):].partition(": ")
        if kind in KINDS:
            return kind, message
    return INTERNAL, line or "the mount process ended without a word"


def kind_of_credentials(kind: str) -> str:
    """The kind for a driver.credentials.CredentialError kind."""
    return {"refused": UNAUTHENTICATED, "denied": ACCESS_DENIED, "unreachable": UNREACHABLE,
            "invalid": INVALID}.get(kind, INTERNAL)


def kind_of(exc: api.ObjectClientError) -> str:
    if isinstance(exc, api.NoSuchBucket):
        return NOT_FOUND
    if isinstance(exc, api.AccessDenied):
        return ACCESS_DENIED
    if isinstance(exc, api.Unreachable):
        return UNREACHABLE
    return INTERNAL
