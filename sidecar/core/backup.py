"""Backups, history and undo: the pure part (names, records, decisions; no I/O).

Every sync that changes something gets a sync id and a history record: the paths it touched,
each with what it held before (a backup: a copy under `.netvol/backup/<sync id>/`, an object
version, or a local file moved aside) and what it left after. Undo and restore are computed
from these records: undo puts each path's `before` back; restore --at puts back, for each
path, the `before` of the first sync after that time.
"""

from __future__ import annotations

import builtins
import enum
import json
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

# The sidecar's own bookkeeping under the remote prefix: never synced, listed or deleted.
NETVOL = ".netvol"
NETVOL_PREFIX = NETVOL + "/"
BACKUP_DIR = NETVOL_PREFIX + "backup/"
HISTORY_DIR = NETVOL_PREFIX + "history/"
RECORD_SUFFIX = ".json"
RECORD_FORMAT = 2  # 1: one line; 2: a line per entry (see record_lines)

_SYNC_ID = re.compile(r"^\d{8}T\d{9}Z-[0-9a-f]{6}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class BackupMode(enum.StrEnum):
    OFF = "off"
    COPY = "copy"  # server-side copies under .netvol/backup/<sync id>/
    VERSIONS = "versions"  # the bucket keeps versions: record the replaced version id
    AUTO = "auto"  # versions where the bucket has versioning enabled, else copy


def parse_backup_mode(text: str) -> BackupMode:
    try:
        return BackupMode(text.strip().lower())
    except ValueError:
        raise ValueError(f"must be off, copy, versions or auto, got {text!r}") from None


def parse_duration(text: str) -> float:
    """'7d' -> 604800.0 seconds; s, m, h, d, w or a bare number of seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (examples: 7d, 12h, 30m, 3600)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def is_bookkeeping(relpath: str) -> bool:
    """Whether a path relative to the remote prefix (or the folder) is the sidecar's own."""
    return relpath == NETVOL or relpath.startswith(NETVOL_PREFIX)


def new_sync_id(now: datetime) -> str:
    """Sortable by time (to the millisecond), unique across replicas by its random tail:
    20261203T121500123Z-1a2b3c."""
    utc = now.astimezone(UTC)
    return f"{utc:%Y%m%dT%H%M%S}{utc.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def is_sync_id(text: str) -> bool:
    return bool(_SYNC_ID.match(text))


def sync_id_time(sync_id: str) -> datetime | None:
    try:
        moment = datetime.strptime(sync_id[:15], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
        return moment.replace(microsecond=int(sync_id[15:18]) * 1000)
    except ValueError:
        return None


def backup_key(prefix: str, sync_id: str, relpath: str) -> str:
    return f"{prefix}{BACKUP_DIR}{sync_id}/{relpath}"


def history_key(prefix: str, sync_id: str) -> str:
    return f"{prefix}{HISTORY_DIR}{sync_id}{RECORD_SUFFIX}"


def parse_utc(text: str) -> datetime:
    """An ISO time; without a zone it is UTC ('2026-12-03T12:00', '2026-12-03 12:00:00Z')."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a UTC time: {text!r} (example: 2026-12-03T12:00:00Z)") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def format_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Version:
    """One version of a path: where its bytes are kept (for a `before`) and how to know it."""

    size: int
    hash: str = ""  # content hash when known
    etag: str = ""  # remote side
    executable: bool = False
    key: str = ""  # remote backup copy (copy mode)
    version_id: str = ""  # versions mode: the object version at the path's own key
    local: str = ""  # local backup, relative to the backup folder: "<sync id>/<path>"

    @property
    def kept(self) -> bool:
        return bool(self.key or self.version_id or self.local)

    def as_dict(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items() if value not in ("", False)}

    @staticmethod
    def from_dict(data: Mapping[str, Any] | None) -> Version | None:
        if data is None:
            return None
        return Version(
            int(data.get("size", 0)),
            str(data.get("hash", "")),
            str(data.get("etag", "")),
            bool(data.get("executable", False)),
            str(data.get("key", "")),
            str(data.get("version_id", "")),
            str(data.get("local", "")),
        )


@dataclass(frozen=True, slots=True)
class Entry:
    """One path a sync touched: before None = it created the path; after None = deleted."""

    path: str
    before: Version | None
    after: Version | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "before": self.before.as_dict() if self.before else None,
            "after": self.after.as_dict() if self.after else None,
        }


@dataclass(slots=True)
class Tally:
    """A record's counts: its summary, known without its entries (a header says them)."""

    entries: int = 0
    uploaded: int = 0
    replaced: int = 0
    deleted: int = 0
    bytes: int = 0

    def add(self, entry: Entry) -> None:
        self.entries += 1
        if entry.after is None:
            self.deleted += 1
            return
        self.bytes += entry.after.size
        if entry.before is None:
            self.uploaded += 1
        else:
            self.replaced += 1

    @staticmethod
    def of(entries: Iterable[Entry]) -> Tally:
        tally = Tally()
        for entry in entries:
            tally.add(entry)
        return tally


@dataclass(slots=True)
class SyncRecord:
    """A sync's record. Read whole (`from_json`) it has its entries; read as a stream
    (`read_record`) it is the header alone, and its entries come one at a time."""

    sync_id: str
    time: str  # UTC, ISO
    operation: str  # pull, finalize, undo, restore
    side: str  # "remote" (the bucket changed) or "local" (the folder changed)
    host: str
    remote: str
    local_dir: str
    backup: str  # copy, versions, local
    entries: list[Entry] = field(default_factory=list)
    undoes: str | None = None  # the sync an undo put back
    tally: Tally = field(default_factory=Tally)

    def __post_init__(self) -> None:
        if self.entries and not self.tally.entries:
            self.tally = Tally.of(self.entries)

    @property
    def uploaded(self) -> int:
        return self.tally.uploaded

    @property
    def replaced(self) -> int:
        return self.tally.replaced

    @property
    def deleted(self) -> int:
        return self.tally.deleted

    @property
    def bytes(self) -> int:
        return self.tally.bytes

    def summary(self) -> dict[str, Any]:
        return {
            "sync_id": self.sync_id,
            "time": self.time,
            "operation": self.operation,
            "side": self.side,
            "uploaded": self.uploaded,
            "replaced": self.replaced,
            "deleted": self.deleted,
            "bytes": self.bytes,
            "host": self.host,
            "backup": self.backup,
            **({"undoes": self.undoes} if self.undoes else {}),
        }

    # builtins.bytes: in this class `bytes` is the property above.
    def to_json(self) -> builtins.bytes:
        """The whole record (format 2), from the entries it holds."""
        return b"".join(record_lines(self, map(entry_line, self.entries)))

    @staticmethod
    def from_json(data: builtins.bytes) -> SyncRecord:
        """A whole record of either format, entries included. Raises ValueError naming what
        is wrong."""
        record, entries = read_record(iter(data.splitlines(keepends=True)))
        record.entries = list(entries)
        return record


# ---- the record's bytes ------------------------------------------------------------------
# Format 1 was one JSON object on one line, written whole at the end of a sync. Format 2 is
# the same JSON object (an old reader parses it as it did), laid out so that it is written
# and read a line at a time: the header (the summary, and "count" of entries) on the first
# line, which ends in `"entries":[`, then one entry per line (each after the first begins
# with a comma), then `]}`. A record is whole or absent where it is stored (a rename, one PUT
# or one CompleteMultipartUpload); a reader still checks the count and the closing line, so
# a cut record is named as partial, never taken for a shorter one.
_ENTRIES_OPEN = b',"entries":['
_END = b"]}"
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def entry_line(entry: Entry) -> builtins.bytes:
    """One entry's line of a format 2 record (without the comma that joins it to the last)."""
    return (_ENCODE(entry.as_dict()) + "\n").encode()


def header_line(record: SyncRecord) -> builtins.bytes:
    data = {
        "format": RECORD_FORMAT,
        **record.summary(),
        "remote": record.remote,
        "local_dir": record.local_dir,
        "count": record.tally.entries,
    }
    return _ENCODE(data).encode()[:-1] + _ENTRIES_OPEN + b"\n"


def record_lines(
    record: SyncRecord, entry_lines: Iterable[builtins.bytes]
) -> Iterator[builtins.bytes]:
    """A format 2 record, a line at a time: `record`'s header (its tally must count the
    entries) and the entries' lines (entry_line) in the order given."""
    yield header_line(record)
    first = True
    for line in entry_lines:
        yield line if first else b"," + line
        first = False
    yield _END + b"\n"


def read_record(
    lines: Iterator[builtins.bytes],
) -> tuple[SyncRecord, Iterator[Entry]]:
    """A record of either format from its lines: the header (no entries, its tally from the
    record) and its entries, in record order. A format 2 record's entries are parsed as they
    are iterated: one that is cut short or damaged raises ValueError there, naming the line
    and how many entries it should have had. Raises ValueError at once for an unreadable
    header."""
    first = next(lines, b"")
    try:
        try:
            raw = json.loads(first)
        except ValueError:
            opened = first.rstrip()
            if not opened.endswith(_ENTRIES_OPEN):
                raise
            raw = json.loads(opened + _END)  # format 2: the header line
            record = _header(raw)
            count = int(raw["count"])
            record.tally = Tally(
                count,
                int(raw["uploaded"]),
                int(raw["replaced"]),
                int(raw["deleted"]),
                int(raw["bytes"]),
            )
            return record, _streamed_entries(lines, count)
        # Format 1: the whole record on its one line.
        record = _header(raw)
        entries = [_entry(e) for e in raw.get("entries", [])]
        record.tally = Tally.of(entries)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"unreadable history record: {exc!r}") from None
    return record, iter(entries)


def _header(raw: Any) -> SyncRecord:
    return SyncRecord(
        sync_id=str(raw["sync_id"]),
        time=str(raw["time"]),
        operation=str(raw["operation"]),
        side=str(raw.get("side", "remote")),
        host=str(raw.get("host", "")),
        remote=str(raw.get("remote", "")),
        local_dir=str(raw.get("local_dir", "")),
        backup=str(raw.get("backup", "")),
        undoes=raw.get("undoes"),
    )


def _entry(raw: Any) -> Entry:
    return Entry(
        str(raw["path"]), Version.from_dict(raw.get("before")), Version.from_dict(raw.get("after"))
    )


def _streamed_entries(lines: Iterator[builtins.bytes], count: int) -> Iterator[Entry]:
    seen = 0
    for number, line in enumerate(lines, start=2):
        text = line.rstrip(b"\n")
        if text == _END:
            if seen != count:
                raise ValueError(
                    f"unreadable history record: {seen} entries where its header says {count}"
                )
            return
        try:
            if seen and not text.startswith(b","):
                raise ValueError("no comma before the entry")
            yield _entry(json.loads(text[1:] if seen else text))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"unreadable history record: line {number}: {exc!r}") from None
        seen += 1
    raise ValueError(
        f"partial history record: it ends after {seen} of its {count} entries (no closing line)"
    )


def history_line(summary: Mapping[str, Any]) -> str:
    """One line of `sidecar history`."""
    from sidecar.core.units import format_bytes

    undoes = f" (undoes {summary['undoes']})" if summary.get("undoes") else ""
    return (
        f"{summary['sync_id']}  {summary['time']}  {summary['operation']:<8}  "
        f"+{summary['uploaded']} ~{summary['replaced']} -{summary['deleted']}  "
        f"{format_bytes(summary['bytes']):>10}  {summary['host']}  [{summary['side']}]{undoes}"
    )


# ---- undo and restore decisions -------------------------------------------------------


class StepKind(enum.StrEnum):
    PUT_BACK = "put-back"  # the path gets `target`'s bytes again
    REMOVE = "remove"  # the path is removed (kept in the undo's own backup)


@dataclass(frozen=True, slots=True)
class Step:
    kind: StepKind
    path: str
    target: Version | None  # PUT_BACK: the version to put back
    current: Version | None  # what the path holds now (None: absent)

    def to_line(self) -> bytes:
        """One line of JSON: an undo decides every step before it carries one out, and
        keeps them on disk in between (an undo of a million paths)."""
        data = {
            "kind": str(self.kind),
            "path": self.path,
            "target": self.target.as_dict() if self.target else None,
            "current": self.current.as_dict() if self.current else None,
        }
        return (_ENCODE(data) + "\n").encode()

    @staticmethod
    def from_line(line: bytes) -> Step:
        raw = json.loads(line)
        return Step(
            StepKind(raw["kind"]),
            str(raw["path"]),
            Version.from_dict(raw["target"]),
            Version.from_dict(raw["current"]),
        )


@dataclass(frozen=True, slots=True)
class Skipped:
    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


def same_version(current: Version | None, wanted: Version | None) -> bool:
    """Whether the path now holds `wanted` (None: absent), by hash where both know it, else
    by ETag."""
    if current is None or wanted is None:
        return current is None and wanted is None
    if current.hash and wanted.hash:
        return current.hash == wanted.hash and current.size == wanted.size
    return bool(current.etag) and current.etag == wanted.etag


def undo_steps(
    record: SyncRecord, current: Mapping[str, Version | None], force: bool
) -> tuple[list[Step], list[Skipped]]:
    """What undoing `record` (read whole) does, given what each of its paths holds now."""
    steps: list[Step] = []
    skipped: list[Skipped] = []
    for entry in record.entries:
        step = undo_step(record.sync_id, entry, current.get(entry.path), force)
        if isinstance(step, Skipped):
            skipped.append(step)
        elif step is not None:
            steps.append(step)
    return steps, skipped


def undo_step(
    sync_id: str, entry: Entry, now: Version | None, force: bool
) -> Step | Skipped | None:
    """What undoing one entry of sync `sync_id` does, given what its path holds now (None:
    absent). A path changed since the sync is skipped (reported) unless `force`; a path
    whose old version was not kept cannot be put back."""
    if not force and not same_version(now, entry.after):
        state = "deleted" if now is None else "changed"
        return Skipped(
            entry.path, f"{state} since sync {sync_id}; not touched (--force to undo anyway)"
        )
    return _step_to(entry.path, entry.before, now)


def _step_to(path: str, target: Version | None, now: Version | None) -> Step | Skipped | None:
    if target is None:
        return None if now is None else Step(StepKind.REMOVE, path, None, now)
    if not target.kept:
        return Skipped(path, "its earlier version was not kept (backup off); cannot put it back")
    if same_version(now, target):
        return None
    return Step(StepKind.PUT_BACK, path, target, now)


def restore_targets(
    records: Iterable[SyncRecord], path: str, at: datetime
) -> dict[str, Version | None]:
    """For every path at or under `path` ('' = all) that a sync after `at` touched: what it
    held at `at` (None: absent), i.e. the `before` of the first such sync."""
    targets = RestoreTargets(path, at)
    for record in restore_order(records):
        if targets.after(record):
            targets.add(record.entries)
    return targets.found


def restore_order(records: Iterable[SyncRecord]) -> list[SyncRecord]:
    """The order restore reads records in: by the time each was written."""
    return sorted(records, key=lambda r: (r.time, r.sync_id))


class RestoreTargets:
    """restore_targets a record at a time (its entries may come as a stream): the records in
    restore_order, each that is `after` the time `add`ed."""

    def __init__(self, path: str, at: datetime) -> None:
        self.moment = format_utc(at)
        self.folder = path.rstrip("/")
        self.found: dict[str, Version | None] = {}

    def after(self, record: SyncRecord) -> bool:
        return record.time > self.moment

    def add(self, entries: Iterable[Entry]) -> None:
        folder, found = self.folder, self.found
        for entry in entries:
            inside = not folder or entry.path == folder or entry.path.startswith(folder + "/")
            if inside and entry.path not in found:
                found[entry.path] = entry.before


def versions_at(
    versions: Iterable[tuple[str, str, str, str, int, bool]], at: datetime
) -> dict[str, Version | None]:
    """From a versioned bucket's listing (path, version id, LastModified, ETag, size, delete
    marker): what each path held at `at` (None: absent, or a delete marker). Covers every
    writer, not only the syncs with a record."""
    moment = at.astimezone(UTC)
    newest: dict[str, tuple[datetime, Version | None]] = {}
    seen: set[str] = set()
    for path, version_id, modified, etag, size, deleted in versions:
        seen.add(path)
        try:
            when = datetime.fromisoformat(modified.replace("Z", "+00:00"))
        except ValueError:
            continue
        if when > moment or (path in newest and newest[path][0] >= when):
            continue
        version = None if deleted else Version(size, etag=etag, version_id=version_id)
        newest[path] = (when, version)
    return {path: newest[path][1] if path in newest else None for path in seen}


def restore_steps(
    targets: Mapping[str, Version | None], current: Mapping[str, Version | None]
) -> tuple[list[Step], list[Skipped]]:
    steps: list[Step] = []
    skipped: list[Skipped] = []
    for path, target in sorted(targets.items()):
        step = _step_to(path, target, current.get(path))
        if isinstance(step, Skipped):
            skipped.append(step)
        elif step is not None:
            steps.append(step)
    return steps, skipped


@dataclass(slots=True)
class UndoReport:
    """The answer of undo and restore: what was (or would be) done, and what was not."""

    operation: str  # undo or restore
    target: str  # the sync undone, or "PATH at TIME"
    dry_run: bool = False
    sync_id: str | None = None  # this undo's own sync id (undo it to redo)
    put_back: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    errors: list[Skipped] = field(default_factory=list)
    fatal: str | None = None

    @property
    def ok(self) -> bool:
        return self.fatal is None and not self.errors and not self.skipped

    def as_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "target": self.target,
            "ok": self.ok,
            "dry_run": self.dry_run,
            "sync_id": self.sync_id,
            "put_back": self.put_back,
            "removed": self.removed,
            "skipped": [s.as_dict() for s in self.skipped],
            "errors": [e.as_dict() for e in self.errors],
            "fatal": self.fatal,
            "summary": self.one_line(),
        }

    def one_line(self) -> str:
        verb = "would put back" if self.dry_run else "put back"
        text = (
            f"{self.operation} {self.target}: {verb} {len(self.put_back)}, "
            f"{'would remove' if self.dry_run else 'removed'} {len(self.removed)}, "
            f"skipped {len(self.skipped)}, errors {len(self.errors)}"
        )
        if self.sync_id and not self.dry_run:
            text += f"; this {self.operation} is sync {self.sync_id}"
        if self.fatal:
            text += f"; FAILED: {self.fatal}"
        return text
