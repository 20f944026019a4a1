"""The counting proxy's request framing and S3 operation names (fast, no server)."""

from __future__ import annotations

import pytest

from tests.bench import countproxy

PUT = (
    b"PUT /bkt/a/b.bin HTTP/1.1\r\nHost: 127.0.0.1:9\r\nExpect: 100-continue\r\n"
    b"Content-Length: 11\r\n\r\nhello world"
)
CHUNKED = (
    b"PUT /bkt/k?partNumber=2&uploadId=xyz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;chunk-signature=ab\r\nhello\r\n6\r\n world\r\n0\r\nx-amz-checksum-crc32: AAAA\r\n\r\n"
)
GET = b"GET /bkt?list-type=2&prefix=vol%2F HTTP/1.1\r\nHost: h\r\n\r\n"
HEAD = b"HEAD /bkt/GET%20/x HTTP/1.1\r\nContent-Length: 0\r\n\r\n"


def parse(stream: bytes, step: int) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    parser = countproxy.RequestParser(lambda method, target, _h: seen.append((method, target)))
    for start in range(0, len(stream), step):
        parser.feed(stream[start : start + step])
    return seen


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 10_000])
def test_keep_alive_stream_is_split_into_requests_at_any_read_size(step: int) -> None:
    stream = PUT + CHUNKED + GET + HEAD + PUT
    assert parse(stream, step) == [
        ("PUT", "/bkt/a/b.bin"),
        ("PUT", "/bkt/k?partNumber=2&uploadId=xyz"),
        ("GET", "/bkt?list-type=2&prefix=vol%2F"),
        ("HEAD", "/bkt/GET%20/x"),
        ("PUT", "/bkt/a/b.bin"),
    ]


@pytest.mark.parametrize(
    ("method", "target", "headers", "operation"),
    [
        ("GET", "/", {}, "ListBuckets"),
        ("GET", "/b?list-type=2&prefix=p", {}, "ListObjectsV2"),
        ("GET", "/b?prefix=p&marker=", {}, "ListObjects"),
        ("GET", "/b?location", {}, "GetBucketLocation"),
        ("HEAD", "/b", {}, "HeadBucket"),
        ("PUT", "/b", {}, "CreateBucket"),
        ("GET", "/b/k/x", {}, "GetObject"),
        ("HEAD", "/b/k", {}, "HeadObject"),
        ("PUT", "/b/k", {}, "PutObject"),
        ("PUT", "/b/k", {"x-amz-copy-source": "/b/j"}, "CopyObject"),
        ("PUT", "/b/k?partNumber=1&uploadId=u", {}, "UploadPart"),
        ("POST", "/b/k?uploads", {}, "CreateMultipartUpload"),
        ("POST", "/b/k?uploadId=u", {}, "CompleteMultipartUpload"),
        ("DELETE", "/b/k?uploadId=u", {}, "AbortMultipartUpload"),
        ("DELETE", "/b/k", {}, "DeleteObject"),
        ("POST", "/b?delete", {}, "DeleteObjects"),
    ],
)
def test_s3_operation_names(
    method: str, target: str, headers: dict[str, str], operation: str
) -> None:
    assert countproxy.s3_operation(method, target, headers) == operation
