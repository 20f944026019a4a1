"""Our writes to the bucket say only what is true (issue 9, items 5, 13, 14, 16): a mode
rewrite never labels another writer's bytes, a mode change made by another replica is seen,
a write whose answer was lost is not reported as a conflict, and an ETag that is not an MD5
is never compared with one."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from sidecar.engine.hashing import content_hash_bytes
from sidecar.engine.transfer import Transfers
from sidecar.s3 import META_HASH, ObjectStore
from sidecar.s3.http11 import ConnectionPool
from tests.conftest import S3Server
from tests.support.engine_support import (
    FIN,
    PULL,
    MiB,
    config,
    first_arguments,
    sync,
    tree,
    write,
)
from tests.support.faultproxy import Fault, FaultProxy, Request


@pytest.mark.parametrize("size", [100, 6 * MiB], ids=["single-part", "multipart"])
async def test_a_mode_rewrite_racing_a_writer_never_relabels_its_bytes(
    conditional: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Item 5: moto ignores x-amz-copy-source-if-match, so the in-place copy that carries a
    chmod would put our hash and mode on bytes another writer put there after our listing
    (the copy's ETag gives it away); SeaweedFS, as AWS, refuses the copy with 412."""
    bucket = conditional.new_bucket()
    s3 = conditional.client()
    local = workdir / "l"
    cfg = config(bucket, local, workdir / "s")
    script = write(local / "tool.sh", os.urandom(size))
    assert (await sync(cfg, FIN)).ok
    script.chmod(0o755)
    racer = os.urandom(size)
    original = Transfers.set_mode_remote

    async def racing(self: Transfers, action: Any) -> Any:
        # Another writer lands between our listing and our copy.
        s3.put_object(Bucket=bucket, Key=f"vol/{action.path}", Body=racer)
        return await original(self, action)

    monkeypatch.setattr(Transfers, "set_mode_remote", racing)
    result = await sync(cfg, FIN)
    assert not result.ok, result.as_dict()
    failed = {e.path: e.reason for e in result.errors}
    assert set(failed) == {"tool.sh"} and "changed in the bucket" in failed["tool.sh"]
    assert s3.get_object(Bucket=bucket, Key="vol/tool.sh")["Body"].read() == racer
    label = s3.head_object(Bucket=bucket, Key="vol/tool.sh")["Metadata"].get(META_HASH)
    assert label in (None, content_hash_bytes(racer))  # never our hash on their bytes

    monkeypatch.setattr(Transfers, "set_mode_remote", original)
    fresh = await sync(config(bucket, workdir / "c", workdir / "sc"), PULL)
    assert fresh.ok, fresh.as_dict()  # no hash mismatch: the object does not lie
    assert (workdir / "c" / "tool.sh").read_bytes() == racer


async def test_a_mode_rewrite_of_a_single_part_object_is_checked_not_resent(
    moto: S3Server, workdir: Path
) -> None:
    """The check costs nothing when no one raced: the copy's ETag is the one it was pinned
    to, and no byte moves."""
    bucket = moto.new_bucket()
    local = workdir / "l"
    cfg = config(bucket, local, workdir / "s")
    script = write(local / "tool.sh", b"#!/bin/sh\n")
    assert (await sync(cfg, FIN)).ok
    script.chmod(0o755)
    pushed = await sync(cfg, FIN)
    assert pushed.ok and pushed.files_transferred == 1 and pushed.bytes_transferred == 0
    fresh = await sync(config(bucket, workdir / "c", workdir / "sc"), PULL)
    assert fresh.ok and os.access(workdir / "c" / "tool.sh", os.X_OK)
    assert tree(workdir / "c") == tree(local)


async def _settle_a_second() -> None:
    # Listings show LastModified to the second: a write in the same second as the one
    # before cannot be told from it, whatever is recorded.
    await asyncio.sleep(1.1)


async def test_a_chmod_pushed_by_another_replica_reaches_the_uploader(
    server: S3Server, workdir: Path
) -> None:
    """Item 13: A's BASE entry comes from its own upload (no LastModified known yet); B's
    chmod keeps the ETag (same bytes), so only the time of the rewrite shows it."""
    bucket = server.new_bucket()
    a, b = workdir / "a", workdir / "b"
    cfg_a = config(bucket, a, workdir / "sa")
    cfg_b = config(bucket, b, workdir / "sb")
    write(a / "tool.sh", b"#!/bin/sh\necho hi\n")
    write(a / "big.bin", os.urandom(6 * MiB))
    assert (await sync(cfg_a, FIN)).ok
    assert (await sync(cfg_b, PULL)).ok
    await _settle_a_second()
    for name in ("tool.sh", "big.bin"):
        (b / name).chmod(0o755)
    pushed = await sync(cfg_b, FIN)
    assert pushed.ok and pushed.files_transferred == 2, pushed.as_dict()

    pulled = await sync(cfg_a, PULL)
    assert pulled.ok and pulled.files_transferred == 2, pulled.as_dict()
    for name in ("tool.sh", "big.bin"):
        assert os.access(a / name, os.X_OK), name
    assert tree(a) == tree(b)
    again = await sync(cfg_a, PULL)
    assert again.ok and again.files_transferred == 0, again.as_dict()


async def test_our_own_write_is_not_taken_for_a_remote_change(
    each_server: S3Server, workdir: Path, request_counter: Counter[str]
) -> None:
    """What item 13 records must not make the uploader see its own write as news."""
    bucket = each_server.new_bucket()
    local = workdir / "l"
    cfg = config(bucket, local, workdir / "s")
    write(local / "tool.sh", b"#!/bin/sh\n")
    write(local / "big.bin", os.urandom(6 * MiB))
    assert (await sync(cfg, FIN)).ok
    await _settle_a_second()
    (local / "tool.sh").chmod(0o755)
    assert (await sync(cfg, FIN)).ok  # a rewrite of our own, recorded as ours
    await _settle_a_second()
    request_counter.clear()
    pulled = await sync(cfg, PULL)
    assert pulled.ok and pulled.files_transferred == 0, pulled.as_dict()
    assert "get_object" not in request_counter, request_counter


async def test_a_write_whose_answer_was_lost_counts_as_done(
    conditional: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 14: the connection resets after the server applied a conditional PUT (or
    CompleteMultipartUpload), before its answer arrives; the retry then meets our own
    write (412, or NoSuchUpload for the finished upload). That is done, not a conflict."""
    bucket = conditional.new_bucket()
    s3 = conditional.client()
    local = workdir / "l"
    cfg = config(bucket, local, workdir / "s")
    write(local / "shared.txt", b"v1")
    write(local / "big-old.bin", os.urandom(6 * MiB))
    assert (await sync(cfg, FIN)).ok
    write(local / "shared.txt", b"v2, sent once")  # If-Match on the ETag in BASE
    write(local / "new.txt", b"new, sent once")  # If-None-Match: *
    write(local / "big-old.bin", os.urandom(6 * MiB))  # Complete, If-Match
    write(local / "big-new.bin", os.urandom(6 * MiB))  # Complete, If-None-Match: *
    lost: list[str] = []
    completes: list[str] = []
    original_request = ConnectionPool.request

    async def answer_lost_once(
        self: ConnectionPool,
        method: str,
        target: str,
        headers: Any,
        body: Any = None,
        **options: Any,
    ) -> Any:
        if method == "POST" and target in completes and conditional.kind == "moto":
            # The server applied this Complete; its answer was dropped, and here is the
            # retry. AWS (and SeaweedFS) answer it with 412 (the ETag it was pinned to is
            # gone: the object is now ours) or NoSuchUpload. moto would complete the
            # finished upload again, conditions unchecked (and ignores If-Match there); for
            # an upload it does not know it checks If-None-Match first. So on moto the retry
            # names an unknown upload with If-None-Match: *, and moto answers as AWS does.
            target = target.replace("uploadId=", "uploadId=gone-")
            headers = {**headers, "If-None-Match": "*"}
            headers.pop("If-Match", None)
        response = await original_request(self, method, target, headers, body, **options)
        complete = method == "POST" and "uploadId=" in target and "gone-" not in target
        single_put = method == "PUT" and "partNumber" not in target
        single_put = single_put and "x-amz-copy-source" not in headers
        if (complete and target not in completes) or (single_put and target not in lost):
            (completes if complete else lost).append(target)
            await response.read_all()
            response.release()
            raise ConnectionResetError("reset by the test after the server applied it")
        return response

    monkeypatch.setattr(ConnectionPool, "request", answer_lost_once)
    checked = first_arguments(monkeypatch, ObjectStore, "_landed_already")
    result = await sync(cfg, FIN)
    assert len(lost) == 2 and len(completes) == 2, (lost, completes)
    assert result.ok and result.files_transferred == 4, result.errors
    assert sorted(checked) == [
        f"vol/{n}" for n in ("big-new.bin", "big-old.bin", "new.txt", "shared.txt")
    ]
    for name in ("shared.txt", "new.txt", "big-old.bin", "big-new.bin"):
        body = s3.get_object(Bucket=bucket, Key=f"vol/{name}")["Body"].read()
        assert body == (local / name).read_bytes(), name
    monkeypatch.setattr(ConnectionPool, "request", original_request)
    again = await sync(cfg, FIN)  # BASE holds what the bucket holds: nothing to do
    assert again.ok and again.files_transferred == 0, again.as_dict()


def _opaque_etags_on_the_wire(
    monkeypatch: pytest.MonkeyPatch, key: str, real: str, opaque: str
) -> None:
    """moto stores SSE-KMS objects (and answers their HEADs with the encryption header) but
    keeps the MD5 as their ETag; AWS does not. Rewrite the ETag of `key` in every answer the
    client reads (listing, HEAD, GET) and back in the If-Match it sends, below the S3 layer."""
    original = ConnectionPool.request
    path = "/" + key

    async def rewriting(
        self: ConnectionPool,
        method: str,
        target: str,
        headers: Any,
        body: Any = None,
        **options: Any,
    ) -> Any:
        headers = dict(headers)
        if headers.get("If-Match") == f'"{opaque}"':
            headers["If-Match"] = f'"{real}"'
        response = await original(self, method, target, headers, body, **options)
        if "list-type=" in target:
            listing = await response.read_all()
            response.body = listing.replace(real.encode(), opaque.encode())
        elif target.split("?")[0].endswith(path) and "etag" in response.headers:
            response.headers["etag"] = f'"{opaque}"'
        return response

    monkeypatch.setattr(ConnectionPool, "request", rewriting)


@pytest.mark.parametrize("direction", [PULL, FIN])
async def test_an_encrypted_objects_etag_is_never_taken_for_an_md5(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch, direction: Any
) -> None:
    """Item 16: an SSE-KMS object's ETag is not the MD5 of its bytes. A first sync (no
    BASE) of a folder that already holds the same bytes must see them as equal: no
    conflict, no conflict copy, nothing re-sent."""
    bucket = moto.new_bucket()
    s3 = moto.client()
    data = os.urandom(1000)
    answer = s3.put_object(
        Bucket=bucket,
        Key="vol/secret.bin",
        Body=data,
        ServerSideEncryption="aws:kms",
        SSEKMSKeyId="alias/test",
    )
    real = answer["ETag"].strip('"')
    head = s3.head_object(Bucket=bucket, Key="vol/secret.bin")
    assert head["ServerSideEncryption"] == "aws:kms"  # from the server, not from the test
    _opaque_etags_on_the_wire(monkeypatch, f"{bucket}/vol/secret.bin", real, "0" * 32)
    local = workdir / "l"
    write(local / "secret.bin", data)
    cfg = config(bucket, local, workdir / "s")

    result = await sync(cfg, direction)
    assert result.ok and not result.conflicts, result.as_dict()
    assert result.files_adopted == 1 and result.bytes_transferred == 0, result.as_dict()
    assert tree(local) == {"secret.bin": data}
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="vol/")["Contents"]
    assert [item["Key"] for item in listed] == ["vol/secret.bin"]
    again = await sync(cfg, direction)
    assert again.ok and again.files_transferred == 0 and again.files_adopted == 0


async def test_a_first_finalize_over_an_equal_foreign_multipart_object_sends_nothing(
    conditional: S3Server, workdir: Path
) -> None:
    """The same unknown for a foreign multipart object ('-N' ETag, no hash metadata): the
    finalize reads and hashes it instead of uploading equal bytes and copying it aside."""
    bucket = conditional.new_bucket()
    s3 = conditional.client()
    data = os.urandom(6 * MiB)
    upload = s3.create_multipart_upload(Bucket=bucket, Key="vol/model.bin")
    parts = []
    for number, start in enumerate((0, 5 * MiB), 1):
        part = s3.upload_part(
            Bucket=bucket,
            Key="vol/model.bin",
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=data[start : start + 5 * MiB],
        )
        parts.append({"ETag": part["ETag"], "PartNumber": number})
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key="vol/model.bin",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": parts},
    )
    local = workdir / "l"
    write(local / "model.bin", data)
    result = await sync(config(bucket, local, workdir / "s"), FIN)
    assert result.ok and not result.conflicts, result.as_dict()
    assert result.files_adopted == 1 and result.bytes_transferred == 0, result.as_dict()
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="vol/")["Contents"]
    assert [item["Key"] for item in listed] == ["vol/model.bin"]


def _foreign_multipart(s3: Any, bucket: str, key: str, data: bytes) -> str:
    """Upload data in 5 MiB parts as another tool would (no hash metadata); its ETag."""
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts = [
        {"PartNumber": n, "ETag": s3.upload_part(
            Bucket=bucket, Key=key, UploadId=upload, PartNumber=n, Body=data[at : at + 5 * MiB]
        )["ETag"]}
        for n, at in enumerate(range(0, len(data), 5 * MiB), 1)
    ]  # fmt: skip
    done = s3.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
    )
    return str(done["ETag"]).strip('"')


@pytest.mark.parametrize("direction", [PULL, FIN])
async def test_a_multipart_etag_is_never_compared_with_a_local_md5(
    seaweed: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch, direction: Any
) -> None:
    """Item 4 (issue 11) with SeaweedFS's real `-N` ETags (in HEAD and listings, as AWS): a
    foreign multipart object and a local file of the same size, no BASE. No MD5 of the local
    file is taken; the bytes decide (a pull downloads, a finalize reads the object), and
    differing bytes are a conflict that keeps both."""
    bucket = seaweed.new_bucket()
    s3 = seaweed.client()
    theirs, mine = os.urandom(6 * MiB), os.urandom(6 * MiB)
    etag = _foreign_multipart(s3, bucket, "vol/model.bin", theirs)
    assert etag.endswith("-2"), etag
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="vol/")["Contents"][0]["ETag"]
    assert listed.strip('"') == etag  # SeaweedFS lists it as Complete answered it

    def no_md5(path: Any) -> str:
        raise AssertionError(f"MD5 of {path} taken to compare with ETag {etag}")

    monkeypatch.setattr("sidecar.engine.walk.md5_file", no_md5)
    local = workdir / "l"
    write(local / "model.bin", mine)
    result = await sync(config(bucket, local, workdir / "s"), direction)
    assert result.ok and not result.files_adopted, result.as_dict()
    (conflict,) = result.conflicts
    assert conflict.copy is not None
    if direction is PULL:
        assert tree(local) == {"model.bin": theirs, conflict.copy: mine}
    else:
        assert s3.get_object(Bucket=bucket, Key="vol/model.bin")["Body"].read() == mine
        kept = s3.get_object(Bucket=bucket, Key=f"vol/{conflict.copy}")["Body"].read()
        assert kept == theirs


async def test_an_sse_s3_objects_etag_is_its_md5_and_adopts_equal_bytes(
    seaweed: S3Server, workdir: Path
) -> None:
    """The other side of item 4: SSE-S3 (AES256) keeps the MD5 as the ETag (AWS, SeaweedFS),
    so a foreign object encrypted that way is proven equal by MD5, nothing moved."""
    bucket = seaweed.new_bucket()
    s3 = seaweed.client()
    data = os.urandom(1000)
    s3.put_object(Bucket=bucket, Key="vol/a.bin", Body=data, ServerSideEncryption="AES256")
    assert s3.head_object(Bucket=bucket, Key="vol/a.bin")["ServerSideEncryption"] == "AES256"
    local = workdir / "l"
    write(local / "a.bin", data)
    result = await sync(config(bucket, local, workdir / "s"), FIN)
    assert result.ok and not result.conflicts, result.as_dict()
    assert result.files_adopted == 1 and result.bytes_transferred == 0, result.as_dict()


async def test_a_rewritten_object_deleted_here_is_asked_about_not_read(
    moto: S3Server, workdir: Path, request_counter: Counter[str]
) -> None:
    """A same-bytes rewrite (here by another tool, no hash metadata) of a file deleted
    locally: one HEAD to tell a real change, no local file to compare with, no crash; the
    modification wins as always (modified-deleted)."""
    bucket = moto.new_bucket()
    s3 = moto.client()
    s3.put_object(Bucket=bucket, Key="vol/notes.txt", Body=b"notes")
    local = workdir / "l"
    cfg = config(bucket, local, workdir / "s")
    assert (await sync(cfg, PULL)).ok
    await _settle_a_second()
    s3.copy_object(
        Bucket=bucket,
        Key="vol/notes.txt",
        CopySource={"Bucket": bucket, "Key": "vol/notes.txt"},
        MetadataDirective="REPLACE",
        Metadata={"owner": "someone"},
    )
    (local / "notes.txt").unlink()
    request_counter.clear()
    pulled = await sync(cfg, PULL)
    assert pulled.ok, pulled.as_dict()
    assert [c.kind for c in pulled.conflicts] == ["modified-deleted"]
    assert (local / "notes.txt").read_bytes() == b"notes"
    assert request_counter["head_object"] == 1, request_counter


def _reset_after_first(operation: str) -> Callable[[Request], Fault]:
    """RESET_AFTER on the first request of `operation` only: the server applies it, the
    client never learns its answer."""
    faulted: list[Request] = []

    def choose(request: Request) -> Fault:
        if request.operation == operation and not faulted:
            faulted.append(request)
            return Fault.RESET_AFTER
        return Fault.NONE

    return choose


async def test_a_conditional_put_reset_on_a_reused_connection_is_checked_not_resent_blind(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 14 on the wire: the listing leaves a kept-alive connection, the PutObject
    (If-None-Match: *) reuses it, the server applies it and the connection resets before any
    byte of the answer. The pool used to take that for a stale connection and resend it
    silently; the resend's 412 then came back as a first answer and the file was reported
    "changed in the bucket". The resend must be a visible retry, so the object is checked."""
    bucket = moto.new_bucket()
    s3 = moto.client()
    upstream = urlsplit(moto.endpoint)
    assert upstream.hostname and upstream.port
    checked = first_arguments(monkeypatch, ObjectStore, "_landed_already")
    local = workdir / "l"
    write(local / "x.txt", b"new, sent once\n")
    with FaultProxy(upstream.hostname, upstream.port, _reset_after_first("PutObject")) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        result = await sync(config(bucket, local, workdir / "s"), FIN)
        faults = proxy.faults()
    assert faults == Counter({Fault.RESET_AFTER: 1}), faults
    assert result.ok and result.files_transferred == 1, result.as_dict()
    assert checked == ["vol/x.txt"]
    assert s3.get_object(Bucket=bucket, Key="vol/x.txt")["Body"].read() == b"new, sent once\n"
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    again = await sync(config(bucket, local, workdir / "s"), FIN)
    assert again.ok and again.files_transferred == 0, again.as_dict()


@pytest.mark.parametrize("size", [100, 6 * MiB], ids=["single-part", "multipart"])
@pytest.mark.parametrize("known", [True, False], ids=["replaced", "new"])
async def test_a_write_applied_just_before_the_run_died_is_not_a_conflict_with_ourselves(
    conditional: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch, size: int, known: bool
) -> None:
    """The run dies after the server applied a write and before its answer came: the next
    finalize, after the user edited the file again, must take the object for our own write
    (it holds our hash), not keep it as a `.conflict-` copy (issue 9, kill -9 suite)."""
    bucket = conditional.new_bucket()
    s3 = conditional.client()
    local = workdir / "l"
    cfg = config(bucket, local, workdir / "s")
    if known:
        write(local / "a.bin", os.urandom(size))
        assert (await sync(cfg, FIN)).ok
    sent = os.urandom(size + 1)
    write(local / "a.bin", sent)
    applied = asyncio.Event()

    def dying(real: Any) -> Any:
        async def write_then_hang(self: ObjectStore, *args: Any, **kwargs: Any) -> Any:
            await real(self, *args, **kwargs)
            applied.set()
            await asyncio.Event().wait()  # the answer never reaches us: we are killed

        return write_then_hang

    real_put, real_complete = ObjectStore.put, ObjectStore.complete_multipart
    monkeypatch.setattr(ObjectStore, "put", dying(real_put))
    monkeypatch.setattr(ObjectStore, "complete_multipart", dying(real_complete))
    running = asyncio.ensure_future(sync(cfg, FIN))
    await asyncio.wait_for(applied.wait(), 30)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    monkeypatch.setattr(ObjectStore, "put", real_put)
    monkeypatch.setattr(ObjectStore, "complete_multipart", real_complete)
    assert s3.get_object(Bucket=bucket, Key="vol/a.bin")["Body"].read() == sent

    edited = os.urandom(size + 2)
    write(local / "a.bin", edited)
    result = await sync(cfg, FIN)
    assert result.ok and not result.conflicts, result.as_dict()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["vol/a.bin"]
    assert s3.get_object(Bucket=bucket, Key="vol/a.bin")["Body"].read() == edited
    again = await sync(cfg, FIN)
    assert again.ok and again.files_transferred == 0, again.as_dict()
