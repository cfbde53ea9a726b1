"""Volume ids of dynamically provisioned volumes: what DeleteVolume needs, in the id.

DeleteVolumeRequest carries only the volume id (and secrets), and
ValidateVolumeCapabilities little more, so the id CreateVolume returns must say where the
volume's objects are and whether deleting the volume deletes them. The StorageClass may
have changed or gone by then, so nothing is looked up elsewhere. The CSI spec asks that
ids stay within 128 bytes; kubectl shows them, so they are printable and readable.

Format (version 1)::

    pail1:<flags>:<bucket>/<prefix>

- ``pail1`` names the format and its version; a later format gets a new word, and
  ``decode`` answers None for any id that is not exactly this format.
- ``<flags>``: ``-`` for none, else in this order ``b`` (the bucket was created for this
  volume: bucketPerVolume) and ``d`` (DeleteVolume deletes the objects: deletePolicy
  delete). So ``-``, ``b``, ``d`` or ``bd``.
- ``<bucket>``: a bucket name or access-point alias; neither contains ``:`` or ``/``
  (access-point ARNs are refused), so the first ``/`` after it ends it.
- ``<prefix>``: the rest, verbatim: empty (the whole bucket) or ending in ``/``. It may
  contain ``:`` and ``/``, but only printable characters (``str.isprintable``: no
  control, format, line-separator or unassigned ones), so that ids print as they are.

Examples: ``pail1:-:data-lake/volumes/pvc-1b2c.../`` (retained) and
``pail1:bd:pail-pvc-1b2c.../`` (own bucket, deleted with the volume). Every id decode
accepts is the one encode makes of the result, so ids compare as strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from driver.config import ConfigError, validate_bucket

MAX_VOLUME_ID_BYTES = 128  # the CSI spec's guidance for volume ids
MAGIC = "pail1:"
_NO_FLAGS = "-"
_CANONICAL_FLAGS = ("-", "b", "d", "bd")


@dataclass(frozen=True)
class VolumeRef:
    """Where a dynamic volume's objects are, and what deleting the volume does."""

    bucket: str
    prefix: str  # "" (the whole bucket) or ending in "/"
    delete_objects: bool  # deletePolicy delete: DeleteVolume deletes the prefix's objects
    bucket_per_volume: bool  # the bucket was created for this volume alone


class VolumeIdTooLong(ValueError):
    """The id would exceed the CSI spec's 128 bytes: shorten the bucket name or basePrefix."""

    def __init__(self, length: int) -> None:
        super().__init__(f"the volume id would be {length} bytes, over the CSI limit of "
                         f"{MAX_VOLUME_ID_BYTES} bytes: use a shorter bucket name or basePrefix")
        self.length = length
        self.limit = MAX_VOLUME_ID_BYTES


def encode(ref: VolumeRef) -> str:
    """The volume id for ``ref``. ValueError if the bucket or prefix cannot be encoded,
    VolumeIdTooLong if the id would exceed 128 bytes in UTF-8."""
    if not _is_bucket(ref.bucket):
        raise ValueError(f"bucket {ref.bucket!r}: a dynamic volume needs a bucket name or "
                         "access-point alias")
    if not _is_prefix(ref.prefix):
        raise ValueError(f"prefix {ref.prefix!r}: must be empty or end in '/', with "
                         "printable characters only")
    flags = ("b" if ref.bucket_per_volume else "") + ("d" if ref.delete_objects else "")
    volume_id = f"{MAGIC}{flags or _NO_FLAGS}:{ref.bucket}/{ref.prefix}"
    length = len(volume_id.encode("utf-8"))
    if length > MAX_VOLUME_ID_BYTES:
        raise VolumeIdTooLong(length)
    return volume_id


def decode(volume_id: str) -> VolumeRef | None:
    """The VolumeRef in a Pail dynamic-volume id, or None for any other id (a static PV's
    volumeHandle is whatever its author chose): then there is nothing to delete."""
    if not volume_id.startswith(MAGIC):
        return None
    if len(volume_id.encode("utf-8", "surrogatepass")) > MAX_VOLUME_ID_BYTES:
        return None
    flags, sep, location = volume_id[len(MAGIC):].partition(":")
    if not sep or flags not in _CANONICAL_FLAGS:
        return None
    bucket, sep, prefix = location.partition("/")
    if not sep or not _is_bucket(bucket) or not _is_prefix(prefix):
        return None
    return VolumeRef(bucket=bucket, prefix=prefix, delete_objects="d" in flags,
                     bucket_per_volume="b" in flags)


def _is_bucket(bucket: str) -> bool:
    if ":" in bucket or "/" in bucket:
        return False  # an access-point ARN: its ':' and '/' would make the id ambiguous
    if not (bucket.isascii() and bucket.isprintable()):
        return False  # validate_bucket's regex lets a trailing newline through
    try:
        validate_bucket(bucket)
    except ConfigError:
        return False
    return True


def _is_prefix(prefix: str) -> bool:
    if prefix and not prefix.endswith("/"):
        return False
    return prefix.isprintable()
