"""Bucket options (--storage-class, --sse, SSE-C, --requester-pays, --expected-bucket-owner,
--no-sign-request): which headers go on which S3 operation. Pure, but for SseCKey, which
reads the key file (again when it changes, so a rotated key is picked up).

`operation_of` names the operation of a request the store sends; `option_headers` says
which headers the options add to it. Why not everywhere: AWS rejects x-amz-server-side-
encryption on UploadPart, GET and HEAD, and storage class belongs to the object (PUT,
CreateMultipartUpload, CopyObject: a copy without it falls back to STANDARD).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.core.model import Identity, identity_of
from sidecar.s3.errors import S3Error

PUT = "put_object"
CREATE = "create_multipart_upload"
PART = "upload_part"
PART_COPY = "upload_part_copy"
COPY = "copy_object"
GET = "get_object"
HEAD = "head_object"
OTHER = "other"  # listings, deletes, Complete/Abort, bucket queries

_WITH_STORAGE_CLASS = (PUT, CREATE, COPY)
_WITH_SSE = (PUT, CREATE, COPY)
_WITH_SSE_C = (PUT, CREATE, PART, PART_COPY, COPY, GET, HEAD)
_COPIES = (COPY, PART_COPY)

SSE_C_PREFIX = "x-amz-server-side-encryption-customer-"
COPY_SSE_C_PREFIX = "x-amz-copy-source-server-side-encryption-customer-"


@dataclass(frozen=True, slots=True)
class BucketOptions:
    storage_class: str | None = None
    requester_pays: bool = False
    expected_bucket_owner: str | None = None
    sse: str | None = None  # "AES256" or "aws:kms"
    sse_kms_key_id: str | None = None
    sse_c_key_file: str | None = None
    no_sign_request: bool = False


def operation_of(
    method: str, has_key: bool, query: Mapping[str, str], headers: Mapping[str, str]
) -> str:
    """The S3 operation of a request (botocore's name for the ones options care about)."""
    if not has_key:
        return OTHER
    copying = "x-amz-copy-source" in headers
    if method == "PUT":
        if "partNumber" in query:
            return PART_COPY if copying else PART
        return COPY if copying else PUT
    if method == "POST" and "uploads" in query:
        return CREATE
    if method == "GET" and "uploadId" not in query:
        return GET
    if method == "HEAD":
        return HEAD
    return OTHER


def option_headers(
    options: BucketOptions, operation: str, sse_c: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The headers the options add to one request of `operation`. `sse_c`: the customer-key
    headers (SseCKey.headers()), when --sse-c-key-file is set."""
    headers: dict[str, str] = {}
    if options.requester_pays:
        headers["x-amz-request-payer"] = "requester"
    if options.expected_bucket_owner:
        headers["x-amz-expected-bucket-owner"] = options.expected_bucket_owner
        if operation in _COPIES:  # the source is in the same bucket
            headers["x-amz-source-expected-bucket-owner"] = options.expected_bucket_owner
    if options.storage_class and operation in _WITH_STORAGE_CLASS:
        headers["x-amz-storage-class"] = options.storage_class
    if options.sse and operation in _WITH_SSE:
        headers["x-amz-server-side-encryption"] = options.sse
        if options.sse_kms_key_id:
            headers["x-amz-server-side-encryption-aws-kms-key-id"] = options.sse_kms_key_id
    if sse_c and operation in _WITH_SSE_C:
        headers.update(sse_c)
        if operation in _COPIES:  # the source was written with the same key
            for name, value in sse_c.items():
                headers[COPY_SSE_C_PREFIX + name.removeprefix(SSE_C_PREFIX)] = value
    return headers


def sse_c_headers(key: bytes) -> dict[str, str]:
    return {
        SSE_C_PREFIX + "algorithm": "AES256",
        SSE_C_PREFIX + "key": base64.b64encode(key).decode(),
        SSE_C_PREFIX + "key-MD5": base64.b64encode(hashlib.md5(key).digest()).decode(),
    }


def parse_sse_c_key(data: bytes) -> bytes:
    """A 256-bit key: 32 raw bytes, or their base64 (surrounding whitespace ignored).
    ValueError otherwise; the message never holds the key."""
    if len(data) == 32:
        return data
    text = data.strip()
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ValueError(
            f"not a 256-bit key: expected 32 raw bytes or their base64, got {len(data)} bytes"
        )
    return key


class SseCKey:
    """The SSE-C key of --sse-c-key-file, re-read when the file changes (a rotated Secret).
    The key is never logged: errors name the file only."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen: Identity | None = None
        self._headers: dict[str, str] = {}

    def headers(self) -> dict[str, str]:
        """The customer-key headers; S3Error (fatal) naming the file when it is unusable.
        One stat per request: the read happens only when the file changed."""
        try:
            info = os.stat(self.path)
            seen = identity_of(info)
            if seen != self._seen:
                with open(self.path, "rb") as file:
                    key = parse_sse_c_key(file.read())
                self._headers, self._seen = sse_c_headers(key), seen
        except (OSError, ValueError) as exc:
            cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise S3Error(
                self.path,
                "BadSseCKey",
                f"unusable SSE-C key file (--sse-c-key-file): {cause}",
                fatal=True,
            ) from None
        return self._headers
