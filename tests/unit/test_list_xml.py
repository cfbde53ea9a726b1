"""ListObjectsV2 bodies as S3 and S3-compatible stores send them, parsed as boto3 would."""

import pytest

from driver.s3.api import ListPage, ObjectInfo
from driver.s3.list_xml import ListParseError, parse_list_page

S3_PAGE = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>bucket</Name><Prefix>data%2F</Prefix><KeyCount>3</KeyCount><MaxKeys>3</MaxKeys>
  <Delimiter>%2F</Delimiter><EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>
  <NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=</NextContinuationToken>
  <Contents><Key>data%2Fa+b%2Bc%25%01</Key><LastModified>2026-12-01T03:37:44.000Z</LastModified>
    <ETag>&quot;3e44107170a520582ade522fa73c1d15&quot;</ETag><Size>2</Size><StorageClass>STANDARD</StorageClass></Contents>
  <Contents><Key>data%2F%C3%BC.txt</Key><LastModified>2026-12-01T03:37:45Z</LastModified>
    <ETag>&quot;x-2&quot;</ETag><Size>10485760</Size></Contents>
  <CommonPrefixes><Prefix>data%2Fsub%2F</Prefix></CommonPrefixes>
</ListBucketResult>"""


def test_an_s3_page_is_read_as_boto3_reads_it():
    page = parse_list_page(S3_PAGE)
    assert page == ListPage(
        objects=[ObjectInfo("data/a b+c%\x01", 2, '"3e44107170a520582ade522fa73c1d15"', 1796096264.0),
                 ObjectInfo("data/ü.txt", 10485760, '"x-2"', 1796096265.0)],
        prefixes=["data/sub/"],
        next_token="1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=",
    )


def test_a_store_that_ignores_encoding_type_sends_keys_plain():
    body = (b"<ListBucketResult><IsTruncated>false</IsTruncated>"
            b"<NextContinuationToken>ignored</NextContinuationToken>"
            b"<Contents><Key>a+b%20c</Key><LastModified>2026-12-01T03:37:44</LastModified><Size>0</Size></Contents>"
            b"</ListBucketResult>")
    page = parse_list_page(body)
    assert page.objects == [ObjectInfo("a+b%20c", 0, "", 1796096264.0)]  # naive time: UTC
    assert page.next_token is None  # not truncated: the token means nothing


def test_an_empty_listing():
    page = parse_list_page(b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                           b"<KeyCount>0</KeyCount><IsTruncated>false</IsTruncated></ListBucketResult>")
    assert page == ListPage()


@pytest.mark.parametrize("body, message", [
    (b"<html>proxy error</html>", "unexpected element 'html'"),
    (b"not xml", "not XML"),
    (b"<ListBucketResult><Contents><Key>k</Key></Contents></ListBucketResult>", "without Key, Size"),
])
def test_a_body_that_is_not_a_listing_is_an_error(body, message):
    with pytest.raises(ListParseError, match=message):
        parse_list_page(body)
