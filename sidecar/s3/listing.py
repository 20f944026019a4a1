"""ListObjectsV2 pages, parsed."""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from sidecar.s3.objects import ObjectInfo, unquote_etag


def decode_listed_key(raw: str, url_encoded: bool) -> str:
    """Keys listed with encoding-type=url; invalid UTF-8 survives as surrogates, which the
    path rules then reject by name (botocore would silently turn them into U+FFFD)."""
    if not url_encoded:
        return raw
    # Form encoding, as botocore's unquote_plus: '+' is a space, a real '+' comes as %2B.
    return unquote_to_bytes(raw.replace("+", " ")).decode("utf-8", "surrogateescape")


# ListObjectsV2 answers are read with a few regular expressions rather than an XML tree:
# ElementTree spent ~11 us per listed object (half of a no-op sync of 5,000 files); this
# takes ~3. What a tree would have caught is checked instead: the root element, KeyCount
# against the entries found, and a truncated page that names no continuation token.
_LISTING_ROOT = re.compile(rb"<ListBucketResult[\s>]")
_CONTENTS_FIELD = re.compile(rb"<(Key|Size|ETag|LastModified)>([^<]*)<|</Contents>")
_ENTITY = re.compile(r"&(#[0-9]+|#x[0-9a-fA-F]+|amp|lt|gt|quot|apos);")
_NAMED_ENTITIES = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}


def _top_level(body: bytes, name: bytes) -> bytes | None:
    """The text of the first <name> element outside the Contents entries (S3 puts these
    before the entries, but servers differ: look at the end too)."""
    pattern = re.compile(b"<" + name + b">([^<]*)</" + name + b">")
    head = body.split(b"<Contents>", 1)[0]
    found = pattern.search(head) or pattern.search(body.rsplit(b"</Contents>", 1)[-1])
    return found.group(1) if found else None


def _xml_text(raw: bytes) -> str:
    text = raw.decode("utf-8", "surrogateescape")
    return _ENTITY.sub(_entity, text) if "&" in text else text


def _entity(match: re.Match[str]) -> str:
    name = match.group(1)
    if name[0] != "#":
        return _NAMED_ENTITIES[name]
    return chr(int(name[2:], 16) if name[1] == "x" else int(name[1:]))


def listing_token(body: bytes) -> str | None:
    """The continuation token of a truncated page; None on the last page."""
    if not _LISTING_ROOT.search(body[:4096]):
        raise ValueError(f"not a ListBucketResult: {body[:120]!r}")
    truncated = (_top_level(body, b"IsTruncated") or b"").strip().lower() == b"true"
    if not truncated:
        return None
    token = _top_level(body, b"NextContinuationToken")
    if not token:
        raise ValueError("a truncated page without a NextContinuationToken")
    return _xml_text(token)


_COMMON_PREFIX = re.compile(rb"<CommonPrefixes>\s*<Prefix>([^<]*)</Prefix>\s*</CommonPrefixes>")


def listing_prefixes(body: bytes) -> list[str]:
    """The CommonPrefixes of a page listed with a delimiter, decoded as keys are."""
    if b"<CommonPrefixes>" not in body:
        return []
    url_encoded = (_top_level(body, b"EncodingType") or b"").strip().lower() == b"url"
    return [decode_listed_key(_xml_text(raw), url_encoded) for raw in _COMMON_PREFIX.findall(body)]


def listing_entries(body: bytes, prefixes: int = 0) -> list[ObjectInfo]:
    """The objects of one page; `prefixes` is the number of CommonPrefixes on it, which
    servers count in KeyCount (AWS, moto) or not."""
    url_encoded = (_top_level(body, b"EncodingType") or b"").strip().lower() == b"url"
    page = []
    fields: dict[bytes, bytes] = {}
    first = body.find(b"<Contents>")
    # One pass over the fields of every entry; each </Contents> closes one.
    for match in _CONTENTS_FIELD.finditer(body, first if first >= 0 else len(body)):
        name = match.group(1)
        if name is not None:
            fields[name] = match.group(2)
            continue
        page.append(
            ObjectInfo(
                decode_listed_key(_xml_text(fields.get(b"Key", b"")), url_encoded),
                int(fields.get(b"Size") or 0),
                unquote_etag(_xml_text(fields.get(b"ETag", b""))),
                {},
                fields.get(b"LastModified", b"").decode("ascii", "replace"),
            )
        )
        fields = {}
    key_count = _top_level(body, b"KeyCount")
    if (
        key_count is not None
        and key_count.strip().isdigit()
        and int(key_count) not in (len(page), len(page) + prefixes)
    ):
        raise ValueError(f"KeyCount says {int(key_count)} objects, the page lists {len(page)}")
    return page
