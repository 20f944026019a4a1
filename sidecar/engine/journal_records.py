"""What each kind of journal record (sidecar/engine/state.py, journal.jsonl) holds, checked
before a replayed record is applied.

A line can be JSON of the right shape with fields of the wrong types: bytes a power cut left,
a hand edit, a bug of another version. Applied, such a record reached state.db's commit (a
path SQLite cannot store as UTF-8, an integer past 64 bits, keys of mixed types to sort) and
failed it, so every later sync failed too; or it reached the planner with a size it cannot
compare. Checked here, it is skipped like a torn line. Records this version writes always
pass: the check is the writers' types (`StateStore.set_base` and the others), and it runs on
replay only, never on the hot path of recording.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

_INT64 = 1 << 63
_U64 = 1 << 64


class BadRecord(ValueError):
    """A journal record whose fields do not fit its kind."""


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"a {type(value).__name__}, not a string"
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate from a \\ud800 escape
        return "a string that is no UTF-8"
    return None


def _int_in(low: int, high: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"a {type(value).__name__}, not an integer"
        if not low <= value < high:
            return f"{value} out of range"
        return None

    return check


def _texts(value: Any) -> str | None:
    if not isinstance(value, list):
        return f"a {type(value).__name__}, not a list"
    for item in value:
        if (problem := _text(item)) is not None:
            return f"holds {problem}"
    return None


def _flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"a {type(value).__name__}, not true/false"


_size = _int_in(0, _INT64)  # SQLite's integers are signed 64-bit
_int64 = _int_in(-_INT64, _INT64)
_inode = _int_in(0, _U64)  # stored wrapped into 64 signed bits (state._cache_columns)

# Per kind, the fields after the kind that must be there, then those that may follow.
_Field = tuple[str, Callable[[Any], str | None]]
_KINDS: dict[str, tuple[tuple[_Field, ...], tuple[_Field, ...]]] = {
    "set": (
        (("path", _text), ("size", _size), ("hash", _text), ("etags", _texts)),
        (("executable", _flag), ("last_modified", _text), ("written_at", _int64)),
    ),
    "del": ((("path", _text),), ()),
    "sending": (
        (("path", _text), ("size", _size), ("hash", _text), ("executable", _flag)),
        (),
    ),
    "sending-end": ((("path", _text),), ()),
    "hash": (
        (
            ("path", _text),
            ("size", _size),
            ("mtime_ns", _int64),
            ("inode", _inode),
            ("hash", _text),
        ),
        (),
    ),
    "unhash": ((("path", _text),), ()),
    "mpu-create": ((("key", _text),), ()),
    "mpu-create-end": ((("key", _text),), ()),
    "mpu": ((("upload_id", _text), ("key", _text)), ()),
    "mpu-end": ((("upload_id", _text),), ()),
}


def check_record(record: Sequence[Any]) -> None:
    """Raise BadRecord naming the first field that does not fit the record's kind (a kind
    this version does not know passes: applying it changes nothing)."""
    kind = _KINDS.get(record[0])
    if kind is None:
        return
    required, optional = kind
    fields = record[1:]
    if len(fields) < len(required):
        raise BadRecord(f"{record[0]!r} needs {len(required)} field(s), has {len(fields)}")
    for (name, check), value in zip((*required, *optional), fields, strict=False):
        if (problem := check(value)) is not None:
            raise BadRecord(f"{record[0]!r} record: {name} is {problem}")
