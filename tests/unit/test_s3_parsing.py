"""Parsing of S3 answers on the hot path (no server needed)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.s3.errors import http_error
from sidecar.s3.listing import (
    _page_by_value,
    _plain_page,
    _rows_as_laid_out,
    _rows_by_field,
    decode_listed_key,
    listing_entries,
    listing_token,
)
from sidecar.s3.metadata import Labels, from_headers, labels_for, read_labels, to_headers
from sidecar.s3.objects import ObjectInfo


def parse_listing(body: bytes) -> tuple[list[ObjectInfo], str | None]:
    """One page as the store reads it: the token first (a damaged page fails there), then
    the entries."""
    token = listing_token(body)
    return listing_entries(body), token


def test_listed_keys_decode_like_botocore() -> None:
    assert decode_listed_key("with+space%2Bplus%2520.txt", True) == "with space+plus%20.txt"
    assert decode_listed_key("raw+key", False) == "raw+key"
    assert decode_listed_key("bad%FFutf8", True) == "bad\udcffutf8"  # rejected later by name


def test_listing_page_with_namespace_quotes_and_continuation() -> None:
    body = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name><Prefix>p/</Prefix><EncodingType>url</EncodingType>
  <IsTruncated>true</IsTruncated><NextContinuationToken>tok==</NextContinuationToken>
  <Contents><Key>p/a+b.txt</Key><Size>3</Size><ETag>&quot;abc&quot;</ETag></Contents>
  <Contents><Key>p/c</Key><Size>0</Size><ETag>def-2</ETag></Contents>
</ListBucketResult>"""
    page, token = parse_listing(body)
    assert [(o.key, o.size, o.etag) for o in page] == [("p/a b.txt", 3, "abc"), ("p/c", 0, "def-2")]
    assert token == "tok=="


def test_last_page_has_no_token() -> None:
    body = b"<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>"
    assert parse_listing(body) == ([], None)


def test_listing_page_as_rclone_and_other_servers_write_it() -> None:
    """Numeric entities, any field order, no namespace, KeyCount, raw keys with entities."""
    body = b"""<ListBucketResult><KeyCount>2</KeyCount><IsTruncated>false</IsTruncated>
  <Contents><ETag>&#34;e1&#34;</ETag><Size>10</Size><Key>a&amp;b &lt;c&gt;.txt</Key>
    <LastModified>2026-11-23T10:00:00.000Z</LastModified>
    <Owner><ID>x</ID><DisplayName>y</DisplayName></Owner></Contents>
  <Contents><Key>%C3%A9</Key><Size>1</Size><ETag>&#x22;e2&#x22;</ETag></Contents>
</ListBucketResult>"""
    page, token = parse_listing(body)
    assert token is None
    assert [(o.key, o.size, o.etag, o.last_modified) for o in page] == [
        ("a&b <c>.txt", 10, "e1", "2026-11-23T10:00:00.000Z"),
        ("%C3%A9", 1, "e2", ""),  # no EncodingType: the server did not url-encode
    ]


def test_listing_token_may_follow_the_entries() -> None:
    body = b"""<ListBucketResult><EncodingType>url</EncodingType>
  <Contents><Key>%C3%A9</Key><Size>1</Size><ETag>e</ETag></Contents>
  <IsTruncated>true</IsTruncated><NextContinuationToken>a&amp;b</NextContinuationToken>
</ListBucketResult>"""
    page, token = parse_listing(body)
    assert [o.key for o in page] == ["\u00e9"]
    assert token == "a&b"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<html>gateway says hello</html>", "not a ListBucketResult"),
        (b"", "not a ListBucketResult"),
        (b"<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>", "without a Next"),
        (
            b"<ListBucketResult><KeyCount>3</KeyCount><Contents><Key>a</Key></Contents>"
            b"</ListBucketResult>",
            "KeyCount says 3 objects, the page lists 1",
        ),
    ],
)
def test_damaged_listing_pages_are_refused_not_read_as_empty(body: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_listing(body)


def test_errors_name_the_key_and_mark_credentials_fatal() -> None:
    body = b"<Error><Code>InvalidAccessKeyId</Code><Message>no such key id</Message></Error>"
    error = http_error("bucket", 403, body)
    assert error.fatal and "AWS_ACCESS_KEY_ID" in error.message and error.key == "bucket"
    head_404 = http_error("p/x", 404, b"")
    assert head_404.not_found and not head_404.fatal
    assert http_error("p/x", 412, b"").precondition_failed


def test_object_labels_round_trip_and_foreign_metadata_says_nothing() -> None:
    written = labels_for("ab" * 16, 1_700_000_000_123_456_789, True)
    assert written == {"xxh3-128": "ab" * 16, "mtime-ns": "1700000000123456789", "mode": "755"}
    headers = {f"X-Amz-Meta-{name.upper()}": value for name, value in written.items()}
    assert from_headers({**headers, "ETag": '"x"'}) == written
    assert to_headers(written) == {f"x-amz-meta-{n}": v for n, v in written.items()}
    assert read_labels(from_headers(headers)) == Labels("ab" * 16, 1_700_000_000_123_456_789, True)
    # Other tools' objects, or odd values: no claim, never a crash.
    assert read_labels({}) == Labels(None, None, False)
    assert read_labels({"xxh3-128": "", "mtime-ns": "-5", "mode": "644"}) == Labels(
        None, None, False
    )


# ---- a page read as laid out (one pattern) is read as field by field ------------------------
_FIELD_PIECES = [  # each entry takes at most one of each line
    [b"<Key>k</Key>", b"<Key>k&amp;1</Key>", b"<Key>p%2F+%C3%A9</Key>"],
    [b"<ETag>&#34;e&#34;</ETag>", b"<ETag>&quot;e2&quot;</ETag>", b"<ETag>&amp;#34;x</ETag>"],
    [b"<Size>3</Size>", b"<Size></Size>"],
    [b"<LastModified>2026-01-01T00:00:00Z</LastModified>"],
    [b"<StorageClass>STANDARD</StorageClass>", b"<Owner><ID>o</ID></Owner>"],
]
_NOISE = [
    *(piece for line in _FIELD_PIECES for piece in line),
    b"<Owner><Key>x</Key></Owner>",
    b"<Key>swallows<ETag>e</ETag>",  # a value's '<' is taken with it: that ETag is not read
    b"<Key>",
    b"</Contents>",
    b"<Contents>",
    b" ",
]
_ENTRY = st.tuples(*(st.sampled_from([None, *line]) for line in _FIELD_PIECES)).flatmap(
    lambda chosen: st.permutations([piece for piece in chosen if piece is not None])
)


@given(st.lists(_ENTRY, min_size=1, max_size=4), st.lists(st.sampled_from(_NOISE), max_size=12))
def test_a_page_reads_the_same_by_layout_as_field_by_field(
    entries: list[list[bytes]], noise: list[bytes]
) -> None:
    """The one-pattern read (listing._rows_as_laid_out) gives the rows of the general pass,
    or gives way to it: alike entries, and damaged or mixed pages."""
    alike = b"".join(b"<Contents>" + b"".join(entries[0]) + b"</Contents>" for _ in entries)
    mixed = b"".join(b"<Contents>" + b"".join(e) + b"</Contents>" for e in entries)
    for contents in (alike, mixed, alike + b"".join(noise), b"".join(noise) + alike):
        body = b"<ListBucketResult>" + contents + b"</ListBucketResult>"
        first = body.find(b"<Contents>")
        first = first if first >= 0 else len(body)
        fast = _rows_as_laid_out(body, first)
        assert fast is None or fast == _rows_by_field(body, first), body
        if contents == alike:
            assert fast is not None, body  # alike entries take the quick read


def test_listing_entries_of_a_page_laid_out_as_seaweedfs_and_aws_do() -> None:
    seaweed = (
        b"<ListBucketResult><Contents><Key>p/a</Key><ETag>&#34;e1&#34;</ETag><Size>1</Size>"
        b"<StorageClass>STANDARD</StorageClass><LastModified>2026-12-03T21:04:48Z"
        b"</LastModified></Contents><Contents><Key>p/b</Key><ETag>&#34;e2&#34;</ETag>"
        b"<Size>22</Size><StorageClass>STANDARD</StorageClass><LastModified>"
        b"2026-12-03T21:04:49Z</LastModified></Contents></ListBucketResult>"
    )
    aws = (
        b"<ListBucketResult><EncodingType>url</EncodingType><Contents><Key>p/%C3%A9+x</Key>"
        b"<LastModified>2026-12-03T21:04:48.000Z</LastModified><ETag>&quot;e1&quot;</ETag>"
        b"<Size>1</Size><StorageClass>STANDARD</StorageClass></Contents></ListBucketResult>"
    )
    assert [(o.key, o.size, o.etag, o.last_modified) for o in listing_entries(seaweed)] == [
        ("p/a", 1, "e1", "2026-12-03T21:04:48Z"),
        ("p/b", 22, "e2", "2026-12-03T21:04:49Z"),
    ]
    assert [(o.key, o.etag) for o in listing_entries(aws)] == [("p/\u00e9 x", "e1")]


_VALUE = st.lists(
    st.sampled_from(
        [
            b"a",
            b"/",
            b"&amp;",
            b"&#34;",
            b"&quot;",
            b"%2F",
            b"+",
            b" ",
            b"\xc3\xa9",
            b"\xff",
            b"\xc3",
        ]
    ),
    max_size=4,
).map(b"".join)


@given(
    st.lists(st.tuples(_VALUE, _VALUE, st.sampled_from([b"", b"0", b"12"]), _VALUE), max_size=4),
    st.booleans(),
)
def test_a_plain_page_decodes_as_each_value_alone(
    rows: list[tuple[bytes, bytes, bytes, bytes]], url_encoded: bool
) -> None:
    """Columns decoded joined (listing._plain_page) give what each value decoded by itself
    gives, or give way to that: entities, url-encoding, invalid or split UTF-8."""
    plain = _plain_page(rows, url_encoded)
    assert plain is None or plain == _page_by_value(rows, url_encoded)
    if not any(b"&" in row[0] + row[1].replace(b"&#34;", b"") for row in rows) and not url_encoded:
        assert plain is not None
