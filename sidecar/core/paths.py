"""Rules that turn object keys into local relative paths and back, and name validation.

A relative path here is always POSIX, never absolute, never has '.', '..' or empty segments.
Containment is decided on path segments, never on string prefixes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Container, Iterable, Mapping
from datetime import UTC, datetime
from typing import Protocol

MAX_NAME_BYTES = 255  # NAME_MAX on Linux filesystems
MAX_PATH_BYTES = 4096 - 1  # PATH_MAX including the terminating NUL

TEMP_PREFIX = ".netvol-tmp."
# A sharded run tags its temp files (".netvol-tmp.s2of8-<hex>") so that the other shards
# syncing the same folder at the same time clean up only their own.
_TEMP_RE = re.compile(r"^\.netvol-tmp\.(?:s\d+of\d+-)?[0-9a-f]{16}$")

_VOLUME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,50}$")
_MOUNT_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_+.-]+$")


class BadKey(ValueError):
    """An object key (or local name) that cannot be a file inside the sync folder."""


def temp_name(tag: str = "") -> str:
    """A fresh temp-file basename; one recognisable pattern for every temp file we create."""
    # os.urandom is what secrets.token_hex reads; importing secrets cost ~5 ms per process.
    return TEMP_PREFIX + tag + os.urandom(8).hex()


def is_temp_name(basename: str) -> bool:
    # The prefix test first: asked of every scanned, listed and filtered name.
    return basename.startswith(TEMP_PREFIX) and bool(_TEMP_RE.match(basename))


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


class _Sized(Protocol):
    @property
    def size(self) -> int: ...


def folder_markers(listed: Mapping[str, _Sized]) -> list[str]:
    """The listed paths that are folder markers, not files: rclone lists a 'dir/' marker as a
    0-byte 'dir' beside 'dir/...'. A real file and folder of one name (the file has bytes)
    both stay: hiding the file made every later sync see it as deleted; the planner reports
    the clash and decides each path as usual."""
    return sorted(d for d in folders_of(listed) if d in listed and listed[d].size == 0)


# An extension longer than this is not kept whole in a conflict copy's name: it is part of
# the name that gets shortened (a "name.<250 bytes>" file has no extension worth keeping).
_MAX_KEPT_EXT_BYTES = 32


def _utf8_len(text: str) -> int:
    # surrogatepass: never raises, and never counts fewer bytes than the filesystem name has
    # (a surrogateescape'd byte counts 3, not 1), so a cut based on it always fits.
    return len(text.encode("utf-8", "surrogatepass"))


def _cut_to_bytes(text: str, limit: int) -> str:
    """The longest prefix of text that is at most `limit` UTF-8 bytes: cut between
    characters, never inside one."""
    if _utf8_len(text) <= limit:
        return text
    used = 0
    for index, char in enumerate(text):
        used += _utf8_len(char)
        if used > limit:
            return text[:index]
    return text


def conflict_name(relpath: str, when: datetime, taken: Container[str] = ()) -> str:
    """Where to keep the losing version of relpath: a name no file or object has.

    'dir/model.pt' -> 'dir/model.conflict-20261123T091500.123Z.pt'; when that name is in
    `taken` (files on either side, copies already chosen): '...091500.123Z-2.pt', '-3', ...
    Milliseconds make two conflicts in one second distinct across replicas; the counter
    makes them distinct within what this run knows. The result's last segment always fits
    MAX_NAME_BYTES (the stem is shortened between characters, the extension kept when
    short), and the whole path fits MAX_PATH_BYTES whenever relpath's folder leaves room
    for the marker at all.
    """
    stamp = when.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"
    head, sep, base = relpath.rpartition("/")
    dot = base.rfind(".")
    stem, ext = (base[:dot], base[dot:]) if dot > 0 else (base, "")
    if _utf8_len(ext) > _MAX_KEPT_EXT_BYTES:
        stem, ext = base, ""
    folder_bytes = _utf8_len(head + sep)
    counter = 1
    while True:
        marker = f".conflict-{stamp}" + (f"-{counter}" if counter > 1 else "")
        room = MAX_NAME_BYTES - _utf8_len(marker + ext)
        room = min(room, MAX_PATH_BYTES - folder_bytes - _utf8_len(marker + ext))
        name = f"{head}{sep}{_cut_to_bytes(stem, max(room, 0))}{marker}{ext}"
        if name not in taken:
            return name
        counter += 1


class NamesInUse:
    """Container of every relative path a conflict copy must not take: the files of the
    local scan, the objects of the listing, and the copies already named in this run.
    Looks the maps up instead of copying them (a volume may hold millions of names)."""

    def __init__(self, *sides: Container[str]) -> None:
        self._sides = sides
        self._chosen: set[str] = set()

    def __contains__(self, name: object) -> bool:
        return name in self._chosen or any(name in side for side in self._sides)

    def claim(self, name: str) -> None:
        self._chosen.add(name)


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
