"""History records as streams (issues 12 and 14): a first pull (or a finalize of a new tree)
of N files holds no entry per file written; records are written and read a line at a time;
records of the old format (one JSON line) are still listed, undone and restored.

Memory is measured with tracemalloc (bytes, never wall time) in a forked child, as in
tests/integration/test_scale_memory.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import sidecar.engine.history as history_module
import sidecar.engine.state as state_module
from sidecar.core import filters
from sidecar.core.backup import HISTORY_DIR, BackupMode, Entry, SyncRecord, Version, new_sync_id
from sidecar.engine.history import SPOOL_NAME, History, RecordSpool, record_header
from sidecar.engine.sync import SyncEngine
from sidecar.s3 import ClientSettings, ObjectInfo, ObjectStore
from tests.conftest import S3Server
from tests.integration.test_scale_memory import _in_forked_child
from tests.support.engine_support import FIN, PULL, config, write

BODY = b"%064d" % 7


def _path(n: int) -> str:
    return f"d{n // 1000:04d}/f{n:07d}.bin"


class _GeneratedBucket:
    """A bucket of `count` objects of 64 bytes, generated as they are asked for (listing
    pages, GETs): the test measures the sidecar, not a server."""

    def __init__(self, count: int, settings: ClientSettings) -> None:
        self.count = count
        self.settings = settings
        self.round_trip = None

    async def list(self, prefix: str, *args: Any, **kwargs: Any) -> Any:
        for start in range(0, self.count, 1000):
            yield [
                ObjectInfo(prefix + _path(n), len(BODY), f"{n:032x}", {}, "2026-12-03T10:00:00Z")
                for n in range(start, min(start + 1000, self.count))
            ]

    async def get_object(self, key: str, etag: str | None, sink: Any, *a: Any, **k: Any) -> Any:
        sink(BODY)
        return {}

    def warm(self, requests: int) -> None:
        pass


def _first_pull_peak(root: Path, count: int) -> int:
    """Traced peak (bytes) of a first pull of `count` files, backups on (its history record
    has an entry per file)."""
    cfg = config("bucket", root / "local", root / "state", backup=BackupMode.AUTO)
    engine = SyncEngine(cfg)
    bucket = _GeneratedBucket(count, engine.client_settings)

    async def store() -> Any:
        return bucket

    engine._get_store = store  # type: ignore[method-assign]

    async def run() -> Any:
        async with engine:
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                result = await engine.run(PULL)
                peak = tracemalloc.get_traced_memory()[1] - before
            finally:
                tracemalloc.stop()
            return result, peak

    result, peak = asyncio.run(run())
    assert result.ok and result.files_transferred == count, result.as_dict()
    assert result.sync_id is not None
    record = engine.state.directory / "history" / f"{result.sync_id}.json"
    whole = SyncRecord.from_json(record.read_bytes())
    assert len(whole.entries) == whole.uploaded == count
    assert not (engine.state.directory / SPOOL_NAME).exists(), "the record's spool stayed"
    return int(peak)


@_in_forked_child
def test_a_first_pull_holds_no_entry_per_file_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peak memory of a first pull grows by a few bytes per file, not by the history
    record's entry for it. Measured over first pulls of 2,000, 6,000 and 10,000 files: 916-
    1,133 B/file with the record's entries held and the record encoded whole at the end
    (~1 GiB at 1 M files; main at 08d2205); -80 to +18 B/file with the entries spooled to
    disk and the record written a line at a time."""
    # As in the plan spool's test: the filter's verdicts (a bounded cache) kept to a few,
    # and BASE's pending changes (held until FLUSH_AT) the same at the end of both runs.
    monkeypatch.setattr(filters, "VERDICTS_KEPT", 1024)
    monkeypatch.setattr(state_module, "FLUSH_AT", 512)
    small, large = 2_000, 6_000
    low = _first_pull_peak(tmp_path / "small", small)
    high = _first_pull_peak(tmp_path / "large", large)
    per_file = (high - low) / (large - small)
    assert per_file < 150, f"{per_file:.0f} B per file pulled ({low} -> {high} B peak)"


def test_the_spool_gives_entries_back_in_path_order_and_leaves_nothing(tmp_path: Path) -> None:
    """In the order records always had (Python's str order, a path's entries in sync
    order), however they came; the scratch file is gone once closed."""
    spool = RecordSpool(tmp_path)
    assert not spool and not (tmp_path / SPOOL_NAME).exists()  # no file for a no-op
    names = ["b", "a/b", "a-b", "é", "a0", "z", "a.b", "a"]
    for n, name in enumerate(names):
        spool.add(Entry(name, None, Version(n)))
    spool.add(Entry("a", Version(7), None))  # the same path again, later in the sync
    assert list(spool.paths()) == [*sorted(names)[:1], "a", *sorted(names)[1:]]
    decoded = [json.loads(line) for line in spool.lines()]
    assert [d["path"] for d in decoded] == list(spool.paths())
    assert decoded[:2] == [
        Entry("a", None, Version(names.index("a"))).as_dict(),
        Entry("a", Version(7), None).as_dict(),
    ]
    assert (spool.tally.entries, spool.tally.uploaded, spool.tally.deleted) == (9, 8, 1)
    assert (tmp_path / SPOOL_NAME).exists()
    spool.close()
    assert not (tmp_path / SPOOL_NAME).exists()


def _scratch(folder: Path, prefix: str) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith(prefix)]


def _spooled(folder: Path, count: int, width: int = 0) -> RecordSpool:
    spool = RecordSpool(folder)
    for n in range(count):
        spool.add(Entry(_path(n) + "x" * width, None, Version(n, f"{n:016x}", f"{n:032x}")))
    return spool


def _header(sync_id: str, side: str, spool: RecordSpool) -> SyncRecord:
    return record_header(sync_id, "finalize", side, "s3://b/vol/", "/data", "copy", spool.tally)


async def test_a_large_remote_record_goes_up_in_parts_and_lists_by_its_header(
    moto: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above RECORD_PART a record is one multipart upload (whole or absent, as one PUT);
    `history` reads a large record's first line only (one ranged GET), `open` streams the
    entries of a whole one."""
    monkeypatch.setattr(history_module, "RECORD_PART", 5 * 1024**2)
    bucket = moto.new_bucket()
    count = 30_000  # ~7 MiB of lines
    spool = _spooled(tmp_path, count, width=60)
    sync_id = new_sync_id(datetime.now(UTC))
    async with ObjectStore(bucket, ClientSettings(concurrency=4)) as store:
        history = History(store, "vol/", tmp_path)
        await history.write(_header(sync_id, "remote", spool), spool)
        spool.close()
        stored = moto.client().head_object(Bucket=bucket, Key=f"vol/{HISTORY_DIR}{sync_id}.json")
        assert stored["ETag"].strip('"').endswith("-2"), "one multipart upload of two parts"
        assert stored["ContentLength"] > history_module.RECORD_PART

        got: list[str] = []
        original = store.get_object

        async def counted(key: str, *args: Any, **kwargs: Any) -> Any:
            got.append(key)
            return await original(key, *args, **kwargs)

        monkeypatch.setattr(store, "get_object", counted)
        records, problems = await history.records()
        assert not problems and not got, "a large record's header came from a ranged GET"
        assert [(r.sync_id, r.uploaded, r.entries) for r in records] == [(sync_id, count, [])]
        async with history.open(sync_id, "remote") as (header, entries):
            assert header.tally.entries == count
            assert sum(1 for _ in entries) == count
        assert not _scratch(tmp_path, "record-"), "the scratch copy stayed"


async def test_a_local_record_is_renamed_into_place_whole(tmp_path: Path) -> None:
    spool = _spooled(tmp_path, 2500)
    sync_id = new_sync_id(datetime.now(UTC))
    history = History(None, "vol/", tmp_path)  # type: ignore[arg-type]  # a local record
    await history.write(_header(sync_id, "local", spool), spool)
    assert sorted(p.name for p in (tmp_path / "history").iterdir()) == [f"{sync_id}.json"]
    whole = await history.read(sync_id, "local")
    assert [e.path for e in whole.entries] == [_path(n) for n in range(2500)]
    assert whole.summary()["bytes"] == sum(range(2500))
    records, problems = await history.records(side="local")
    assert not problems and [r.sync_id for r in records] == [sync_id]


def _as_format_1(data: bytes) -> bytes:
    """The same record as format 1 wrote it: one JSON line."""
    made = SyncRecord.from_json(data)
    old = {
        "format": 1,
        **made.summary(),
        "remote": made.remote,
        "local_dir": made.local_dir,
        "entries": [e.as_dict() for e in made.entries],
    }
    return (json.dumps(old, separators=(",", ":")) + "\n").encode()


@pytest.mark.parametrize("old_format", [False, True], ids=["format-2", "format-1"])
async def test_undo_and_restore_of_a_pull_read_its_record_of_either_format(
    moto: S3Server, tmp_path: Path, old_format: bool
) -> None:
    bucket = moto.new_bucket()
    s3 = moto.client()
    s3.put_object(Bucket=bucket, Key="vol/a.txt", Body=b"a one")
    s3.put_object(Bucket=bucket, Key="vol/d/b.txt", Body=b"b one")
    local = tmp_path / "local"
    cfg = config(bucket, local, tmp_path / "state", backup=BackupMode.AUTO)
    async with SyncEngine(cfg) as engine:
        first = await engine.run(PULL)
        assert first.ok and first.sync_id is not None
        await asyncio.sleep(1.1)  # history times are to the second
        moment = datetime.now(UTC)
        await asyncio.sleep(1.1)
        s3.put_object(Bucket=bucket, Key="vol/a.txt", Body=b"a two")
        s3.delete_object(Bucket=bucket, Key="vol/d/b.txt")
        s3.put_object(Bucket=bucket, Key="vol/c.txt", Body=b"c")
        pulled = await engine.run(PULL)
        assert pulled.ok and pulled.sync_id is not None
        path = engine.state.directory / "history" / f"{pulled.sync_id}.json"
        assert len(path.read_bytes().splitlines()) == 3 + 2  # format 2: a line per entry
        if old_format:
            path.write_bytes(_as_format_1(path.read_bytes()))
        records, problems = await engine.history()
        assert not problems
        assert [(r.sync_id, r.uploaded, r.replaced, r.deleted) for r in records] == [
            (pulled.sync_id, 1, 1, 1),
            (first.sync_id, 2, 0, 0),
        ]
        restoring = await engine.restore("d", moment, local=True, dry_run=True)
        assert (restoring.ok, restoring.put_back, restoring.removed) == (True, ["d/b.txt"], [])
        undone = await engine.undo(pulled.sync_id)
        assert undone.ok, undone.as_dict()
        assert (sorted(undone.put_back), undone.removed) == (["a.txt", "d/b.txt"], ["c.txt"])
        assert (local / "a.txt").read_bytes() == b"a one"
        assert (local / "d/b.txt").read_bytes() == b"b one"
        assert not (local / "c.txt").exists()
        assert not _scratch(engine.state.directory, "undo-steps-")
        assert not (engine.state.directory / SPOOL_NAME).exists()


@pytest.mark.parametrize("old_format", [False, True], ids=["format-2", "format-1"])
async def test_undo_and_restore_of_a_finalize_read_its_record_of_either_format(
    moto: S3Server, tmp_path: Path, old_format: bool
) -> None:
    bucket = moto.new_bucket()
    s3 = moto.client()
    local = tmp_path / "local"
    write(local / "a.txt", b"a one")
    write(local / "d/b.txt", b"b one")
    cfg = config(bucket, local, tmp_path / "state", backup=BackupMode.COPY)
    async with SyncEngine(cfg) as engine:
        assert (await engine.run(FIN)).ok
        await asyncio.sleep(1.1)  # history times are to the second
        moment = datetime.now(UTC)
        await asyncio.sleep(1.1)
        write(local / "a.txt", b"a two")
        (local / "d/b.txt").unlink()
        write(local / "c.txt", b"c")
        pushed = await engine.run(FIN)
        assert pushed.ok and pushed.sync_id is not None
        key = f"vol/{HISTORY_DIR}{pushed.sync_id}.json"
        if old_format:
            stored = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            s3.put_object(Bucket=bucket, Key=key, Body=_as_format_1(stored))
        records, problems = await engine.history()
        assert not problems
        assert (records[0].sync_id, records[0].replaced, records[0].deleted) == (
            pushed.sync_id,
            1,
            1,
        )
        restoring = await engine.restore("", moment, dry_run=True)
        assert restoring.ok, restoring.as_dict()
        assert (sorted(restoring.put_back), restoring.removed) == (["a.txt", "d/b.txt"], ["c.txt"])
        undone = await engine.undo(pushed.sync_id)
        assert undone.ok, undone.as_dict()
        assert (sorted(undone.put_back), undone.removed) == (["a.txt", "d/b.txt"], ["c.txt"])
        bodies = {
            k: s3.get_object(Bucket=bucket, Key=f"vol/{k}")["Body"].read()
            for k in ("a.txt", "d/b.txt")
        }
        assert bodies == {"a.txt": b"a one", "d/b.txt": b"b one"}
        assert not _scratch(engine.state.directory, "record-")
