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

import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.core.backup import (
    BACKUP_DIR,
    BackupMode,
    Entry,
    Skipped,
    Step,
    StepKind,
    SyncRecord,
    UndoReport,
    Version,
    format_utc,
    is_bookkeeping,
    new_sync_id,
    restore_steps,
    restore_targets,
    sync_id_time,
    undo_steps,
    versions_at,
)
from sidecar.core.model import BaseEntry
from sidecar.engine.backup import BackupFailed, History, LocalBackup, RemoteBackup, new_record
from sidecar.engine.folder import Folder, UnsafeFolder
from sidecar.engine.hashing import content_hash_file
from sidecar.s3 import S3Error, Store, read_labels

if TYPE_CHECKING:
    from sidecar.engine.sync import SyncEngine


async def undo(engine: SyncEngine, sync_id: str, *, dry_run: bool, force: bool) -> UndoReport:
    store = await engine.store()
    report = UndoReport("undo", sync_id, dry_run=dry_run)
    history = History(store, engine.config.prefix, engine.state.directory)
    try:
        record = await history.find(sync_id)
    except (S3Error, OSError, ValueError) as exc:
        report.fatal = f"cannot read the record of sync {sync_id}: {exc}"
        return report
    if record is None:
        report.fatal = (
            f"no sync {sync_id} in the history of {engine.config.remote_url} or of this "
            "state folder (sidecar history lists them)"
        )
        return report
    side = record.side
    current = await _current(engine, store, [e.path for e in record.entries], side)
    steps, skipped = undo_steps(record, current, force)
    report.skipped.extend(skipped)
    await _apply(engine, store, side, steps, report, "undo", undoes=sync_id)
    return report


async def restore(
    engine: SyncEngine, path: str, at: datetime, *, local: bool, dry_run: bool
) -> UndoReport:
    store = await engine.store()
    side = "local" if local else "remote"
    report = UndoReport("restore", f"{path or '.'} at {format_utc(at)}", dry_run=dry_run)
    history = History(store, engine.config.prefix, engine.state.directory)
    try:
        ids = await history.remote_ids() if side == "remote" else history.local_ids()
        records: list[SyncRecord] = []
        for sync_id in sorted(ids):
            started = sync_id_time(sync_id)
            # A sync's record is written when it ends, after its id was taken: one that
            # started before `at` may have written after it.
            if started is not None and (at - started).total_seconds() < 24 * 3600:
                records.append(await history.read(sync_id, side))
        if side == "remote":
            records += await _unrecorded(store, engine.config.prefix, set(ids))
    except (S3Error, OSError, ValueError) as exc:
        report.fatal = f"cannot read the history: {exc}"
        return report
    targets = restore_targets(records, path, at)
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
    steps: list[Step],
    report: UndoReport,
    operation: str,
    undoes: str | None = None,
) -> None:
    if dry_run_only(report, steps):
        return
    sync_id = new_sync_id(datetime.now(UTC))
    report.sync_id = sync_id
    config = engine.config
    if side == "remote":
        mode = await engine.remote_backup_mode()
        remote_backup = RemoteBackup(store, config.prefix, mode, sync_id, engine.remote_backup_mode)
        backup: RemoteBackup | LocalBackup = remote_backup
        for step in steps:
            await _remote_step(store, config.prefix, remote_backup, step, report)
        _point_base_at_folder(engine, [e.path for e in backup.entries])
        await engine.commit_state()
        backup_name = str(mode)
    else:
        backup = LocalBackup(
            engine.state.directory / "backup", sync_id, engine.local_backup_renames()
        )
        folder = Folder(str(config.local_dir))
        try:
            for step in steps:
                _local_step(folder, engine.state.directory / "backup", backup, step, report)
        finally:
            folder.close()
        backup_name = "local"
    if not backup.entries:
        report.sync_id = None
        return
    record = new_record(
        sync_id,
        operation,
        side,
        config.remote_url,
        str(config.local_dir),
        backup_name,
        backup.entries,
        undoes=undoes,
    )
    try:
        await History(store, config.prefix, engine.state.directory).write(record)
    except (S3Error, OSError) as exc:
        report.errors.append(Skipped(f".netvol/history/{sync_id}", f"not written: {exc}"))


def dry_run_only(report: UndoReport, steps: list[Step]) -> bool:
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


def _point_base_at_folder(engine: SyncEngine, paths: list[str]) -> None:
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
