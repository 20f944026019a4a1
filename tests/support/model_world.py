"""The world the model-based test (test_model_based.py) acts on, and its invariants.

One replica (a local folder, a state dir, an in-process SyncEngine on its own event loop) and
an outside writer (boto3: another replica with our metadata, or a foreign tool without) share
one moto bucket. Versions are identified by content: every content any actor writes is
remembered by its MD5, which is the ETag of a single-part object, so one listing tells what
the bucket holds.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import shutil
import stat
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sidecar.core.backup import BackupMode, is_bookkeeping
from sidecar.core.model import Direction
from sidecar.core.options import SyncConfig
from sidecar.core.paths import TEMP_PREFIX, folders_of, parent_dirs
from sidecar.core.result import SyncResult
from sidecar.engine.hashing import content_hash_bytes
from sidecar.engine.history import History
from sidecar.engine.sync import SyncEngine
from sidecar.s3 import labels_for, read_labels
from tests.conftest import S3Server

PREFIX = "vol/"
# Few names, nested, so the same path is edited often and file<->folder clashes happen
# ('a' / 'a/q', 'd' / 'd/x', 'd/e' / 'd/e/z.py'); one name so long (242 bytes) that its
# conflict copy must be named shorter than the usual '<stem>.conflict-<UTC>.<ext>'.
LONG_NAME = "n" * 236 + ".ipynb"
PATHS = ("a", "a/q", "b.txt", "d", "d/x", "d/y.txt", "d/e/z.py", f"d/{LONG_NAME}")
CONFLICT_MARK = ".conflict-"

_runs = itertools.count()
_clients: dict[str, Any] = {}


def _client(server: S3Server) -> Any:
    """One boto3 client per server for all worlds: creating one costs ~0.1 s."""
    if server.endpoint not in _clients:
        _clients[server.endpoint] = server.client()
    return _clients[server.endpoint]


# What the runs exercised, summed over all worlds (printed by the test: a run that never
# conflicts or never deletes proves little).
STATS: Counter[str] = Counter()


@dataclass(frozen=True, slots=True)
class Listed:
    content: bytes
    etag: str
    last_modified: str

    @property
    def listed(self) -> tuple[str, str]:
        """All a listing tells about the object (besides size)."""
        return self.etag, self.last_modified


Local = dict[str, tuple[bytes, bool]]  # path -> (content, executable)
Remote = dict[str, Listed]


class SyncWorld:
    def __init__(
        self,
        server: S3Server,
        scratch: Path,
        *,
        force_delete: bool,
        backup: BackupMode = BackupMode.OFF,
    ) -> None:
        self.s3 = _client(server)
        self.bucket = f"model{os.getpid()}x{next(_runs)}"
        self.s3.create_bucket(Bucket=self.bucket)
        self.root = scratch / f"run{next(_runs)}"
        self.local = self.root / "local"
        self.local.mkdir(parents=True)
        self.config = SyncConfig(
            bucket=self.bucket,
            prefix=PREFIX,
            local_dir=self.local,
            state_dir=self.root / "state",
            concurrency=4,
            force_delete=force_delete,
            # Off as the suite (tests/conftest.py); on, each sync's backups are checked.
            backup=backup,
        )
        self.loop = asyncio.new_event_loop()
        self.engine: SyncEngine | None = None
        # What both sides last held equal, per path (the model's BASE): a content that differs
        # from it is "the newest on its side" and must survive the next sync.
        self.agreed: dict[str, bytes] = {}
        self.known: dict[str, bytes] = {}  # MD5 -> content, for every content ever written
        # Paths whose remote mode was changed by a rewrite of the same bytes dated in the
        # second of a write BASE knows: README says replicas with BASE may not see it.
        # (The listing it was made under: once the object is written again, the lag ends.)
        self.mode_may_lag: dict[str, Listed] = {}
        self.last_sync_end = 0.0  # time.time() when the last sync ended
        self._remote: Remote | None = None  # the last listing, while nothing wrote since
        self.pulled_clean = False  # an ok pull happened and no outside edit since

    # ---- lifecycle ---------------------------------------------------------------------
    def _engine(self) -> SyncEngine:
        if self.engine is None:
            self.engine = SyncEngine(self.config)
        return self.engine

    def restart_engine(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            self.loop.run_until_complete(engine.__aexit__(None, None, None))

    def close(self) -> None:
        self.restart_engine()
        self.loop.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def _remember(self, content: bytes) -> None:
        self.known[hashlib.md5(content).hexdigest()] = content

    # ---- observing both sides ------------------------------------------------------------
    def local_files(self) -> list[str]:
        return sorted(self.local_snapshot()[0])

    def local_snapshot(self) -> tuple[Local, set[str]]:
        """Files (content, executable) and folders of the local side; asserts no temp file."""
        files: Local = {}
        dirs: set[str] = set()
        for top, dirnames, filenames in os.walk(self.local):
            rel_top = os.path.relpath(top, self.local)
            for name in dirnames + filenames:
                assert not name.startswith(TEMP_PREFIX), f"temp file visible: {top}/{name}"
            for name in dirnames:
                dirs.add(name if rel_top == "." else f"{rel_top}/{name}")
            for name in filenames:
                rel = name if rel_top == "." else f"{rel_top}/{name}"
                st = os.lstat(self.local / rel)
                files[rel] = ((self.local / rel).read_bytes(), bool(st.st_mode & stat.S_IXUSR))
        return files, dirs

    def remote_paths(self) -> list[str]:
        return sorted(self.remote_snapshot())

    def remote_snapshot(self) -> Remote:
        """The bucket as last listed; listed again only if something may have written since."""
        if self._remote is None:
            self._remote = self._list_remote()
        return self._remote

    def _list_remote(self) -> Remote:
        """Objects under the prefix by one listing; asserts every object holds bytes some actor
        wrote (its ETag is a known MD5) and that no temp object is visible."""
        out: Remote = {}
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=PREFIX)
        for page in pages:
            for item in page.get("Contents", []):
                key: str = item["Key"]
                path = key[len(PREFIX) :]
                if is_bookkeeping(path):
                    continue  # backups and history: checked by _check_backups
                assert TEMP_PREFIX not in key, f"temp object visible: {key}"
                etag = item["ETag"].strip('"')
                assert etag in self.known, f"{key} holds bytes nobody wrote (ETag {etag})"
                out[path] = Listed(self.known[etag], etag, item["LastModified"].isoformat())
        return out

    def remote_modes(self, paths: list[str]) -> dict[str, bool]:
        modes = {}
        for path in paths:
            head = self.s3.head_object(Bucket=self.bucket, Key=PREFIX + path)
            modes[path] = read_labels(head.get("Metadata", {})).executable
        return modes

    # ---- local edits -----------------------------------------------------------------------
    def _clear_way(self, path: str) -> None:
        """Make room for a file at `path` as a user would: a folder there, or a file where a
        folder must be, is removed (file<->folder changes)."""
        target = self.local / path
        if target.is_dir():
            shutil.rmtree(target)
        for parent in parent_dirs(path):
            if (self.local / parent).is_file():
                (self.local / parent).unlink()
        target.parent.mkdir(parents=True, exist_ok=True)

    def local_write(self, path: str, content: bytes, executable: bool, in_place: bool) -> None:
        self._remember(content)
        self._clear_way(path)
        target = self.local / path
        if in_place or not target.exists():
            target.write_bytes(content)
        else:  # an editor's save: a new file renamed over the old one (a new inode)
            scratch = target.with_name(f".save-{target.name}")
            scratch.write_bytes(content)
            scratch.rename(target)
        target.chmod(0o755 if executable else 0o644)

    def local_delete(self, path: str) -> None:
        (self.local / path).unlink()  # the emptied folder stays, as after `rm`

    def local_chmod(self, path: str) -> None:
        target = self.local / path
        executable = bool(target.stat().st_mode & stat.S_IXUSR)
        target.chmod(0o644 if executable else 0o755)

    def local_rename(self, source: str, target: str) -> None:
        if source == target or target in parent_dirs(source) or source in parent_dirs(target):
            return  # making room for the target would remove the source itself
        self._clear_way(target)
        (self.local / source).rename(self.local / target)

    # ---- the outside writer ------------------------------------------------------------------
    def _outside_edit(self, path: str, write: Any) -> None:
        before = self.remote_snapshot().get(path)
        write()
        self._remote = None
        after = self.remote_snapshot()[path]
        self.pulled_clean = False
        # Same bytes (same ETag) rewritten with other metadata is seen by the LastModified of
        # the listing, which has whole seconds: README promises it is seen only when it is
        # dated after the second of the write BASE knows, and that write ended no later than
        # the last sync did.
        same_bytes = before is not None and before.etag == after.etag
        if same_bytes and _seconds(after.last_modified) <= int(self.last_sync_end):
            self.mode_may_lag[path] = after
        else:
            self.mode_may_lag.pop(path, None)

    def wait_for_next_second(self) -> None:
        """Wait for the second after the last sync: a rewrite from then on is dated after
        every write BASE knows."""
        wait = max(0.0, int(self.last_sync_end) + 1.01 - time.time())
        STATS["waited ms"] += int(wait * 1000)
        time.sleep(wait)

    def _metadata(self, content: bytes, executable: bool) -> dict[str, str]:
        return labels_for(content_hash_bytes(content), time.time_ns(), executable)

    def outside_put(
        self, path: str, content: bytes, our_metadata: bool, executable: bool, keep_clash: bool
    ) -> None:
        self._remember(content)
        if not keep_clash:  # a careful writer replaces a folder by a file (and back) whole
            for other in self.remote_snapshot():
                if other in parent_dirs(path) or path in parent_dirs(other):
                    self.outside_delete(other)
        metadata = self._metadata(content, executable) if our_metadata else {}

        def write() -> None:
            self.s3.put_object(
                Bucket=self.bucket, Key=PREFIX + path, Body=content, Metadata=metadata
            )

        self._outside_edit(path, write)

    def outside_delete(self, path: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=PREFIX + path)
        self._remote = None
        self.pulled_clean = False

    def outside_chmod(self, path: str) -> None:
        """Another replica's mode-only finalize: the object's metadata rewritten in place."""
        key = PREFIX + path
        content = self.remote_snapshot()[path].content
        executable = self.remote_modes([path])[path]

        def write() -> None:
            self.s3.copy_object(
                Bucket=self.bucket,
                Key=key,
                CopySource={"Bucket": self.bucket, "Key": key},
                MetadataDirective="REPLACE",
                Metadata=self._metadata(content, not executable),
            )

        self._outside_edit(path, write)

    # ---- a sync and its invariants -----------------------------------------------------------
    def _run(self, direction: Direction) -> SyncResult:
        try:
            return self.loop.run_until_complete(self._engine().run(direction))
        finally:
            self.last_sync_end = time.time()
            self._remote = None

    def sync(self, direction: Direction) -> SyncResult:
        local, local_dirs = self.local_snapshot()
        remote = self.remote_snapshot()
        newest = {(p, c) for p, (c, _) in local.items() if self.agreed.get(p) != c}
        newest |= {(p, r.content) for p, r in remote.items() if self.agreed.get(p) != r.content}

        result = self._run(direction)
        STATS[f"{direction}"] += 1
        STATS["transferred"] += result.files_transferred
        STATS["deleted"] += result.files_deleted
        STATS["conflicts"] += len(result.conflicts)
        STATS["errors"] += len(result.errors)
        STATS["deletes withheld"] += bool(result.deletes_blocked)
        summary = result.as_dict()
        context = f"{direction} -> {summary}\nbefore: local={local} remote={_contents(remote)}"
        assert result.fatal is None, context
        after, _ = self.local_snapshot()
        after_remote = self.remote_snapshot()
        context += f"\nafter: local={after} remote={_contents(after_remote)}"
        if self.config.backup is not BackupMode.OFF:
            self._check_backups(result, remote, after_remote, context)

        # Nothing lost: each newest version is at its path or in a conflict copy, either side.
        for path, content in sorted(newest):
            assert _survives(path, content, after, after_remote), (
                f"version {content!r} of {path!r} was lost\n{context}"
            )

        # Errors (and withheld deletes under --force-delete) only where the input is a clash.
        if result.errors or (result.deletes_blocked and self.config.force_delete):
            assert _clash(set(local) | set(remote), local_dirs), (
                f"errors without a file/folder clash in the input\n{context}"
            )

        # Every new conflict copy is reported by the sync that made it.
        copies_before = {p for p in set(local) | set(remote) if CONFLICT_MARK in p}
        copies_after = {p for p in set(after) | set(after_remote) if CONFLICT_MARK in p}
        reported = {c.copy for c in result.conflicts}
        unreported = copies_after - copies_before - reported
        assert not unreported, f"conflict copies not reported: {unreported}\n{context}"
        # ...and every copy it reports is there.
        missing = reported - {None} - copies_after
        assert not missing, f"reported conflict copies do not exist: {missing}\n{context}"

        if result.deletes_blocked:
            # Withheld deletes are not a finished sync, and the guard's fraction counts the
            # files this sync brought: the next one may rightly delete what this one could not.
            self._update_agreed(after, after_remote)
            self.pulled_clean = False
            return result
        moved = (
            result.files_transferred,
            result.files_deleted,
            result.files_adopted,
            result.conflicts,
        ) != (0, 0, 0, []) or (after, after_remote) != (local, remote)
        if not moved:  # this sync was a no-op re-sync already
            self._update_agreed(after, after_remote)
            self._after_sync(direction, result, after, after_remote, context)
            return result
        # A no-op re-sync moves nothing.
        again = self._run(direction)
        assert again.fatal is None, again.as_dict()
        assert (again.files_transferred, again.files_deleted, again.bytes_transferred) == (
            0,
            0,
            0,
        ), f"the re-sync moved something: {again.as_dict()}\n{context}"
        # (It may report again a conflict it could not resolve: the snapshots tell what moved.)
        assert self.local_snapshot()[0] == after, f"re-sync changed the folder\n{context}"
        assert self.remote_snapshot() == after_remote, f"re-sync changed the bucket\n{context}"

        self._update_agreed(after, after_remote)
        self._after_sync(direction, result, after, after_remote, context)
        return result

    def _check_backups(
        self, result: SyncResult, before: Remote, after: Remote, context: str
    ) -> None:
        """Every object this sync replaced or deleted is in its history record, and the
        backup the record names holds the bytes it replaced."""
        gone = {p: r for p, r in before.items() if p not in after or after[p].etag != r.etag}
        if not gone:
            return
        STATS["backups checked"] += len(gone)
        assert result.sync_id is not None, f"no sync id for replacing {sorted(gone)}\n{context}"
        record = self.loop.run_until_complete(self._record(result.sync_id))
        kept = {e.path: e.before for e in record.entries if e.before is not None}
        for path, listed in sorted(gone.items()):
            version = kept.get(path)
            assert version is not None and version.key, (
                f"{path!r} replaced without a backup in {record}\n{context}"
            )
            body = self.s3.get_object(Bucket=self.bucket, Key=version.key)["Body"].read()
            assert body == listed.content, f"backup {version.key} holds {body!r}\n{context}"

    async def _record(self, sync_id: str) -> Any:
        engine = self._engine()
        history = History(await engine.store(), PREFIX, engine.state.directory)
        return await history.read(sync_id, "remote")

    def _after_sync(
        self, direction: Direction, result: SyncResult, local: Local, remote: Remote, context: str
    ) -> None:
        if direction is Direction.PULL:
            self.pulled_clean = result.ok
        elif result.ok and self.pulled_clean and not _clash(set(remote)):
            # (A bucket holding both 'a' and 'a/q' is left as it is: no folder can equal it.)
            self._assert_equal(local, remote, context)

    def _update_agreed(self, local: Local, remote: Remote) -> None:
        for path in set(self.agreed) | set(local) | set(remote):
            here, there = local.get(path), remote.get(path)
            if here is not None and there is not None and here[0] == there.content:
                self.agreed[path] = here[0]
            elif here is None and there is None:
                self.agreed.pop(path, None)

    def _assert_equal(self, local: Local, remote: Remote, context: str) -> None:
        """After pull + finalize with no outside edit between, both sides hold the same."""
        STATS["equality checks"] += 1
        assert {p: c for p, (c, _) in local.items()} == _contents(remote), (
            f"pull + finalize left the sides different\n{context}"
        )
        modes = self.remote_modes(sorted(remote))
        lagging = {p for p, listed in self.mode_may_lag.items() if remote.get(p) == listed}
        differ = {p for p, (_, executable) in local.items() if modes[p] != executable} - lagging
        assert not differ, f"modes differ after pull + finalize: {differ}\n{context}"


def _clash(files: set[str], dirs: set[str] = frozenset()) -> bool:  # type: ignore[assignment]
    """Whether some path is a file and a folder at once (among these files and folders)."""
    return bool(files & (dirs | folders_of(files)))


def _seconds(last_modified: str) -> int:
    return int(datetime.fromisoformat(last_modified).timestamp())


def _contents(remote: Remote) -> dict[str, bytes]:
    return {p: r.content for p, r in remote.items()}


def _survives(path: str, content: bytes, local: Local, remote: Remote) -> bool:
    if local.get(path, (None,))[0] == content:
        return True
    if path in remote and remote[path].content == content:
        return True
    return any(CONFLICT_MARK in p and c == content for p, (c, _) in local.items()) or any(
        CONFLICT_MARK in p and r.content == content for p, r in remote.items()
    )
