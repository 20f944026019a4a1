"""The sync engine in-process against real servers on loopback (moto and rclone)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sidecar.core.paths import temp_name
from sidecar.core.progress import Progress
from sidecar.engine.sync import SyncEngine
from sidecar.engine.transfer import Transfers
from sidecar.s3 import ObjectStore
from tests.conftest import S3Server
from tests.support.engine_support import (
    FIN,
    OLD_NS,
    PULL,
    MiB,
    Volume,
    config,
    edited_on_both_sides,
    race_before,
    spy_on_hashing,
    sync,
    tree,
    volume,
    write,
)

SIZES = {
    "empty": 0,
    "one": 1,
    "part-1": 5 * MiB - 1,
    "part": 5 * MiB,
    "part+1": 5 * MiB + 1,
    "several": 17 * MiB + 3,
}


async def test_round_trip_sizes_mtime_exec_and_noop(
    each_server: S3Server, workdir: Path, request_counter: Counter[str]
) -> None:
    server = each_server
    bucket = server.new_bucket()
    a, b = workdir / "a", workdir / "b"
    for i, (name, size) in enumerate(SIZES.items()):
        write(a / "sizes" / f"{name}.bin", os.urandom(size), mtime_ns=1_700_000_000_123_456_789 + i)
    write(a / "ünï/名前.txt", b"unicode")
    script = write(a / "bin/run.sh", b"#!/bin/sh\necho hi\n")
    script.chmod(0o755)

    pushed = await sync(config(bucket, a, workdir / "sa"), FIN)
    assert pushed.ok, pushed.as_dict()
    assert pushed.files_transferred == len(SIZES) + 2
    pulled = await sync(config(bucket, b, workdir / "sb"), PULL)
    assert pulled.ok, pulled.as_dict()
    assert tree(b) == tree(a)
    for path in a.rglob("*"):
        if path.is_file():
            twin = b / path.relative_to(a)
            assert twin.stat().st_mtime_ns == path.stat().st_mtime_ns, path
            assert os.access(twin, os.X_OK) == os.access(path, os.X_OK), path

    request_counter.clear()
    again = await sync(config(bucket, a, workdir / "sa"), FIN)
    again_pull = await sync(config(bucket, b, workdir / "sb"), PULL)
    assert again.files_transferred == again_pull.files_transferred == 0
    assert again.ok and again_pull.ok
    # rclone lists a multipart object under another ETag than Complete returned: the first
    # re-sync proves each one unchanged by its hash (one HEAD) and remembers the ETag.
    # moto and SeaweedFS keep Complete's `-N` ETag in listings: nothing to prove there.
    multipart = sum(1 for size in SIZES.values() if size >= 5 * MiB)
    expected_heads = multipart if server.kind == "rclone" else 0
    assert request_counter["head_object"] <= expected_heads, request_counter
    assert set(request_counter) <= {"list_objects_v2", "head_object"}, request_counter

    request_counter.clear()
    third = await sync(config(bucket, a, workdir / "sa"), FIN)
    third_pull = await sync(config(bucket, b, workdir / "sb"), PULL)
    assert third.files_transferred == third_pull.files_transferred == 0
    # From then on a no-op costs one listing pass each and no per-object request.
    assert set(request_counter) == {"list_objects_v2"}, request_counter


async def test_pull_applies_remote_changes_and_keeps_local_ones(
    moto: S3Server, workdir: Path
) -> None:
    bucket = moto.new_bucket()
    s3 = moto.client()
    local = workdir / "l"
    for name in ("keep", "modify", "delete", "local-edit"):
        s3.put_object(Bucket=bucket, Key=f"vol/{name}.txt", Body=name.encode())
    cfg = config(bucket, local, workdir / "s")
    assert (await sync(cfg, PULL)).files_transferred == 4
    s3.put_object(Bucket=bucket, Key="vol/modify.txt", Body=b"changed remotely")
    s3.delete_object(Bucket=bucket, Key="vol/delete.txt")
    s3.put_object(Bucket=bucket, Key="vol/new/added.txt", Body=b"added")
    write(local / "local-edit.txt", b"edited locally")
    write(local / "local-only.txt", b"mine")

    result = await sync(
        cfg,
        PULL,
    )
    assert result.ok, result.as_dict()
    assert tree(local) == {
        "keep.txt": b"keep",
        "modify.txt": b"changed remotely",
        "new/added.txt": b"added",
        "local-edit.txt": b"edited locally",
        "local-only.txt": b"mine",
    }
    assert result.files_deleted == 1 and result.files_transferred == 2


async def test_conflicts_keep_both_versions(moto: S3Server, workdir: Path) -> None:
    vol = await edited_on_both_sides(moto, workdir, mine=b"my edit", theirs=b"their edit")
    pushed = await sync(vol.cfg, FIN)
    assert pushed.ok, pushed.as_dict()
    (conflict,) = pushed.conflicts
    assert conflict.path == "nb.ipynb" and conflict.copy and ".conflict-" in conflict.copy
    assert vol.get("nb.ipynb") == b"my edit"
    assert vol.get(conflict.copy) == b"their edit"

    # And the pull direction: the bucket's version takes the name, mine is kept locally.
    vol.put("nb.ipynb", b"theirs again")
    write(vol.local / "nb.ipynb", b"mine again")
    pulled = await sync(vol.cfg, PULL)
    (conflict,) = pulled.conflicts
    assert (vol.local / "nb.ipynb").read_bytes() == b"theirs again"
    assert conflict.copy is not None and (vol.local / conflict.copy).read_bytes() == b"mine again"


async def test_a_delete_never_takes_a_version_written_after_the_listing(
    conditional: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local file is gone, so finalize deletes the object, but another writer replaced
    it after our listing: If-Match on the listed ETag keeps the new version."""
    vol = volume(conditional, workdir)
    write(vol.local / "gone.txt", b"v1")
    write(vol.local / "stays.txt", b"keep")
    assert (await sync(vol.cfg, FIN)).ok
    (vol.local / "gone.txt").unlink()
    original = Transfers.delete_remote
    race_before(monkeypatch, vol, "delete_remote")
    result = await sync(vol.cfg, FIN)
    assert not result.ok and result.files_deleted == 0
    [error] = result.errors
    assert (
        error.path == "gone.txt"
        and "precondition" in error.reason
        and "not deleted" in (error.reason)
    )
    assert vol.get("gone.txt") == b"racer"

    monkeypatch.setattr(Transfers, "delete_remote", original)
    pulled = await sync(vol.cfg, PULL)  # the new version comes back, as the error says
    assert pulled.ok and (vol.local / "gone.txt").read_bytes() == b"racer"


async def _racing_writer_is_refused(
    server: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, size: int
) -> Volume:
    """A file replaced locally and one created locally (its object deleted meanwhile); a
    writer puts both keys between our listing and our upload: both uploads are refused (a
    412 each, as per-file errors), the writer's versions stay, and so do the local files."""
    vol = volume(server, workdir)
    shared, new = f"shared{suffix}", f"new{suffix}"
    write(vol.local / shared, os.urandom(size))
    write(vol.local / new, os.urandom(size))
    assert (await sync(vol.cfg, FIN)).ok
    mine = write(vol.local / shared, os.urandom(size)).read_bytes()
    vol.s3.delete_object(Bucket=vol.bucket, Key=f"vol/{new}")
    write(vol.local / new, os.urandom(size))
    race_before(monkeypatch, vol, "upload")
    result = await sync(vol.cfg, FIN)
    assert not result.ok
    failed = {e.path: e.reason for e in result.errors}
    assert set(failed) == {shared, new}, failed
    assert all("precondition" in reason for reason in failed.values()), failed
    assert vol.get(shared) == vol.get(new) == b"racer"
    assert (vol.local / shared).read_bytes() == mine
    return vol


async def test_concurrent_writer_is_not_silently_overwritten(
    conditional: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If-Match on the ETag the plan saw: a writer racing in between gets a 412, not lost."""
    await _racing_writer_is_refused(conditional, workdir, monkeypatch, ".txt", 8)


async def test_a_multipart_upload_racing_a_writer_is_refused_at_complete(
    seaweed: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same race for files sent in parts: the condition rides on
    CompleteMultipartUpload. SeaweedFS (as AWS) checks If-Match there; moto ignores it
    (tests/integration/test_s3_servers.py), so this runs where the 412 is real."""
    vol = await _racing_writer_is_refused(seaweed, workdir, monkeypatch, ".bin", 6 * MiB)
    assert not vol.s3.list_multipart_uploads(Bucket=vol.bucket).get("Uploads"), "left behind"


async def test_emptied_folder_never_wipes_the_bucket(moto: S3Server, workdir: Path) -> None:
    bucket = moto.new_bucket()
    local = workdir / "l"
    cfg = config(bucket, local, workdir / "s")
    for i in range(6):
        write(local / f"f{i}", b"x")
    assert (await sync(cfg, FIN)).ok
    for path in local.iterdir():
        path.unlink()
    blocked = await sync(cfg, FIN)
    assert not blocked.ok and blocked.files_deleted == 0
    assert blocked.deletes_blocked and "--force-delete" in blocked.deletes_blocked
    listed = moto.client().list_objects_v2(Bucket=bucket, Prefix="vol/")
    assert listed["KeyCount"] == 6
    forced = await sync(config(bucket, local, workdir / "s", force_delete=True), FIN)
    assert forced.ok and forced.files_deleted == 6


async def test_stale_temp_files_are_removed_and_never_uploaded(
    moto: S3Server, workdir: Path
) -> None:
    bucket = moto.new_bucket()
    local = workdir / "l"
    stale = write(local / "d" / temp_name(), b"half a download")
    write(local / "d/real.txt", b"real")
    result = await sync(config(bucket, local, workdir / "s"), FIN)
    assert result.ok and result.files_transferred == 1
    assert not stale.exists()
    keys = [o["Key"] for o in moto.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["vol/d/real.txt"]


async def test_filters_hide_paths_from_every_side(moto: S3Server, workdir: Path) -> None:
    bucket = moto.new_bucket()
    local = workdir / "l"
    write(local / ".syncignore", b"scratch/\n")
    write(local / "scratch/big.tmp", b"x")
    write(local / ".ipynb_checkpoints/nb-checkpoint.ipynb", b"x")
    write(local / "pkg/__pycache__/m.pyc", b"x")
    write(local / "keep.log", b"x")
    write(local / "drop.log", b"x")
    cfg = config(bucket, local, workdir / "s", exclude=("drop.log",))
    assert (await sync(cfg, FIN)).ok
    keys = sorted(o["Key"] for o in moto.client().list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["vol/.syncignore", "vol/keep.log"]


async def test_dry_run_changes_nothing(moto: S3Server, workdir: Path) -> None:
    bucket = moto.new_bucket()
    local = workdir / "l"
    write(local / "a.txt", b"a")
    result = await sync(config(bucket, local, workdir / "s"), FIN, dry_run=True)
    assert result.dry_run and [(str(a.kind), a.path) for a in result.planned] == [
        ("upload", "a.txt")
    ]
    assert moto.client().list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    state = workdir / "s"
    assert not state.exists() or not [*state.rglob("state.json"), *state.rglob("state.db")]


async def test_unchanged_files_are_not_rehashed(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = moto.new_bucket()
    local = workdir / "l"
    for i in range(5):
        write(local / f"f{i}", os.urandom(100), mtime_ns=OLD_NS)
    cfg = config(bucket, local, workdir / "s")
    assert (await sync(cfg, FIN)).ok
    hashed = spy_on_hashing(monkeypatch)
    os.utime(local / "f3")  # touched, content unchanged: re-hashed, not re-sent
    result = await sync(cfg, FIN)
    assert hashed == ["f3"]
    assert result.files_transferred == 0


def rewrite_in_place(path: Path, data: bytes) -> None:
    """New bytes of the same size in the same inode, its mtime put back: only the content
    tells (an edit in the timestamp tick of the last hash looks exactly like this)."""
    st = path.stat()
    with path.open("r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
    )


async def test_an_edit_in_the_tick_of_the_hash_is_pushed(moto: S3Server, workdir: Path) -> None:
    """Racy clean (as git calls it): a file hashed within the timestamp granularity of its
    mtime may be rewritten with size, mtime and inode kept. Its hash is not cached, so the
    next sync hashes it again and pushes the edit (before: the stale hash hid it for good)."""
    bucket = moto.new_bucket()
    local = workdir / "l"
    write(local / "old", b"old file", mtime_ns=OLD_NS)
    write(local / "new", b"version 1")  # mtime: now, as the sync hashes it
    cfg = config(bucket, local, workdir / "s")
    assert (await sync(cfg, FIN)).ok
    rewrite_in_place(local / "new", b"version 2")
    result = await sync(cfg, FIN)
    assert result.ok and result.files_transferred == 1, result.as_dict()
    body = moto.client().get_object(Bucket=bucket, Key="vol/new")["Body"].read()
    assert body == b"version 2"
    # The scan's own hashes: touched, same bytes (hashed by the scan, nothing sent), then
    # rewritten in the tick of that hash.
    os.utime(local / "old")
    assert (await sync(cfg, FIN)).files_transferred == 0
    rewrite_in_place(local / "old", b"new file")
    result = await sync(cfg, FIN)
    assert result.ok and result.files_transferred == 1, result.as_dict()
    body = moto.client().get_object(Bucket=bucket, Key="vol/old")["Body"].read()
    assert body == b"new file"


async def test_a_file_hashed_racy_is_hashed_again_once_it_is_old(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The racy rule costs one hash more per fresh file, never one each sync: an old tree's
    no-op hashes nothing; a file pulled just now (its mtime ours) is hashed by the next sync
    and, once older than the margin, cached for good."""
    hashed = spy_on_hashing(monkeypatch)
    bucket = moto.new_bucket()
    moto.client().put_object(Bucket=bucket, Key="vol/pulled", Body=b"from the bucket")
    local = workdir / "l"
    write(local / "old", b"old file", mtime_ns=OLD_NS)
    cfg = config(bucket, local, workdir / "s")
    assert (await sync(cfg, PULL)).ok
    # The download has no mtime label: it is as fresh as the sync, not cached yet.
    hashed.clear()
    assert (await sync(cfg, PULL)).ok
    assert "old" not in hashed and "pulled" in hashed
    # Aged past the margin (its mtime moved back, as time would): hashed once more and cached.
    aged = (local / "pulled").stat().st_mtime_ns - 10 * 10**9
    os.utime(local / "pulled", ns=(aged, aged))
    hashed.clear()
    assert (await sync(cfg, PULL)).ok
    assert hashed == ["pulled"]
    hashed.clear()
    result = await sync(cfg, PULL)
    assert result.ok and result.files_transferred == 0 and hashed == []


async def test_a_daemon_keeps_syncing_after_pushing_files_edited_just_now(
    moto: S3Server, workdir: Path
) -> None:
    """One engine for many syncs, as the daemon runs it: pushing a file edited within the
    racy margin dropped its cache row after the scan had replaced the cache, and the store
    counted that removal off rows it no longer had. With one notebook in the folder the
    count went to -1 and every later sync of that daemon failed (len() < 0) until a
    restart."""
    vol = volume(moto, workdir)
    write(vol.local / "nb.ipynb", b"saved long ago", mtime_ns=OLD_NS)
    async with SyncEngine(vol.cfg) as engine:
        assert (await engine.run(FIN)).ok
        for version in range(3):
            write(vol.local / "nb.ipynb", b"saved just now %d" % version)
            result = await engine.run(FIN)
            assert result.ok and result.files_transferred == 1, result.as_dict()
            assert len(engine.state.hash_cache) >= 0
    assert vol.get("nb.ipynb") == b"saved just now 2"


async def test_resume_after_cancel_does_not_resend(
    moto: S3Server, workdir: Path, request_counter: Counter[str]
) -> None:
    bucket = moto.new_bucket()
    s3 = moto.client()
    for i in range(40):
        s3.put_object(Bucket=bucket, Key=f"vol/f{i:02d}", Body=os.urandom(1000))
    local = workdir / "l"
    cfg = config(bucket, local, workdir / "s", concurrency=2)
    engine = SyncEngine(cfg)
    task = asyncio.ensure_future(engine.run(PULL))
    while request_counter["get_object"] < 10:  # noqa: ASYNC110 - polling a spy counter
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await engine.__aexit__(None, None, None)
    done_before = len(tree(local))
    assert 0 < done_before < 40

    request_counter.clear()
    result = await sync(cfg, PULL)
    assert result.ok
    assert len(tree(local)) == 40
    assert result.files_transferred == 40 - done_before
    assert request_counter["get_object"] == 40 - done_before
    assert not list(local.rglob(".netvol-tmp.*"))


async def test_failed_multipart_upload_leaves_no_orphan(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = moto.new_bucket()
    local = workdir / "l"
    write(local / "big.bin", os.urandom(12 * MiB))
    original = ObjectStore.upload_part
    calls = 0

    async def failing_part(
        self: ObjectStore, key: str, upload_id: str, number: int, body: bytes
    ) -> str:
        nonlocal calls
        calls += 1
        if number == 2:
            raise asyncio.CancelledError  # the sync is stopped mid-upload
        return await original(self, key, upload_id, number, body)

    monkeypatch.setattr(ObjectStore, "upload_part", failing_part)
    with pytest.raises(asyncio.CancelledError):
        await sync(config(bucket, local, workdir / "s"), FIN)
    s3 = moto.client()
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0  # no half object became current


async def test_file_changing_during_upload_never_mixes_versions(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = moto.new_bucket()
    local = workdir / "l"
    path = write(local / "big.bin", b"A" * (12 * MiB))
    original = ObjectStore.upload_part
    changed = False

    async def writer_meanwhile(
        self: ObjectStore, key: str, upload_id: str, number: int, body: bytes
    ) -> str:
        nonlocal changed
        if not changed:
            changed = True
            path.write_bytes(b"B" * (12 * MiB))  # the notebook saves while we upload
        return await original(self, key, upload_id, number, body)

    monkeypatch.setattr(ObjectStore, "upload_part", writer_meanwhile)
    result = await sync(config(bucket, local, workdir / "s"), FIN)
    assert result.ok, result.as_dict()
    body = moto.client().get_object(Bucket=bucket, Key="vol/big.bin")["Body"].read()
    assert body == b"B" * (12 * MiB)


async def test_equal_content_without_base_is_adopted_not_resent(
    server: S3Server, workdir: Path, request_counter: Counter[str]
) -> None:
    """Lost state: both sides hold the same bytes; nothing moves, nothing is deleted."""
    bucket = server.new_bucket()
    a = workdir / "a"
    write(a / "x.bin", os.urandom(2000))
    write(a / "big.bin", os.urandom(6 * MiB))
    assert (await sync(config(bucket, a, workdir / "s1"), FIN)).ok
    request_counter.clear()
    again = await sync(config(bucket, a, workdir / "fresh-state"), FIN)
    assert again.ok and again.files_transferred == 0 and again.files_adopted == 2
    assert request_counter["put_object"] == request_counter["upload_part"] == 0


async def test_the_walk_shows_what_it_scanned_listed_hashed_checked_and_compared(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first finalize over a folder the bucket already holds (put by another tool: no hash
    label) reads every file and asks the bucket about every object before it decides any:
    during the walk (phase "scanning") the progress /status shows has counts that grow, not
    a frozen "scanning 0/0 files" (README, The daemon)."""
    bucket, s3, local = moto.new_bucket(), moto.client(), workdir / "l"
    files = {f"d{i % 3}/f{i:02d}.txt": b"the same bytes %d" % i for i in range(40)}
    for rel, body in files.items():
        write(local / rel, body)
        s3.put_object(Bucket=bucket, Key=f"vol/{rel}", Body=body)
    progress = Progress("finalize", 0.0)
    at_first_head: list[tuple[dict[str, Any], str]] = []
    original = ObjectStore.head

    async def head(self: ObjectStore, key: str, *args: Any, **kwargs: Any) -> Any:
        if not at_first_head:  # mid-walk: every file read, no path decided yet
            at_first_head.append((progress.as_dict(1.0), progress.line(1.0)))
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(ObjectStore, "head", head)
    result = await sync(config(bucket, local, workdir / "s"), FIN, progress=progress)
    assert result.ok and result.files_transferred == 0 and result.files_adopted == 40
    (during, line) = at_first_head[0]
    assert during["phase"] == "scanning"
    counts = ("files_scanned", "objects_listed", "files_hashed", "objects_checked")
    assert [during[name] for name in (*counts, "paths_compared")] == [40, 40, 40, 0, 0]
    assert line == (
        "finalize scanning: 40 files in the folder, 40 objects listed, 0 paths compared "
        "(40 files hashed, 0 objects checked)"
    )
    after = progress.as_dict(2.0)
    assert [after[name] for name in (*counts, "paths_compared")] == [40, 40, 40, 40, 40]


async def test_wrong_credentials_and_missing_bucket_are_named(
    moto: S3Server, rclone_s3: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = workdir / "l"
    local.mkdir()
    missing = await sync(config("no-such-bucket", local, workdir / "s"), PULL)
    assert missing.fatal and "bucket does not exist" in missing.fatal
    monkeypatch.setenv("AWS_ENDPOINT_URL", rclone_s3.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong-key-id-123")
    bad = await sync(config(rclone_s3.new_bucket(), local, workdir / "s2"), PULL)
    assert bad.fatal and "AWS_ACCESS_KEY_ID" in bad.fatal
    assert list(local.iterdir()) == []


async def test_not_enough_space_fails_before_touching_anything(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import sidecar.engine.sync

    bucket = moto.new_bucket()
    s3 = moto.client()
    s3.put_object(Bucket=bucket, Key="vol/model.bin", Body=b"x" * 3000)
    local = workdir / "l"
    write(local / "mine.txt", b"mine")
    real = shutil.disk_usage

    def tiny_disk(path: Any) -> Any:
        usage = real(path)
        return type(usage)(usage.total, usage.total - 1000, 1000)

    monkeypatch.setattr(sidecar.engine.sync.shutil, "disk_usage", tiny_disk)
    result = await sync(config(bucket, local, workdir / "s"), PULL)
    assert result.fatal and "needs 2.9 KiB, 1000 B free" in result.fatal
    assert tree(local) == {"mine.txt": b"mine"}


async def test_empty_key_shadowing_a_folder_is_a_folder_marker(
    moto: S3Server, workdir: Path
) -> None:
    """rclone lists a 'dir/' marker as a 0-byte 'dir': that is no file/folder clash."""
    bucket = moto.new_bucket()
    s3 = moto.client()
    s3.put_object(Bucket=bucket, Key="vol/d", Body=b"")
    s3.put_object(Bucket=bucket, Key="vol/d/x.txt", Body=b"x")
    local = workdir / "l"
    result = await sync(config(bucket, local, workdir / "s"), PULL)
    assert result.ok and not result.errors, result.as_dict()
    assert tree(local) == {"d/x.txt": b"x"}


async def test_new_files_are_read_once_and_hashed_only_where_a_decision_needs_it(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first finalize hashes the bytes it sends, not the files beforehand; files that meet
    an object or a BASE entry are hashed before planning; big files before their upload."""
    import sidecar.engine.scan
    import sidecar.engine.transfer

    hashed: list[str] = []
    original = sidecar.engine.scan.content_hash_file

    def counting(path: Any) -> str:
        hashed.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(sidecar.engine.scan, "content_hash_file", counting)
    monkeypatch.setattr(sidecar.engine.transfer, "content_hash_file", counting)
    bucket = moto.new_bucket()
    a, b = workdir / "a", workdir / "b"
    for i in range(20):
        write(a / f"small{i}.txt", f"content {i}".encode(), mtime_ns=OLD_NS)
    write(a / "big.bin", os.urandom(6 * MiB), mtime_ns=OLD_NS)

    first = await sync(config(bucket, a, workdir / "sa"), FIN)
    assert first.ok and first.files_transferred == 21, first.as_dict()
    assert hashed == ["big.bin"]  # the multipart upload needs it up front; nothing else

    hashed.clear()
    again = await sync(config(bucket, a, workdir / "sa"), FIN)
    assert again.ok and again.files_transferred == 0 and hashed == []  # all cached by the upload

    # Another folder with the same files and no BASE: each meets an object, so each is hashed
    # to learn it is already there (adopted, not sent).
    for path in a.iterdir():
        write(b / path.name, path.read_bytes())
    hashed.clear()
    adopt = await sync(config(bucket, b, workdir / "sb"), FIN)
    assert adopt.ok and adopt.files_transferred == 0, adopt.as_dict()
    assert sorted(hashed) == sorted(p.name for p in a.iterdir())

    # A file changed since the last sync has a BASE entry: hashed before planning.
    write(a / "small3.txt", b"changed")
    hashed.clear()
    changed = await sync(config(bucket, a, workdir / "sa"), FIN)
    assert changed.ok and changed.files_transferred == 1 and hashed == ["small3.txt"]

    pulled = await sync(config(bucket, workdir / "c", workdir / "sc"), PULL)
    assert pulled.ok and tree(workdir / "c") == tree(a)  # the metadata hashes were right


def test_umask_is_read_without_being_changed() -> None:
    from sidecar.engine.transfer import _current_umask

    previous = os.umask(0o027)
    try:
        assert _current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # still what it was: nothing set it meanwhile
    finally:
        os.umask(previous)


async def test_part_buffers_are_handed_out_in_the_order_asked() -> None:
    """Ranged downloads hold a buffer until the ranges before them are hashed; that always
    ends only because the pool serves borrowers first come, first served (no barging)."""
    from sidecar.engine.transfer import BufferPool

    pool = BufferPool(16, 1)
    order: list[str] = []
    release = asyncio.Event()

    async def borrower(name: str, hold: asyncio.Event | None = None) -> None:
        async with pool.borrow(16):
            order.append(name)
            if hold is not None:
                await hold.wait()

    first = asyncio.create_task(borrower("first", release))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(borrower(f"queued{i}")) for i in range(3)]
    await asyncio.sleep(0)
    release.set()
    await asyncio.sleep(0)  # "first" gives its buffer back...
    late = asyncio.create_task(borrower("late"))  # ...and a newcomer asks at once
    await asyncio.gather(first, *queued, late)
    assert order == ["first", "queued0", "queued1", "queued2", "late"]


async def test_buffer_pool_lends_bytes_within_budget_and_survives_cancellation() -> None:
    """Bodies of any length share one byte budget: small ones go side by side, one larger
    than the budget waits until nothing is lent and then goes alone, and a borrower
    cancelled while queued neither leaks its charge nor blocks those behind it."""
    from sidecar.engine.transfer import BufferPool

    pool = BufferPool(16, 64)
    held: list[int] = []
    peak = 0
    gates = {name: asyncio.Event() for name in ("a", "b", "big", "c")}

    async def borrower(name: str, length: int) -> None:
        nonlocal peak
        async with pool.borrow(length) as view:
            assert len(view) == length
            held.append(length)
            peak = max(peak, sum(held))
            await gates[name].wait()
            held.remove(length)

    a = asyncio.create_task(borrower("a", 30))
    b = asyncio.create_task(borrower("b", 30))
    await asyncio.sleep(0)
    assert sorted(held) == [30, 30]  # 60 of 64: side by side
    big = asyncio.create_task(borrower("big", 100))  # more than the budget: waits for all
    c = asyncio.create_task(borrower("c", 4))  # fits, but must not barge past "big"
    await asyncio.sleep(0)
    assert sorted(held) == [30, 30]
    big.cancel()  # cancelled while queued: "c" moves up
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert sorted(held) == [4, 30, 30]
    for name in ("a", "b", "c"):
        gates[name].set()
    await asyncio.gather(a, b, c)
    assert pool._lent == 0 and peak <= 64
    gates["big"].set()
    await borrower("big", 100)  # alone, once nothing else is lent
    assert pool._lent == 0


def test_short_writes_are_completed_not_left_as_holes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pwrite may write less than asked; downloads hash from memory, so the file must get
    every byte (or the error)."""
    import sidecar.engine.transfer

    real_pwrite = os.pwrite
    monkeypatch.setattr(
        sidecar.engine.transfer.os,
        "pwrite",
        lambda fd, data, offset: real_pwrite(fd, data[:3], offset),
    )
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        sidecar.engine.transfer._pwrite_all(fd, b"0123456789", 5)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"\0" * 5 + b"0123456789"


async def test_a_mode_only_change_sends_no_content(
    server: S3Server, workdir: Path, request_counter: Counter[str]
) -> None:
    """chmod +x after a sync: finalize rewrites the object's metadata, and a replica with
    BASE chmods its copy, neither moving the bytes. rclone serve s3 keeps ETag and
    LastModified on such a rewrite (replicas could not see it), so there it is uploaded."""
    bucket = server.new_bucket()
    a, b = workdir / "a", workdir / "b"
    script = write(a / "tool.sh", b"#!/bin/sh\necho hi\n")
    write(a / "big.bin", os.urandom(6 * MiB))  # multipart-sized: the rewrite does not care
    assert (await sync(config(bucket, a, workdir / "sa"), FIN)).ok
    assert (await sync(config(bucket, b, workdir / "sb"), PULL)).ok

    # Listings show LastModified to the second (moto, AWS): a rewrite of the same bytes
    # within the second of the upload is invisible to replicas whatever is sent.
    await asyncio.sleep(1.1)
    script.chmod(0o755)
    (a / "big.bin").chmod(0o755)
    request_counter.clear()
    pushed = await sync(config(bucket, a, workdir / "sa"), FIN)
    assert pushed.ok and pushed.files_transferred == 2, pushed.as_dict()
    if server.kind == "moto":
        assert pushed.bytes_transferred == 0
        assert request_counter["copy_object"] == 2
        assert not {"put_object", "upload_part"} & set(request_counter), request_counter
    else:
        assert pushed.bytes_transferred == 6 * MiB + script.stat().st_size

    request_counter.clear()
    pulled = await sync(config(bucket, b, workdir / "sb"), PULL)
    assert pulled.ok and pulled.files_transferred == 2, pulled.as_dict()
    for name in ("tool.sh", "big.bin"):
        assert os.access(b / name, os.X_OK), name
    assert tree(b) == tree(a)
    if server.kind == "moto":
        assert pulled.bytes_transferred == 0 and request_counter["get_object"] == 0

    fresh = await sync(config(bucket, workdir / "c", workdir / "sc"), PULL)
    assert fresh.ok and os.access(workdir / "c" / "tool.sh", os.X_OK)
    request_counter.clear()
    again = await sync(config(bucket, b, workdir / "sb"), PULL)
    assert (
        again.ok and again.files_transferred == 0 and set(request_counter) == {"list_objects_v2"}
    ), request_counter


def keys(moto: S3Server, bucket: str) -> set[str]:
    listed = moto.client().list_objects_v2(Bucket=bucket, Prefix="vol/")
    return {item["Key"] for item in listed.get("Contents", [])}


async def test_a_folder_replacing_a_file_waits_for_the_files_delete(
    moto: S3Server, workdir: Path
) -> None:
    """`d` -> `d/x` pushed while the delete of `d` is withheld (here by a scan error: one
    invalid-UTF-8 local name) used to leave `d` and `d/x` in the bucket for good, and every
    later sync on every replica withheld all its deletes."""
    bucket = moto.new_bucket()
    mine, theirs = workdir / "a", workdir / "b"
    cfg_a, cfg_b = config(bucket, mine, workdir / "sa"), config(bucket, theirs, workdir / "sb")
    write(mine / "d", b"a file")
    write(mine / "other.txt", b"other")
    assert (await sync(cfg_a, FIN)).ok
    assert (await sync(cfg_b, PULL)).ok

    (mine / "d").unlink()
    write(mine / "d" / "x", b"now a folder")
    bad = write(mine / os.fsdecode(b"bad\xff"), b"a name that is no UTF-8")
    held = await sync(cfg_a, FIN)
    assert held.deletes_blocked, held.as_dict()
    assert "d/x" in {e.path for e in held.errors}, held.as_dict()
    assert keys(moto, bucket) == {"vol/d", "vol/other.txt"}, "a file and a folder named d"

    # The scan error gone, the next finalize deletes the file and pushes the folder.
    bad.unlink()
    done = await sync(cfg_a, FIN)
    assert done.ok, done.as_dict()
    assert keys(moto, bucket) == {"vol/d/x", "vol/other.txt"}
    pulled = await sync(cfg_b, PULL)
    assert pulled.ok, pulled.as_dict()
    assert tree(theirs) == {"d/x": b"now a folder", "other.txt": b"other"}


async def test_a_file_and_folder_clash_in_the_bucket_withholds_no_delete_and_resolves(
    moto: S3Server, workdir: Path
) -> None:
    """A clash left by an older version: reported by name on every replica, deletes elsewhere
    still happen, and the replica whose folder replaced the file removes the file."""
    bucket = moto.new_bucket()
    s3 = moto.client()
    mine, theirs = workdir / "a", workdir / "b"
    cfg_a, cfg_b = config(bucket, mine, workdir / "sa"), config(bucket, theirs, workdir / "sb")
    for name in ("d", "gone.txt", "k1", "k2", "k3"):
        write(mine / name, name.encode())
    assert (await sync(cfg_a, FIN)).ok
    assert (await sync(cfg_b, PULL)).ok
    # What an older version pushed: the folder that replaced `d`, beside `d`.
    (mine / "d").unlink()
    write(mine / "d" / "x", b"now a folder")
    s3.put_object(Bucket=bucket, Key="vol/d/x", Body=b"now a folder")

    # Another replica still has the file: it keeps it, names the clash, and its deletes go on.
    (theirs / "k1").unlink()
    b_fin = await sync(cfg_b, FIN)
    assert "vol/d" in {e.path for e in b_fin.errors}, b_fin.as_dict()
    assert b_fin.deletes_blocked is None and b_fin.files_deleted == 1, b_fin.as_dict()
    s3.put_object(Bucket=bucket, Key="vol/gone.txt", Body=b"changed")
    s3.delete_object(Bucket=bucket, Key="vol/k2")
    b_pull = await sync(cfg_b, PULL)
    assert b_pull.files_deleted == 1 and b_pull.deletes_blocked is None, b_pull.as_dict()
    assert "vol/d" in {e.path for e in b_pull.errors}
    assert (theirs / "d").read_bytes() == b"d" and not (theirs / "k2").exists()

    # The replica that replaced the file by the folder deletes the file: clash resolved.
    a_fin = await sync(cfg_a, FIN)
    assert a_fin.ok, a_fin.as_dict()
    assert keys(moto, bucket) == {"vol/d/x", "vol/gone.txt", "vol/k3"}
    assert (await sync(cfg_b, PULL)).ok
    assert tree(theirs) == {"d/x": b"now a folder", "gone.txt": b"changed", "k3": b"k3"}


async def test_no_folder_is_pushed_below_a_file_whose_delete_failed(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan deletes `d` before pushing `d/x`, but another writer rewrites `d` after our
    listing: the conditional delete fails, so `d/x` must not be pushed either."""
    vol = volume(moto, workdir, force_delete=True)
    write(vol.local / "d", b"a file")
    assert (await sync(vol.cfg, FIN)).ok
    (vol.local / "d").unlink()
    write(vol.local / "d" / "x", b"now a folder")
    race_before(monkeypatch, vol, "delete_remote")
    result = await sync(vol.cfg, FIN)
    assert {e.path for e in result.errors} == {"d", "d/x"}, result.as_dict()
    assert keys(moto, vol.bucket) == {"vol/d"}, "a file and a folder named d"


async def test_whole_file_puts_share_the_transfer_memory_budget(
    moto: S3Server, workdir: Path
) -> None:
    """Files under the multipart threshold are PUT from memory; with --concurrency of them
    in flight at once, their bodies must still fit the transfer memory budget (64 MiB)
    rather than concurrency x file size (64 x 30 MiB held 2 GiB before)."""
    import tracemalloc

    local = workdir / "local"
    for index in range(40):
        write(local / f"f{index:02d}.bin", os.urandom(3 * MiB + index))
    cfg = config(
        moto.new_bucket(),
        local,
        workdir / "state",
        concurrency=40,
        multipart_threshold=32 * MiB,
    )
    tracemalloc.start()
    try:
        result = await sync(cfg, FIN)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.ok, result.errors
    assert result.files_transferred == 40
    assert peak < 96 * MiB, f"{peak / MiB:.0f} MiB held at once for 120 MiB of 3 MiB files"


async def test_downloads_take_the_same_valid_parts_as_uploads(
    server: S3Server, workdir: Path, request_counter: Counter[str]
) -> None:
    """A part size under S3's 5 MiB minimum (a config built without the option table) was
    used as is for ranged downloads: 12 GETs of 1 MiB for what was uploaded as 3 parts."""
    bucket = server.new_bucket()
    a, b = workdir / "a", workdir / "b"
    data = os.urandom(12 * MiB)
    write(a / "big.bin", data)
    assert (await sync(config(bucket, a, workdir / "sa", part_size=1 * MiB), FIN)).ok
    assert request_counter["upload_part"] == 3
    request_counter.clear()
    pulled = await sync(config(bucket, b, workdir / "sb", part_size=1 * MiB), PULL)
    assert pulled.ok, pulled.as_dict()
    assert (b / "big.bin").read_bytes() == data
    assert request_counter["get_object"] == 3, request_counter


async def test_part_buffers_are_reused_when_borrowers_are_granted_before_they_run() -> None:
    """Four 16-byte buffers fit the budget; however the releases and the grants interleave,
    no more than four are ever made (a 1 GiB pull made 19 of 16 MiB when two releases came
    before the borrowers they granted had run)."""
    from sidecar.engine.transfer import BufferPool

    pool = BufferPool(16, 64)
    made: dict[int, object] = {}  # holding each buffer keeps its id unique
    gates = [asyncio.Event() for _ in range(12)]

    async def borrower(index: int) -> None:
        async with pool.borrow(16) as view:
            made[id(view.obj)] = view.obj
            await gates[index].wait()

    tasks = [asyncio.create_task(borrower(i)) for i in range(12)]
    await asyncio.sleep(0)
    for first, second in ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)):
        gates[first].set()  # two holders give back in one loop turn, before either
        gates[second].set()  # borrower granted by them has run
        for _ in range(3):
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert len(made) <= 4 and pool._lent == 0


async def test_a_cancelled_thread_call_returns_only_once_the_thread_is_done() -> None:
    """The caller closes the fd and gives back the buffer as soon as the cancellation reaches
    it: the thread (a pwrite, a preadv into a part buffer) must be done by then."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from sidecar.engine.transfer import finish_in_thread

    started, proceed, finished = threading.Event(), threading.Event(), threading.Event()

    def work() -> None:
        started.set()
        proceed.wait(30)
        finished.set()

    with ThreadPoolExecutor(1) as executor:
        try:
            call = asyncio.ensure_future(finish_in_thread(executor, work))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
            call.cancel()
            for _ in range(5):
                await asyncio.sleep(0)
            assert not call.done(), "returned while the thread still works"
            call.cancel()  # cancelled again meanwhile: still waits
        finally:
            proceed.set()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert finished.is_set()
