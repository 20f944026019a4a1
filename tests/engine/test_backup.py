"""Backup, history and undo of a finalize (issue 14) in-process against real servers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sidecar.core.backup import BACKUP_DIR, HISTORY_DIR
from sidecar.core.model import Direction
from sidecar.sync import SyncEngine
from tests.conftest import S3Server
from tests.engine.test_engine import config, write

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


async def test_finalize_backup_history_undo_and_redo(server: S3Server, workdir: Path) -> None:
    """finalize v1; modify a, delete b, add c, finalize; history; undo; undo of the undo."""
    bucket = server.new_bucket()
    local = workdir / "local"
    write(local / "a.txt", b"a version 1")
    write(local / "dir/b.txt", b"b version 1")
    cfg = config(bucket, local, workdir / "state", backup="copy")
    async with SyncEngine(cfg) as engine:
        first = await run(engine, FIN)
        assert first.sync_id is not None  # it created two objects
        write(local / "a.txt", b"a version 2, longer")
        (local / "dir/b.txt").unlink()
        write(local / "c.txt", b"c new")
        second = await run(engine, FIN)
        sync_id = second.sync_id
        assert sync_id is not None

        stored = objects(server, bucket)
        assert stored[f"{BACKUP_DIR}{sync_id}/a.txt"] == b"a version 1"
        assert stored[f"{BACKUP_DIR}{sync_id}/dir/b.txt"] == b"b version 1"
        assert f"{HISTORY_DIR}{sync_id}.json" in stored
        assert data(stored) == {"a.txt": b"a version 2, longer", "c.txt": b"c new"}

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


async def test_undo_skips_a_path_changed_since_unless_forced(moto: S3Server, workdir: Path) -> None:
    bucket = moto.new_bucket()
    local = workdir / "local"
    write(local / "a.txt", b"one")
    write(local / "b.txt", b"bee")
    cfg = config(bucket, local, workdir / "state", backup="copy")
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
    cfg = config(bucket, local, workdir / "state", backup="off")
    async with SyncEngine(cfg) as engine:
        await run(engine, FIN)
        write(local / "a.txt", b"two")
        result = await run(engine, FIN)
    assert result.sync_id is None
    assert set(objects(moto, bucket)) == {"a.txt"}
