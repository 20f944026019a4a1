"""Undo one sync, restore a path as of a time, read the history (issue 14): the edges.

The steps come from sidecar/core/backup.py (undo_steps, restore_targets, restore_steps);
here they are carried out. Each undo or restore is a sync of its own, with its own id, its
own backups of what it replaces or removes, and its own history record: undo it to redo.

- Bucket side (a finalize): a path is put back by a server-side copy from its backup copy or
  its kept version; a path the sync created is deleted (kept first). Then BASE says that each
  such path holds what the local folder holds now: the next finalize does not push the undone
  state back, and the next pull brings the restored bytes into the folder.
- Folder side (a pull): the backup file is renamed back into place (the file there now kept
  first). BASE is left as it is: the restored files are local changes to the next sync.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING

from sidecar.core.backup import (
    BACKUP_DIR,
    BackupMode,
    Entry,
    RestoreTargets,
    Skipped,
    Step,
    StepKind,
    SyncRecord,
    UndoReport,
    Version,
    format_utc,
    is_bookkeeping,
    new_sync_id,
    restore_order,
    restore_steps,
    sync_id_time,
    undo_step,
    versions_at,
)
from sidecar.core.model import BaseEntry
from sidecar.engine.backup import BackupFailed, LocalBackup, RemoteBackup
from sidecar.engine.folder import Folder, UnsafeFolder
from sidecar.engine.hashing import content_hash_file
from sidecar.engine.history import History, RecordSpool, record_header
from sidecar.s3 import S3Error, Store, read_labels

if TYPE_CHECKING:
    from sidecar.engine.sync import SyncEngine

_DECIDE_BATCH = 1000  # entries an undo reads what their paths hold for at a time


async def undo(engine: SyncEngine, sync_id: str, *, dry_run: bool, force: bool) -> UndoReport:
    """Two passes, so that a record of any size is never held: every path's step is decided
    (from what it holds now) as the record streams by and kept in a scratch file; then the
    steps are carried out. Nothing is touched before the whole record was read."""
    store = await engine.store()
    report = UndoReport("undo", sync_id, dry_run=dry_run)
    history = History(store, engine.config.prefix, engine.state.directory)
    side = "local" if sync_id in history.local_ids() else "remote"
    with tempfile.TemporaryFile(prefix="undo-steps-", dir=engine.state.directory) as steps:
        async with contextlib.AsyncExitStack() as opened:
            try:
                record, entries = await opened.enter_async_context(history.open(sync_id, side))
                await _decide(engine, store, record, entries, force, steps, report)
            except S3Error as exc:
                if not exc.not_found:
                    raise
                report.fatal = (
                    f"no sync {sync_id} in the history of {engine.config.remote_url} or of "
                    "this state folder (sidecar history lists them)"
                )
                return report
            except (OSError, ValueError) as exc:
                report.fatal = f"cannot read the record of sync {sync_id}: {exc}"
                return report
        steps.seek(0)
        decided = (Step.from_line(line) for line in steps)
        await _apply(engine, store, record.side, decided, report, "undo", undoes=sync_id)
    return report


async def _decide(
    engine: SyncEngine,
    store: Store,
    record: SyncRecord,
    entries: Iterator[Entry],
    force: bool,
    steps: IO[bytes],
    report: UndoReport,
) -> None:
    """Each entry's step into `steps` (a line each), what is skipped into the report; a
    batch of entries at a time (what their paths hold now, then their steps)."""
    while batch := list(itertools.islice(entries, _DECIDE_BATCH)):
        current = await _current(engine, store, [e.path for e in batch], record.side)
        for entry in batch:
            step = undo_step(record.sync_id, entry, current.get(entry.path), force)
            if isinstance(step, Skipped):
                report.skipped.append(step)
            elif step is not None:
                steps.write(step.to_line())


async def restore(
    engine: SyncEngine, path: str, at: datetime, *, local: bool, dry_run: bool
) -> UndoReport:
    store = await engine.store()
    side = "local" if local else "remote"
    report = UndoReport("restore", f"{path or '.'} at {format_utc(at)}", dry_run=dry_run)
    history = History(store, engine.config.prefix, engine.state.directory)
    try:
        targets = await _restore_targets(engine, store, history, side, path, at)
    except (S3Error, OSError, ValueError) as exc:
        report.fatal = f"cannot read the history: {exc}"
        return report
    if side == "remote" and await engine.remote_backup_mode() is BackupMode.VERSIONS:
        try:
            listed = await store.list_versions(engine.config.prefix + path)
        except S3Error as exc:
            report.fatal = f"cannot list the object versions: {exc}"
            return report
        start = len(engine.config.prefix)
        inside = [
            (v.key[start:], v.version_id, v.last_modified, v.etag, v.size, v.delete_marker)
            for v in listed
            if _inside(v.key[start:], path) and not is_bookkeeping(v.key[start:])
        ]
        # The bucket's versions know every writer's changes, not only recorded syncs'.
        targets.update(versions_at(inside, at))
    current = await _current(engine, store, list(targets), side)
    steps, skipped = restore_steps(targets, current)
    report.skipped.extend(skipped)
    await _apply(engine, store, side, steps, report, "restore")
    return report


async def _restore_targets(
    engine: SyncEngine, store: Store, history: History, side: str, path: str, at: datetime
) -> dict[str, Version | None]:
    """What each path under `path` held at `at`, by the records written since: their
    headers first (to order them), then each one's entries as a stream. Holds the paths
    under `path` that changed, never a whole record."""
    remote = side == "remote"
    sizes = await history.remote_sizes() if remote else dict.fromkeys(history.local_ids(), 0)
    headers: list[SyncRecord] = []
    for sync_id in sorted(sizes):
        started = sync_id_time(sync_id)
        # A sync's record is written when it ends, after its id was taken: one that
        # started before `at` may have written after it.
        if started is not None and (at - started).total_seconds() < 24 * 3600:
            headers.append(await history.header(sync_id, side, sizes[sync_id]))
    unrecorded = await _unrecorded(store, engine.config.prefix, set(sizes)) if remote else []
    targets = RestoreTargets(path, at)
    for record in restore_order(headers + unrecorded):
        if not targets.after(record):
            continue
        if record.entries:  # an interrupted sync's, from its backup copies
            targets.add(record.entries)
            continue
        async with history.open(record.sync_id, side) as (_header, entries):
            targets.add(entries)
    return targets.found


async def history(engine: SyncEngine, limit: int | None) -> tuple[list[SyncRecord], list[str]]:
    store = await engine.store()
    return await History(store, engine.config.prefix, engine.state.directory).records(limit)


async def _unrecorded(store: Store, prefix: str, recorded: set[str]) -> list[SyncRecord]:
    """Syncs that kept backups but wrote no record (killed mid-way): their backup copies, as
    records dated by the sync's start."""
    start = prefix + BACKUP_DIR
    found: dict[str, list[Entry]] = {}
    async for page in store.list(start):
        for item in page:
            sync_id, _, path = item.key[len(start) :].partition("/")
            if sync_id in recorded or not path or sync_id_time(sync_id) is None:
                continue
            kept = Version(item.size, etag=item.etag, key=item.key)
            found.setdefault(sync_id, []).append(Entry(path, kept, None))
    return [
        SyncRecord(
            sync_id,
            format_utc(sync_id_time(sync_id) or datetime.now(UTC)),
            "interrupted",
            "remote",
            "",
            "",
            "",
            "copy",
            entries,
        )
        for sync_id, entries in found.items()
    ]


def _inside(relpath: str, folder: str) -> bool:
    folder = folder.rstrip("/")
    return not folder or relpath == folder or relpath.startswith(folder + "/")


# ---- what the paths hold now ------------------------------------------------------------


async def _current(
    engine: SyncEngine, store: Store, paths: list[str], side: str
) -> dict[str, Version | None]:
    if side == "local":
        return {p: _local_version(engine.config.local_dir, p) for p in paths}
    found: dict[str, Version | None] = {}
    for path in paths:
        try:
            info, _version = await store.head_version(engine.config.prefix + path)
        except S3Error as exc:
            if not exc.not_found:
                raise
            found[path] = None
            continue
        labels = read_labels(info.metadata)
        found[path] = Version(info.size, labels.hash or "", info.etag, labels.executable)
    return found


def _local_version(root: Path, path: str) -> Version | None:
    full = root / path
    try:
        st = os.lstat(full)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return Version(st.st_size, "not a regular file")
    try:
        digest = content_hash_file(str(full))
    except OSError:
        digest = ""
    return Version(st.st_size, digest, executable=bool(st.st_mode & 0o100))


# ---- carrying the steps out -------------------------------------------------------------


async def _apply(
    engine: SyncEngine,
    store: Store,
    side: str,
    steps: Iterable[Step],
    report: UndoReport,
    operation: str,
    undoes: str | None = None,
) -> None:
    if dry_run_only(report, steps):
        return
    sync_id = new_sync_id(datetime.now(UTC))
    report.sync_id = sync_id
    spool = RecordSpool(engine.state.directory)
    try:
        await _carry_out(engine, store, side, steps, report, sync_id, spool)
        if not spool:
            report.sync_id = None
            return
        config = engine.config
        backup_name = "local" if side == "local" else str(await engine.remote_backup_mode())
        header = record_header(
            sync_id,
            operation,
            side,
            config.remote_url,
            str(config.local_dir),
            backup_name,
            spool.tally,
            undoes=undoes,
        )
        try:
            await History(store, config.prefix, engine.state.directory).write(header, spool)
        except (S3Error, OSError) as exc:
            report.errors.append(Skipped(f".netvol/history/{sync_id}", f"not written: {exc}"))
    finally:
        spool.close()


async def _carry_out(
    engine: SyncEngine,
    store: Store,
    side: str,
    steps: Iterable[Step],
    report: UndoReport,
    sync_id: str,
    spool: RecordSpool,
) -> None:
    config = engine.config
    if side == "remote":
        mode = await engine.remote_backup_mode()
        backup = RemoteBackup(store, config.prefix, mode, sync_id, spool, engine.remote_backup_mode)
        for step in steps:
            await _remote_step(store, config.prefix, backup, step, report)
        _point_base_at_folder(engine, spool.paths())
        await engine.commit_state()
        return
    local = LocalBackup(
        engine.state.directory / "backup", sync_id, engine.local_backup_renames(), spool
    )
    folder = Folder(str(config.local_dir))
    try:
        for step in steps:
            _local_step(folder, engine.state.directory / "backup", local, step, report)
    finally:
        folder.close()


def dry_run_only(report: UndoReport, steps: Iterable[Step]) -> bool:
    if not report.dry_run:
        return False
    for step in steps:
        (report.put_back if step.kind is StepKind.PUT_BACK else report.removed).append(step.path)
    return True


async def _remote_step(
    store: Store, prefix: str, backup: RemoteBackup, step: Step, report: UndoReport
) -> None:
    key = prefix + step.path
    now = step.current
    try:
        if now is not None and backup.mode is not BackupMode.OFF:
            await backup.keep(step.path, key, now.etag, now.size, now.hash, now.executable)
        if step.kind is StepKind.PUT_BACK:
            target = step.target
            assert target is not None
            written = await store.copy_object(
                target.key or key, key, version_id=target.version_id or None, size=target.size
            )
            after = Version(target.size, target.hash, written.etag, target.executable)
            backup.done(step.path, after)
            report.put_back.append(step.path)
        else:
            assert now is not None
            await store.delete(key, if_match=now.etag or None)
            backup.done(step.path, None)
            report.removed.append(step.path)
    except BackupFailed as exc:
        report.errors.append(Skipped(step.path, exc.reason))
    except S3Error as exc:
        report.errors.append(Skipped(step.path, exc.message))


def _point_base_at_folder(engine: SyncEngine, paths: Iterable[str]) -> None:
    """BASE of each path the bucket side undo changed: what the folder holds now. The
    folder's file is then unchanged to the next sync (a finalize does not push it back over
    the restored object) and the bucket's is changed (a pull brings it)."""
    state = engine.state
    for path in paths:
        version = _local_version(engine.config.local_dir, path)
        if version is None or version.hash in ("", "not a regular file"):
            state.drop_base(path)
        else:
            state.set_base(path, BaseEntry(version.size, version.hash, (), version.executable))


def _local_step(
    folder: Folder, backup_root: Path, backup: LocalBackup, step: Step, report: UndoReport
) -> None:
    parent, _, name = step.path.rpartition("/")
    try:
        dir_fd = folder.open_dir(parent, create=step.kind is StepKind.PUT_BACK)
    except (OSError, UnsafeFolder) as exc:
        report.errors.append(Skipped(step.path, f"cannot open its folder: {exc}"))
        return
    try:
        if step.current is not None and not backup.keep(step.path, dir_fd, name, None):
            os.unlink(name, dir_fd=dir_fd)
        if step.kind is StepKind.PUT_BACK:
            target = step.target
            assert target is not None
            source = backup_root / target.local
            if backup.same_filesystem:
                os.rename(source, name, dst_dir_fd=dir_fd)
            else:
                _copy_into(source, dir_fd, name)
            backup.done(step.path, Version(target.size, target.hash, "", target.executable))
            report.put_back.append(step.path)
        else:
            backup.done(step.path, None)
            report.removed.append(step.path)
    except OSError as exc:
        report.errors.append(Skipped(step.path, f"{exc.strerror or exc}"))
    finally:
        os.close(dir_fd)


def _copy_into(source: Path, dir_fd: int, name: str) -> None:
    st = os.stat(source)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
    with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
        while chunk := src.read(1024 * 1024):
            dst.write(chunk)
        os.fchmod(dst.fileno(), st.st_mode & 0o777)
        os.utime(dst.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
