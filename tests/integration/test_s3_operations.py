"""Every S3 operation over the one signed transport (issue 10 item 2): multipart create,
complete, abort and the stray sweep, copy, delete and the metadata rewrite, against moto and
rclone with keys that trip encoders, and request for request against botocore's."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from unittest import mock
from urllib.parse import parse_qsl, unquote, urlsplit

import boto3
import pytest
from botocore.config import Config

from sidecar.s3 import ClientSettings, ObjectStore, S3Error
from sidecar.s3.answers import complete_body
from sidecar.s3.sigv4 import uri_encode_path
from tests.conftest import S3Server
from tests.integration.test_http11 import Server, answer, endpoint_env, read_request, serving
from tests.unit.test_sigv4 import NOW, botocore_authorization

__all__ = ["endpoint_env"]  # the fixture, used by name

MiB = 1024 * 1024
SETTINGS = ClientSettings(concurrency=4)
# `%` that looks like an escape, `+` (a space in form encoding), spaces, non-ASCII, `//`,
# XML's own characters, and a query-looking tail.
KEYS = [
    "vol/100%25 sure+plus/a b.bin",
    "vol/ünï cödé €/😀.bin",
    "vol/a//b/c.bin",
    "vol/x&y<z>'q\".bin",
    "vol/what?x=1&y=#frag.bin",
]


def body(seed: str, size: int) -> bytes:
    out = hashlib.sha256(seed.encode()).digest()
    return (out * (size // len(out) + 1))[:size]


@pytest.fixture(params=["moto", "rclone", "seaweed"])
def server(request: pytest.FixtureRequest, s3_env) -> S3Server:  # type: ignore[no-untyped-def]
    """The three real servers (the engine's `server` is moto and rclone)."""
    chosen: S3Server = request.getfixturevalue(f"{request.param}_s3")
    s3_env(chosen)
    return chosen


def usable_keys(server: S3Server, uploads: bool = False) -> list[str]:
    # rclone serve s3 stores keys as file paths (`a//b` is the file `a/b` there); SeaweedFS
    # keeps `a//b` for objects but lists its multipart uploads as `a/b`.
    flattened = ("rclone", "seaweed") if uploads else ("rclone",)
    return [k for k in KEYS if not (server.kind in flattened and "//" in k)]


async def test_multipart_create_complete_and_the_stray_sweep(server: S3Server) -> None:
    bucket = server.new_bucket()
    s3 = server.client()
    async with ObjectStore(bucket, SETTINGS) as store:
        for key in usable_keys(server, uploads=True):
            data = body(key, 5 * MiB + 123)
            upload = await store.create_multipart(key, {"xxh3-128": "ff00", "mode": "755"})
            etags = [
                await store.upload_part(key, upload, 1, data[: 5 * MiB]),
                await store.upload_part(key, upload, 2, data[5 * MiB :]),
            ]
            written = await store.complete_multipart(key, upload, etags)
            assert written.etag and written.at > 0, key
            got = s3.get_object(Bucket=bucket, Key=key)
            assert got["Body"].read() == data, key
            if server.kind == "moto":  # rclone keeps metadata in memory: checked by HEAD below
                assert got["Metadata"] == {"xxh3-128": "ff00", "mode": "755"}, key
            assert (await store.head(key)).metadata["mode"] == "755", key

            # Two uploads nobody completes, one to keep: the sweep aborts exactly the other.
            stray = await store.create_multipart(key, {})
            kept = await store.create_multipart(key, {})
            other = await store.create_multipart(key + "-other", {})
            assert await store.abort_strays(key, keep=kept) == [stray], key
            listed = s3.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
            assert sorted(u["UploadId"] for u in listed) == sorted([kept, other]), key
            await store.abort_multipart(key, kept)
            await store.abort_multipart(key, kept)  # gone already: fine
            await store.abort_multipart(key + "-other", other)
            listed = s3.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
            assert listed == [], key


async def test_copy_and_delete_of_keys_that_trip_encoders(server: S3Server) -> None:
    bucket = server.new_bucket()
    s3 = server.client()
    async with ObjectStore(bucket, SETTINGS) as store:
        for key in usable_keys(server):
            data = body(key, 1000)
            etag = s3.put_object(Bucket=bucket, Key=key, Body=data)["ETag"].strip('"')
            copy_key = key.replace("vol/", "backup/", 1) + ".copy"
            copied = await store.copy(key, copy_key, etag, if_none_match=True)
            assert copied == etag, key  # a single-part copy keeps the MD5
            assert s3.get_object(Bucket=bucket, Key=copy_key)["Body"].read() == data, key
            with pytest.raises(S3Error) as exists:
                await store.copy(key, copy_key, etag, if_none_match=True)
            assert exists.value.precondition_failed, key

            await store.delete(copy_key, if_match=etag)
            await store.delete(key)
            left = s3.list_objects_v2(Bucket=bucket, Prefix=key.split("/")[0] + "/")
            remaining = [o["Key"] for o in left.get("Contents", [])]
            assert key not in remaining and copy_key not in remaining, (key, remaining)


async def test_a_conditional_delete_of_a_changed_object_is_refused(
    conditional: S3Server,
) -> None:
    """moto and SeaweedFS honour If-Match on DELETE (rclone ignores it: README, Tests)."""
    bucket = conditional.new_bucket()
    s3 = conditional.client()
    key = KEYS[0]
    s3.put_object(Bucket=bucket, Key=key, Body=b"theirs")
    async with ObjectStore(bucket, SETTINGS) as store:
        with pytest.raises(S3Error) as refused:
            await store.delete(key, if_match="0" * 32)
    assert refused.value.precondition_failed and refused.value.key == key
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"theirs"


async def test_a_copy_pinned_to_a_gone_version_is_refused(moto: S3Server) -> None:
    bucket = moto.new_bucket()
    s3 = moto.client()
    s3.put_object(Bucket=bucket, Key="vol/src", Body=b"v2")
    async with ObjectStore(bucket, SETTINGS) as store:
        with pytest.raises(S3Error) as missing:
            await store.copy("vol/nothing here", "vol/dst", None)
    assert missing.value.not_found or missing.value.code == "NoSuchKey"


async def test_rewrite_metadata_of_keys_that_trip_encoders(server: S3Server) -> None:
    bucket = server.new_bucket()
    s3 = server.client()
    async with ObjectStore(bucket, SETTINGS) as store:
        for key in usable_keys(server):
            etag = s3.put_object(
                Bucket=bucket, Key=key, Body=b"same bytes", Metadata={"mode": "644"}
            )["ETag"].strip('"')
            written = await store.rewrite_metadata(key, etag, {"mode": "755"})
            head = await store.head(key)
            if server.kind == "rclone":
                # rclone keeps ETag and LastModified: the rewrite is invisible to replicas.
                assert written is None and not store.metadata_rewrites
                return
            assert written is not None and written.etag == etag and written.at > 0, key
            assert head.metadata == {"mode": "755"}, key
            got = s3.head_object(Bucket=bucket, Key=key)
            assert got["ContentType"] == "application/octet-stream", key


# ---- scripted: what S3 does that the test servers do not ------------------------------
def scripted_s3(answers: Callable[[bytes, bytes, int], bytes]) -> Any:
    """A server answering each request with answers(head, body, index of the request)."""

    async def handler(reader, writer, server: Server):
        while (head := await read_request(reader, server)) is not None:
            writer.write(answers(head, server.requests[-1][1], len(server.requests) - 1))
            await writer.drain()

    return handler


INTERNAL_IN_200 = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)
COMPLETED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<CompleteMultipartUploadResult '
    b'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>bkt</Bucket><Key>k</Key>'
    b"<ETag>&quot;3858f62230ac3c915f300c664312c11f-2&quot;</ETag></CompleteMultipartUploadResult>"
)
COPIED = (
    b"<CopyObjectResult><LastModified>2026-12-03T10:00:00.000Z</LastModified>"
    b"<ETag>&quot;9b2cf535f27731c974343645a3985328&quot;</ETag></CopyObjectResult>"
)
DATE = "Date: Thu, 03 Dec 2026 10:00:00 GMT\r\n"


@pytest.mark.parametrize("operation", ["complete", "copy", "rewrite"])
async def test_an_error_in_a_200_answer_is_an_error_and_retried(
    endpoint_env: Callable[[int], None], operation: str
) -> None:
    """CompleteMultipartUpload and CopyObject answer 200 before they are done; an <Error>
    in that 200 (or a body cut short) is a failure, retried as botocore retries it."""
    success = COMPLETED if operation == "complete" else COPIED

    def answers(head: bytes, body: bytes, index: int) -> bytes:
        if index == 0:
            return answer(200, INTERNAL_IN_200, DATE)
        if index == 1:  # not XML: cut short
            return answer(200, success[:40], DATE)
        return answer(200, success, DATE)

    async with serving(scripted_s3(answers)) as (server, port):
        endpoint_env(port)
        async with ObjectStore("bkt", SETTINGS) as store:
            if operation == "complete":
                written = await store.complete_multipart("k", "up+id/=", ["a", "b"])
                assert written.etag == "3858f62230ac3c915f300c664312c11f-2"
                assert written.at == int(datetime(2026, 12, 3, 10, tzinfo=UTC).timestamp())
            elif operation == "copy":
                assert await store.copy("src", "k", None) == "9b2cf535f27731c974343645a3985328"
            else:
                written = await store.rewrite_metadata("k", "e", {"mode": "755"})
                assert written is not None and written.etag == "9b2cf535f27731c974343645a3985328"
            assert store.retries == 2
    assert len(server.requests) == 3


async def test_an_error_in_a_200_that_stays_names_the_key_and_code(
    endpoint_env: Callable[[int], None],
) -> None:
    gone = b"<Error><Code>NoSuchUpload</Code><Message>The upload does not exist</Message></Error>"

    async with serving(scripted_s3(lambda head, body, index: answer(200, gone))) as (server, port):
        endpoint_env(port)
        async with ObjectStore("bkt", ClientSettings(concurrency=2, max_attempts=2)) as store:
            with pytest.raises(S3Error, match="NoSuchUpload") as caught:
                await store.complete_multipart("vol/k", "u", ["a"])
    assert caught.value.key == "vol/k" and caught.value.code == "NoSuchUpload"
    assert len(server.requests) == 2


# ---- request for request against botocore ---------------------------------------------
CANNED = {
    "create": b"<InitiateMultipartUploadResult><Bucket>bkt</Bucket><Key>k</Key>"
    b"<UploadId>up+id/=</UploadId></InitiateMultipartUploadResult>",
    "complete": COMPLETED,
    "copy": COPIED,
    "list_uploads": b"<ListMultipartUploadsResult><Bucket>bkt</Bucket>"
    b"<IsTruncated>false</IsTruncated></ListMultipartUploadsResult>",
}


def canned(head: bytes, _body: bytes, _index: int) -> bytes:
    line = head.split(b"\r\n", 1)[0].decode()
    method, target = line.split(" ")[:2]
    lower = head.lower()
    if method == "DELETE":
        return answer(204, b"", DATE)
    if method == "POST":
        return answer(200, CANNED["complete" if "uploadId=" in target else "create"], DATE)
    if method == "GET":
        return answer(200, CANNED["list_uploads"], DATE)
    assert b"x-amz-copy-source:" in lower
    return answer(200, CANNED["copy"], DATE)


def parsed(head: bytes, body: bytes) -> dict[str, Any]:
    lines = head.decode().split("\r\n")
    method, target = lines[0].split(" ")[:2]
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    parts = urlsplit(target)
    return {
        "method": method,
        "path": unquote(parts.path),
        "raw_path": parts.path,
        "query": dict(parse_qsl(parts.query, keep_blank_values=True)),
        "headers": headers,
        "body": body,
        "target": target,
    }


# What each operation must carry as botocore sends it (the SDK's own headers aside).
OPERATION_HEADERS = (
    "x-amz-copy-source",
    "x-amz-copy-source-if-match",
    "x-amz-metadata-directive",
    "if-match",
    "if-none-match",
    "content-type",
    "x-amz-meta-mode",
    "x-amz-meta-xxh3-128",
)


@pytest.mark.parametrize("key", KEYS)
async def test_each_operation_is_the_request_botocore_sends(
    endpoint_env: Callable[[int], None], key: str
) -> None:
    """Ours and botocore's, sent to the same scripted server: same method, path, query,
    operation headers and body; and our signature is the one botocore computes for the
    request we sent."""
    async with serving(scripted_s3(canned)) as (server, port):
        endpoint_env(port)
        async with ObjectStore("bkt", SETTINGS) as store:
            with mock.patch("sidecar.s3.store.datetime") as clock:
                clock.now.return_value = NOW
                await store.create_multipart(key, {"mode": "755", "xxh3-128": "ab"})
                await store.complete_multipart(key, "up+id/=", ["e1", "e&2"], if_match="old")
                await store.abort_multipart(key, "up+id/=")
                await store.delete(key, if_match="e3")
                await store.copy(key, key + "//copy", "e4")
                await store.rewrite_metadata(key, "e5", {"mode": "644"})
                await store.abort_strays(key)
        ours = [parsed(head, data) for head, data in server.requests]
        server.requests.clear()

        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id="fake-key-0123456789",
            aws_secret_access_key="fake-secret-0123456789",
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path", "payload_signing_enabled": False},
                request_checksum_calculation="when_required",
                retries={"total_max_attempts": 1},
            ),
        )
        source = {"Bucket": "bkt", "Key": key}

        def botocore_calls() -> None:
            client.create_multipart_upload(
                Bucket="bkt", Key=key, Metadata={"mode": "755", "xxh3-128": "ab"}
            )
            parts = [{"ETag": '"e1"', "PartNumber": 1}, {"ETag": '"e&2"', "PartNumber": 2}]
            client.complete_multipart_upload(
                Bucket="bkt",
                Key=key,
                UploadId="up+id/=",
                MultipartUpload={"Parts": parts},
                IfMatch='"old"',
            )
            client.abort_multipart_upload(Bucket="bkt", Key=key, UploadId="up+id/=")
            client.delete_object(Bucket="bkt", Key=key, IfMatch='"e3"')
            client.copy_object(
                Bucket="bkt", Key=key + "//copy", CopySource=source, CopySourceIfMatch='"e4"'
            )
            client.copy_object(
                Bucket="bkt",
                Key=key,
                CopySource=source,
                CopySourceIfMatch='"e5"',
                MetadataDirective="REPLACE",
                Metadata={"mode": "644"},
                ContentType="application/octet-stream",
            )
            client.list_multipart_uploads(Bucket="bkt", Prefix=key, EncodingType="url")

        await asyncio.to_thread(botocore_calls)
        theirs = [parsed(head, data) for head, data in server.requests]

    assert len(ours) == len(theirs) == 7
    for mine, sdk in zip(ours, theirs, strict=True):
        where = (mine["method"], mine["target"])
        assert mine["method"] == sdk["method"], where
        assert mine["path"] == sdk["path"], where
        assert mine["raw_path"] == uri_encode_path(sdk["path"]), where
        assert mine["query"] == sdk["query"], where
        for name in OPERATION_HEADERS:
            assert mine["headers"].get(name) == sdk["headers"].get(name), (where, name)
        assert _same_xml(mine["body"], sdk["body"]), (where, mine["body"], sdk["body"])
        # Our signature is botocore's over our request, as sent.
        signed = {
            name: value
            for name, value in mine["headers"].items()
            if name not in ("authorization", "user-agent", "content-length")
        }
        expected = botocore_authorization_for(mine["method"], port, mine["target"], signed)
        assert mine["headers"]["authorization"] == expected, where


def botocore_authorization_for(method: str, port: int, target: str, headers: dict[str, str]) -> str:
    url = f"http://127.0.0.1:{port}{target}"
    unsigned = ("x-amz-date", "x-amz-content-sha256")  # botocore sets both itself
    headers = {k: v for k, v in headers.items() if k not in unsigned}
    return botocore_authorization(
        method,
        url,
        headers,
        None,
        credentials=("fake-key-0123456789", "fake-secret-0123456789"),
        region="us-east-1",
    )


def _same_xml(ours: bytes, theirs: bytes) -> bool:
    """Equal documents, up to an XML declaration."""
    declaration = b'<?xml version="1.0" encoding="UTF-8"?>'
    return ours.removeprefix(declaration).strip() == theirs.removeprefix(declaration).strip()


def test_the_complete_document_escapes_what_xml_must() -> None:
    document = complete_body(["a&b", "<c>"])
    assert b'<ETag>"a&amp;b"</ETag><PartNumber>1</PartNumber>' in document
    assert b'<ETag>"&lt;c&gt;"</ETag><PartNumber>2</PartNumber>' in document
