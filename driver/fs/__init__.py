"""The filesystem core: S3 objects and prefixes as files and directories.

It knows nothing of FUSE: ``driver.fuse`` translates kernel requests into calls on
``core.Filesystem`` and its errors (``errors.FsError``) into FUSE replies. It talks to S3
only through ``driver.s3.api.ObjectClient``.
"""
