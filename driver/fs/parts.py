"""What an object's ETag tells about the parts it was uploaded in, so reads follow them.

AWS's S3 performance guidance is to read an object uploaded in parts in ranges of its
part size, or at least aligned to part boundaries ("Use byte-range fetches"). Against
SeaweedFS, 8 MiB ranges of an object uploaded in 5 MiB parts moved 11 % more bytes and
cost 10–18 % more server CPU than of one uploaded in 8 MiB parts. The ETag of a
multipart object ends in ``-N``, its number of parts; with the object's size that pins
the part size to a narrow range, and uploaders use whole MiB (5 MiB for rclone and the
Go SDK, 8 MiB for the AWS CLI, boto3, Mountpoint and Pail, 10 MiB for s3fs). No request
is made to find it.
"""

from __future__ import annotations

import re

from driver.config import KiB, MiB

# Request boundaries stay on 64 KiB, so chunks end on page boundaries.
_GRAIN = 64 * KiB
_COMMON = 8 * MiB  # the most common part size: chosen when the count allows several

_MULTIPART_ETAG = re.compile(r'"?[0-9a-fA-F]{32}-([0-9]{1,5})"?')


def part_size(etag: str, size: int) -> int | None:
    """The size of the object's parts (all but the last), or None: not a multipart ETag,
    a single part, or a count no whole-MiB part size explains unambiguously."""
    match = _MULTIPART_ETAG.fullmatch(etag)
    if not match:
        return None
    count = int(match.group(1))
    if count < 2 or size <= 0:
        return None
    # count - 1 whole parts come before a last one of 1 .. part bytes:
    # (count - 1) * part < size <= count * part.
    smallest = -(-size // count)
    largest = (size - 1) // (count - 1)
    first_mib = -(-smallest // MiB) * MiB
    if first_mib > largest:
        return None  # not whole MiB: parts of differing sizes, or an unusual uploader
    if smallest <= _COMMON <= largest:
        return _COMMON
    if first_mib + MiB <= largest:
        return None  # several whole-MiB sizes fit (few parts): guessing could misalign
    return first_mib


def request_unit(part: int | None, max_request: int) -> int:
    """The largest request size up to ``max_request`` that divides ``part`` into equal
    pieces on 64 KiB boundaries (``max_request`` when the part size is unknown, or is a
    multiple of it): 5 MiB for 5 MiB or 10 MiB parts, 8 MiB for 8, 16 or 64 MiB parts."""
    if part is None or part % max_request == 0 or part % _GRAIN:
        return max_request
    pieces = -(-part // max_request)
    while (part // _GRAIN) % pieces:
        pieces += 1
    return part // pieces
