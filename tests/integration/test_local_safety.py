"""What a pull does to the folder when the folder does not hold still (issue 9, items 1, 2,
4, 15, 17): conflict copies never replace anything, long names never crash, a folder
renamed or swapped for a symlink mid-pull never leads a write outside, and BASE never
claims bytes that are not on disk."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sidecar.core.result import SyncResult
from sidecar.engine import folder as folder_module
from sidecar.engine.state import StateStore
from sidecar.engine.transfer import Transfers
from sidecar.s3 import ObjectStore
from tests.conftest import S3Server
from tests.support.engine_support import (
    FIN,
    PULL,
    Volume,
    config,
    edited_on_both_sides,
    sync,
    tree,
    volume,
    write,
)

FROZEN = datetime(2026, 11, 23, 9, 15, 0, 250_000, tzinfo=UTC)


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every conflict of the test happens within the same millisecond."""

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return FROZEN

    monkeypatch.setattr("sidecar.engine.sync.datetime", Frozen)
    monkeypatch.setattr("sidecar.engine.walk.datetime", Frozen)
    monkeypatch.setattr("sidecar.engine.transfer.datetime", Frozen)


def conflict_copies(root: Path) -> dict[str, bytes]:
    return {path: data for path, data in tree(root).items() if ".conflict-" in path}


# ---- item 1: conflict copies never replace anything --------------------------------------
async def test_two_pull_conflicts_in_one_second_keep_both_local_versions(
    moto: S3Server, workdir: Path, frozen_clock: None
) -> None:
    vol = volume(moto, workdir)
    write(vol.local / "d/nb.ipynb", b"base")
    assert (await sync(vol.cfg, FIN)).ok
    for mine, theirs in ((b"mine 1", b"theirs 1"), (b"mine 2", b"theirs 2")):
        vol.put("d/nb.ipynb", theirs)
        write(vol.local / "d/nb.ipynb", mine)
        result = await sync(vol.cfg, PULL)
        assert result.ok, result.as_dict()
        (conflict,) = result.conflicts
        assert conflict.copy is not None and (vol.local / conflict.copy).read_bytes() == mine
    assert sorted(conflict_copies(vol.local).values()) == [b"mine 1", b"mine 2"]
    assert (vol.local / "d/nb.ipynb").read_bytes() == b"theirs 2"


async def test_two_finalize_conflicts_in_one_second_keep_both_bucket_versions(
    server: S3Server, workdir: Path, frozen_clock: None
) -> None:
    vol = volume(server, workdir)
    write(vol.local / "nb.ipynb", b"base")
    assert (await sync(vol.cfg, FIN)).ok
    for mine, theirs in ((b"mine 1", b"theirs 1"), (b"mine 2", b"theirs 2")):
        vol.put("nb.ipynb", theirs)
        write(vol.local / "nb.ipynb", mine)
        result = await sync(vol.cfg, FIN)
        assert result.ok, result.as_dict()
        (conflict,) = result.conflicts
        assert conflict.copy is not None and vol.get(conflict.copy) == theirs
    copies = [body for key, body in vol.bodies().items() if "conflict" in key]
    assert sorted(copies) == [b"theirs 1", b"theirs 2"]


async def test_a_conflict_key_written_after_the_listing_is_never_replaced(
    server: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica takes the copy's name between our listing and our copy: the copy
    goes to the next name (If-None-Match, and a HEAD first where the server ignores it)."""
    vol = await edited_on_both_sides(server, workdir)
    original = ObjectStore.copy

    async def racing_copy(self: ObjectStore, source: str, dest: str, *args: Any, **kw: Any) -> Any:
        if not raced:
            raced.append(dest)
            vol.s3.put_object(Bucket=vol.bucket, Key=dest, Body=b"other replica's copy")
        return await original(self, source, dest, *args, **kw)

    raced: list[str] = []
    monkeypatch.setattr(ObjectStore, "copy", racing_copy)
    result = await sync(vol.cfg, FIN)
    assert result.ok, result.as_dict()
    (conflict,) = result.conflicts
    assert conflict.copy is not None and f"vol/{conflict.copy}" != raced[0]
    bodies = vol.bodies()
    assert bodies[f"vol/{conflict.copy}"] == b"theirs"
    assert bodies[raced[0]] == b"other replica's copy"
    assert sorted(bodies.values()) == [b"mine", b"other replica's copy", b"theirs"]


async def test_a_conflict_key_taken_after_our_check_is_refused_by_the_server(
    seaweed: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name is taken after the HEAD that found it free, just before the copy: only the
    server can refuse then. SeaweedFS (as AWS) answers If-None-Match on CopyObject with 412
    and the copy goes to the next name; moto and rclone ignore it (the window store.copy
    documents), so this runs where the 412 is real."""
    vol = await edited_on_both_sides(seaweed, workdir)
    original_head = ObjectStore.head
    raced: list[str] = []

    async def head_then_race(self: ObjectStore, key: str, *args: Any, **kw: Any) -> Any:
        try:
            return await original_head(self, key, *args, **kw)
        finally:
            if ".conflict-" in key and not raced:
                raced.append(key)
                vol.s3.put_object(Bucket=vol.bucket, Key=key, Body=b"other replica's copy")

    monkeypatch.setattr(ObjectStore, "head", head_then_race)
    result = await sync(vol.cfg, FIN)
    assert result.ok, result.as_dict()
    (conflict,) = result.conflicts
    assert raced and conflict.copy is not None and f"vol/{conflict.copy}" != raced[0]
    # A server that ignored the condition would have put "theirs" over the other copy.
    assert vol.bodies() == {
        "vol/nb.ipynb": b"mine",
        raced[0]: b"other replica's copy",
        f"vol/{conflict.copy}": b"theirs",
    }


async def test_a_local_copy_name_taken_after_the_scan_is_never_replaced(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = await edited_on_both_sides(moto, workdir)
    original = Transfers.download

    async def racing_download(self: Transfers, action: Any) -> Any:
        write(vol.local / action.conflict_copy, b"made meanwhile")
        return await original(self, action)

    monkeypatch.setattr(Transfers, "download", racing_download)
    result = await sync(vol.cfg, PULL)
    assert result.ok, result.as_dict()
    (conflict,) = result.conflicts
    assert conflict.copy is not None and (vol.local / conflict.copy).read_bytes() == b"mine"
    assert sorted(conflict_copies(vol.local).values()) == [b"made meanwhile", b"mine"]


# ---- item 2: long names ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["n" * 230 + ".ipynb", "\u00e9" * 127, "x" * 255])
async def test_conflicts_on_names_of_230_to_255_bytes(
    moto: S3Server, workdir: Path, name: str
) -> None:
    vol = await edited_on_both_sides(moto, workdir, name)
    # pull: the local version is kept under a shortened name
    pulled = await sync(vol.cfg, PULL)
    assert pulled.ok, pulled.as_dict()
    (copy,) = conflict_copies(vol.local)
    assert len(copy.encode()) <= 255 and (vol.local / copy).read_bytes() == b"mine"
    (vol.local / copy).unlink()
    # finalize: the bucket's version is kept under a key every replica can pull
    vol.put(name, b"theirs again")
    write(vol.local / name, b"mine again")
    pushed = await sync(vol.cfg, FIN)
    assert pushed.ok, pushed.as_dict()
    (conflict,) = pushed.conflicts
    assert conflict.copy is not None and len(conflict.copy.encode()) <= 255
    elsewhere = workdir / "replica"
    pulled = await sync(config(vol.bucket, elsewhere, workdir / "s2"), PULL)
    assert pulled.ok, pulled.as_dict()
    assert (elsewhere / conflict.copy).read_bytes() == b"theirs again"


# ---- item 15: the folder changes under the pull ----------------------------------------------
def _swap_during_pull(monkeypatch: pytest.MonkeyPatch, after_calls: int, swap: Any) -> None:
    """Run swap() when the pull asks for its `after_calls`-th object (others in flight)."""
    original = ObjectStore.get_object
    calls = 0

    async def hooked(self: ObjectStore, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == after_calls:
            swap()
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(ObjectStore, "get_object", hooked)


def _no_temp_files(*roots: Path) -> bool:
    return not [p for root in roots for p in root.rglob("*") if ".netvol-tmp." in p.name]


async def _pull_while(
    moto: S3Server,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    swap: Callable[[Path], object],
) -> tuple[Volume, SyncResult]:
    """A pull of 41 objects (40 under sub/deeper/, four at a time) into a folder that has
    sub/deeper/ already; `swap(local)` runs when the fifth object is asked for."""
    vol = volume(moto, workdir, concurrency=4)
    for index in range(40):
        vol.put(f"sub/deeper/f{index:02}", b"x" * index)
    vol.put("top.txt", b"top")
    write(vol.local / "sub/deeper/.keep", b"")
    _swap_during_pull(monkeypatch, 5, lambda: swap(vol.local))
    return vol, await sync(vol.cfg, PULL)


async def test_a_folder_swapped_for_a_symlink_mid_pull_is_never_written_through(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = workdir / "outside"
    (outside / "deeper").mkdir(parents=True)

    def swap(local: Path) -> None:
        (local / "sub").rename(workdir / "moved-away")
        (local / "sub").symlink_to(outside)

    vol, result = await _pull_while(moto, workdir, monkeypatch, swap)
    assert result.fatal is None
    assert list(outside.rglob("*")) == [outside / "deeper"]  # nothing landed outside
    failed = {e.path for e in result.errors}
    assert failed and all(path.startswith("sub/deeper/f") for path in failed)
    assert all("symlink" in e.reason or "moved" in e.reason for e in result.errors)
    assert (vol.local / "top.txt").read_bytes() == b"top"
    assert _no_temp_files(vol.local, workdir / "moved-away")


async def test_a_folder_renamed_mid_pull_gives_per_file_errors_not_a_crash(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol, result = await _pull_while(
        moto, workdir, monkeypatch, lambda local: (local / "sub").rename(local / "renamed")
    )
    assert result.fatal is None
    assert all(e.path.startswith("sub/deeper/f") for e in result.errors)
    assert all("moved" in e.reason for e in result.errors)
    # Files placed before the rename moved with their folder, files in flight then are
    # reported, the rest arrive where the bucket says they belong; no half file anywhere.
    arrived = [p for p in tree(vol.local) if "/deeper/f" in p]
    assert len(arrived) + len(result.errors) == 40
    assert _no_temp_files(vol.local)
    again = await sync(vol.cfg, PULL)
    assert again.ok, again.as_dict()


async def test_a_folder_replaced_by_a_file_mid_pull_is_a_per_file_error(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def swap(local: Path) -> None:
        (local / "sub").rename(workdir / "moved-away")
        write(local / "sub", b"a file now")

    vol, result = await _pull_while(moto, workdir, monkeypatch, swap)
    assert result.fatal is None and result.errors
    assert all(e.path.startswith("sub/deeper/f") for e in result.errors)
    assert (vol.local / "sub").read_bytes() == b"a file now"
    assert _no_temp_files(vol.local, workdir / "moved-away")


async def test_deletes_and_chmods_never_go_through_a_swapped_folder(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = volume(moto, workdir, max_delete_fraction=1.0)
    bucket, s3, local, cfg = vol.bucket, vol.s3, vol.local, vol.cfg
    outside = workdir / "outside"
    write(local / "sub/gone.txt", b"v1")
    write(local / "sub/mode.sh", b"#!/bin/sh\n")
    write(local / "keep.txt", b"keep")
    assert (await sync(cfg, FIN)).ok
    s3.delete_object(Bucket=bucket, Key="vol/sub/gone.txt")
    s3.copy_object(
        Bucket=bucket,
        Key="vol/sub/mode.sh",
        CopySource={"Bucket": bucket, "Key": "vol/sub/mode.sh"},
        Metadata={
            **s3.head_object(Bucket=bucket, Key="vol/sub/mode.sh")["Metadata"],
            "mode": "755",
        },
        MetadataDirective="REPLACE",
    )

    def swap_once() -> None:
        # After the scan: the folder (with the very files the plan saw) now lies outside
        # the volume and a symlink to it takes its place. Following it would delete and
        # chmod files outside.
        if not (local / "sub").is_symlink():
            (local / "sub").rename(outside)
            (local / "sub").symlink_to(outside)

    for method in ("set_mode_local", "delete_local"):
        original = getattr(Transfers, method)

        def hooked(self: Transfers, action: Any, original: Any = original) -> bool:
            swap_once()
            return bool(original(self, action))

        monkeypatch.setattr(Transfers, method, hooked)
    result = await sync(cfg, PULL)
    assert result.fatal is None
    assert (outside / "gone.txt").read_bytes() == b"v1"
    assert not os.stat(outside / "mode.sh").st_mode & 0o100
    assert result.files_deleted == 0


# ---- item 17 (second half): equal bytes are not a conflict -------------------------------------
async def test_a_file_written_during_the_pull_with_the_same_bytes_is_not_a_conflict(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pulls into one folder: the other one placed the same bytes first."""
    bucket = moto.new_bucket()
    s3 = moto.client()
    for index in range(5):
        s3.put_object(Bucket=bucket, Key=f"vol/m{index}.bin", Body=b"model %d" % index)
    local = workdir / "l"
    local.mkdir()
    original = ObjectStore.get_object

    async def other_pull_first(self: ObjectStore, key: str, *args: Any, **kwargs: Any) -> Any:
        name = key.removeprefix("vol/")
        write(local / name, s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(ObjectStore, "get_object", other_pull_first)
    result = await sync(config(bucket, local, workdir / "s"), PULL)
    assert result.ok and not result.conflicts, result.as_dict()
    assert tree(local) == {f"m{i}.bin": b"model %d" % i for i in range(5)}
    monkeypatch.setattr(ObjectStore, "get_object", original)
    again = await sync(config(bucket, local, workdir / "s"), PULL)
    assert again.ok and again.files_transferred == 0 and not again.conflicts


async def test_a_file_written_during_the_pull_with_other_bytes_is_kept(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = moto.new_bucket()
    moto.client().put_object(Bucket=bucket, Key="vol/m.bin", Body=b"bucket")
    local = workdir / "l"
    local.mkdir()
    original = ObjectStore.get_object

    async def user_writes_first(self: ObjectStore, *args: Any, **kwargs: Any) -> Any:
        write(local / "m.bin", b"user's")  # same size, other bytes
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(ObjectStore, "get_object", user_writes_first)
    result = await sync(config(bucket, local, workdir / "s"), PULL)
    assert result.ok, result.as_dict()
    (conflict,) = result.conflicts
    assert conflict.copy is not None and (local / conflict.copy).read_bytes() == b"user's"
    assert (local / "m.bin").read_bytes() == b"bucket"


# ---- item 4: BASE never claims bytes that are not on disk ----------------------------------------
async def test_downloads_are_on_disk_before_base_records_them(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Order of events per downloaded file: its data fsynced, renamed into place, its folder
    fsynced, and only then its BASE record (which the journal may write at any time)."""
    bucket = moto.new_bucket()
    s3 = moto.client()
    for index in range(30):
        s3.put_object(Bucket=bucket, Key=f"vol/d{index % 3}/f{index}", Body=b"v" * index)
    s3.put_object(Bucket=bucket, Key="vol/big", Body=os.urandom(6 * 1024 * 1024))
    local = workdir / "l"
    events: list[tuple[str, Any]] = []
    real_fsync, real_set_base = os.fsync, StateStore.set_base

    def spy_fsync(fd: int) -> None:
        real_fsync(fd)
        st = os.fstat(fd)
        events.append(("fsync", (st.st_ino, os.path.stat.S_ISDIR(st.st_mode))))

    def spy_set_base(self: StateStore, path: str, entry: Any) -> None:
        events.append(("base", path))
        real_set_base(self, path, entry)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(StateStore, "set_base", spy_set_base)
    result = await sync(config(bucket, local, workdir / "s"), PULL)
    assert result.ok and result.files_transferred == 31, result.as_dict()
    recorded = [i for i, (kind, _) in enumerate(events) if kind == "base"]
    assert len(recorded) == 31
    for index in recorded:
        path = local / events[index][1]
        file_synced = events.index(("fsync", (path.stat().st_ino, False)))
        folder_ino = path.parent.stat().st_ino
        assert file_synced < index
        assert any(
            events[i] == ("fsync", (folder_ino, True)) for i in range(file_synced + 1, index)
        ), f"{path}: folder not fsynced between the file's fsync and its BASE record"


@pytest.mark.parametrize("native", [True, False], ids=["renameat2", "link-unlink"])
def test_rename_noreplace_never_replaces(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    if not native:  # the fallback, as on a filesystem without RENAME_NOREPLACE
        monkeypatch.setattr(folder_module, "_renameat2", None)
    write(workdir / "a", b"a")
    write(workdir / "b", b"b")
    dir_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            folder_module.rename_noreplace("a", "b", dir_fd)
        assert tree(workdir) == {"a": b"a", "b": b"b"}
        folder_module.rename_noreplace("a", "c", dir_fd)
        assert tree(workdir) == {"b": b"b", "c": b"a"}
    finally:
        os.close(dir_fd)


async def test_download_records_reach_the_journal_while_a_long_download_goes_on(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of BASE records is written within its max age even when no later record comes
    (issue 9 item 3 on the pull side): kill -9 during a long download must not lose the
    records of files placed seconds earlier."""
    bucket = moto.new_bucket()
    s3 = moto.client()
    for index in range(20):
        s3.put_object(Bucket=bucket, Key=f"vol/small/f{index}", Body=b"s" * (index + 1))
    s3.put_object(Bucket=bucket, Key="vol/big", Body=os.urandom(6 * 1024 * 1024))
    local, state_dir = workdir / "l", workdir / "s"
    release = asyncio.Event()
    real_get_range_into = ObjectStore.get_range_into

    async def held_range(self: ObjectStore, *args: Any, **kwargs: Any) -> Any:
        await release.wait()  # the big file's parts wait while the small files land
        return await real_get_range_into(self, *args, **kwargs)

    monkeypatch.setattr(ObjectStore, "get_range_into", held_range)
    cfg = config(bucket, local, state_dir)
    running = asyncio.ensure_future(sync(cfg, PULL))
    try:
        for _ in range(200):
            if len(list((local / "small").glob("f*"))) == 20:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # twice the batch's max age, and nothing else finishes
        journals = list(state_dir.rglob("journal.jsonl"))
        lines = journals[0].read_text().splitlines() if journals else []
        recorded = {json.loads(line)[1] for line in lines if line.startswith('["set"')}
        assert recorded >= {f"small/f{index}" for index in range(20)}, sorted(recorded)
    finally:
        release.set()
        result = await running
    assert result.ok, result.as_dict()
