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
    first = body.find(b"<Contents>")
    first = first if first >= 0 else len(body)
    rows = _rows_as_laid_out(body, first)
    if rows is None:
        rows = _rows_by_field(body, first)
    page = _plain_page(rows, url_encoded)
    if page is None:
        page = _page_by_value(rows, url_encoded)
    key_count = _top_level(body, b"KeyCount")
    if (
        key_count is not None
        and key_count.strip().isdigit()
        and int(key_count) not in (len(page), len(page) + prefixes)
    ):
        raise ValueError(f"KeyCount says {int(key_count)} objects, the page lists {len(page)}")
    return page


_FIELDS = (b"Key", b"ETag", b"Size", b"LastModified")  # the order of a row's values
_Row = tuple[bytes, bytes, bytes, bytes]


def _rows_by_field(body: bytes, first: int) -> list[_Row]:
    """Every entry's (Key, ETag, Size, LastModified) as listed (b"" when absent; the last
    one when repeated): one pass over the fields, each </Contents> closing an entry."""
    rows = []
    fields: dict[bytes, bytes] = {}
    for name, value in _CONTENTS_FIELD.findall(body, first):
        if name:
            fields[name] = value
        else:
            rows.append(tuple(fields.get(field, b"") for field in _FIELDS))
            fields = {}
    return rows  # type: ignore[return-value]


# Text that holds no field's opening tag nor a </Contents>.
_GAP = rb"[^<]*(?:<(?!(?:Key|Size|ETag|LastModified)>|/Contents>)[^<]*)*"
_LAYOUTS: dict[tuple[bytes, ...], re.Pattern[bytes]] = {}


def _rows_as_laid_out(body: bytes, first: int) -> list[_Row] | None:
    """_rows_by_field's rows, read in one regular expression call where every entry lays
    its fields out as the first one does (a server writes them all alike): about twice as
    quick. None where they are not all alike: then the general pass reads them.

    Why the rows are the same: the layout's pattern takes each field as _CONTENTS_FIELD
    does (its value and the '<' after it), with _GAP between them; _GAP holds no field tag
    and no </Contents>. If the page holds exactly as many of each of the layout's tags, and
    of </Contents>, as the pattern found entries (and none of the other fields' tags), then
    every tag is one the pattern matched, each entry has each field once, and the general
    pass, meeting the same tags in the same order, reads the same values."""
    close = body.find(b"</Contents>", first)
    if close < 0:
        return []  # no entry is closed: none is read
    tags = {name: body.find(b"<" + name + b">", first, close) for name in _FIELDS}
    layout = tuple(sorted((name for name in _FIELDS if tags[name] >= 0), key=tags.__getitem__))
    pattern = _LAYOUTS.get(layout)
    if pattern is None:
        parts = [rb"<" + name + rb">([^<]*)<" + _GAP for name in layout]
        pattern = _LAYOUTS[layout] = re.compile(b"".join(parts) + rb"</Contents>")
    found = pattern.findall(body, first)
    count = len(found)
    if body.count(b"</Contents>", first) != count or any(
        body.count(b"<" + name + b">", first) != (count if name in layout else 0)
        for name in _FIELDS
    ):
        return None
    if len(layout) < 2:  # findall gives one group's values (or no group's match) bare
        found = [(value,) for value in found] if layout else [() for _ in found]
    where = [layout.index(name) if name in layout else -1 for name in _FIELDS]
    if where == [0, 1, 2, 3]:
        return found
    return [tuple(row[i] if i >= 0 else b"" for i in where) for row in found]  # type: ignore[misc]


def _page_by_value(rows: list[_Row], url_encoded: bool) -> list[ObjectInfo]:
    """The page's objects, every value decoded by itself."""
    return [
        ObjectInfo(
            _listed_key(key, url_encoded),
            int(size or 0),
            unquote_etag(_etag_text(etag)),
            {},
            modified.decode("ascii", "replace"),
        )
        for key, etag, size, modified in rows
    ]


def _plain_page(rows: list[_Row], url_encoded: bool) -> list[ObjectInfo] | None:
    """The page's objects where no key holds an entity or anything url-encoded and the ETags
    only quotes (nearly every page): each column decoded in one call, joined by "<" (which
    no value holds: the pattern reads [^<]*), so each value decodes as it would alone. None
    otherwise: then each value is decoded by itself."""
    if not rows:
        return []
    keys, etags, sizes, modified = zip(*rows, strict=True)
    joined = b"<".join(keys)
    if b"&" in joined or (
        url_encoded and (b"%" in joined or b"+" in joined or not joined.isascii())
    ):
        return None
    quoted = b"<".join(etags).replace(b"&quot;", b'"').replace(b"&#34;", b'"')
    if b"&" in quoted:
        return None
    return [
        ObjectInfo(key, int(size or 0), etag.strip().strip('"'), {}, last_modified)
        for key, etag, size, last_modified in zip(
            joined.decode("utf-8", "surrogateescape").split("<"),
            quoted.decode("utf-8", "surrogateescape").split("<"),
            sizes,
            b"<".join(modified).decode("ascii", "replace").split("<"),
            strict=True,
        )
    ]


def _listed_key(raw: bytes, url_encoded: bool) -> str:
    """decode_listed_key(_xml_text(raw), url_encoded), without the calls for a key with no
    entity and nothing url-encoded (nearly every key)."""
    if b"&" in raw or (url_encoded and (b"%" in raw or b"+" in raw or not raw.isascii())):
        return decode_listed_key(_xml_text(raw), url_encoded)
    return raw.decode("utf-8", "surrogateescape")


def _etag_text(raw: bytes) -> str:
    """_xml_text(raw) of an ETag: its quotes come as &quot; or &#34; (rclone, SeaweedFS),
    replaced directly where nothing else needs decoding."""
    if b"&" in raw:
        plain = raw.replace(b"&quot;", b'"').replace(b"&#34;", b'"')
        if b"&" in plain:
            return _xml_text(raw)
        raw = plain
    return raw.decode("utf-8", "surrogateescape")
