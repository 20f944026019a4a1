"""What each test server does with the requests the engine's safety rests on, pinned: the
end-to-end tests run each case where its behaviour means something, and this table says
why (and fails loudly when a server upgrade changes an answer).

AWS S3 for reference: 412 on every conditional write below, `-N` ETags everywhere, 206.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.conftest import S3Server

PRECONDITION = "412"
SERVERS = ("moto", "rclone", "seaweed")
MiB = 1024 * 1024

# Per server, in SERVERS order: what the server answers (a status, or "ignored" where it
# applied a write its condition should have refused).
EXPECTED: dict[str, tuple[str, str, str]] = {
    "put If-None-Match on an existing key": (PRECONDITION, "ignored", PRECONDITION),
    "put If-Match on another ETag": (PRECONDITION, "ignored", PRECONDITION),
    "put If-Match on a missing key": ("404", "ignored", PRECONDITION),
    "delete If-Match on another ETag": (PRECONDITION, "ignored", PRECONDITION),
    "copy If-None-Match on an existing key": ("ignored", "ignored", PRECONDITION),
    "copy x-amz-copy-source-if-match on another ETag": ("ignored", "ignored", PRECONDITION),
    "complete If-Match on another ETag": ("ignored", "ignored", PRECONDITION),
    "complete If-None-Match on an existing key": (PRECONDITION, "ignored", PRECONDITION),
    "GET If-Match on another ETag": (PRECONDITION, "ignored", PRECONDITION),
}


def answer(call: Callable[[], Any]) -> str:
    try:
        call()
    except ClientError as exc:
        return str(exc.response["ResponseMetadata"]["HTTPStatusCode"])
    return "ignored"


@pytest.fixture(params=SERVERS)
def each(request: pytest.FixtureRequest) -> S3Server:
    return request.getfixturevalue(f"{request.param}_s3")  # type: ignore[no-any-return]


def upload(s3: Any, bucket: str, key: str, **conditions: str) -> Callable[[], Any]:
    """A two-part multipart upload of key, completed by the returned call."""
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts = [
        {"PartNumber": n, "ETag": s3.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=body
        )["ETag"]}
        for n, body in ((1, os.urandom(5 * MiB)), (2, b"tail"))
    ]  # fmt: skip
    return lambda: s3.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}, **conditions
    )


def test_conditional_requests(each: S3Server) -> None:
    s3, bucket = each.client(), each.new_bucket()
    for key in ("k1", "k2", "k3", "k4", "k6", "k7"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"base")
    other = '"0123456789abcdef0123456789abcdef"'
    source = {"Bucket": bucket, "Key": "k1"}
    seen = {
        "put If-None-Match on an existing key": answer(
            lambda: s3.put_object(Bucket=bucket, Key="k1", Body=b"x", IfNoneMatch="*")
        ),
        "put If-Match on another ETag": answer(
            lambda: s3.put_object(Bucket=bucket, Key="k2", Body=b"x", IfMatch=other)
        ),
        "put If-Match on a missing key": answer(
            lambda: s3.put_object(Bucket=bucket, Key="missing", Body=b"x", IfMatch=other)
        ),
        "delete If-Match on another ETag": answer(
            lambda: s3.delete_object(Bucket=bucket, Key="k3", IfMatch=other)
        ),
        "copy If-None-Match on an existing key": answer(
            lambda: s3.copy_object(Bucket=bucket, Key="k4", CopySource=source, IfNoneMatch="*")
        ),
        "copy x-amz-copy-source-if-match on another ETag": answer(
            lambda: s3.copy_object(
                Bucket=bucket, Key="k5", CopySource=source, CopySourceIfMatch=other
            )
        ),
        "complete If-Match on another ETag": answer(upload(s3, bucket, "k6", IfMatch=other)),
        "complete If-None-Match on an existing key": answer(
            upload(s3, bucket, "k7", IfNoneMatch="*")
        ),
        "GET If-Match on another ETag": answer(
            lambda: s3.get_object(Bucket=bucket, Key="k1", IfMatch=other)
        ),
    }
    column = SERVERS.index(each.kind)
    assert seen == {name: row[column] for name, row in EXPECTED.items()}


def test_etags_ranges_and_metadata_rewrites(each: S3Server) -> None:
    s3, bucket = each.client(), each.new_bucket()
    completed = upload(s3, bucket, "big")()["ETag"].strip('"')
    head = s3.head_object(Bucket=bucket, Key="big")["ETag"]
    listed = s3.list_objects_v2(Bucket=bucket)["Contents"][0]["ETag"]
    ranged = s3.get_object(Bucket=bucket, Key="big", Range="bytes=0-9")
    s3.put_object(Bucket=bucket, Key="small", Body=b"x", Metadata={"m": "1"})
    time.sleep(1.1)  # LastModified is to the second
    copied = s3.copy_object(
        Bucket=bucket,
        Key="small",
        CopySource={"Bucket": bucket, "Key": "small"},
        MetadataDirective="REPLACE",
        Metadata={"m": "2"},
    ).get("CopyObjectResult", {})
    seen = {
        "Complete's ETag is -N": completed.endswith("-2"),
        "HEAD's ETag is Complete's": head.strip('"') == completed,
        "listing's ETag is HEAD's": listed.strip('"') == head.strip('"'),
        "listing's ETag is quoted": listed.startswith('"'),
        "range status": ranged["ResponseMetadata"]["HTTPStatusCode"],
        "range bytes": len(ranged["Body"].read()),
        "self-copy reports ETag and LastModified": bool(
            copied.get("ETag") and copied.get("LastModified")
        ),
        "metadata after self-copy": s3.head_object(Bucket=bucket, Key="small")["Metadata"],
    }
    expected = {
        "moto": (True, True, True, True, 206, 10, True, {"m": "2"}),
        # One object, two ETags: Complete's `-N`, then the MD5 of the whole object.
        "rclone": (True, False, True, False, 200, 10, False, {"M": "2"}),
        "seaweed": (True, True, True, True, 206, 10, True, {"m": "2"}),
    }[each.kind]
    assert seen == dict(zip(seen, expected, strict=True))


def test_keys_held_as_sent(each: S3Server) -> None:
    """Keys the engine must survive (README "How a sync decides": keys that would escape the
    folder, a file and a folder of one name): what each server stores, lists, or refuses."""
    s3, bucket = each.client(Config(retries={"max_attempts": 1})), each.new_bucket()
    refused = {}
    for key in ("a//b", "../x", "/abs", "a/./b", "d", "d/x", "e/y", "e", "dir/"):
        try:
            s3.put_object(Bucket=bucket, Key=key, Body=b"x")
        except ClientError as exc:
            refused[key] = str(exc.response["Error"]["Code"])
    listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))
    expected = {
        "moto": ({}, ["../x", "/abs", "a/./b", "a//b", "d", "d/x", "dir/", "e", "e/y"]),
        # A folder on disk: no dot segments nor empty ones, no file beside a folder of its
        # name (the second PUT fails, and a refused "e" hides "e/y" from the listing).
        "rclone": (
            {
                "a//b": "InvalidArgument",
                "../x": "InvalidArgument",
                "/abs": "InvalidArgument",
                "a/./b": "InvalidArgument",
                "d/x": "InternalError",
                "e": "InternalError",
            },
            ["d", "dir", "e"],
        ),
        # A filer: dot segments refused, empty segments and a leading slash folded away
        # ("a//b" is listed as "a/b", "/abs" as "abs"), a file beside a folder is fine.
        "seaweed": (
            {"../x": "InvalidRequest", "a/./b": "InvalidRequest"},
            ["a/b", "abs", "d", "d/x", "dir/", "e", "e/y"],
        ),
    }[each.kind]
    assert (refused, listed) == expected
