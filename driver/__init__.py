"""Pail: S3 buckets as files, for Kubernetes pods and for `pail mount`.

Layers, each a package that knows only the one below it:

- ``driver.cli``: the ``pail`` command.
- ``driver.fuse``: a thin pyfuse3 adapter and the mount session around it.
- ``driver.fs``: the filesystem core (inodes, listing, prefetch); knows nothing of FUSE.
- ``driver.s3``: the object-client interface, a real S3 client and an in-memory one.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("pail-csi")
except _metadata.PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"
