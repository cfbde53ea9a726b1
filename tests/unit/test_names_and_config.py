"""Naming rules and option parsing: the pure functions under the mount."""

from __future__ import annotations

import math

import pytest

from driver.config import (
    ConfigError,
    FsSettings,
    S3Settings,
    normalize_prefix,
    parse_id,
    parse_mode,
    parse_quantity,
    parse_size,
    parse_ttl,
    validate_bucket,
)
from driver.fs.names import child_name, is_valid_name


@pytest.mark.parametrize("name", ["a", "with space", "ü" * 127, "x" * 255, "...", ".hidden", "%00"])
def test_valid_names(name):
    assert is_valid_name(name)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "nul\0", "x" * 256, "ü" * 128, "\udcff"])
def test_invalid_names(name):
    assert not is_valid_name(name)


@pytest.mark.parametrize("prefix,key,expected", [
    ("", "a", "a"),
    ("", "a/", "a"),
    ("p/", "p/a", "a"),
    ("p/", "p/a/", "a"),
    ("p/", "p/", None),          # the directory's own marker
    ("p/", "p//", None),         # empty segment
    ("p/", "p/./", None),
    ("p/", "p/../", None),
])
def test_child_name(prefix, key, expected):
    assert child_name(prefix, key) == expected


@pytest.mark.parametrize("text,seconds", [("0", 0.0), ("1", 1.0), ("2.5", 2.5), ("minimal", 0.0),
                                          ("indefinite", math.inf), (" Indefinite ", math.inf)])
def test_metadata_ttl_values(text, seconds):
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["-1", "soon", "nan", "inf", ""])
def test_metadata_ttl_refuses_nonsense(text):
    with pytest.raises(ConfigError) as error:
        parse_ttl(text)
    assert error.value.option == "--metadata-ttl"


def test_modes_ids_and_sizes():
    assert parse_mode("0644", "--file-mode") == 0o644
    assert parse_mode("755", "--dir-mode") == 0o755
    for bad in ["0888", "rw-r--r--", "01777"]:
        with pytest.raises(ConfigError, match="--file-mode"):
            parse_mode(bad, "--file-mode")
    assert parse_id("1000", "--uid") == 1000
    with pytest.raises(ConfigError, match="--uid"):
        parse_id("-1", "--uid")
    for bad in ["root", "\u0661\u0662\u0663", " 12", "1_000", "+5"]:  # int() reads all but the first
        with pytest.raises(ConfigError, match="--gid"):
            parse_id(bad, "--gid")
    assert parse_size("8MiB", "--max-memory") == 8 * 2**20
    assert parse_size("512k", "--max-memory") == 512 * 2**10
    assert parse_size("1G", "--max-memory") == 2**30
    for bad in ["lots", "9" * 4301, "\u0661\u0662MiB"]:  # also no int() of 4,301 digits, no Arabic digits
        with pytest.raises(ConfigError, match="--max-memory"):
            parse_size(bad, "--max-memory")
    # Kubernetes quantities, as an emptyDir's sizeLimit: binary and decimal units, fractions.
    assert parse_quantity("20Gi", "--cache-capacity") == 20 * 2**30
    assert parse_quantity("500M", "--cache-capacity") == 500 * 10**6
    assert parse_quantity("1.5Ti", "--cache-capacity") == 3 * 2**39
    assert parse_quantity("4096", "--cache-capacity") == 4096
    for bad in ["lots", "20GiB", "-1Gi", "1e9", "١Gi", "1.Gi"]:
        with pytest.raises(ConfigError, match="--cache-capacity"):
            parse_quantity(bad, "--cache-capacity")


@pytest.mark.parametrize("region", ["us east", "-us-east-1", "123", "eu-west-1\n", "a" * 64, ""])
def test_region_names_botocore_would_refuse_are_refused_naming_the_option(region):
    with pytest.raises(ConfigError, match="--region"):
        S3Settings(bucket="b", region=region)


def test_prefix_normalization():
    assert normalize_prefix("") == ""
    assert normalize_prefix("a") == "a/"
    assert normalize_prefix("a/b/") == "a/b/"
    for bad in ["/a", "a//b", "a/./b", "../a"]:
        with pytest.raises(ConfigError, match="--prefix"):
            normalize_prefix(bad)


@pytest.mark.parametrize("bucket", ["my-bucket", "a.b.c", "abc", "my-ap-abcdefgh1234567890-s3alias",
                                    "arn:aws:s3:us-west-2:123456789012:accesspoint/my-ap"])
def test_bucket_names_aliases_and_arns(bucket):
    assert validate_bucket(bucket) == bucket


@pytest.mark.parametrize("bucket", ["", "ab", "My_Bucket", "-abc", "a..b", "s3://bucket", "bucket/prefix"])
def test_bad_bucket_names(bucket):
    with pytest.raises(ConfigError, match="BUCKET"):
        validate_bucket(bucket)


def test_memory_budget_must_hold_one_request():
    with pytest.raises(ConfigError, match="--max-memory"):
        FsSettings(max_memory=1024)
