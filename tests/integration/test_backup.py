"""Backup, history and undo of a finalize (issue 14) in-process against real servers."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sidecar.core.backup import BACKUP_DIR, HISTORY_DIR, BackupMode, SyncRecord, new_sync_id
from sidecar.core.model import Direction
from sidecar.engine.backup import RemoteBackup
from sidecar.engine.sync import SyncEngine
from sidecar.s3 import ClientSettings, ObjectStore
from tests.conftest import S3Server
from tests.support.engine_support import config, first_arguments, write

PULL, FIN = Direction.PULL, Direction.FINALIZE


def objects(server: S3Server, bucket: str, prefix: str = "vol/") -> dict[str, bytes]:
    client = server.client()
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            found[item["Key"][len(prefix) :]] = body
    return found


def data(found: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in found.items() if not k.startswith(".netvol/")}


async def run(engine: SyncEngine, direction: Direction, **kwargs: Any):  # type: ignore[no-untyped-def]
    result = await engine.run(direction, **kwargs)
    assert result.ok, result.as_dict()
    return result


async def finalize_undo_redo(server: S3Server, workdir: Path, backup: str) -> list[Any]:
    """The issue's scenario: finalize v1; modify a, delete b, add c, finalize; history lists
    it; undo brings a back to v1, restores b, removes c; undo of the undo restores the edit.
    Returns the history records, newest first."""
    bucket = server.new_bucket()
    local = workdir / "local"
    write(local / "a.txt", b"a version 1")
    write(local / "dir/b.txt", b"b version 1")
    cfg = config(bucket, local, workdir / "state", backup=BackupMode(backup))
    async with SyncEngine(cfg) as engine:
        first = await run(engine, FIN)
        assert first.sync_id is not None  # it created two objects
        write(local / "a.txt", b"a version 2, longer")
        (local / "dir/b.txt").unlink()
        write(local / "c.txt", b"c new")
        second = await run(engine, FIN)
        sync_id = second.sync_id
        assert sync_id is not None
        assert data(objects(server, bucket)) == {"a.txt": b"a version 2, longer", "c.txt": b"c new"}

        records, problems = await engine.history()
        assert not problems
        assert [r.sync_id for r in records] == [sync_id, first.sync_id]
        newest = records[0].summary()
        assert (newest["operation"], newest["uploaded"], newest["replaced"], newest["deleted"]) == (
            "finalize",
            1,
            1,
            1,
        )
        assert newest["bytes"] == len(b"a version 2, longer") + len(b"c new")

        # .netvol/ is invisible: a pull brings none of it, a finalize deletes none of it.
        assert (await run(engine, PULL)).files_transferred == 0
        assert not (local / ".netvol").exists()

        dry = await engine.undo(sync_id, dry_run=True)
        assert dry.ok and sorted(dry.put_back) == ["a.txt", "dir/b.txt"]
        assert dry.removed == ["c.txt"]
        assert data(objects(server, bucket)) == {"a.txt": b"a version 2, longer", "c.txt": b"c new"}

        undone = await engine.undo(sync_id)
        assert undone.ok, undone.as_dict()
        assert data(objects(server, bucket)) == {
            "a.txt": b"a version 1",
            "dir/b.txt": b"b version 1",
        }
        # BASE was updated: the next finalize does not push the undone state back ...
        again = await run(engine, FIN)
        assert (again.files_transferred, again.files_deleted) == (0, 0)
        assert data(objects(server, bucket))["a.txt"] == b"a version 1"

        # ... and the undo is undoable: its own backups put the edit back.
        assert undone.sync_id is not None
        redone = await engine.undo(undone.sync_id)
        assert redone.ok, redone.as_dict()
        assert data(objects(server, bucket)) == {"a.txt": b"a version 2, longer", "c.txt": b"c new"}
        records, _ = await engine.history()
        assert [r.operation for r in records[:2]] == ["undo", "undo"]
        assert records[0].undoes == undone.sync_id
        return records


async def test_finalize_backup_history_undo_and_redo(server: S3Server, workdir: Path) -> None:
    """Copy mode (rclone has no versioning; moto's bucket here is not versioned)."""
    records = await finalize_undo_redo(server, workdir, "auto")
    stored = objects(server, records[0].remote.split("/")[2])
    edit = records[2]  # the finalize that modified a, deleted b, added c
    assert edit.backup == "copy"
    assert stored[f"{BACKUP_DIR}{edit.sync_id}/a.txt"] == b"a version 1"
    assert stored[f"{BACKUP_DIR}{edit.sync_id}/dir/b.txt"] == b"b version 1"
    assert f"{HISTORY_DIR}{edit.sync_id}.json" in stored


async def test_versioned_bucket_records_versions_instead_of_copying(
    conditional: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto on a versioned bucket (moto, SeaweedFS): the replaced version's id is recorded,
    nothing is copied, and undo copies that version back."""
    original = conditional.new_bucket

    def versioned_bucket() -> str:
        name = original()
        conditional.client().put_bucket_versioning(
            Bucket=name, VersioningConfiguration={"Status": "Enabled"}
        )
        return name

    monkeypatch.setattr(conditional, "new_bucket", versioned_bucket)
    records = await finalize_undo_redo(conditional, workdir, "auto")
    edit = records[2]
    assert edit.backup == "versions"
    stored = objects(conditional, edit.remote.split("/")[2])
    whole = SyncRecord.from_json(stored[f"{HISTORY_DIR}{edit.sync_id}.json"])
    befores = {e.path: e.before for e in whole.entries if e.before is not None}
    assert set(befores) == {"a.txt", "dir/b.txt"}
    assert all(b.version_id and not b.key for b in befores.values())
    assert not any(k.startswith(BACKUP_DIR) for k in stored)


async def test_undo_skips_a_path_changed_since_unless_forced(moto: S3Server, workdir: Path) -> None:
    bucket = moto.new_bucket()
    local = workdir / "local"
    write(local / "a.txt", b"one")
    write(local / "b.txt", b"bee")
    cfg = config(bucket, local, workdir / "state", backup=BackupMode.COPY)
    async with SyncEngine(cfg) as engine:
        await run(engine, FIN)
        write(local / "a.txt", b"two")
        write(local / "b.txt", b"bee 2")
        sync_id = (await run(engine, FIN)).sync_id
        assert sync_id is not None
        moto.client().put_object(Bucket=bucket, Key="vol/a.txt", Body=b"someone else")

        report = await engine.undo(sync_id)
        assert [s.path for s in report.skipped] == ["a.txt"]
        assert "changed since sync" in report.skipped[0].reason
        assert report.put_back == ["b.txt"]
        assert data(objects(moto, bucket))["a.txt"] == b"someone else"

        forced = await engine.undo(sync_id, force=True)
        assert forced.put_back == ["a.txt"]
        assert data(objects(moto, bucket))["a.txt"] == b"one"


async def test_backup_off_keeps_nothing(moto: S3Server, workdir: Path) -> None:
    bucket = moto.new_bucket()
    local = workdir / "local"
    write(local / "a.txt", b"one")
    cfg = config(bucket, local, workdir / "state", backup=BackupMode.OFF)
    async with SyncEngine(cfg) as engine:
        await run(engine, FIN)
        write(local / "a.txt", b"two")
        result = await run(engine, FIN)
    assert result.sync_id is None
    assert set(objects(moto, bucket)) == {"a.txt"}


async def test_pull_keeps_replaced_and_deleted_files_and_undo_puts_them_back(
    moto: S3Server, workdir: Path
) -> None:
    bucket = moto.new_bucket()
    s3 = moto.client()
    s3.put_object(Bucket=bucket, Key="vol/a.txt", Body=b"a one")
    s3.put_object(Bucket=bucket, Key="vol/sub/b.txt", Body=b"b one")
    local, state = workdir / "local", workdir / "state"
    cfg = config(bucket, local, state, backup=BackupMode.AUTO)
    async with SyncEngine(cfg) as engine:
        await run(engine, PULL)
        a_inode = (local / "a.txt").stat().st_ino
        s3.put_object(Bucket=bucket, Key="vol/a.txt", Body=b"a two from another replica")
        s3.delete_object(Bucket=bucket, Key="vol/sub/b.txt")
        s3.put_object(Bucket=bucket, Key="vol/c.txt", Body=b"c")
        pulled = await run(engine, PULL)
        sync_id = pulled.sync_id
        assert sync_id is not None
        kept = engine.state.directory / "backup" / sync_id
        assert (kept / "a.txt").read_bytes() == b"a one"
        assert (kept / "a.txt").stat().st_ino == a_inode  # moved, not copied
        assert (kept / "sub/b.txt").read_bytes() == b"b one"

        records, _ = await engine.history()
        assert records[0].sync_id == sync_id and records[0].side == "local"
        summary = records[0].summary()
        assert (summary["uploaded"], summary["replaced"], summary["deleted"]) == (1, 1, 1)

        undone = await engine.undo(sync_id)
        assert undone.ok, undone.as_dict()
        assert (local / "a.txt").read_bytes() == b"a one"
        assert (local / "sub/b.txt").read_bytes() == b"b one"
        assert not (local / "c.txt").exists()
        assert undone.sync_id is not None
        redone = await engine.undo(undone.sync_id)
        assert redone.ok, redone.as_dict()
        assert (local / "a.txt").read_bytes() == b"a two from another replica"
        assert not (local / "sub/b.txt").exists()
        assert (local / "c.txt").read_bytes() == b"c"


async def test_restore_a_path_as_it_was_at_a_time(moto: S3Server, workdir: Path) -> None:
    bucket = moto.new_bucket()
    local = workdir / "local"
    write(local / "d/x.txt", b"x one")
    write(local / "d/y.txt", b"y one")
    write(local / "z.txt", b"z one")
    cfg = config(bucket, local, workdir / "state", backup=BackupMode.COPY)
    async with SyncEngine(cfg) as engine:
        await run(engine, FIN)
        await asyncio.sleep(1.1)  # history times are to the second
        moment = datetime.now(UTC)
        await asyncio.sleep(1.1)
        write(local / "d/x.txt", b"x two")
        (local / "d/y.txt").unlink()
        write(local / "d/new.txt", b"new")
        write(local / "z.txt", b"z two")
        await run(engine, FIN)
        write(local / "d/x.txt", b"x three")
        await run(engine, FIN)

        report = await engine.restore("d", moment)
        assert report.ok, report.as_dict()
        assert data(objects(moto, bucket)) == {
            "d/x.txt": b"x one",
            "d/y.txt": b"y one",
            "z.txt": b"z two",  # outside the restored folder
        }


async def test_a_copy_above_the_single_copy_limit_goes_in_parts(moto: S3Server) -> None:
    bucket = moto.new_bucket()
    moto.client().put_object(
        Bucket=bucket, Key="big", Body=b"0123456789" * 1_200_000, Metadata={"k": "v"}
    )
    etag = moto.client().head_object(Bucket=bucket, Key="big")["ETag"].strip('"')
    async with ObjectStore(bucket, ClientSettings(concurrency=4)) as store:
        store.copy_part_threshold = 5 * 1024**2
        await store.copy_object("big", "copy", if_match=etag, size=12_000_000)
    copied = moto.client().get_object(Bucket=bucket, Key="copy")
    assert copied["Body"].read() == b"0123456789" * 1_200_000
    assert copied["Metadata"] == {"k": "v"}


async def test_expired_backups_and_history_are_pruned_at_the_end_of_a_sync(
    moto: S3Server, workdir: Path
) -> None:
    bucket = moto.new_bucket()
    s3 = moto.client()
    local, state = workdir / "local", workdir / "state"
    write(local / "a.txt", b"one")
    cfg = config(bucket, local, state, backup=BackupMode.COPY)
    async with SyncEngine(cfg) as engine:
        await run(engine, FIN)
        write(local / "a.txt", b"two")
        replaced = (await run(engine, FIN)).sync_id
        s3.put_object(Bucket=bucket, Key="vol/a.txt", Body=b"three")
        pulled = (await run(engine, PULL)).sync_id
    assert (state_folder := next(state.iterdir()) / "backup" / str(pulled)).is_dir()
    assert any(k.startswith(f"{BACKUP_DIR}{replaced}/") for k in objects(moto, bucket))

    # Within retention nothing goes; with none left, the next sync removes the old ones.
    async with SyncEngine(config(bucket, local, state, backup=BackupMode.COPY)) as engine:
        await run(engine, PULL)
    assert state_folder.is_dir()
    expiring = config(bucket, local, state, backup=BackupMode.COPY, backup_retention=0.0)
    async with SyncEngine(expiring) as engine:
        await run(engine, PULL)
    assert not any(k.startswith(".netvol/") for k in objects(moto, bucket))
    assert not state_folder.exists()
    assert not list((state_folder.parent.parent / "history").iterdir())


async def test_a_racing_writers_version_is_never_filed_as_ours(
    conditional: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer replaces the object between our listing and our backup copy: the copy
    is pinned to the listed ETag (a 412, or, where the server ignores the pin, a copy whose
    ETag is not the listed one): the path is reported, the racer's object stays current."""
    bucket = conditional.new_bucket()
    local = workdir / "local"
    write(local / "a.txt", b"ours one")
    cfg = config(bucket, local, workdir / "state", backup=BackupMode.COPY)
    original = RemoteBackup.keep

    async def racing_keep(self: RemoteBackup, path: str, key: str, *args: Any) -> Any:
        conditional.client().put_object(Bucket=bucket, Key=key, Body=b"the racer's")
        return await original(self, path, key, *args)

    async with SyncEngine(cfg) as engine:
        await run(engine, FIN)
        write(local / "a.txt", b"ours two")
        monkeypatch.setattr(RemoteBackup, "keep", racing_keep)
        result = await engine.run(FIN)
    assert [e.path for e in result.errors] == ["a.txt"]
    assert "changed in the bucket" in result.errors[0].reason
    stored = objects(conditional, bucket)
    assert data(stored) == {"a.txt": b"the racer's"}
    assert not [k for k in stored if k.startswith(BACKUP_DIR)], "a backup filed as ours"


async def test_state_on_another_filesystem_keeps_copies_and_says_so(
    moto: S3Server, workdir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    if os.stat(state).st_dev == os.stat(workdir).st_dev:
        pytest.skip("no second filesystem here (workdir is not on tmpfs)")
    bucket = moto.new_bucket()
    s3 = moto.client()
    s3.put_object(Bucket=bucket, Key="vol/a.txt", Body=b"a one")
    local = workdir / "local"
    async with SyncEngine(config(bucket, local, state, backup=BackupMode.AUTO)) as engine:
        await run(engine, PULL)
        s3.put_object(Bucket=bucket, Key="vol/a.txt", Body=b"a two")
        sync_id = (await run(engine, PULL)).sync_id
        assert "on another filesystem" in caplog.text
        assert (engine.state.directory / "backup" / str(sync_id) / "a.txt").read_bytes() == b"a one"
        undone = await engine.undo(str(sync_id))
        assert undone.ok, undone.as_dict()
    assert (local / "a.txt").read_bytes() == b"a one"


async def test_restore_in_a_versioned_bucket_also_undoes_other_writers(
    conditional: S3Server, workdir: Path
) -> None:
    """Changes made by another tool have no history record; the bucket's versions have them."""
    bucket = conditional.new_bucket()
    s3 = conditional.client()
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    local = workdir / "local"
    write(local / "a.txt", b"a one")
    write(local / "b.txt", b"b one")
    cfg = config(bucket, local, workdir / "state", backup=BackupMode.AUTO)
    async with SyncEngine(cfg) as engine:
        await run(engine, FIN)
        await asyncio.sleep(1.1)  # LastModified is to the second on some servers
        moment = datetime.now(UTC)
        await asyncio.sleep(1.1)
        s3.put_object(Bucket=bucket, Key="vol/a.txt", Body=b"a by another tool")
        s3.delete_object(Bucket=bucket, Key="vol/b.txt")
        s3.put_object(Bucket=bucket, Key="vol/c.txt", Body=b"c by another tool")
        report = await engine.restore("", moment)
        assert report.ok, report.as_dict()
    assert data(objects(conditional, bucket)) == {"a.txt": b"a one", "b.txt": b"b one"}


async def test_a_large_listing_does_not_list_the_backup_area(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sync's listing fans out over the prefix's folders but not into .netvol/ (copy
    backups may outnumber the data); the pruner lists only its oldest page of backup/ and of
    history/, and still removes what expired."""
    bucket = moto.new_bucket()
    s3 = moto.client()
    for i in range(12):
        s3.put_object(Bucket=bucket, Key=f"vol/d{i % 3}/f{i}.txt", Body=b"data %d" % i)
    sync_ids = [new_sync_id(datetime.now(UTC)) for _ in range(6)]
    for sync_id in sync_ids:
        for i in range(10):
            s3.put_object(Bucket=bucket, Key=f"vol/{BACKUP_DIR}{sync_id}/d{i}/f.txt", Body=b"old")
    monkeypatch.setattr(ObjectStore, "list_page_keys", 5)
    listed = first_arguments(monkeypatch, ObjectStore, "_list_page")
    local, state = workdir / "local", workdir / "state"
    async with SyncEngine(config(bucket, local, state, backup=BackupMode.COPY)) as engine:
        pulled = await run(engine, PULL)
    assert pulled.files_transferred == 12 and not (local / ".netvol").exists()
    backup_area = [p for p in listed if p.startswith("vol/.netvol/")]
    # The pruner's first page of backup/ (its oldest key has not expired) and of history/.
    assert backup_area == [f"vol/{BACKUP_DIR}", f"vol/{HISTORY_DIR}"], listed
    assert len(listed) <= 12, listed  # the data's folders; 60 backup keys were ~20 more

    listed.clear()
    expiring = config(bucket, local, state, backup=BackupMode.COPY, backup_retention=0.0)
    async with SyncEngine(expiring) as engine:
        await run(engine, PULL)
    assert not any(k.startswith(".netvol/") for k in objects(moto, bucket))


async def test_one_bucket_versioning_request_however_many_objects_are_kept_at_once(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--backup auto asks GetBucketVersioning at the first object a sync keeps, once: the
    uploads that replace objects start together, and each used to ask it (10 requests for a
    finalize of 10 changed files, seen in the peer benchmark's CHANGED row)."""
    bucket = moto.new_bucket()
    local = workdir / "local"
    for i in range(10):
        write(local / f"f{i}.txt", b"version 1 of %d" % i)
    asked: list[str] = []
    original = ObjectStore.bucket_versioning

    async def spy(self: ObjectStore) -> str:
        asked.append(bucket)
        await asyncio.sleep(0.01)  # an answer takes a while: the other uploads ask meanwhile
        return await original(self)

    monkeypatch.setattr(ObjectStore, "bucket_versioning", spy)
    cfg = config(bucket, local, workdir / "state", backup=BackupMode.AUTO)
    async with SyncEngine(cfg) as engine:
        await run(engine, FIN)
        assert asked == []  # nothing replaced: nothing kept, nothing asked
        for i in range(10):
            write(local / f"f{i}.txt", b"version 2 of %d" % i)
        second = await run(engine, FIN)
    assert second.files_transferred == 10
    assert len(asked) == 1
    assert len([k for k in objects(moto, bucket) if k.startswith(f"{BACKUP_DIR}")]) == 10
