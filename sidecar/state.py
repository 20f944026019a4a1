"""The state store: BASE, the local hash cache and open multipart uploads, kept outside the
synced folder.

Crash safety: the snapshot (state.json) is only ever replaced atomically (write temp, fsync,
rename, fsync dir). Between snapshots every completed transfer is appended to journal.jsonl,
so an interrupted sync resumes without re-sending what it finished; a torn last line is
ignored on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sidecar.core.model import BaseEntry

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
JOURNAL_FLUSH_SECONDS = 0.05
HashCacheEntry = tuple[int, int, int, str]  # size, mtime_ns, inode, hash


class StateError(RuntimeError):
    pass


def state_path_for(state_dir: Path, remote_url: str, local_dir: Path) -> Path:
    """One state folder per (remote, local folder) pair, so a changed --remote never reuses
    the BASE of another prefix (which would read as 'everything deleted')."""
    digest = hashlib.sha256(f"{remote_url}\n{local_dir}".encode()).hexdigest()[:16]
    return state_dir / digest


class StateStore:
    def __init__(self, directory: Path, remote_url: str, local_dir: Path) -> None:
        self.directory = directory
        self.remote_url = remote_url
        self.local_dir = str(local_dir)
        self.base: dict[str, BaseEntry] = {}
        self.hash_cache: dict[str, HashCacheEntry] = {}
        self.open_uploads: dict[str, str] = {}  # upload id -> key
        self._journal: IO[str] | None = None
        self._flushed_at = 0.0
        self._dirty = False

    @property
    def snapshot_path(self) -> Path:
        return self.directory / "state.json"

    @property
    def journal_path(self) -> Path:
        return self.directory / "journal.jsonl"

    # ---- loading -------------------------------------------------------------------------
    def load(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state folder {self.directory}: {exc}") from None
        self._load_snapshot()
        replayed = 0
        for record in self._journal_records():
            self._apply(record)
            replayed += 1
        if replayed:
            self._dirty = True
            log.info("resuming: replayed %d journal record(s) from an interrupted sync", replayed)

    def _load_snapshot(self) -> None:
        try:
            raw = self.snapshot_path.read_text()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateError(f"cannot read state {self.snapshot_path}: {exc}") from None
        try:
            data = json.loads(raw)
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown state version {data.get('version')!r}")
            if data.get("remote") != self.remote_url or data.get("local_dir") != self.local_dir:
                raise ValueError("state belongs to another remote/folder pair")
            self.base = {path: _base_entry(fields) for path, fields in data["base"].items()}
            self.hash_cache = {path: tuple(entry) for path, entry in data["hashes"].items()}  # type: ignore[misc]
            self.open_uploads = dict(data.get("open_uploads", {}))
        except (ValueError, KeyError, TypeError) as exc:
            # A damaged BASE must never cause deletions: set it aside and start as if new.
            aside = self.snapshot_path.with_name(f"state.damaged-{int(time.time())}.json")
            os.replace(self.snapshot_path, aside)
            log.error("state %s is unusable (%s); moved to %s", self.snapshot_path, exc, aside)
            self.base, self.hash_cache, self.open_uploads = {}, {}, {}

    def _journal_records(self) -> Iterator[list[Any]]:
        try:
            with open(self.journal_path) as handle:
                lines = handle.read().split("\n")
        except FileNotFoundError:
            return
        for line in lines:
            if not line:
                continue
            try:
                yield json.loads(line)
            except ValueError:
                log.warning("ignoring a torn journal line (interrupted write)")

    def _apply(self, record: list[Any]) -> None:
        op = record[0]
        if op == "set":
            self.base[record[1]] = _base_entry(record[2:])
        elif op == "del":
            self.base.pop(record[1], None)
        elif op == "hash":
            _, path, size, mtime_ns, inode, digest = record
            self.hash_cache[path] = (size, mtime_ns, inode, digest)
        elif op == "unhash":
            self.hash_cache.pop(record[1], None)
        elif op == "mpu":
            self.open_uploads[record[1]] = record[2]
        elif op == "mpu-end":
            self.open_uploads.pop(record[1], None)

    # ---- recording -----------------------------------------------------------------------
    def _record(self, record: list[Any]) -> None:
        self._apply(record)
        self._dirty = True
        if self._journal is None:
            self._journal = open(self.journal_path, "a")  # noqa: SIM115 - kept open for the sync
        # Flushed at most every 50 ms: what is flushed survives the process being killed
        # (page cache), which is the failure resume is for; a record lost in the last 50 ms
        # only costs a re-check (equal content is adopted, never re-sent). The snapshot at
        # commit is fsynced.
        self._journal.write(_encode_record(record) + "\n")
        now = time.monotonic()
        if now - self._flushed_at >= JOURNAL_FLUSH_SECONDS:
            self._journal.flush()
            self._flushed_at = now

    def set_base(self, path: str, entry: BaseEntry) -> None:
        self._record(["set", path, *_base_fields(entry)])

    def drop_base(self, path: str) -> None:
        if path in self.base:
            self._record(["del", path])

    def set_hash(self, path: str, entry: HashCacheEntry) -> None:
        if self.hash_cache.get(path) != entry:
            self._record(["hash", path, *entry])

    def replace_hash_cache(self, entries: dict[str, HashCacheEntry]) -> None:
        """After a scan: the cache is exactly what the scan saw (no journal: derivable)."""
        if entries != self.hash_cache:
            self.hash_cache = entries
            self._dirty = True

    def upload_started(self, upload_id: str, key: str) -> None:
        self._record(["mpu", upload_id, key])

    def upload_ended(self, upload_id: str) -> None:
        self._record(["mpu-end", upload_id])

    # ---- committing ----------------------------------------------------------------------
    def commit(self) -> bool:
        """Write the snapshot atomically and empty the journal. False if nothing changed."""
        self.close_journal()
        if not self._dirty:
            return False
        data = {
            "version": FORMAT_VERSION,
            "remote": self.remote_url,
            "local_dir": self.local_dir,
            "written": time.time(),
            "base": {p: _base_fields(e) for p, e in self.base.items()},
            "hashes": self.hash_cache,
            "open_uploads": self.open_uploads,
        }
        tmp = self.snapshot_path.with_name(f"state.json.tmp-{os.getpid()}")
        with open(tmp, "w") as handle:
            json.dump(data, handle, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.snapshot_path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.journal_path.unlink(missing_ok=True)
        self._dirty = False
        return True

    def close_journal(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None


# One encoder for every journal line: json.dumps with any option builds a new one per call
# (a third of the journal's cost at two records per file).
_encode_record = json.JSONEncoder(separators=(",", ":")).encode


def _base_fields(entry: BaseEntry) -> list[Any]:
    return [entry.size, entry.hash, list(entry.etags), entry.executable, entry.last_modified]


def _base_entry(fields: list[Any]) -> BaseEntry:
    size, digest, etags, *rest = fields
    executable = bool(rest[0]) if rest else False
    last_modified = str(rest[1]) if len(rest) > 1 else ""
    return BaseEntry(size, digest, tuple(etags), executable, last_modified)
