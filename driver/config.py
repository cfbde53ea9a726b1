"""Mount configuration: one validated value object built from the command line.

The CLI builds it, the mount process runs from it, and (later) the node server will build
it from a CSI request: validation lives here so every entry point refuses the same bad
input with the same message.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

KiB = 1024
MiB = 1024 * KiB
# The cache holds whole blocks of 1 MiB; fewer than 16 would evict each other at once.
MIN_CACHE_SIZE = 16 * MiB

# --metadata-ttl words. `indefinite` is stored as infinity; FUSE needs a finite timeout,
# which the adapter clamps (see driver.fuse.adapter.KERNEL_TTL_MAX).
TTL_MINIMAL = 0.0
TTL_INDEFINITE = math.inf
DEFAULT_METADATA_TTL = 1.0
# S3 takes parts of 5 MiB to 5 GiB (but for the last); some S3-compatible stores take
# smaller ones, so smaller sizes are accepted for them.
MIN_WRITE_PART_SIZE = 1 * KiB
MAX_WRITE_PART_SIZE = 5 * 1024 * MiB

# How reads reach S3 (driver.s3.client): a knob for comparing the paths (bench/) and a
# fallback, read from the mount process's environment rather than offered as an option.
DATA_PATH_ENV = "PAIL_DATA_PATH"
DATA_PATHS = ("direct", "crt", "boto3")

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,253}[a-z0-9]$")
_ACCESS_POINT_ARN = re.compile(r"^arn:aws[a-zA-Z-]*:s3(-object-lambda|-outposts)?:[a-z0-9-]*:\d{12}:\S+$")


class ConfigError(ValueError):
    """A setting is invalid. ``option`` names it the way the user wrote it."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


def data_path() -> str:
    """PAIL_DATA_PATH, default ``direct``; anything else is refused rather than ignored."""
    value = os.environ.get(DATA_PATH_ENV) or DATA_PATHS[0]
    if value not in DATA_PATHS:
        raise ConfigError(DATA_PATH_ENV, f"expected one of {', '.join(DATA_PATHS)}, not {value!r}")
    return value


def parse_ttl(text: str, option: str = "--metadata-ttl") -> float:
    """SECONDS (a non-negative number), ``minimal`` (0) or ``indefinite``."""
    word = text.strip().lower()
    if word == "minimal":
        return TTL_MINIMAL
    if word == "indefinite":
        return TTL_INDEFINITE
    try:
        value = float(word)
    except ValueError:
        raise ConfigError(option, f"expected seconds, 'minimal' or 'indefinite', not {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(option, f"expected a non-negative number of seconds, not {text!r}")
    return value


def parse_mode(text: str, option: str) -> int:
    """An octal permission mode such as 0644 or 755."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError(option, f"expected an octal mode such as 0644, not {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(option, f"mode {text!r} is outside 0000-0777")
    return mode


def parse_id(text: str, option: str) -> int:
    # ASCII digits only: int() also reads "١٢٣" (123) and " 12", "1_000".
    if not re.fullmatch(r"[0-9]{1,10}", text):
        raise ConfigError(option, f"expected a numeric id, not {text!r}")
    value = int(text)
    if not 0 <= value < 2**32 - 1:
        raise ConfigError(option, f"id {text!r} is out of range")
    return value


def parse_seconds(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(option, f"expected seconds, not {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(option, f"expected a positive number of seconds, not {text!r}")
    return value


def parse_size(text: str, option: str) -> int:
    """A byte count with an optional binary suffix: 8388608, 8M, 8MiB, 512K, 1G."""
    match = re.fullmatch(r"\s*([0-9]{1,20})\s*([kmg]?)(i?b)?\s*", text.lower())
    if not match:
        raise ConfigError(option, f"expected a size such as 8MiB, not {text!r}")
    number, unit = int(match.group(1)), match.group(2)
    return number * {"": 1, "k": KiB, "m": MiB, "g": 1024 * MiB}[unit]


_QUANTITY_UNITS = {"": 1, "k": 1000, "M": 1000 ** 2, "G": 1000 ** 3, "T": 1000 ** 4, "P": 1000 ** 5,
                   "Ki": KiB, "Mi": MiB, "Gi": 1024 * MiB, "Ti": 1024 ** 4, "Pi": 1024 ** 5}


def parse_quantity(text: str, option: str) -> int:
    """Bytes as Kubernetes writes them (20Gi, 500M, 1.5Ti), as an emptyDir's sizeLimit is."""
    match = re.fullmatch(r"([0-9]{1,20}(?:\.[0-9]{1,9})?)(k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?", text.strip())
    if not match:
        raise ConfigError(option, f"expected a quantity such as 20Gi, not {text!r}")
    number, unit = match.group(1), match.group(2) or ""
    whole, _, fraction = number.partition(".")
    scale = _QUANTITY_UNITS[unit]
    return int(whole) * scale + (int(fraction) * scale // 10 ** len(fraction) if fraction else 0)


# botocore's own rule (validate_region_name): other names make it raise where the mount
# process would die before saying why.
REGION_NAME = re.compile(r"(?![0-9]+$)(?!-)[a-zA-Z0-9-]{1,63}(?<!-)")


def validate_bucket(bucket: str) -> str:
    """A bucket name, access-point alias (also a valid bucket name) or access-point ARN."""
    if _ACCESS_POINT_ARN.fullmatch(bucket) or (_BUCKET_NAME.fullmatch(bucket) and ".." not in bucket):
        return bucket
    raise ConfigError("BUCKET", f"{bucket!r} is not a bucket name, access-point alias or ARN")


def normalize_prefix(prefix: str) -> str:
    """'' or a key prefix ending in '/': the mount shows what is under it."""
    if not prefix:
        return ""
    if prefix.startswith("/"):
        raise ConfigError("--prefix", f"{prefix!r} must not start with '/' (S3 keys do not)")
    if not prefix.endswith("/"):
        prefix += "/"
    segments = prefix[:-1].split("/")
    if any(s in ("", ".", "..") or "\0" in s for s in segments):
        raise ConfigError("--prefix", f"{prefix!r} has an empty, '.' or '..' segment")
    return prefix


@dataclass(frozen=True)
class S3Settings:
    """Where the bucket is, how to talk to it, and what every request carries."""

    bucket: str
    region: str | None = None  # None: ask the bucket
    endpoint_url: str | None = None
    force_path_style: bool = False
    no_sign_request: bool = False
    ca_bundle: str | None = None
    # Credentials from this file (driver.credentials) instead of the standard chain.
    credentials_file: str | None = None
    # Bounded retries: every S3 failure becomes an error within a bounded time.
    max_attempts: int = 5
    connect_timeout: float = 5.0
    # The longest one S3 request may take, retries included (through awscrt: reads, HEAD,
    # LIST; through boto3, uploads: each attempt, and no retry that would end past it).
    request_timeout: float = 30.0
    user_agent_extra: str = "pail"
    # Sent on every request they apply to (see driver.s3.options).
    requester_pays: bool = False
    expected_bucket_owner: str | None = None
    storage_class: str | None = None
    sse: str | None = None  # "aws:kms" or "AES256"
    sse_kms_key_id: str | None = None
    upload_checksum: str | None = "CRC32C"  # or None: no checksums on uploads

    def __post_init__(self) -> None:
        if self.region is not None and not REGION_NAME.fullmatch(self.region):
            raise ConfigError("--region", f"{self.region!r} is not a region name")
        if not 0 < self.request_timeout <= 3600:
            raise ConfigError("--request-timeout", "must be more than 0 and at most 3600 seconds")
        if self.storage_class is not None and self.storage_class not in STORAGE_CLASSES:
            raise ConfigError("--storage-class", f"{self.storage_class!r} is not one of {', '.join(STORAGE_CLASSES)}")
        if self.sse is not None and self.sse not in SSE_MODES:
            raise ConfigError("--sse", f"{self.sse!r} is not one of {', '.join(SSE_MODES)}")
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise ConfigError("--sse-kms-key-id", "needs --sse aws:kms")
        if self.expected_bucket_owner is not None and not re.fullmatch(r"\d{12}", self.expected_bucket_owner):
            raise ConfigError("--expected-bucket-owner", "must be a 12-digit AWS account id")
        if self.upload_checksum not in (None, "CRC32C"):
            raise ConfigError("--upload-checksums", "must be crc32c or off")


STORAGE_CLASSES = ("STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING",
                   "GLACIER", "DEEP_ARCHIVE", "GLACIER_IR", "OUTPOSTS", "EXPRESS_ONEZONE")
SSE_MODES = ("aws:kms", "AES256")


@dataclass(frozen=True)
class FsSettings:
    """What the filesystem shows and how it caches."""

    prefix: str = ""
    read_only: bool = False
    uid: int = 0
    gid: int = 0
    file_mode: int = 0o644
    dir_mode: int = 0o755
    metadata_ttl: float = DEFAULT_METADATA_TTL
    # Prefetch: ranged GETs of min_request bytes at first, doubling while the reader stays
    # sequential, up to max_request (one HTTP request each), at most max_ahead in flight.
    min_request: int = 256 * KiB
    max_request: int = 8 * MiB
    max_ahead: int = 4
    max_memory: int = 256 * MiB  # prefetched bytes and upload parts of all open files together
    cache_dir: str | None = None  # local disk cache of object data (none: no cache)
    max_cache_size: int = 1024 * MiB
    # Files opened for reading bypass the kernel's page cache (FOPEN_DIRECT_IO): one copy
    # of every byte fewer, but no shared mmap and every read() a request to the mount.
    direct_io: bool = False
    # Random reads that keep coming back to a block fetch it whole into the kernel's page
    # cache (driver.fs.blockfill); only where reads go through that cache (not direct_io).
    block_fill: bool = True
    # Writing: new objects are multipart uploads of write_part_size parts, at most
    # parts_in_flight uploading while the writer fills the next (past the first, within
    # max_memory).
    write_part_size: int = 8 * MiB
    parts_in_flight: int = 4
    allow_overwrite: bool = False
    allow_delete: bool = False

    def __post_init__(self) -> None:
        if self.min_request <= 0 or self.max_request < self.min_request:
            raise ConfigError("prefetch", "need 0 < min_request <= max_request")
        if self.max_memory < self.max_request:
            raise ConfigError("--max-memory", f"must be at least {self.max_request // MiB} MiB")
        if self.max_cache_size < MIN_CACHE_SIZE:
            raise ConfigError("--max-cache-size", f"must be at least {MIN_CACHE_SIZE // MiB} MiB")
        if not MIN_WRITE_PART_SIZE <= self.write_part_size <= MAX_WRITE_PART_SIZE:
            raise ConfigError("--write-part-size", "must be between 1 KiB and 5 GiB (S3 itself needs at least 5 MiB)")


@dataclass(frozen=True)
class MountConfig:
    s3: S3Settings
    fs: FsSettings = field(default_factory=FsSettings)
    mountpoint: str = ""
    allow_other: bool = False
    allow_root: bool = False
    foreground: bool = False
    debug: bool = False
    log_format: str = "console"
    log_file: str | None = None
