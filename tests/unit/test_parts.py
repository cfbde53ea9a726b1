"""The part size read from a multipart ETag, and the request size that divides a part."""

from __future__ import annotations

import pytest

from driver.fs.parts import part_size, request_unit

MiB = 1024 * 1024
MD5 = "c2a441dc8734143728492969c480d323"


def etag(parts: int) -> str:
    return f'"{MD5}-{parts}"'


@pytest.mark.parametrize("part_mib, size", [
    (5, 512 * MiB),           # rclone, the Go SDK: 103 parts, the last 2 MiB
    (8, 512 * MiB),           # the AWS CLI, boto3, Mountpoint, Pail: 64 whole parts
    (10, 512 * MiB),          # s3fs: 52 parts
    (8, 12 * MiB),            # two parts fit 6 .. 11 MiB: the common 8 MiB is taken
    (16, 1000 * MiB),         # 63 parts, the last 8 MiB
])
def test_the_part_size_of_an_upload_in_whole_mib(part_mib, size):
    part = part_mib * MiB
    count = -(-size // part)
    assert part_size(etag(count), size) == part
    assert part_size(f"{MD5}-{count}", size) == part, "unquoted, as some stores send it"


@pytest.mark.parametrize("tag, size", [
    (f'"{MD5}"', 512 * MiB),                  # a single PUT: no parts
    (etag(1), 512 * MiB),                     # one part: nothing to line up with
    (etag(2), 40 * MiB),                      # 20 .. 39 MiB all fit, 8 MiB does not: unknown
    (etag(100), 100 * (5 * MiB + 1000)),      # no whole MiB fits: parts of other sizes
    ('"not-an-etag-7"', 512 * MiB),
    (etag(3), 0),
])
def test_no_part_size_when_the_etag_does_not_pin_one(tag, size):
    assert part_size(tag, size) is None


@pytest.mark.parametrize("part_mib, unit", [
    (None, 8 * MiB), (8, 8 * MiB), (16, 8 * MiB), (64, 8 * MiB),
    (5, 5 * MiB), (10, 5 * MiB), (6, 6 * MiB), (12, 6 * MiB), (100, 25 * MiB // 4),
])
def test_the_request_size_divides_the_part_into_equal_pieces(part_mib, unit):
    part = part_mib * MiB if part_mib else None
    assert request_unit(part, 8 * MiB) == unit
    if part:
        assert part % unit == 0 and unit % (64 * 1024) == 0
