"""Which S3 keys can be shown as files, and how names map to keys.

A key is shown only when every segment is a valid file name: not empty, not ``.`` or
``..``, no NUL, at most 255 bytes in UTF-8 (NAME_MAX). ``/`` is the only delimiter. A key
ending in ``/`` (a console "folder") contributes a directory and no file.
"""

from __future__ import annotations

NAME_MAX = 255
DELIMITER = "/"


def is_valid_name(name: str) -> bool:
    """True when ``name`` can be one directory entry."""
    if name in ("", ".", ".."):
        return False
    if "\0" in name or DELIMITER in name:
        return False
    try:
        return len(name.encode("utf-8")) <= NAME_MAX
    except UnicodeEncodeError:  # lone surrogates: not representable as a file name
        return False


def child_name(parent_prefix: str, key: str) -> str | None:
    """The entry name that ``key`` (an object key or a common prefix under
    ``parent_prefix``) shows as, or None when it is hidden.

    For a common prefix ``parent_prefix + "d/"`` the name is ``d``. The key equal to
    ``parent_prefix`` itself (the folder marker of the directory) is not an entry.
    """
    rest = key[len(parent_prefix):]
    if rest.endswith(DELIMITER):
        rest = rest[:-1]
    if DELIMITER in rest or not is_valid_name(rest):
        return None
    return rest

