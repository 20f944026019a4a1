"""Bucket options (issue 11 item 3): the headers each operation gets (a table of the pure
decision, then the exact headers a real sync sends), and what the servers do with them:
SeaweedFS checks SSE-C (a GET/HEAD without the key is a 400), moto ignores SSE-C and takes
the rest, weed mini answers SSE-KMS PUTs with 500 (it has no KMS)."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from sidecar.cli.main import EXIT_USAGE, main
from sidecar.core.backup import BackupMode
from sidecar.core.model import Direction
from sidecar.engine.sync import SyncEngine
from sidecar.s3 import BucketOptions, ObjectStore, S3Error
from sidecar.s3 import bucket_options as bo
from sidecar.s3.http11 import ConnectionPool
from tests.conftest import S3Server
from tests.support.engine_support import config, tree, write

MiB = 1024 * 1024
PULL, FIN = Direction.PULL, Direction.FINALIZE
KEY = bytes(range(32))
OWNER = "123456789012"  # moto's default account
SSE_C = bo.sse_c_headers(KEY)
COPY_SSE_C = {
    "x-amz-copy-source-server-side-encryption-customer-algorithm": "AES256",
    "x-amz-copy-source-server-side-encryption-customer-key": SSE_C[bo.SSE_C_PREFIX + "key"],
    "x-amz-copy-source-server-side-encryption-customer-key-MD5": SSE_C[bo.SSE_C_PREFIX + "key-MD5"],
}
EVERY = {"x-amz-request-payer": "requester", "x-amz-expected-bucket-owner": OWNER}
CLASS = {"x-amz-storage-class": "STANDARD_IA"}
KMS = {
    "x-amz-server-side-encryption": "aws:kms",
    "x-amz-server-side-encryption-aws-kms-key-id": "alias/k",
}
SOURCE_OWNER = {"x-amz-source-expected-bucket-owner": OWNER}
ALL = BucketOptions(
    storage_class="STANDARD_IA",
    requester_pays=True,
    expected_bucket_owner=OWNER,
    sse="aws:kms",
    sse_kms_key_id="alias/k",
)

# (operation, options, with the SSE-C key) -> exactly the headers added.
TABLE: list[tuple[str, BucketOptions, bool, dict[str, str]]] = [
    (bo.PUT, BucketOptions(), False, {}),
    (bo.PUT, ALL, False, {**EVERY, **CLASS, **KMS}),
    (bo.CREATE, ALL, False, {**EVERY, **CLASS, **KMS}),
    (bo.COPY, ALL, False, {**EVERY, **SOURCE_OWNER, **CLASS, **KMS}),
    (bo.PART, ALL, False, EVERY),  # AWS refuses x-amz-server-side-encryption on parts
    (bo.PART_COPY, ALL, False, {**EVERY, **SOURCE_OWNER}),
    (bo.GET, ALL, False, EVERY),
    (bo.HEAD, ALL, False, EVERY),
    (bo.OTHER, ALL, False, EVERY),
    (bo.PUT, BucketOptions(sse="AES256"), False, {"x-amz-server-side-encryption": "AES256"}),
    (bo.PUT, BucketOptions(), True, SSE_C),
    (bo.CREATE, BucketOptions(), True, SSE_C),
    (bo.PART, BucketOptions(), True, SSE_C),
    (bo.GET, BucketOptions(), True, SSE_C),
    (bo.HEAD, BucketOptions(), True, SSE_C),
    (bo.COPY, BucketOptions(), True, {**SSE_C, **COPY_SSE_C}),
    (bo.PART_COPY, BucketOptions(), True, {**SSE_C, **COPY_SSE_C}),
    (bo.OTHER, BucketOptions(), True, {}),  # listings, deletes, Complete, Abort
]


@pytest.mark.parametrize(("operation", "options", "with_key", "expected"), TABLE)
def test_which_headers_on_which_operation(
    operation: str, options: BucketOptions, with_key: bool, expected: dict[str, str]
) -> None:
    assert bo.option_headers(options, operation, SSE_C if with_key else None) == expected


@pytest.mark.parametrize(
    ("method", "has_key", "query", "headers", "operation"),
    [
        ("PUT", True, {}, {}, bo.PUT),
        ("PUT", True, {}, {"x-amz-copy-source": "b/k"}, bo.COPY),
        ("PUT", True, {"partNumber": "1", "uploadId": "u"}, {}, bo.PART),
        (
            "PUT",
            True,
            {"partNumber": "1", "uploadId": "u"},
            {"x-amz-copy-source": "b/k"},
            bo.PART_COPY,
        ),
        ("POST", True, {"uploads": ""}, {}, bo.CREATE),
        ("POST", True, {"uploadId": "u"}, {}, bo.OTHER),
        ("GET", True, {}, {"Range": "bytes=0-1"}, bo.GET),
        ("GET", False, {"list-type": "2"}, {}, bo.OTHER),
        ("GET", False, {"uploads": ""}, {}, bo.OTHER),
        ("HEAD", True, {"versionId": "v"}, {}, bo.HEAD),
        ("DELETE", True, {}, {}, bo.OTHER),
    ],
)
def test_operation_of_a_request(
    method: str, has_key: bool, query: dict[str, str], headers: dict[str, str], operation: str
) -> None:
    assert bo.operation_of(method, has_key, query, headers) == operation


def test_sse_c_key_raw_or_base64_and_rereads_a_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(KEY)
    key = bo.SseCKey(str(path))
    assert key.headers() == SSE_C
    rotated = os.urandom(32)
    path.write_bytes(base64.b64encode(rotated) + b"\n")
    os.utime(path, ns=(1, 1))  # a change even within the mtime granularity
    assert (
        key.headers()[bo.SSE_C_PREFIX + "key-MD5"]
        == base64.b64encode(hashlib.md5(rotated).digest()).decode()
    )
    path.write_bytes(b"short secret")
    with pytest.raises(S3Error) as caught:
        key.headers()
    assert str(path) in str(caught.value) and "short secret" not in str(caught.value)
    assert caught.value.fatal


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, dict[str, str]]]:
    """Every request as it goes on the wire: (method, target, headers)."""
    sent: list[tuple[str, str, dict[str, str]]] = []
    original = ConnectionPool.request

    async def spy(
        self: ConnectionPool, method: str, target: str, headers: Any, *a: Any, **k: Any
    ) -> Any:
        sent.append((method, target, dict(headers)))
        return await original(self, method, target, headers, *a, **k)

    monkeypatch.setattr(ConnectionPool, "request", spy)
    return sent


def sent_operation(method: str, target: str, headers: dict[str, str]) -> str:
    path, _, query = target.partition("?")
    params = dict(p.partition("=")[::2] for p in query.split("&") if p)
    has_key = path.strip("/").count("/") >= 1  # path style: /bucket/key
    return bo.operation_of(method, has_key, params, headers)


def option_part(headers: dict[str, str]) -> dict[str, str]:
    names = (
        "x-amz-request-payer",
        "x-amz-expected-bucket-owner",
        "x-amz-source-expected",
        "x-amz-storage-class",
        "x-amz-server-side-encryption",
        "x-amz-copy-source-server",
    )
    return {k: v for k, v in headers.items() if k.lower().startswith(names)}


async def test_a_sync_sends_the_option_headers_on_every_request(
    moto: S3Server, tmp_path: Path, wire: list[tuple[str, str, dict[str, str]]]
) -> None:
    """moto takes requester pays, the owner, a storage class and SSE-S3: a finalize (a PUT and
    a multipart upload) and a pull send exactly the table's headers on each request."""
    bucket = moto.new_bucket()
    local = tmp_path / "a"
    write(local / "small.txt", b"hello")
    write(local / "big.bin", os.urandom(6 * MiB))
    options = {
        "storage_class": "STANDARD_IA",
        "requester_pays": True,
        "expected_bucket_owner": OWNER,
        "sse": "AES256",
    }
    cfg = config(bucket, local, tmp_path / "s1", **options)
    async with SyncEngine(cfg) as engine:
        assert not (await engine.run(FIN)).fatal
    pulled = tmp_path / "b"
    async with SyncEngine(config(bucket, pulled, tmp_path / "s2", **options)) as engine:
        assert not (await engine.run(PULL)).fatal
    assert tree(pulled) == tree(local)
    expected_options = BucketOptions(
        storage_class="STANDARD_IA", requester_pays=True, expected_bucket_owner=OWNER, sse="AES256"
    )
    seen = set()
    for method, target, headers in wire:
        operation = sent_operation(method, target, headers)
        seen.add(operation)
        assert option_part(headers) == bo.option_headers(expected_options, operation), target
    assert {bo.PUT, bo.CREATE, bo.PART, bo.GET, bo.OTHER} <= seen
    head = moto.client().head_object(Bucket=bucket, Key="vol/big.bin")
    assert head["StorageClass"] == "STANDARD_IA" and head["ServerSideEncryption"] == "AES256"


async def test_sse_c_round_trip_on_seaweedfs(
    seaweed: S3Server, tmp_path: Path, wire: list[tuple[str, str, dict[str, str]]]
) -> None:
    """SeaweedFS checks SSE-C: objects written with the key cannot be read without it (400),
    and a finalize then a pull into another folder, multipart included, gets the bytes back."""
    bucket = seaweed.new_bucket()
    key_file = tmp_path / "sse-c.key"
    key_file.write_bytes(base64.b64encode(KEY))
    local = tmp_path / "a"
    write(local / "small.txt", b"secret words")
    write(local / "dir/big.bin", os.urandom(11 * MiB))
    cfg = config(bucket, local, tmp_path / "s1", sse_c_key_file=key_file)
    async with SyncEngine(cfg) as engine:
        result = await engine.run(FIN)
        assert not result.fatal and not result.errors
    s3 = seaweed.client()
    for name in ("vol/small.txt", "vol/dir/big.bin"):
        with pytest.raises(ClientError) as refused:
            s3.head_object(Bucket=bucket, Key=name)
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    got = s3.get_object(
        Bucket=bucket, Key="vol/small.txt", SSECustomerAlgorithm="AES256", SSECustomerKey=KEY
    )
    assert got["Body"].read() == b"secret words"
    pulled = tmp_path / "b"
    async with SyncEngine(config(bucket, pulled, tmp_path / "s2", sse_c_key_file=key_file)) as e:
        result = await e.run(PULL)
        assert not result.fatal and not result.errors
    assert tree(pulled) == tree(local)
    # A second finalize has nothing to do: the SSE-C ETags were not taken for MD5s.
    async with SyncEngine(cfg) as engine:
        again = await engine.run(FIN)
        assert not again.fatal and not again.errors
    for method, target, headers in wire:
        operation = sent_operation(method, target, headers)
        if operation in (bo.PUT, bo.CREATE, bo.PART, bo.GET, bo.HEAD):
            assert {k: headers[k] for k in SSE_C} == SSE_C, (method, target)
        else:
            assert not any(k.lower().startswith(bo.SSE_C_PREFIX) for k in headers), target


async def test_sse_kms_put_on_seaweedfs_fails_naming_the_file(
    seaweed: S3Server, tmp_path: Path
) -> None:
    """weed mini has no KMS: it answers an SSE-KMS PUT with 500, which the sync reports."""
    bucket = seaweed.new_bucket()
    local = tmp_path / "a"
    write(local / "f.txt", b"x")
    cfg = config(bucket, local, tmp_path / "s", sse="aws:kms")
    async with ObjectStore(bucket, SyncEngine(cfg).client_settings) as store:
        store.retry_policy = type(store.retry_policy)(max_attempts=1)
        with pytest.raises(S3Error) as failed:
            await store.put("vol/f.txt", b"x", {})
    assert "vol/f.txt" in str(failed.value)


async def test_no_sign_request_pulls_unsigned_and_refuses_finalize(
    moto: S3Server,
    tmp_path: Path,
    wire: list[tuple[str, str, dict[str, str]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """moto serves unsigned requests where the ACLs allow: a pull sends no Authorization and
    looks up no credentials; a finalize is refused before any request."""
    bucket = moto.new_bucket()
    # moto checks anonymous reads against the ACLs: a public object, in a listable bucket.
    moto.client().put_bucket_acl(Bucket=bucket, ACL="public-read")
    moto.client().put_object(Bucket=bucket, Key="vol/pub.txt", Body=b"public", ACL="public-read")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    async def no_lookup(self: Any) -> Any:
        raise AssertionError("credentials looked up")

    monkeypatch.setattr("sidecar.s3.credentials.Credentials.frozen", no_lookup)
    local = tmp_path / "a"
    cfg = config(bucket, local, tmp_path / "s", no_sign_request=True)
    async with SyncEngine(cfg) as engine:
        result = await engine.run(PULL)
        assert not result.fatal and not result.errors
        assert tree(local) == {"pub.txt": b"public"}
        before = len(wire)
        write(local / "new.txt", b"n")
        refused = await engine.run(FIN)
    assert refused.fatal and "--no-sign-request" in refused.fatal
    assert len(wire) == before
    assert wire and not any("Authorization" in h or "authorization" in h for _, _, h in wire)


async def test_sse_c_backups_copy_and_undo_on_seaweedfs(seaweed: S3Server, tmp_path: Path) -> None:
    """Backups are CopyObjects of SSE-C objects: SeaweedFS needs the copy-source key headers
    to read the source, and the destination ones to write it; an undo copies them back."""
    bucket = seaweed.new_bucket()
    key_file = tmp_path / "sse-c.key"
    key_file.write_bytes(KEY)
    local = tmp_path / "a"
    write(local / "a.txt", b"a version 1")
    cfg = config(bucket, local, tmp_path / "s", sse_c_key_file=key_file, backup=BackupMode.COPY)
    async with SyncEngine(cfg) as engine:
        assert (await engine.run(FIN)).ok
        write(local / "a.txt", b"a version 2, longer")
        second = await engine.run(FIN)
        assert second.ok and second.sync_id is not None, second.as_dict()
        undone = await engine.undo(second.sync_id)
        assert undone.ok, undone.as_dict()
    s3 = seaweed.client()
    got = s3.get_object(
        Bucket=bucket, Key="vol/a.txt", SSECustomerAlgorithm="AES256", SSECustomerKey=KEY
    )
    assert got["Body"].read() == b"a version 1"


@pytest.mark.parametrize("verb", [["serve"], ["pull", "--once"]])
def test_an_unusable_key_file_is_a_usage_error_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], verb: list[str]
) -> None:
    key_file = tmp_path / "sse-c.key"
    key_file.write_bytes(b"not-a-key-at-all")
    flags = ["--remote", "s3://b/", "--local-dir", str(tmp_path / "d")]
    flags += ["--state-dir", str(tmp_path / "s"), "--sse-c-key-file", str(key_file)]
    assert main([*verb, *flags]) == EXIT_USAGE
    error = capsys.readouterr().err
    assert str(key_file) in error and "256-bit" in error and "not-a-key" not in error
    assert main([*verb, *flags[:-1], str(tmp_path / "missing")]) == EXIT_USAGE
    assert "No such file" in capsys.readouterr().err
