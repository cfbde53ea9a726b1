"""The kernel side: a thin pyfuse3 adapter over ``driver.fs`` and the mount session.

``adapter`` translates each FUSE request into one call on the filesystem core and its
result (or ``FsError``) into a reply; ``session`` mounts, serves and unmounts.
"""
