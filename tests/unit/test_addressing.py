"""How object URLs are built for the data path: the same addressing boto3 uses, for path
style, virtual-hosted style, access points and custom endpoints. No network."""

from __future__ import annotations

import botocore.session
import pytest

from driver.config import S3Settings
from driver.mount import _without_userinfo
from driver.s3.crt import CrtRequests


def address(settings: S3Settings, region: str = "us-west-2"):
    session = botocore.session.Session()
    session.set_credentials("AKIDEXAMPLE", "secret")
    data = CrtRequests(settings, region, session)
    return data.scheme, data.host, data.base_path


@pytest.mark.parametrize("settings,expected", [
    (S3Settings(bucket="b1", endpoint_url="http://127.0.0.1:9000"), ("http", "127.0.0.1:9000", "/b1/")),
    (S3Settings(bucket="my-bucket"), ("https", "my-bucket.s3.us-west-2.amazonaws.com", "/")),
    (S3Settings(bucket="my-bucket", force_path_style=True), ("https", "s3.us-west-2.amazonaws.com", "/my-bucket/")),
    (S3Settings(bucket="arn:aws:s3:us-west-2:123456789012:accesspoint/my-ap"),
     ("https", "my-ap-123456789012.s3-accesspoint.us-west-2.amazonaws.com", "/")),
    (S3Settings(bucket="dotted.bucket.name"), ("https", "s3.us-west-2.amazonaws.com", "/dotted.bucket.name/")),
    (S3Settings(bucket="my-ap-abcdefghijklmnop1234567890-s3alias"),
     ("https", "my-ap-abcdefghijklmnop1234567890-s3alias.s3.us-west-2.amazonaws.com", "/")),
    (S3Settings(bucket="b2", endpoint_url="https://minio.example.com", force_path_style=True),
     ("https", "minio.example.com", "/b2/")),
])
def test_object_urls_match_boto3(settings, expected):
    assert address(settings) == expected


def test_endpoints_are_logged_without_credentials():
    assert _without_userinfo("http://user:pass@127.0.0.1:9000/x") == "http://127.0.0.1:9000/x"
    assert _without_userinfo("https://s3.example.com") == "https://s3.example.com"
    assert _without_userinfo(None) is None
