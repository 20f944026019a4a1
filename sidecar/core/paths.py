"""Rules that turn object keys into local relative paths and back, and name validation.

A relative path here is always POSIX, never absolute, never has '.', '..' or empty segments.
Containment is decided on path segments, never on string prefixes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from datetime import UTC, datetime

MAX_NAME_BYTES = 255  # NAME_MAX on Linux filesystems
MAX_PATH_BYTES = 4096 - 1  # PATH_MAX including the terminating NUL

TEMP_PREFIX = ".netvol-tmp."
_TEMP_RE = re.compile(r"^\.netvol-tmp\.[0-9a-f]{16}$")

_VOLUME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,50}$")
_MOUNT_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_+.-]+$")


class BadKey(ValueError):
    """An object key (or local name) that cannot be a file inside the sync folder."""


def temp_name() -> str:
    """A fresh temp-file basename; one recognisable pattern for every temp file we create."""
    # os.urandom is what secrets.token_hex reads; importing secrets cost ~5 ms per process.
    return TEMP_PREFIX + os.urandom(8).hex()


def is_temp_name(basename: str) -> bool:
    return bool(_TEMP_RE.match(basename))


def normalize_prefix(prefix: str) -> str:
    """'' or 'a/b/' (always ending in '/'); rejects prefixes with '.', '..' or empty segments."""
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    check_relpath(stripped, what="prefix")
    return stripped + "/"


def check_relpath(relpath: str, what: str = "key") -> None:
    """Raise BadKey if relpath could not be a file path strictly inside the folder."""
    if relpath.isascii() and 0 < len(relpath) <= MAX_NAME_BYTES and "\x00" not in relpath:
        # The common case, decided with a few substring tests (a sync checks every key):
        # short ASCII paths can only fail on empty, '.' or '..' segments.
        framed = f"/{relpath}/"
        if "//" not in framed and "/./" not in framed and "/../" not in framed:
            return
    check_relpath_fully(relpath, what)


def check_relpath_fully(relpath: str, what: str = "key") -> None:
    """check_relpath without its shortcut: every rule, one by one, with its own message."""
    if not relpath:
        raise BadKey(f"{what} is empty")
    if "\x00" in relpath:
        raise BadKey(f"{what} {relpath!r} contains a NUL byte")
    if "\ufffd" in relpath or _has_surrogates(relpath):
        raise BadKey(f"{what} {relpath!r} is not valid UTF-8")
    if relpath.startswith("/"):
        raise BadKey(f"{what} {relpath!r} is an absolute path")
    segments = relpath.split("/")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise BadKey(f"{what} {relpath!r} would escape the folder or has an empty segment")
        if len(segment.encode()) > MAX_NAME_BYTES:
            raise BadKey(f"{what} {relpath!r}: name {segment[:40]!r}... exceeds 255 bytes")
    if len(relpath.encode()) > MAX_PATH_BYTES:
        raise BadKey(f"{what} {relpath[:60]!r}... exceeds the 4095-byte path limit")


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def key_to_relpath(prefix: str, key: str) -> str | None:
    """The local relative path for `key` under normalized `prefix`.

    None for keys that are not files for us: folder markers ('a/') and our own temp names.
    Raises BadKey for keys that would escape the folder or cannot be a local name.
    """
    if not key.startswith(prefix):
        raise BadKey(f"key {key!r} is outside prefix {prefix!r}")
    relpath = key[len(prefix) :]
    if relpath == "" or relpath.endswith("/"):
        return None
    check_relpath(relpath)
    if is_temp_name(relpath.rsplit("/", 1)[-1]):
        return None
    return relpath


def relpath_to_key(prefix: str, relpath: str) -> str:
    return prefix + relpath


def parent_dirs(relpath: str) -> list[str]:
    """'a/b/c' -> ['a', 'a/b']."""
    segments = relpath.split("/")[:-1]
    return ["/".join(segments[: i + 1]) for i in range(len(segments))]


def folders_of(relpaths: Iterable[str]) -> set[str]:
    """Every folder that holds one of relpaths, at any depth ({'a/b/c'} -> {'a', 'a/b'}).

    Climbs from each file's own folder and stops at the first folder already seen: files
    share folders, so this is about one set lookup per file.
    """
    folders: set[str] = set()
    for relpath in relpaths:
        folder = relpath.rpartition("/")[0]
        while folder and folder not in folders:
            folders.add(folder)
            folder = folder.rpartition("/")[0]
    return folders


def conflict_name(relpath: str, when: datetime) -> str:
    """'dir/model.pt' -> 'dir/model.conflict-20261123T091500Z.pt'."""
    stamp = when.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    head, sep, base = relpath.rpartition("/")
    dot = base.rfind(".")
    stem, ext = (base[:dot], base[dot:]) if dot > 0 else (base, "")
    return f"{head}{sep}{stem}.conflict-{stamp}{ext}"


def check_volume_name(name: str) -> None:
    if not _VOLUME_RE.match(name):
        raise ValueError(
            f"volume name {name!r} is invalid: use 1-50 characters of a-z A-Z 0-9 _ . -"
        )


def check_mount_folder(path: str) -> None:
    """The platform's rule for mount folders: < 256 chars of a-zA-Z0-9_+.- and '/' between."""
    if not path or len(path) >= 256:
        raise ValueError(f"folder {path!r} is invalid: it must be 1-255 characters long")
    segments = path.strip("/").split("/")
    for segment in segments:
        if not _MOUNT_SEGMENT_RE.match(segment) or segment in (".", ".."):
            raise ValueError(
                f"folder {path!r} is invalid: segment {segment!r} must use only "
                "a-z A-Z 0-9 _ + . - (and '/' between segments)"
            )
