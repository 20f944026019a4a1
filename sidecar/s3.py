"""The S3 client wrapper: the only module that imports aiobotocore.

Every request goes through one semaphore (`--concurrency` slots shared by all files), is
retried by botocore's standard mode (throttling, 5xx, timeouts, resets: backoff + jitter),
and fails as an S3Error that names the key and the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ResponseStreamingError,
)

T = TypeVar("T")

# User-metadata names (x-amz-meta-*) we store with every object we write.
META_HASH = "xxh3-128"
META_MTIME = "mtime-ns"
META_MODE = "mode"

FATAL_CODES = {
    "InvalidAccessKeyId": "the access key is not known to the server (check AWS_ACCESS_KEY_ID)",
    "SignatureDoesNotMatch": "the secret key is wrong (check AWS_SECRET_ACCESS_KEY)",
    "AccessDenied": "access denied (check the keys' permissions on the bucket)",
    "ExpiredToken": "the credentials have expired",
    "InvalidToken": "the session token is invalid",
    "NoSuchBucket": "the bucket does not exist",
}
PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412"}
NOT_IMPLEMENTED_CODES = {"NotImplemented", "501"}
STREAM_RETRY_CODES = {
    "ShortRead",
    "Timeout",
    "ResponseStreamingError",
    "AioReadTimeoutError",
    "ReadTimeoutError",
    "ClientPayloadError",
    "ServerDisconnectedError",
    "ConnectionResetError",
    "IncompleteReadError",
}


class S3Error(Exception):
    def __init__(self, key: str, code: str, message: str, fatal: bool = False) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.code = code
        self.message = message
        self.fatal = fatal

    @property
    def precondition_failed(self) -> bool:
        return self.code in PRECONDITION_CODES

    @property
    def not_found(self) -> bool:
        return self.code in ("NoSuchKey", "404", "NotFound")

    @property
    def retryable_stream(self) -> bool:
        """A failure mid-body that botocore cannot retry for us (it only retries requests)."""
        return self.code in STREAM_RETRY_CODES


def _error_from(key: str, exc: BaseException) -> S3Error:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(
            error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        )
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        text = error.get("Message") or code
        if code in FATAL_CODES:
            return S3Error(key, code, f"{FATAL_CODES[code]} ({code}: {text})", fatal=True)
        return S3Error(key, code, f"{code} (HTTP {status}): {text}")
    if isinstance(exc, NoCredentialsError):
        return S3Error(
            key, "NoCredentials", "no S3 credentials: set AWS_ACCESS_KEY_ID/SECRET", fatal=True
        )
    if isinstance(exc, EndpointConnectionError):
        return S3Error(key, "Unreachable", f"cannot reach the S3 endpoint: {exc}", fatal=True)
    if isinstance(exc, asyncio.TimeoutError):
        return S3Error(key, "Timeout", "the server did not answer in time")
    return S3Error(key, type(exc).__name__, str(exc) or type(exc).__name__)


TRANSIENT = (BotoCoreError, OSError, asyncio.TimeoutError, ResponseStreamingError)


def unquote_etag(etag: str) -> str:
    return etag.strip().strip('"')


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    etag: str  # unquoted
    metadata: dict[str, str]


@dataclass(frozen=True, slots=True)
class ClientSettings:
    concurrency: int
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 5


def endpoint_from_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def credentials_fingerprint() -> tuple[float, ...]:
    """mtimes of the files botocore reads keys from: a change means the Secret rotated."""
    stamps: list[float] = []
    for variable in (
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_CONFIG_FILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        path = os.environ.get(variable)
        if path:
            try:
                stamps.append(os.stat(path).st_mtime)
            except OSError:
                stamps.append(-1.0)
    return tuple(stamps)


class ObjectStore:
    """One bucket through one aiobotocore client. Use as an async context manager."""

    def __init__(self, bucket: str, settings: ClientSettings) -> None:
        self.bucket = bucket
        self.settings = settings
        self.slots = asyncio.Semaphore(settings.concurrency)
        self.in_flight = 0
        self.retries = 0
        self.conditional_writes = True  # until the server says NotImplemented
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def __aenter__(self) -> ObjectStore:
        endpoint = endpoint_from_env()
        s3_options: dict[str, Any] = {
            # Our own xxh3 verification covers integrity; SHA-256 of every payload (botocore's
            # default over plain http) would cost a core on loopback for no protection.
            "payload_signing_enabled": False,
        }
        if endpoint:
            s3_options["addressing_style"] = "path"
        config = Config(
            max_pool_connections=self.settings.concurrency,
            connect_timeout=self.settings.connect_timeout,
            read_timeout=self.settings.read_timeout,
            retries={"mode": "standard", "total_max_attempts": self.settings.max_attempts},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            tcp_keepalive=True,
            s3=s3_options,
        )
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        session = get_session()
        self._client = await self._stack.enter_async_context(
            session.create_client("s3", region_name=region, endpoint_url=endpoint, config=config)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _call(self, key: str, method: str, **params: Any) -> dict[str, Any]:
        async with self.slots:
            self.in_flight += 1
            try:
                response: dict[str, Any] = await getattr(self._client, method)(
                    Bucket=self.bucket, **params
                )
            except ClientError as exc:
                self.retries += exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
                raise _error_from(key, exc) from exc
            except (*TRANSIENT, NoCredentialsError) as exc:
                raise _error_from(key, exc) from exc
            finally:
                self.in_flight -= 1
        self.retries += response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
        return response

    # ---- reading ---------------------------------------------------------------------
    async def list(self, prefix: str) -> AsyncIterator[list[ObjectInfo]]:
        """Pages of the listing under prefix (metadata is never in listings)."""
        token: str | None = None
        while True:
            params: dict[str, Any] = {"Prefix": prefix, "MaxKeys": 1000}
            if token:
                params["ContinuationToken"] = token
            page = await self._call(prefix or "/", "list_objects_v2", **params)
            yield [
                ObjectInfo(item["Key"], int(item["Size"]), unquote_etag(item.get("ETag", "")), {})
                for item in page.get("Contents", [])
            ]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    async def head(self, key: str) -> ObjectInfo:
        response = await self._call(key, "head_object", Key=key)
        return ObjectInfo(
            key,
            int(response["ContentLength"]),
            unquote_etag(response.get("ETag", "")),
            dict(response.get("Metadata", {})),
        )

    async def get_range(
        self,
        key: str,
        offset: int,
        length: int,
        etag: str | None,
        sink: Callable[[int, bytes], Awaitable[None] | None],
        chunk: int = 1024 * 1024,
    ) -> dict[str, str]:
        """Stream bytes [offset, offset+length) to sink(offset, data); returns the metadata.

        length < 0 means the whole object. Pinned to `etag` with If-Match so the parts of
        one download never mix two versions. The slot is held while the body streams.
        """
        params: dict[str, Any] = {"Key": key}
        if length >= 0 and (offset or length):
            params["Range"] = f"bytes={offset}-{offset + length - 1}"
        if etag:
            params["IfMatch"] = f'"{etag}"'
        async with self.slots:
            self.in_flight += 1
            try:
                response = await self._client.get_object(Bucket=self.bucket, **params)
                self.retries += response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
                body = response["Body"]
                position = offset
                try:
                    while True:
                        data = await body.read(chunk)
                        if not data:
                            break
                        maybe = sink(position, data)
                        if maybe is not None:
                            await maybe
                        position += len(data)
                finally:
                    body.close()
                if length >= 0 and position - offset != length:
                    raise S3Error(
                        key, "ShortRead", f"expected {length} bytes, got {position - offset}"
                    )
                return dict(response.get("Metadata", {}))
            except ClientError as exc:
                raise _error_from(key, exc) from exc
            except (*TRANSIENT, NoCredentialsError) as exc:
                raise _error_from(key, exc) from exc
            finally:
                self.in_flight -= 1

    # ---- writing ---------------------------------------------------------------------
    def _conditions(self, if_match: str | None, if_none_match: bool) -> dict[str, str]:
        if not self.conditional_writes:
            return {}
        if if_match:
            return {"IfMatch": f'"{if_match}"'}
        if if_none_match:
            return {"IfNoneMatch": "*"}
        return {}

    async def _conditional(
        self, key: str, method: str, if_match: str | None, if_none_match: bool, **params: Any
    ) -> dict[str, Any]:
        try:
            return await self._call(
                key, method, **params, **self._conditions(if_match, if_none_match)
            )
        except S3Error as exc:
            if exc.code in NOT_IMPLEMENTED_CODES and (if_match or if_none_match):
                # A server without conditional writes: fall back to plain writes for good.
                self.conditional_writes = False
                return await self._call(key, method, **params)
            raise

    async def put(
        self,
        key: str,
        body: bytes,
        metadata: dict[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        response = await self._conditional(
            key, "put_object", if_match, if_none_match, Key=key, Body=body, Metadata=metadata
        )
        return unquote_etag(response.get("ETag", ""))

    async def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        response = await self._call(key, "create_multipart_upload", Key=key, Metadata=metadata)
        return str(response["UploadId"])

    async def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> str:
        response = await self._call(
            key, "upload_part", Key=key, UploadId=upload_id, PartNumber=number, Body=body
        )
        return unquote_etag(response["ETag"])

    async def complete_multipart(
        self,
        key: str,
        upload_id: str,
        part_etags: list[str],
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        parts = [{"ETag": f'"{etag}"', "PartNumber": n} for n, etag in enumerate(part_etags, 1)]
        response = await self._conditional(
            key,
            "complete_multipart_upload",
            if_match,
            if_none_match,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
        return unquote_etag(response.get("ETag", ""))

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            await self._call(key, "abort_multipart_upload", Key=key, UploadId=upload_id)
        except S3Error as exc:
            if exc.code not in ("NoSuchUpload", "404"):
                raise

    async def delete(self, key: str) -> None:
        await self._call(key, "delete_object", Key=key)

    async def copy(self, source_key: str, dest_key: str, source_etag: str | None) -> str:
        params: dict[str, Any] = {
            "Key": dest_key,
            "CopySource": {"Bucket": self.bucket, "Key": source_key},
        }
        if source_etag:
            params["CopySourceIfMatch"] = f'"{source_etag}"'
        response = await self._call(dest_key, "copy_object", **params)
        return unquote_etag(response.get("CopyObjectResult", {}).get("ETag", ""))
