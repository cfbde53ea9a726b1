"""Pail's SigV4 signer gives the signatures AWS documents and botocore computes."""

from __future__ import annotations

import botocore.auth
import botocore.awsrequest
import botocore.credentials

from driver.s3.sigv4 import Credentials, Signer

ACCESS, SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_the_get_object_example_of_the_s3_documentation():
    # "Example: GET Object" in the S3 API reference, Signature Version 4 header-based auth.
    headers = Signer("us-east-1").sign("GET", "/test.txt", "", {"host": "examplebucket.s3.amazonaws.com",
                                                                "range": "bytes=0-9"},
                                       Credentials(ACCESS, SECRET), payload_hash=EMPTY_SHA256, now="20130524T000000Z")
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
    assert headers["x-amz-date"] == "20130524T000000Z"


def botocore_signs(url: str, headers: dict[str, str], token: str | None, region: str) -> dict[str, str]:
    request = botocore.awsrequest.AWSRequest("GET", url,
                                             headers={**headers, "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    credentials = botocore.credentials.Credentials(ACCESS, SECRET, token)
    botocore.auth.S3SigV4Auth(credentials, "s3", region).add_auth(request)
    return {name.lower(): value for name, value in request.headers.items()}


def test_the_same_signature_as_botocore_for_a_ranged_conditional_get_with_a_session_token():
    host = "127.0.0.1:8333"
    headers = {"range": "bytes=262144-524287", "if-match": '"0123456789abcdef-3"',
               "x-amz-request-payer": "requester", "user-agent": "pail"}
    for token in (None, "FwoGZXIvYXdzEJr//////////wEaDPail+token/=="):
        expected = botocore_signs(f"http://{host}/bucket/dir/a%20key~1.bin", headers, token, "eu-west-3")
        ours = Signer("eu-west-3").sign("GET", "/bucket/dir/a%20key~1.bin", "", {"host": host, **headers},
                                        Credentials(ACCESS, SECRET, token), now=expected["x-amz-date"],
                                        # botocore hashes the (empty) body over plain http
                                        payload_hash=expected["x-amz-content-sha256"])
        assert ours["authorization"] == expected["authorization"]
        assert ours.get("x-amz-security-token") == token


def test_the_kept_signing_key_follows_the_day_and_the_secret():
    def sign(signer, secret, now):
        return signer.sign("GET", "/b/k", "", {"host": "h"}, Credentials(ACCESS, secret), now=now)["authorization"]

    kept = Signer("us-east-1")
    sign(kept, SECRET, "20261201T235959Z")  # keeps the key of that day and secret
    for secret, now in ((SECRET, "20261202T000000Z"), ("rotated secret", "20261202T000001Z"),
                        (SECRET, "20261202T000002Z")):
        assert sign(kept, secret, now) == sign(Signer("us-east-1"), secret, now)


def test_the_secret_is_not_in_the_credentials_repr():
    text = repr(Credentials(ACCESS, SECRET, "the-session-token"))
    assert ACCESS in text and SECRET not in text and "the-session-token" not in text
