"""What the object store answers: objects as listed or HEADed, and what a write said."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


def unquote_etag(etag: str) -> str:
    return etag.strip().strip('"')


def answer_seconds(headers: Mapping[str, str]) -> int:
    """The server's clock when it answered (its Date header), in whole seconds since the
    epoch; 0 when absent or unreadable."""
    value = headers.get("date")
    if not value:
        return 0
    # Imported on first use: email.utils brings email.*, calendar, random... into every
    # start-up otherwise, and a pull never asks (only writes read the server's clock).
    from email.utils import parsedate_to_datetime

    try:
        return int(parsedate_to_datetime(value).timestamp())
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    etag: str  # unquoted
    metadata: dict[str, str]
    last_modified: str = ""  # listings only
    # HEAD only: the object is encrypted so that its ETag is not the MD5 of its bytes
    # (SSE-KMS, DSSE-KMS, SSE-C).
    etag_is_opaque: bool = False
    modified_seconds: int = 0  # HEAD only: Last-Modified, seconds since the epoch


@dataclass(frozen=True, slots=True)
class Written:
    """What the answer to one of our writes said: the ETag, and the server's clock when it
    answered (seconds since the epoch, 0 when unknown). A listing's LastModified later than
    `at` is another writer's, even when that writer kept the ETag (a metadata rewrite)."""

    etag: str
    at: int = 0


@dataclass(frozen=True, slots=True)
class ObjectVersion:
    """One entry of ListObjectVersions: a version, or a delete marker."""

    key: str
    version_id: str
    last_modified: str  # ISO, as listed
    etag: str = ""
    size: int = 0
    delete_marker: bool = False
