"""The XML of the rare operations, both ways: the CompleteMultipartUpload request body, and
the answers of CreateMultipartUpload, CompleteMultipartUpload, CopyObject and
ListMultipartUploads (ListObjectsV2, the hot one, has its own reader in listing.py).

Answers are read with the standard library's expat parser, which never fetches external
entities; a document with a DTD is refused outright (no S3 answer has one, and entity
expansion is the one thing left that could make a small answer large).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.s3.listing import decode_listed_key
from sidecar.s3.objects import unquote_etag

if TYPE_CHECKING:  # imported where an answer is parsed: only the rare operations' are
    import xml.etree.ElementTree as ET


def escape(text: str) -> str:
    """XML character data, as xml.sax.saxutils.escape makes it. Not that module itself: it
    imports urllib.request (http.client, email...), ~10% of a one-shot sync's start-up."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


S3_NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"


class BadAnswer(ValueError):
    """An answer that is not the XML document the operation returns."""


def complete_body(part_etags: list[str]) -> bytes:
    """The CompleteMultipartUpload document for parts 1..N with these (unquoted) ETags."""
    parts = "".join(
        f"<Part><ETag>{escape(chr(34) + etag + chr(34))}</ETag><PartNumber>{number}</PartNumber>"
        "</Part>"
        for number, etag in enumerate(part_etags, 1)
    )
    return (
        f'<CompleteMultipartUpload xmlns="{S3_NAMESPACE}">{parts}</CompleteMultipartUpload>'
    ).encode()


def parse(body: bytes) -> ET.Element:
    """The root element of an answer, namespaces dropped from every tag."""
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise BadAnswer("an XML answer with a DTD")
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise BadAnswer(f"unreadable XML ({exc}): {body[:120]!r}") from None
    for element in root.iter():
        if isinstance(element.tag, str) and element.tag[:1] == "{":
            element.tag = element.tag.split("}", 1)[1]
    return root


_ERROR_ROOT = re.compile(rb"^\s*(?:<\?xml[^>]*\?>\s*)?<Error[\s>]")


def is_error_in_200(body: bytes) -> bool:
    """A 200 answer that is not a success, as botocore reads one: an <Error> document, or
    a body that is not XML at all (cut short). An empty body is not an error."""
    if not body:
        return False
    if _ERROR_ROOT.match(body):
        return True
    try:
        parse(body)
    except BadAnswer:
        return True
    return False


def _text(root: ET.Element, name: str) -> str:
    return (root.findtext(name) or "").strip()


def upload_id(body: bytes) -> str:
    """CreateMultipartUpload's answer: the new upload's id."""
    # Not checked: the root's name (rclone says InitiateMultipartUpload, not ...Result).
    found = _text(parse(body), "UploadId")
    if not found:
        raise BadAnswer(f"no UploadId in the answer: {body[:120]!r}")
    return found


@dataclass(frozen=True, slots=True)
class Result:
    """What CompleteMultipartUpload or CopyObject answered: the ETag (unquoted) and, for a
    copy, its LastModified as written ("" when not said)."""

    etag: str
    last_modified: str = ""


def complete_result(body: bytes) -> Result:
    if not body.strip():
        return Result("")
    root = parse(body)
    return Result(unquote_etag(_text(root, "ETag")))


def copy_result(body: bytes) -> Result:
    if not body.strip():
        return Result("")
    root = parse(body)
    return Result(unquote_etag(_text(root, "ETag")), _text(root, "LastModified"))


@dataclass(frozen=True, slots=True)
class UploadsPage:
    """One page of ListMultipartUploads: (keys, upload id) pairs, and where the next page
    starts (key marker, upload-id marker), None on the last page. `keys`: the listed key
    decoded, and as listed (see uploads_page)."""

    uploads: list[tuple[frozenset[str], str]]
    next_markers: tuple[str, str] | None


def uploads_page(body: bytes) -> UploadsPage:
    """SeaweedFS answers EncodingType url yet lists these keys as they are (`a%25b+c`
    stands for itself): an upload's key is either form. Listed with prefix=K, no other key
    can be mistaken for K that way: a listed key starts with K, and its encoding is never
    shorter than itself, so it spells K only when it is K."""
    root = parse(body)
    url_encoded = _text(root, "EncodingType").lower() == "url"
    uploads = []
    for upload in root.iter("Upload"):
        raw = upload.findtext("Key") or ""
        keys = frozenset((raw, decode_listed_key(raw, url_encoded)))
        uploads.append((keys, _text(upload, "UploadId")))
    next_markers = None
    if _text(root, "IsTruncated").lower() == "true":
        key_marker = decode_listed_key(root.findtext("NextKeyMarker") or "", url_encoded)
        id_marker = _text(root, "NextUploadIdMarker")
        if not key_marker and not id_marker:
            raise BadAnswer("a truncated ListMultipartUploads page without its next markers")
        next_markers = (key_marker, id_marker)
    return UploadsPage(uploads, next_markers)
