"""A PV's mountOptions, turned into ``pail mount`` arguments through an allowlist.

mountOptions reach NodePublishVolume as VolumeCapability.mount.mount_flags, a list of
strings written by whoever wrote the PV or StorageClass. They become command-line
arguments of a mount process that runs as root on the node, so only options that shape
the files a pod sees pass; refused are those that could send the node's requests (and
credentials) elsewhere or loosen how they are checked (those come from the volume
attributes a cluster admin sets), and those the node server itself decides (process,
logging and who may use the mount). Anything unknown is refused too: a new `pail mount`
option stays out of reach until it is added here on purpose.

Each entry holds one option, with or without a leading ``--``, as ``key=value``,
``key value`` or a bare flag (``read-only``); surrounding whitespace is ignored. Values
are passed on as written: driver.config validates them when the mount is configured.

``cache`` is written as a flag but becomes ``--cache DIR``: the directory is the node
server's (one per target, under its --cache-dir), never the PV's, since the mount process
creates, empties and removes it as root.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MAX_VALUE_BYTES = 4096

# Options that take no value.
FLAGS = frozenset({"read-only", "allow-overwrite", "allow-delete", "requester-pays", "debug", "direct-io",
                   "no-block-fill"})
# Options that take one value.
VALUE_OPTIONS = frozenset({
    "uid", "gid", "file-mode", "dir-mode", "metadata-ttl", "max-memory", "write-part-size",
    "request-timeout", "storage-class", "sse", "sse-kms-key-id", "expected-bucket-owner",
    "upload-checksums", "region", "prefix", "max-cache-size",
})
# Written as flags, passed with a value the node server supplies: ``cache`` becomes
# ``--cache <cache_dir>`` (parse_mount_flags).
NODE_VALUED = frozenset({"cache"})
ALLOWED = FLAGS | VALUE_OPTIONS | NODE_VALUED

_ADMIN = "is set by a cluster admin in the volume attributes, not in mountOptions"
_NODE = "is set by the node server, not in mountOptions"
# Known `pail mount` options that mountOptions may not set, and why (the user sees it).
REFUSED = {
    "endpoint-url": f"the endpoint {_ADMIN} ('endpoint')",
    "force-path-style": f"the addressing style {_ADMIN} ('forcePathStyle')",
    "ca-bundle": "the CAs trusted for TLS are the node's, not a per-volume choice",
    "no-sign-request": "how requests are signed is decided by the driver's credentials "
                       "('authenticationSource'), not by mountOptions",
    **{name: _NODE for name in ("log-file", "log-format", "foreground", "ready-fd",
                                "allow-other", "allow-root", "credentials-file")},
}

_NAME = re.compile(r"[^\s=]*")


class MountFlagError(ValueError):
    """A mount option is refused; ``option`` is its name as the user wrote it."""

    def __init__(self, option: str, reason: str) -> None:
        shown = option if len(option) <= 80 else option[:77] + "..."
        super().__init__(f"mount option {shown!r}: {reason}")
        self.option = option
        self.reason = reason


def parse_mount_flags(flags: Sequence[str], *, cache_dir: str | None = None) -> list[str]:
    """``pail mount`` arguments for ``flags``, in order, e.g. ["--uid", "1000", "--read-only"].

    ``cache`` becomes ``--cache cache_dir`` (the node server's directory for this target);
    without a ``cache_dir`` it is refused. Raises MountFlagError for the first entry that is
    refused. A value that starts with "-" is passed as ``--key=value``, so that argparse
    cannot take it for an option.
    """
    if isinstance(flags, str):
        raise TypeError("mount flags are a list of strings, not one string")
    args: list[str] = []
    seen: dict[str, str] = {}  # option -> its name as written
    for entry in flags:
        written, value = _split(entry)
        key = written[2:] if written.startswith("--") else written
        if key in REFUSED:
            raise MountFlagError(written, REFUSED[key])
        if key not in ALLOWED:
            raise MountFlagError(written, "not an option mountOptions may set (allowed: "
                                          + ", ".join(sorted(ALLOWED)) + ")")
        if key in seen:
            raise MountFlagError(written, "given more than once")
        seen[key] = written
        if key == "cache":
            if value is not None:
                raise MountFlagError(written, "the cache directory is chosen by the node server: "
                                              "write 'cache' alone")
            if not cache_dir:
                raise MountFlagError(written, "this node server keeps no cache directory")
            args.extend([f"--{key}", cache_dir])
            continue
        if key in FLAGS:
            if value is not None:
                raise MountFlagError(written, "is a flag and takes no value")
            args.append(f"--{key}")
            continue
        if not value:
            raise MountFlagError(written, "needs a value (key=value)")
        if "\0" in value or "\n" in value or "\r" in value:
            raise MountFlagError(written, "the value contains a NUL or a line break")
        if len(value.encode("utf-8", "surrogatepass")) > MAX_VALUE_BYTES:
            raise MountFlagError(written, f"the value is longer than {MAX_VALUE_BYTES} bytes")
        args.extend([f"--{key}={value}"] if value.startswith("-") else [f"--{key}", value])
    if "max-cache-size" in seen and "cache" not in seen:
        # pail mount would say "needs --cache DIR", which is no option a PV can write.
        raise MountFlagError(seen["max-cache-size"], "sizes the cache: add the 'cache' mount option too")
    return args


def _split(entry: str) -> tuple[str, str | None]:
    """(name as written, value or None): "k=v", "k = v", "k v" and "k" (a flag)."""
    text = entry.strip()
    if not text:
        raise MountFlagError(entry, "an empty mount option")
    name = _NAME.match(text).group()
    rest = text[len(name):].lstrip()
    if not name:
        raise MountFlagError(text, "no option name before '='")
    if not rest:
        return name, None
    if rest.startswith("="):
        rest = rest[1:].lstrip()
    return name, rest
