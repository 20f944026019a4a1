"""The transfer engine (sidecar/engine/transfer.py) on its own: one Transfers against a real
server, one action at a time, checked against the promises of its docstring. Whole syncs
through it are in test_engine.py; the BufferPool's own bookkeeping is tested there too."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sidecar.core.model import UNHASHED, Action, ActionKind, LocalFile, RemoteObject
from sidecar.core.paths import is_temp_name
from sidecar.engine.hashing import content_hash_bytes
from sidecar.engine.state import StateStore
from sidecar.engine.transfer import CHANGED_IN_BUCKET, Settings, TransferError, Transfers
from sidecar.s3 import ClientSettings, ObjectStore, S3Error, labels_for
from tests.conftest import S3Server
from tests.support.engine_support import write

MiB = 1024 * 1024
PART = 5 * MiB  # S3's smallest part; also the threshold, so 12 MiB is three parts
PREFIX = "vol/"
MTIME_NS = 1_600_000_000_123_456_789
SIZES = {"whole": MiB + 3, "ranged": 12 * MiB + 3}  # under / over the threshold


@contextlib.asynccontextmanager
async def transfers(
    workdir: Path, bucket: str, budget: int = 64 * MiB, concurrency: int = 4
) -> AsyncIterator[Transfers]:
    local = workdir / "local"
    local.mkdir(exist_ok=True)
    state = StateStore(workdir / "state", f"s3://{bucket}/{PREFIX}", local)
    state.load()
    with ThreadPoolExecutor(4) as executor:
        async with ObjectStore(bucket, ClientSettings(concurrency=concurrency)) as store:
            engine = Transfers(store, local, PREFIX, Settings(PART, PART, budget), state, executor)
            try:
                yield engine
            finally:
                engine.close()
                state.close_journal()


def put_object(
    server: S3Server, bucket: str, path: str, data: bytes, labelled_hash: str | None = None
) -> RemoteObject:
    """An object as our own upload labels it (hash, mtime, mode 755); its listing entry."""
    digest = content_hash_bytes(data) if labelled_hash is None else labelled_hash
    answer = server.client().put_object(
        Bucket=bucket, Key=PREFIX + path, Body=data, Metadata=labels_for(digest, MTIME_NS, True)
    )
    return RemoteObject(PREFIX + path, len(data), answer["ETag"].strip('"'))


def download(path: str, remote: RemoteObject, local: LocalFile | None = None) -> Action:
    return Action(ActionKind.DOWNLOAD, path, local=local, remote=remote)


def upload(root: Path, path: str) -> Action:
    local = LocalFile.of(os.stat(root / path), UNHASHED)
    return Action(ActionKind.UPLOAD, path, local=local)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if is_temp_name(p.name)]


def bucket_keys(server: S3Server, bucket: str) -> list[str]:
    s3 = server.client()
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def open_uploads(server: S3Server, bucket: str) -> list[Any]:
    return server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def rewrite(path: Path, data: bytes, mtime_ns: int) -> None:
    """Another version of the file: new bytes and a new mtime (same size, so only the stat
    and the content tell it apart)."""
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


# ---- downloads ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
async def test_a_download_lands_in_a_temp_file_beside_the_target_then_is_renamed(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    bucket = moto.new_bucket()
    data = os.urandom(size)
    remote = put_object(moto, bucket, "sub/dir/f.bin", data)
    folder = workdir / "local" / "sub" / "dir"
    seen: list[list[str]] = []  # the target's folder while the bytes come in
    for name in ("get_object", "get_range_into"):
        original = getattr(ObjectStore, name)

        async def spying(
            self: ObjectStore, *args: Any, _original: Any = original, **kwargs: Any
        ) -> Any:
            seen.append(sorted(p.name for p in folder.iterdir()))
            return await _original(self, *args, **kwargs)

        monkeypatch.setattr(ObjectStore, name, spying)
    async with transfers(workdir, bucket) as engine:
        done = await engine.download(download("sub/dir/f.bin", remote))
    assert seen, "the body was fetched"
    assert all(len(names) == 1 and is_temp_name(names[0]) for names in seen), seen
    target = folder / "f.bin"
    assert target.read_bytes() == data
    st = target.stat()
    assert st.st_mtime_ns == MTIME_NS
    assert st.st_mode & stat.S_IXUSR, "mode 755 from the metadata"
    assert done.local == LocalFile.of(st, content_hash_bytes(data))
    assert done.etag == remote.etag and done.conflict_copy is None
    assert temp_files(workdir / "local") == []


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
async def test_a_body_that_does_not_match_its_hash_leaves_the_old_file_and_no_temp(
    moto: S3Server, workdir: Path, size: int
) -> None:
    bucket = moto.new_bucket()
    wrong = content_hash_bytes(b"some other version")
    remote = put_object(moto, bucket, "sub/f.bin", os.urandom(size), labelled_hash=wrong)
    old = write(workdir / "local" / "sub" / "f.bin", b"the old version")
    before = old.stat()
    async with transfers(workdir, bucket) as engine:
        planned = LocalFile.of(before, content_hash_bytes(b"the old version"))
        with pytest.raises(TransferError) as caught:
            await engine.download(download("sub/f.bin", remote, planned))
    assert caught.value.error.path == "sub/f.bin"
    assert "content hash mismatch" in caught.value.error.reason
    assert wrong in caught.value.error.reason
    assert old.read_bytes() == b"the old version"
    assert old.stat().st_ino == before.st_ino
    assert temp_files(workdir / "local") == []


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
async def test_a_body_of_another_size_than_listed_leaves_the_old_file_and_no_temp(
    moto: S3Server, workdir: Path, size: int
) -> None:
    """The object was replaced after the listing by one of another size (a server that
    ignores If-Match would serve it): the listed size is what the download must get."""
    bucket = moto.new_bucket()
    remote = put_object(moto, bucket, "f.bin", os.urandom(size))
    listed = RemoteObject(remote.key, size + 7, "")  # no ETag to pin: only the size checks
    old = write(workdir / "local" / "f.bin", b"the old version")
    async with transfers(workdir, bucket) as engine:
        with pytest.raises(TransferError) as caught:
            await engine.download(download("f.bin", listed))
    assert caught.value.error.path == "f.bin"
    assert old.read_bytes() == b"the old version"
    assert temp_files(workdir / "local") == []


async def test_ranged_downloads_in_flight_stay_within_the_memory_budget(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = moto.new_bucket()
    data = os.urandom(6 * PART)
    remote = put_object(moto, bucket, "big.bin", data)
    in_flight, peak = 0, 0
    original = ObjectStore.get_range_into

    async def counting(self: ObjectStore, *args: Any) -> Any:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.02)  # room for more ranges to start, were they allowed to
            return await original(self, *args)
        finally:
            in_flight -= 1

    monkeypatch.setattr(ObjectStore, "get_range_into", counting)
    async with transfers(workdir, bucket, budget=2 * PART, concurrency=8) as engine:
        await engine.download(download("big.bin", remote))
        size = engine._part_buffers.size  # smaller on a long link (parts.range_size_for)
    assert peak >= 1 and peak * size <= 2 * PART, (peak, size)
    assert (workdir / "local" / "big.bin").read_bytes() == data


@pytest.mark.parametrize("arrival", ["in file order", "last range first"])
async def test_a_ranged_download_hashes_the_file_in_order_whatever_order_ranges_arrive(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch, arrival: str
) -> None:
    """A range whose turn it is is written and hashed in one hop, slice by slice; the others
    are written, then hashed when their turn comes: the hash is the file's either way."""
    bucket = moto.new_bucket()
    data = os.urandom(4 * PART + 12345)
    remote = put_object(moto, bucket, "big.bin", data)
    original = ObjectStore.get_range_into

    async def delayed(self: ObjectStore, key: str, offset: int, *args: Any) -> Any:
        if arrival == "last range first":
            await asyncio.sleep(0.05 * (len(data) - offset) / PART)
        return await original(self, key, offset, *args)

    monkeypatch.setattr(ObjectStore, "get_range_into", delayed)
    async with transfers(workdir, bucket, budget=8 * PART, concurrency=8) as engine:
        done = await engine.download(download("big.bin", remote))
    assert done.local.hash == content_hash_bytes(data)
    assert (workdir / "local" / "big.bin").read_bytes() == data


async def test_a_local_version_written_since_the_scan_is_kept_aside_not_overwritten(
    moto: S3Server, workdir: Path
) -> None:
    bucket = moto.new_bucket()
    remote = put_object(moto, bucket, "f.txt", b"the bucket's version")
    path = write(workdir / "local" / "f.txt", b"what the scan saw", MTIME_NS)
    planned = LocalFile.of(path.stat(), content_hash_bytes(b"what the scan saw"))
    rewrite(path, b"saved during the pull", MTIME_NS + 10**9)
    async with transfers(workdir, bucket) as engine:
        done = await engine.download(download("f.txt", remote, planned))
    assert done.conflict_copy is not None and done.conflict_copy != "f.txt"
    assert (workdir / "local" / done.conflict_copy).read_bytes() == b"saved during the pull"
    assert path.read_bytes() == b"the bucket's version"
    assert temp_files(workdir / "local") == []


async def test_a_local_file_equal_to_the_download_is_kept_as_is(
    moto: S3Server, workdir: Path
) -> None:
    """Written during the pull with the very bytes of the object (another pull, a copy by
    hand): not a conflict, no copy, and the file in place is not replaced."""
    bucket = moto.new_bucket()
    remote = put_object(moto, bucket, "f.txt", b"same bytes")
    path = write(workdir / "local" / "f.txt", b"same bytes", MTIME_NS)
    inode = path.stat().st_ino
    async with transfers(workdir, bucket) as engine:
        done = await engine.download(download("f.txt", remote))
    assert done.equal_already and done.conflict_copy is None
    assert sorted(p.name for p in (workdir / "local").iterdir()) == ["f.txt"]
    assert path.stat().st_ino == inode


# ---- uploads -----------------------------------------------------------------------------


async def test_a_large_upload_goes_in_parts_of_the_configured_size(
    server: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = server.new_bucket()
    data = os.urandom(2 * PART + MiB + 1)
    write(workdir / "local" / "big.bin", data)
    parts: dict[int, int] = {}
    original = ObjectStore.upload_part

    async def recording(self: ObjectStore, key: str, upload_id: str, number: int, body: Any) -> Any:
        parts[number] = len(body)
        return await original(self, key, upload_id, number, body)

    monkeypatch.setattr(ObjectStore, "upload_part", recording)
    async with transfers(workdir, bucket) as engine:
        done = await engine.upload(upload(workdir / "local", "big.bin"))
        assert engine.state.open_uploads == {}, "the upload's record ended with it"
    assert parts == {1: PART, 2: PART, 3: MiB + 1}
    assert len(done.etags) == 1 and done.etags[0].endswith("-3"), done.etags
    assert done.local.hash == content_hash_bytes(data)
    body = server.client().get_object(Bucket=bucket, Key=PREFIX + "big.bin")["Body"].read()
    assert body == data
    assert open_uploads(server, bucket) == []


async def test_a_small_upload_is_one_put_labelled_with_the_hash_of_the_bytes_sent(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = moto.new_bucket()
    data = os.urandom(PART - 1)
    path = write(workdir / "local" / "f.bin", data, MTIME_NS)
    path.chmod(0o755)

    async def no_parts(*args: Any) -> Any:
        raise AssertionError("a file under the threshold went multipart")

    monkeypatch.setattr(ObjectStore, "create_multipart", no_parts)
    async with transfers(workdir, bucket) as engine:
        done = await engine.upload(upload(workdir / "local", "f.bin"))
    assert "-" not in done.etags[0]
    head = moto.client().head_object(Bucket=bucket, Key=PREFIX + "f.bin")
    assert head["ContentLength"] == len(data)
    assert head["Metadata"] == labels_for(content_hash_bytes(data), MTIME_NS, True)


async def test_a_file_changed_during_its_multipart_upload_is_sent_again_whole(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changed after its first part went: that upload is aborted (never completed with a mix
    of two versions) and the new version is sent, labelled with its own hash."""
    bucket = moto.new_bucket()
    path = write(workdir / "local" / "big.bin", b"A" * (12 * MiB), MTIME_NS)
    created: list[dict[str, str]] = []
    original_create, original_part = ObjectStore.create_multipart, ObjectStore.upload_part

    async def creating(self: ObjectStore, key: str, metadata: dict[str, str]) -> str:
        created.append(metadata)
        return await original_create(self, key, metadata)

    async def saving_meanwhile(
        self: ObjectStore, key: str, upload_id: str, number: int, body: Any
    ) -> Any:
        if len(created) == 1 and number == 1:
            rewrite(path, b"B" * (12 * MiB), MTIME_NS + 10**9)  # the notebook saves
        return await original_part(self, key, upload_id, number, body)

    monkeypatch.setattr(ObjectStore, "create_multipart", creating)
    monkeypatch.setattr(ObjectStore, "upload_part", saving_meanwhile)
    async with transfers(workdir, bucket) as engine:
        done = await engine.upload(upload(workdir / "local", "big.bin"))
    assert len(created) == 2, "one upload per version"
    assert done.local.hash == content_hash_bytes(b"B" * (12 * MiB))
    assert done.local.mtime_ns == MTIME_NS + 10**9
    s3 = moto.client()
    got = s3.get_object(Bucket=bucket, Key=PREFIX + "big.bin")
    assert got["Body"].read() == b"B" * (12 * MiB)
    new_labels = labels_for(content_hash_bytes(b"B" * (12 * MiB)), MTIME_NS + 10**9, False)
    assert created[1] == got["Metadata"] == new_labels
    assert open_uploads(moto, bucket) == [], "the first version's upload was aborted"


async def test_a_file_changed_after_it_was_read_for_a_put_is_read_again(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole-file PUT sends bytes read in one go: a save just after that read must not
    send the old bytes under the new stat (nor the other way round)."""
    import sidecar.engine.transfer as transfer

    bucket = moto.new_bucket()
    path = write(workdir / "local" / "f.txt", b"version one", MTIME_NS)
    original = transfer._read_file
    reads = 0

    def read_then_save(name: str) -> bytes:
        nonlocal reads
        reads += 1
        data = original(name)
        if reads == 1:
            rewrite(path, b"version two", MTIME_NS + 10**9)
        return data

    monkeypatch.setattr(transfer, "_read_file", read_then_save)
    async with transfers(workdir, bucket) as engine:
        done = await engine.upload(upload(workdir / "local", "f.txt"))
    assert reads == 2
    assert done.local.hash == content_hash_bytes(b"version two")
    got = moto.client().get_object(Bucket=bucket, Key=PREFIX + "f.txt")
    assert got["Body"].read() == b"version two"


async def test_a_file_that_keeps_changing_is_not_sent_and_leaves_no_upload(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = moto.new_bucket()
    path = write(workdir / "local" / "big.bin", os.urandom(12 * MiB), MTIME_NS)
    original = ObjectStore.upload_part
    saves = 0

    async def saving_always(
        self: ObjectStore, key: str, upload_id: str, number: int, body: Any
    ) -> Any:
        nonlocal saves
        if number == 1:
            saves += 1
            rewrite(path, os.urandom(12 * MiB), MTIME_NS + saves * 10**9)
        return await original(self, key, upload_id, number, body)

    monkeypatch.setattr(ObjectStore, "upload_part", saving_always)
    async with transfers(workdir, bucket) as engine:
        with pytest.raises(TransferError) as caught:
            await engine.upload(upload(workdir / "local", "big.bin"))
        assert engine.state.open_uploads == {}
    assert caught.value.error.path == "big.bin"
    assert "kept changing" in caught.value.error.reason
    assert saves == 3
    assert bucket_keys(moto, bucket) == []
    assert open_uploads(moto, bucket) == []


async def test_an_upload_stopped_mid_way_is_recorded_durably_then_aborted(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload id is in the journal on disk before a part is sent (a kill -9 then leaves
    the next run an id to abort); stopped mid-way, the upload is aborted at once and its
    record ended, and no object became current."""
    bucket = moto.new_bucket()
    write(workdir / "local" / "big.bin", os.urandom(12 * MiB))
    original = ObjectStore.upload_part
    journal = workdir / "state" / "journal.jsonl"
    recorded: list[tuple[dict[str, str], str]] = []

    async def stopped(self: ObjectStore, key: str, upload_id: str, number: int, body: Any) -> Any:
        if number == 2:
            recorded.append((dict(state.open_uploads), upload_id))
            assert upload_id in journal.read_text()
            raise asyncio.CancelledError  # the sync is stopped
        return await original(self, key, upload_id, number, body)

    monkeypatch.setattr(ObjectStore, "upload_part", stopped)
    async with transfers(workdir, bucket) as engine:
        state = engine.state
        with pytest.raises(asyncio.CancelledError):
            await engine.upload(upload(workdir / "local", "big.bin"))
        assert state.open_uploads == {}
    [(during, upload_id)] = recorded
    assert during == {upload_id: PREFIX + "big.bin"}
    assert bucket_keys(moto, bucket) == []
    assert open_uploads(moto, bucket) == []


async def test_upload_parts_in_flight_stay_within_the_memory_budget(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = moto.new_bucket()
    data = os.urandom(6 * PART)
    write(workdir / "local" / "big.bin", data)
    in_flight, peak = 0, 0
    original = ObjectStore.upload_part

    async def counting(self: ObjectStore, key: str, upload_id: str, number: int, body: Any) -> Any:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.02)  # room for more parts to start, were they allowed to
            return await original(self, key, upload_id, number, body)
        finally:
            in_flight -= 1

    monkeypatch.setattr(ObjectStore, "upload_part", counting)
    async with transfers(workdir, bucket, budget=2 * PART, concurrency=8) as engine:
        done = await engine.upload(upload(workdir / "local", "big.bin"))
    assert 1 <= peak <= 2, peak
    assert done.etags[0].endswith("-6")
    assert moto.client().get_object(Bucket=bucket, Key=PREFIX + "big.bin")["Body"].read() == data


async def test_a_new_file_never_replaces_an_object_that_appeared_meanwhile(
    conditional: S3Server, workdir: Path
) -> None:
    """No object at the plan: the PUT is sent If-None-Match, so another writer's object that
    appeared since the listing is kept, and the error says what to do."""
    bucket = conditional.new_bucket()
    write(workdir / "local" / "f.txt", b"ours")
    action = upload(workdir / "local", "f.txt")
    conditional.client().put_object(Bucket=bucket, Key=PREFIX + "f.txt", Body=b"theirs")
    async with transfers(workdir, bucket) as engine:
        with pytest.raises(TransferError) as caught:
            await engine.upload(action)
    assert caught.value.error.path == "f.txt"
    assert caught.value.error.reason == CHANGED_IN_BUCKET
    got = conditional.client().get_object(Bucket=bucket, Key=PREFIX + "f.txt")
    assert got["Body"].read() == b"theirs"


async def test_an_upload_that_cannot_be_aborted_keeps_its_record_for_the_next_run(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link fails mid-upload and the abort with it: the upload is still on the server,
    so its record must stay for the next run to abort (SyncEngine._abort_leftover_uploads
    keeps a record whose abort failed; the transfer dropped it, orphaning billed parts)."""
    bucket = moto.new_bucket()
    write(workdir / "local" / "big.bin", os.urandom(12 * MiB))
    original = ObjectStore.upload_part
    down = S3Error("vol/big.bin", "ConnectionResetError", "reset by peer", transient=True)

    async def failing(self: ObjectStore, key: str, upload_id: str, number: int, body: Any) -> Any:
        if number == 2:
            raise down
        return await original(self, key, upload_id, number, body)

    async def unreachable(*args: Any) -> None:
        raise down

    monkeypatch.setattr(ObjectStore, "upload_part", failing)
    monkeypatch.setattr(ObjectStore, "abort_multipart", unreachable)
    async with transfers(workdir, bucket) as engine:
        with pytest.raises(TransferError) as caught:
            await engine.upload(upload(workdir / "local", "big.bin"))
    assert caught.value.error.path == "big.bin"
    [listed] = open_uploads(moto, bucket)
    next_run = StateStore(workdir / "state", f"s3://{bucket}/{PREFIX}", workdir / "local")
    next_run.load()
    assert next_run.open_uploads == {listed["UploadId"]: PREFIX + "big.bin"}
    next_run.close_journal()
    moto.client().abort_multipart_upload(
        Bucket=bucket, Key=PREFIX + "big.bin", UploadId=listed["UploadId"]
    )
