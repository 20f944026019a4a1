"""The object store: every S3 request the sidecar makes (the only module that imports aiobotocore).

Every request goes through one semaphore (`--concurrency` slots shared by all files), is
retried on throttling, 5xx, timeouts and resets (backoff + jitter), and fails as an S3Error
that names the key and the cause. botocore is imported lazily: a no-op sync with keys in the
environment never pays its ~0.3 s import.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from sidecar.s3.http11 import DEADLINE_RATE, ConnectError, ConnectionPool, Proxy, Response
from sidecar.s3.sigv4 import Signer, canonical_query, uri_encode_path

T = TypeVar("T")

USER_AGENT = "netvol-sidecar"
# Per body stream; a recv fills at most this much at once, and only touched pages count.
READ_BUFFER_BYTES = 256 * 1024

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
BOTOCORE_CONDITION_PARAMS = {"If-Match": "IfMatch", "If-None-Match": "IfNoneMatch"}
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
    "ProtocolError",
    "BrokenPipeError",
}


class S3Error(Exception):
    def __init__(self, key: str, code: str, message: str, fatal: bool = False) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.code = code
        self.message = message
        self.fatal = fatal
        # The answer came to a retry: an earlier attempt may have been applied by the server
        # with its answer lost (a reset), so a 412 may be our own write.
        self.retried = False

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
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(
            error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        )
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        text = error.get("Message") or code
        if code in FATAL_CODES:
            return S3Error(key, code, f"{FATAL_CODES[code]} ({code}: {text})", fatal=True)
        failed = S3Error(key, code, f"{code} (HTTP {status}): {text}")
        failed.retried = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) > 0
        return failed
    if isinstance(exc, NoCredentialsError):
        return S3Error(
            key, "NoCredentials", "no S3 credentials: set AWS_ACCESS_KEY_ID/SECRET", fatal=True
        )
    if isinstance(exc, EndpointConnectionError | ConnectError):
        return S3Error(key, "Unreachable", f"cannot reach the S3 endpoint: {exc}", fatal=True)
    if isinstance(exc, asyncio.TimeoutError):
        why = f" ({exc})" if str(exc) else ""
        return S3Error(key, "Timeout", f"the server did not answer in time{why}")
    return S3Error(key, type(exc).__name__, str(exc) or type(exc).__name__)


HTTP_TRANSIENT = (OSError, asyncio.TimeoutError)  # http11 raises only these
COPY_MAX_BYTES = 5 * 1024**3  # the most one CopyObject moves
RETRY_STATUSES = {429, 500, 502, 503, 504}
RETRY_CODES = {"SlowDown", "Throttling", "RequestTimeout", "InternalError", "ServiceUnavailable"}
STATUS_CODES = {
    400: "BadRequest",
    403: "AccessDenied",
    404: "NotFound",
    409: "ConditionalRequestConflict",
    412: "PreconditionFailed",
    501: "NotImplemented",
}
_XML_CODE = re.compile(rb"<Code>([^<]*)</Code>")
_XML_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")


def _http_error(key: str, status: int, body: bytes) -> S3Error:
    """An S3Error from an HTTP error answer (HEAD answers carry no body: use the status)."""
    found = _XML_CODE.search(body)
    code = found.group(1).decode() if found else STATUS_CODES.get(status, str(status))
    found = _XML_MESSAGE.search(body)
    message = found.group(1).decode(errors="replace") if found else code
    if code in FATAL_CODES:
        return S3Error(key, code, f"{FATAL_CODES[code]} ({code}: {message})", fatal=True)
    return S3Error(key, code, f"{code} (HTTP {status}): {message}")


def _metadata(headers: Any) -> dict[str, str]:
    return {
        name[11:].lower(): value
        for name, value in headers.items()
        if name[:11].lower() == "x-amz-meta-"
    }


def decode_listed_key(raw: str, url_encoded: bool) -> str:
    """Keys listed with encoding-type=url; invalid UTF-8 survives as surrogates, which the
    path rules then reject by name (botocore would silently turn them into U+FFFD)."""
    if not url_encoded:
        return raw
    # Form encoding, as botocore's unquote_plus: '+' is a space, a real '+' comes as %2B.
    return unquote_to_bytes(raw.replace("+", " ")).decode("utf-8", "surrogateescape")


def unquote_etag(etag: str) -> str:
    return etag.strip().strip('"')


def answer_seconds(headers: Mapping[str, str]) -> int:
    """The server's clock when it answered (its Date header), in whole seconds since the
    epoch; 0 when absent or unreadable."""
    value = headers.get("date")
    if not value:
        return 0
    try:
        return int(parsedate_to_datetime(value).timestamp())
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0


# Server-side encryption that makes the ETag something other than the MD5 of the bytes
# (SSE-S3, "AES256", keeps the MD5; SSE-KMS, DSSE-KMS and SSE-C do not).
_OPAQUE_ETAG_ENCRYPTION = ("aws:kms", "aws:kms:dsse")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    etag: str  # unquoted
    metadata: dict[str, str]
    last_modified: str = ""  # listings only
    # HEAD only: the object is encrypted so that its ETag is not the MD5 of its bytes
    # (SSE-KMS, DSSE-KMS, SSE-C).
    etag_is_opaque: bool = False
    modified_seconds: int = 0  # HEAD only: Last-Modified, seconds since the epoch


@dataclass(frozen=True, slots=True)
class Written:
    """What the answer to one of our writes said: the ETag, and the server's clock when it
    answered (seconds since the epoch, 0 when unknown). A listing's LastModified later than
    `at` is another writer's, even when that writer kept the ETag (a metadata rewrite)."""

    etag: str
    at: int = 0


@dataclass(frozen=True, slots=True)
class ClientSettings:
    concurrency: int
    connect_timeout: float = 5.0
    read_timeout: float = 30.0  # of silence (SIDECAR_REQUEST_TIMEOUT)
    max_attempts: int = 5
    # Every request ends within deadline_base + its bytes at deadline_rate (http11 docstring);
    # the base defaults to twice the read timeout.
    deadline_base: float | None = None
    deadline_rate: float = DEADLINE_RATE

    @property
    def base_seconds(self) -> float:
        return 2 * self.read_timeout if self.deadline_base is None else self.deadline_base

    def call_deadline(self, expected_bytes: int) -> float:
        """All of one aiobotocore call: every attempt its deadline, plus botocore's backoff
        between them (standard mode: up to 1, 2, 4, ... 20 s)."""
        per_attempt = self.base_seconds + expected_bytes / self.deadline_rate
        backoffs = sum(min(20, 2**i) for i in range(self.max_attempts - 1))
        return self.max_attempts * per_attempt + backoffs


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
    """One bucket. Use as an async context manager.

    Per-object hot operations (list, HEAD, GET, PUT, UploadPart) go over sidecar.s3.http11's
    kept-alive connections, signed by sidecar.s3.sigv4: botocore spends ~1.7 ms of CPU per
    request and aiohttp's client ~0.26 ms, which caps a 2-core pod at a few hundred small
    files per second. Credentials still come from botocore's provider chain (env, files,
    IRSA...), and the rare multi-step operations (create/complete/abort multipart, copy,
    delete) still go through aiobotocore.
    """

    def __init__(self, bucket: str, settings: ClientSettings) -> None:
        self.bucket = bucket
        self.settings = settings
        self.slots = asyncio.Semaphore(settings.concurrency)
        self.in_flight = 0
        self.retries = 0
        self.conditional_writes = True  # until the server says NotImplemented
        self.metadata_rewrites = True  # until a rewrite proves invisible in listings
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._credentials: Any = None
        self._session: Any = None
        self._region = "us-east-1"
        self._signer: Signer | None = None
        self._pool: ConnectionPool | None = None
        self._env_credentials: tuple[str, str, str | None] | None = None
        self._read_buffers: list[bytearray] = []  # reused by get_object, one per stream
        self._host = ""
        self._path_prefix = ""

    async def __aenter__(self) -> ObjectStore:
        self._region = (
            os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        )
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if key and secret:  # a process's environment does not change: read it once
            self._env_credentials = (key, secret, os.environ.get("AWS_SESSION_TOKEN") or None)
        scheme, host, port = self._configure_urls(endpoint_from_env(), self._region)
        self._pool = ConnectionPool(
            scheme,
            host,
            port,
            connect_timeout=self.settings.connect_timeout,
            read_timeout=self.settings.read_timeout,
            max_idle=self.settings.concurrency,
            ssl_context=_ssl_context() if scheme == "https" else None,
            proxy=proxy_from_env(scheme, host),
            deadline_base=self.settings.base_seconds,
            deadline_rate=self.settings.deadline_rate,
        )
        self._stack.push_async_callback(self._pool.close)
        return self

    async def _botocore_client(self) -> Any:
        """The aiobotocore client, created on first use (multipart, copy, delete)."""
        if self._client is None:
            from botocore.config import Config

            endpoint = endpoint_from_env()
            s3_options: dict[str, Any] = {
                # Our xxh3 verification covers integrity; SHA-256 of every payload (botocore's
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
            session = self._botocore_session()
            self._client = await self._stack.enter_async_context(
                session.create_client(
                    "s3", region_name=self._region, endpoint_url=endpoint, config=config
                )
            )
        return self._client

    def _botocore_session(self) -> Any:
        if self._session is None:
            from aiobotocore.session import get_session

            self._session = get_session()
        return self._session

    async def _frozen_credentials(self) -> tuple[str, str, str | None]:
        if self._env_credentials is not None:  # the common case in a pod: a Secret, as env
            return self._env_credentials
        if self._credentials is None:
            # Files, profiles, IRSA, instance roles: botocore's provider chain, refreshed
            # by botocore when the credentials expire.
            self._credentials = await self._botocore_session().get_credentials()
            if self._credentials is None:
                raise S3Error(
                    self.bucket,
                    "NoCredentials",
                    "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                    "(or AWS_SHARED_CREDENTIALS_FILE)",
                    fatal=True,
                )
        frozen = await self._credentials.get_frozen_credentials()
        return frozen.access_key, frozen.secret_key, frozen.token

    def _configure_urls(self, endpoint: str | None, region: str) -> tuple[str, str, int]:
        """Sets the signed Host and the path prefix; returns (scheme, host, port) to dial."""
        if endpoint:  # custom endpoints (MinIO, rclone, Ceph...): path-style addressing
            parts = urlsplit(endpoint)
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https") or not parts.hostname:
                raise S3Error(
                    self.bucket,
                    "BadEndpoint",
                    f"the endpoint {endpoint!r} is not an http:// or https:// URL",
                    fatal=True,
                )
            try:
                port = parts.port or (443 if scheme == "https" else 80)
            except ValueError:
                raise S3Error(
                    self.bucket,
                    "BadEndpoint",
                    f"the endpoint {endpoint!r} has a bad port",
                    fatal=True,
                ) from None
            self._host = _signed_host(scheme, parts.netloc)
            self._path_prefix = f"/{self.bucket}"
            return scheme, parts.hostname, port
        host = f"{self.bucket}.s3.{region}.amazonaws.com"
        self._host = host
        self._path_prefix = ""
        return "https", host, 443

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _current_signer(self) -> Signer:
        access_key, secret_key, token = await self._frozen_credentials()
        signer = self._signer
        if (
            signer is None
            or signer.access_key != access_key
            or signer.secret_key != secret_key
            or signer.session_token != token
        ):
            signer = Signer(access_key, secret_key, self._region, token)
            self._signer = signer
        return signer

    async def _send(
        self,
        method: str,
        key: str | None,
        *,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        data: bytes | memoryview | None = None,
    ) -> Response:
        """One signed request with retries (5xx, throttling, timeouts, resets: backoff and
        jitter). Returns the open response on success; the caller reads and releases it."""
        assert self._pool is not None
        name = key if key is not None else self.bucket
        path = self._path_prefix + ("/" + key if key is not None else "/")
        target = uri_encode_path(path)
        if query:
            target += "?" + canonical_query(query)
        attempts = self.settings.max_attempts
        for attempt in range(attempts):
            signer = await self._current_signer()
            signed = signer.sign(
                method, self._host, path, query or {}, dict(headers or {}), datetime.now(UTC)
            )
            signed["Host"] = self._host
            signed["User-Agent"] = USER_AGENT
            try:
                response = await self._pool.request(method, target, signed, data)
            except HTTP_TRANSIENT as exc:
                if attempt + 1 == attempts or getattr(exc, "permanent", False):
                    raise _error_from(name, exc) from exc
                self.retries += 1
                await backoff(attempt)
                continue
            if response.status < 300:
                return response
            body = await _read_all(response)
            response.release()
            error = _http_error(name, response.status, body)
            if (response.status in RETRY_STATUSES or error.code in RETRY_CODES) and (
                attempt + 1 < attempts
            ):
                self.retries += 1
                await backoff(attempt)
                continue
            error.retried = attempt > 0
            raise error
        raise AssertionError("unreachable")

    async def _call(self, key: str, method: str, **params: Any) -> dict[str, Any]:
        """A request through aiobotocore (retried by botocore's standard mode).

        aiohttp under aiobotocore has only connect and per-read timeouts (aiobotocore sets no
        ClientTimeout total), so the whole call gets a deadline here. A server-side copy
        moves up to 5 GiB (S3's CopyObject limit) without telling us its size: its deadline
        allows for that.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        client = await self._botocore_client()
        moved = COPY_MAX_BYTES if method == "copy_object" else 0
        async with self.slots:
            self.in_flight += 1
            try:
                async with asyncio.timeout(self.settings.call_deadline(moved)):
                    response: dict[str, Any] = await getattr(client, method)(
                        Bucket=self.bucket, **params
                    )
            except ClientError as exc:
                self.retries += exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
                raise _error_from(key, exc) from exc
            except (BotoCoreError, *HTTP_TRANSIENT) as exc:
                raise _error_from(key, exc) from exc
            finally:
                self.in_flight -= 1
        self.retries += response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
        return response

    # ---- reading ---------------------------------------------------------------------
    async def list(self, prefix: str) -> AsyncIterator[list[ObjectInfo]]:
        """Pages of the listing under prefix (metadata is never in listings).

        The next page is requested as soon as a page's continuation token is read, so the
        server lists page N+1 while we parse page N.
        """
        name = prefix or "/"
        fetch = asyncio.ensure_future(self._list_page(prefix, None))
        try:
            while True:
                body = await fetch
                try:
                    token = _listing_token(body)
                    if token:
                        fetch = asyncio.ensure_future(self._list_page(prefix, token))
                    page = _listing_entries(body)
                except ValueError as exc:
                    raise S3Error(name, "BadListing", f"unreadable listing page: {exc}") from None
                yield page
                if not token:
                    return
        finally:
            if not fetch.done():
                fetch.cancel()

    async def _list_page(self, prefix: str, token: str | None) -> bytes:
        query = {"list-type": "2", "prefix": prefix, "max-keys": "1000", "encoding-type": "url"}
        if token:
            query["continuation-token"] = token
        async with self.slots:
            self.in_flight += 1
            try:
                response = await self._send("GET", None, query=query)
                try:
                    return await response.read_all()
                except HTTP_TRANSIENT as exc:
                    raise _error_from(prefix or "/", exc) from exc
                finally:
                    response.release()
            finally:
                self.in_flight -= 1

    async def head(self, key: str) -> ObjectInfo:
        async with self.slots:
            self.in_flight += 1
            try:
                response = await self._send("HEAD", key)
                response.release()
            finally:
                self.in_flight -= 1
        headers = response.headers
        modified = headers.get("last-modified")
        return ObjectInfo(
            key,
            int(headers.get("content-length", "0")),
            unquote_etag(headers.get("etag", "")),
            _metadata(headers),
            etag_is_opaque=(
                headers.get("x-amz-server-side-encryption", "").lower() in _OPAQUE_ETAG_ENCRYPTION
                or "x-amz-server-side-encryption-customer-algorithm" in headers
            ),
            modified_seconds=answer_seconds({"date": modified}) if modified else 0,
        )

    async def get_object(
        self, key: str, etag: str | None, sink: Callable[[bytes | memoryview], None]
    ) -> dict[str, str]:
        """Stream the whole object to sink(data); returns the metadata.

        Pinned to `etag` with If-Match. The slot is held while the body streams. `data` is
        only valid during the sink call (a view of a reused buffer): the body goes from the
        socket into that buffer and from there to the sink, uncopied. Ranges of large
        objects go through get_range_into instead.
        """
        headers = {"If-Match": f'"{etag}"'} if etag else {}
        async with self.slots:
            self.in_flight += 1
            try:
                response = await self._send("GET", key, headers=headers)
                buffer: bytearray | None = None
                try:
                    if response.body is not None:  # small: it came with the head
                        sink(response.body)
                    else:
                        buffer = (
                            self._read_buffers.pop()
                            if self._read_buffers
                            else bytearray(READ_BUFFER_BYTES)
                        )
                        view = memoryview(buffer)
                        while count := await response.read_into(view):
                            sink(view[:count])
                except HTTP_TRANSIENT as exc:
                    raise _error_from(key, exc) from exc
                finally:
                    response.release()
                    if buffer is not None and len(self._read_buffers) < self.settings.concurrency:
                        self._read_buffers.append(buffer)
                return _metadata(response.headers)
            finally:
                self.in_flight -= 1

    async def get_range_into(
        self,
        key: str,
        offset: int,
        view: memoryview,
        etag: str | None,
        received: Callable[[int], None],
    ) -> dict[str, str]:
        """Bytes [offset, offset+len(view)) of the object, received straight into view;
        returns the metadata. Pinned to `etag` with If-Match; received(n) as bytes arrive."""
        length = len(view)
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        if etag:
            headers["If-Match"] = f'"{etag}"'
        filled = 0
        async with self.slots:
            self.in_flight += 1
            try:
                response = await self._send("GET", key, headers=headers)
                try:
                    while filled < length:
                        count = await response.read_into(view[filled:])
                        if not count:
                            break
                        filled += count
                        received(count)
                    if await response.read_into(memoryview(bytearray(1))):
                        filled += 1  # more than asked for: reported below
                except HTTP_TRANSIENT as exc:
                    received(-filled)
                    raise _error_from(key, exc) from exc
                finally:
                    response.release()
            finally:
                self.in_flight -= 1
        if filled != length:
            received(-filled)
            if filled > length:
                raise S3Error(
                    key, "RangeIgnored", f"asked for {length} bytes, the server sent more"
                )
            raise S3Error(key, "ShortRead", f"expected {length} bytes, got {filled}")
        return _metadata(response.headers)

    # ---- writing ---------------------------------------------------------------------
    def _conditions(self, if_match: str | None, if_none_match: bool) -> dict[str, str]:
        """Conditional-write headers (HTTP names), none once the server said NotImplemented."""
        if not self.conditional_writes:
            return {}
        if if_match:
            return {"If-Match": f'"{if_match}"'}
        if if_none_match:
            return {"If-None-Match": "*"}
        return {}

    async def _write_conditionally(
        self,
        if_match: str | None,
        if_none_match: bool,
        write: Callable[[dict[str, str]], Awaitable[T]],
    ) -> T:
        """write(conditions); a server without conditional writes gets plain writes for good."""
        conditions = self._conditions(if_match, if_none_match)
        try:
            return await write(conditions)
        except S3Error as exc:
            if exc.code in NOT_IMPLEMENTED_CODES and conditions:
                self.conditional_writes = False
                return await write({})
            raise

    async def _put_bytes(
        self,
        key: str,
        body: bytes | memoryview,
        headers: dict[str, str],
        query: dict[str, str] | None,
    ) -> Written:
        async with self.slots:
            self.in_flight += 1
            try:
                response = await self._send("PUT", key, query=query, headers=headers, data=body)
                response.release()
            finally:
                self.in_flight -= 1
        return Written(
            unquote_etag(response.headers.get("etag", "")), answer_seconds(response.headers)
        )

    async def put(
        self,
        key: str,
        body: bytes,
        metadata: dict[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> Written:
        headers = {f"x-amz-meta-{name}": value for name, value in metadata.items()}
        headers["Content-Type"] = "application/octet-stream"

        async def write(conditions: dict[str, str]) -> Written:
            return await self._put_bytes(key, body, {**headers, **conditions}, None)

        try:
            return await self._write_conditionally(if_match, if_none_match, write)
        except S3Error as exc:
            if exc.precondition_failed and exc.retried:
                done = await self._landed_already(key, len(body), metadata)
                if done is not None:
                    return done
            raise

    async def _landed_already(
        self, key: str, size: int, metadata: dict[str, str]
    ) -> Written | None:
        """After a retried conditional write failed: whether the object now holds exactly
        what we sent (size and every metadata value, our content hash among them), i.e. an
        earlier attempt was applied and only its answer was lost. One HEAD."""
        try:
            info = await self.head(key)
        except S3Error:
            return None
        mine = info.size == size and all(info.metadata.get(n) == v for n, v in metadata.items())
        if not mine:
            return None
        return Written(info.etag, info.modified_seconds)

    async def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        """A new upload's id. An attempt whose answer was lost (reset, timeout, cut body) may
        have created an upload we never learn the id of: after a retried or failed create,
        the other uploads of this key are aborted (never orphaned)."""
        try:
            response = await self._call(key, "create_multipart_upload", Key=key, Metadata=metadata)
        except S3Error:
            with contextlib.suppress(S3Error):  # else the next sync does it (StateStore.creating)
                await self.abort_strays(key)
            raise
        upload_id = str(response["UploadId"])
        if response.get("ResponseMetadata", {}).get("RetryAttempts"):
            with contextlib.suppress(S3Error):
                await self.abort_strays(key, keep=upload_id)
        return upload_id

    async def abort_strays(self, key: str, keep: str | None = None) -> list[str]:
        """Abort the multipart uploads of exactly `key` but `keep`; returns their ids (one that
        cannot be aborted is left as it was). Raises S3Error if they cannot be listed.

        Not filtered by start time: servers differ (moto reports one fixed date for every
        upload), and an upload of this key nobody completed is billed for nothing. Another
        writer's upload of this very key in progress is aborted too: its Complete fails by
        name and its next sync sends the file again; nothing is lost."""
        listed = await self._call(key, "list_multipart_uploads", Prefix=key)
        aborted = []
        for upload in listed.get("Uploads", []):
            upload_id = upload.get("UploadId")
            if upload.get("Key") != key or not upload_id or upload_id == keep:
                continue
            try:
                await self.abort_multipart(key, upload_id)
            except S3Error:
                continue
            aborted.append(upload_id)
        return aborted

    async def upload_part(
        self, key: str, upload_id: str, number: int, body: bytes | memoryview
    ) -> str:
        query = {"partNumber": str(number), "uploadId": upload_id}
        return (await self._put_bytes(key, body, {}, query)).etag

    async def complete_multipart(
        self,
        key: str,
        upload_id: str,
        part_etags: list[str],
        if_match: str | None = None,
        if_none_match: bool = False,
        expected: tuple[int, dict[str, str]] | None = None,
    ) -> Written:
        """Complete the upload. `expected` (size, metadata) is what the object holds once
        it is complete: a retried Complete whose first answer was lost (412, or NoSuchUpload
        as the upload is gone) counts as done when the object holds exactly that."""
        parts = [{"ETag": f'"{etag}"', "PartNumber": n} for n, etag in enumerate(part_etags, 1)]

        async def write(conditions: dict[str, str]) -> dict[str, Any]:
            params = {BOTOCORE_CONDITION_PARAMS[name]: value for name, value in conditions.items()}
            return await self._call(
                key,
                "complete_multipart_upload",
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **params,
            )

        try:
            response = await self._write_conditionally(if_match, if_none_match, write)
        except S3Error as exc:
            lost = exc.retried and (exc.precondition_failed or exc.code == "NoSuchUpload")
            if lost and expected is not None:
                done = await self._landed_already(key, *expected)
                if done is not None:
                    return done
            raise
        return Written(unquote_etag(response.get("ETag", "")), _botocore_date(response))

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            await self._call(key, "abort_multipart_upload", Key=key, UploadId=upload_id)
        except S3Error as exc:
            if exc.code not in ("NoSuchUpload", "404"):
                raise

    async def delete(self, key: str, if_match: str | None = None) -> None:
        """Delete the key; with if_match, only while it still holds that version (a writer
        racing in between gets a 412, and its object stays)."""

        async def write(conditions: dict[str, str]) -> None:
            params = {BOTOCORE_CONDITION_PARAMS[name]: value for name, value in conditions.items()}
            await self._call(key, "delete_object", Key=key, **params)

        await self._write_conditionally(if_match, False, write)

    async def copy(
        self,
        source_key: str,
        dest_key: str,
        source_etag: str | None,
        if_none_match: bool = False,
    ) -> str:
        """Server-side copy. With if_none_match the copy never replaces an object: AWS honours
        `If-None-Match: *` on CopyObject (412), moto 5.2 and rclone ignore it, so the
        destination is HEADed first (a 412-like S3Error when it exists). What is left on
        those servers is the window between that HEAD and the copy."""
        params: dict[str, Any] = {
            "Key": dest_key,
            "CopySource": {"Bucket": self.bucket, "Key": source_key},
        }
        if source_etag:
            params["CopySourceIfMatch"] = f'"{source_etag}"'
        if if_none_match:
            try:
                await self.head(dest_key)
            except S3Error as exc:
                if not exc.not_found:
                    raise
            else:
                raise S3Error(dest_key, "PreconditionFailed", "the key already exists")

        if if_none_match and self.conditional_writes:
            try:
                response = await self._call(dest_key, "copy_object", **params, IfNoneMatch="*")
            except S3Error as exc:
                # Not the server-wide switch _write_conditionally flips: a server may refuse
                # the condition on a copy yet honour it on PUT.
                if exc.code not in NOT_IMPLEMENTED_CODES:
                    raise
                response = await self._call(dest_key, "copy_object", **params)
        else:
            response = await self._call(dest_key, "copy_object", **params)
        return unquote_etag(response.get("CopyObjectResult", {}).get("ETag", ""))

    async def rewrite_metadata(
        self, key: str, etag: str, metadata: dict[str, str]
    ) -> Written | None:
        """Replace the object's metadata without sending its content (a copy onto itself,
        pinned to `etag`). Returns the copy's ETag, or None when the server did not report a
        new ETag and LastModified: other replicas compare listings, and would not notice
        (rclone serve s3 keeps both as they were). After one None, no more rewrites.

        The pin is only a request: moto ignores x-amz-copy-source-if-match, so the copy may
        have relabelled another writer's bytes. The caller checks the returned ETag."""
        if not self.metadata_rewrites:
            return None
        response = await self._call(
            key,
            "copy_object",
            Key=key,
            CopySource={"Bucket": self.bucket, "Key": key},
            CopySourceIfMatch=f'"{etag}"',
            MetadataDirective="REPLACE",
            Metadata=metadata,
            ContentType="application/octet-stream",  # REPLACE would reset it otherwise
        )
        result = response.get("CopyObjectResult", {})
        new_etag = unquote_etag(result.get("ETag", ""))
        if not new_etag or not result.get("LastModified"):
            self.metadata_rewrites = False
            return None
        return Written(new_etag, _botocore_date(response))


def _botocore_date(response: dict[str, Any]) -> int:
    return answer_seconds(response.get("ResponseMetadata", {}).get("HTTPHeaders", {}))


def _signed_host(scheme: str, netloc: str) -> str:
    """The Host header as the HTTP client sends it: default ports are left out."""
    if (scheme == "http" and netloc.endswith(":80")) or (
        scheme == "https" and netloc.endswith(":443")
    ):
        return netloc.rsplit(":", 1)[0]
    return netloc


def proxy_from_env(scheme: str, host: str) -> Proxy | None:
    """The proxy for scheme://host from HTTP(S)_PROXY and NO_PROXY, as botocore (and curl)
    read them, so every request of a sync takes the same way out of the pod."""
    if not any(name.lower() in ("http_proxy", "https_proxy") for name in os.environ):
        return None  # the common case: no proxy, and no urllib.request import (~10 ms)
    from urllib.request import getproxies_environment, proxy_bypass_environment

    proxies = getproxies_environment()
    url = proxies.get(scheme)
    if not url or proxy_bypass_environment(host, proxies):
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise S3Error(
            host,
            "BadProxy",
            f"the {scheme.upper()}_PROXY {url!r} is not an http:// proxy URL "
            "(TLS to the proxy itself is not supported)",
            fatal=True,
        )
    authorization = None
    if parts.username is not None:
        user, password = unquote(parts.username), unquote(parts.password or "")
        authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return Proxy(parts.hostname, parts.port or 80, authorization)


def _ssl_context() -> ssl.SSLContext:
    """Verified TLS with the system's CAs, or AWS_CA_BUNDLE's as botocore would use."""
    return ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)


async def _read_all(response: Response) -> bytes:
    try:
        return await response.read_all()
    except HTTP_TRANSIENT:
        return b""


async def backoff(attempt: int) -> None:
    """Exponential backoff with full jitter (0.1 s, 0.2 s, 0.4 s ... capped at 5 s)."""
    await asyncio.sleep(random.uniform(0, min(5.0, 0.1 * 2**attempt)))


# ListObjectsV2 answers are read with a few regular expressions rather than an XML tree:
# ElementTree spent ~11 us per listed object (half of a no-op sync of 5,000 files); this
# takes ~3. What a tree would have caught is checked instead: the root element, KeyCount
# against the entries found, and a truncated page that names no continuation token.
_LISTING_ROOT = re.compile(rb"<ListBucketResult[\s>]")
_CONTENTS_FIELD = re.compile(rb"<(Key|Size|ETag|LastModified)>([^<]*)<|</Contents>")
_ENTITY = re.compile(r"&(#[0-9]+|#x[0-9a-fA-F]+|amp|lt|gt|quot|apos);")
_NAMED_ENTITIES = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}


def _top_level(body: bytes, name: bytes) -> bytes | None:
    """The text of the first <name> element outside the Contents entries (S3 puts these
    before the entries, but servers differ: look at the end too)."""
    pattern = re.compile(b"<" + name + b">([^<]*)</" + name + b">")
    head = body.split(b"<Contents>", 1)[0]
    found = pattern.search(head) or pattern.search(body.rsplit(b"</Contents>", 1)[-1])
    return found.group(1) if found else None


def _xml_text(raw: bytes) -> str:
    text = raw.decode("utf-8", "surrogateescape")
    return _ENTITY.sub(_entity, text) if "&" in text else text


def _entity(match: re.Match[str]) -> str:
    name = match.group(1)
    if name[0] != "#":
        return _NAMED_ENTITIES[name]
    return chr(int(name[2:], 16) if name[1] == "x" else int(name[1:]))


def _listing_token(body: bytes) -> str | None:
    """The continuation token of a truncated page; None on the last page."""
    if not _LISTING_ROOT.search(body[:4096]):
        raise ValueError(f"not a ListBucketResult: {body[:120]!r}")
    truncated = (_top_level(body, b"IsTruncated") or b"").strip().lower() == b"true"
    if not truncated:
        return None
    token = _top_level(body, b"NextContinuationToken")
    if not token:
        raise ValueError("a truncated page without a NextContinuationToken")
    return _xml_text(token)


def _listing_entries(body: bytes) -> list[ObjectInfo]:
    url_encoded = (_top_level(body, b"EncodingType") or b"").strip().lower() == b"url"
    page = []
    fields: dict[bytes, bytes] = {}
    first = body.find(b"<Contents>")
    # One pass over the fields of every entry; each </Contents> closes one.
    for match in _CONTENTS_FIELD.finditer(body, first if first >= 0 else len(body)):
        name = match.group(1)
        if name is not None:
            fields[name] = match.group(2)
            continue
        page.append(
            ObjectInfo(
                decode_listed_key(_xml_text(fields.get(b"Key", b"")), url_encoded),
                int(fields.get(b"Size") or 0),
                unquote_etag(_xml_text(fields.get(b"ETag", b""))),
                {},
                fields.get(b"LastModified", b"").decode("ascii", "replace"),
            )
        )
        fields = {}
    key_count = _top_level(body, b"KeyCount")
    if key_count is not None and key_count.strip().isdigit() and int(key_count) != len(page):
        raise ValueError(f"KeyCount says {int(key_count)} objects, the page lists {len(page)}")
    return page


def _parse_listing(body: bytes) -> tuple[list[ObjectInfo], str | None]:
    token = _listing_token(body)
    return _listing_entries(body), token
