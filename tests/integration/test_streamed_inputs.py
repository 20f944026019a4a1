"""The scan and the listing streamed into the planner's walk (issue 12, the input side): a
server listing out of key order, the hash cache kept up as the scan passes, and decisions
equal to the planner's over maps of every side (the path before the streaming)."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytest

from sidecar.engine.hashing import content_hash_file
from sidecar.engine.sync import SyncEngine
from sidecar.s3 import ObjectInfo, ObjectStore
from tests.support.engine_support import FIN, OLD_NS, PULL, config, sync, tree, write
from tests.support.streamed_model import map_plan, random_world


def _shuffled_list(seed: int) -> Any:
    """ObjectStore.list with every key of the prefix handed on in a random order, a few per
    page: a server that lists out of key order."""
    original = ObjectStore.list

    async def listing(self: ObjectStore, prefix: str, *args: Any, **kwargs: Any) -> Any:
        items: list[ObjectInfo] = []
        async for page in original(self, prefix, *args, **kwargs):
            items.extend(page)
        random.Random(seed).shuffle(items)
        for start in range(0, len(items), 3):
            yield items[start : start + 3]

    return listing


async def test_a_listing_out_of_key_order_is_decided_on_a_sorted_spool(
    moto: Any, workdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing decided on the broken order runs: the files the bucket still has are not
    taken for deleted there (a walk over the shuffled listing would see most of them
    missing). The sync is decided again over the sorted spool, exactly as with a listing in
    order, and the spool is removed."""
    bucket = moto.new_bucket()
    local, state = workdir / "local", workdir / "state"
    names = [f"d{n % 4}/{'-.x'[n % 3]}f{n:02d}" for n in range(40)] + ["d1-", "e", "e-1/x"]
    for name in names:
        write(local / name, name.encode(), OLD_NS)
    cfg = config(bucket, local, state)
    assert (await sync(cfg, FIN)).ok
    client = moto.client()
    client.delete_object(Bucket=bucket, Key="vol/d2/-f06")
    client.put_object(Bucket=bucket, Key="vol/d3/new", Body=b"new")
    client.put_object(Bucket=bucket, Key="vol/d0/.f04", Body=b"other bytes")
    client.put_object(Bucket=bucket, Key="vol/marker/", Body=b"")
    (local / "e").write_bytes(b"edited here")  # and in the bucket: a conflict
    client.put_object(Bucket=bucket, Key="vol/e", Body=b"edited there")
    in_order = await sync(cfg, PULL, dry_run=True)
    assert in_order.ok, in_order

    monkeypatch.setattr(ObjectStore, "list", _shuffled_list(5))
    left = next(state.glob("*/state.db")).parent / "spool-1-a.db"
    left.write_bytes(b"a spool a killed run left")
    with caplog.at_level(logging.WARNING, logger="sidecar.sync"):
        shuffled = await sync(cfg, PULL, dry_run=True)
    assert "not in key order" in caplog.text
    planned = [(a.kind, a.path, a.keep_conflict_copy) for a in shuffled.planned]
    assert planned == [(a.kind, a.path, a.keep_conflict_copy) for a in in_order.planned]
    assert [c.path for c in shuffled.conflicts] == [c.path for c in in_order.conflicts] == ["e"]

    result = await sync(cfg, PULL)
    assert result.ok and result.files_deleted == 1, (result.errors, result.files_deleted)
    after = tree(local)
    assert "d2/-f06" not in after and after["d3/new"] == b"new"
    assert after["d0/.f04"] == b"other bytes" and after["e"] == b"edited there"
    assert all(name in after for name in names if name not in ("d2/-f06",))
    assert not list(state.rglob("spool-*"))  # also the one a killed run left


async def test_the_hash_cache_is_kept_up_as_the_scan_passes(moto: Any, workdir: Path) -> None:
    """After a sync the hash cache holds exactly the hashed, non-racy files the scan saw
    (what replacing it whole did): rows of files gone or changed are dropped, and a no-op
    sync of an old tree writes nothing."""
    bucket = moto.new_bucket()
    local, state = workdir / "local", workdir / "state"
    for n in range(30):
        write(local / f"d{n % 3}/f{n:02d}", b"%d" % n, OLD_NS)
    cfg = config(bucket, local, state)
    assert (await sync(cfg, FIN)).ok
    assert (await sync(cfg, PULL)).ok  # hashes each file (a BASE entry each)
    db = state.rglob("state.db").__next__()
    before = db.stat().st_mtime_ns
    assert (await sync(cfg, PULL)).ok
    assert db.stat().st_mtime_ns == before, "a no-op of an old tree rewrote the state"

    (local / "d0/f00").unlink()
    write(local / "d1/f01", b"changed", OLD_NS + 10**9)
    write(local / "d2/f02", b"fresh")  # racy: not cached
    assert (await sync(cfg, FIN)).ok
    async with SyncEngine(cfg) as engine:
        engine.state.load()
        cache = dict(engine.state.hash_cache)
    expected = {}
    for path in tree(local):
        if path != "d2/f02":  # racy: hashed again next time
            st = (local / path).stat()
            expected[path] = (
                st.st_size,
                st.st_mtime_ns,
                st.st_ino,
                content_hash_file(local / path),
            )
    assert cache == expected


@pytest.mark.parametrize("seed", range(6))
async def test_streamed_decisions_equal_the_planner_over_maps(
    moto: Any, workdir: Path, seed: int
) -> None:
    """Varied trees (nested folders, names that sort between 'd' and 'd/', empty files,
    folder markers, both sides edited, deleted, chmodded): the engine's streamed plan is the
    one core.planner.plan makes over maps of the scan, the listing and BASE."""
    bucket = moto.new_bucket()
    local, state = workdir / "local", workdir / "state"
    cfg = config(bucket, local, state)
    await random_world(random.Random(seed), moto.client(), bucket, cfg)
    for direction in (PULL, FIN):
        expected = await map_plan(cfg, direction)
        got = await sync(cfg, direction, dry_run=True)
        assert [(a.kind, a.path, a.keep_conflict_copy) for a in got.planned] == expected.actions
        assert sorted(c.path for c in got.conflicts) == expected.conflicts
        assert got.deletes_blocked == expected.deletes_blocked
        assert sorted(e.path for e in got.errors) == expected.errors


def test_folder_markers_dropped_while_streaming_as_over_the_whole_listing() -> None:
    """MarkerFilter over a listing in key order drops exactly core.paths.folder_markers of
    the whole map (a 0-byte 'd' with a listed path below it), in order, whatever lies between
    'd' and 'd/' ('d-x', 'd.x', also 0-byte ones)."""
    from sidecar.core.model import RemoteObject
    from sidecar.core.paths import folder_markers
    from sidecar.engine.inputs import MarkerFilter

    rng = random.Random(3)
    parts = ["d", "d-x", "d.x", "e", "d0"]
    for _ in range(500):
        paths = {
            "/".join(rng.choice(parts) for _ in range(rng.randrange(1, 4)))
            for _ in range(rng.randrange(1, 12))
        }
        listed = {p: RemoteObject("k/" + p, rng.choice([0, 0, 5]), "e") for p in sorted(paths)}
        expected = [p for p in listed if p not in set(folder_markers(listed))]
        markers = MarkerFilter()
        got = [p for path, obj in listed.items() for p, _ in markers.push(path, obj)]
        got += [p for p, _ in markers.end()]
        assert got == expected, listed


async def test_a_cancelled_sync_ends_its_scan_thread_before_it_returns(
    moto: Any, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan runs ahead of the walk on a thread of its own; a sync cancelled while the
    walk waits (here on a listing that never ends) stops that thread before the cancellation
    reaches the caller: nothing of it outlives the sync's locks."""
    import asyncio

    import sidecar.engine.inputs as inputs_module

    bucket = moto.new_bucket()
    local = workdir / "local"
    for n in range(6000):  # more than the queue holds (4,096): the thread waits for room
        write(local / f"d{n // 1000}/f{n:04d}", b"x", OLD_NS)
    walking = {"started": 0, "ended": 0}
    original_walk = inputs_module.walk_in_key_order

    def counted_walk(*args: Any) -> Any:
        walking["started"] += 1
        try:
            yield from original_walk(*args)
        finally:
            walking["ended"] += 1

    async def endless_listing(self: ObjectStore, prefix: str, *args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()
        yield []

    monkeypatch.setattr(inputs_module, "walk_in_key_order", counted_walk)
    monkeypatch.setattr(ObjectStore, "list", endless_listing)
    task = asyncio.ensure_future(sync(config(bucket, local, workdir / "state"), PULL))
    for _ in range(600):
        if walking["started"]:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert walking == {"started": 1, "ended": 1}
