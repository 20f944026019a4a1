"""The object store: every S3 request the sidecar makes, over one signed transport.

Every attempt of every request takes a slot of one in-flight budget (`--concurrency` at most,
shared by all files, grown while throughput grows, cut on throttling: sidecar/s3/retry.py); a
request is retried by the one retry policy (retry.py: throttling, 5xx, timeouts, resets, a
body cut mid-way; full-jitter backoff, an attempt cap and a deadline), and fails as an S3Error
that names the key and the cause. botocore serves only as the credentials provider
(sidecar.s3.credentials), imported lazily.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar
from urllib.parse import quote

from sidecar.core.options import default_of
from sidecar.core.parts import LONG_LINK_SECONDS
from sidecar.s3 import answers
from sidecar.s3 import metadata as meta
from sidecar.s3.bucket_options import BucketOptions, SseCKey, operation_of, option_headers
from sidecar.s3.credentials import Credentials
from sidecar.s3.endpoint import (
    Address,
    endpoint_from_env,
    proxy_from_env,
    resolve_address,
    ssl_context,
)
from sidecar.s3.errors import (
    HTTP_TRANSIENT,
    NOT_IMPLEMENTED_CODES,
    S3Error,
    error_from,
    http_error,
)
from sidecar.s3.fanout import DELIMITER, FanOutListing
from sidecar.s3.http11 import DEADLINE_RATE, ConnectionPool, Response, connect_early
from sidecar.s3.objects import ObjectInfo, ObjectVersion, Written, answer_seconds, unquote_etag
from sidecar.s3.retry import START_BUDGET, Attempts, InflightBudget, RetryPolicy
from sidecar.s3.sigv4 import Signer, canonical_query, uri_encode_path

T = TypeVar("T")
log = logging.getLogger(__name__)

USER_AGENT = "netvol-sidecar"
# Per body stream; a recv fills at most this much at once, and only touched pages count.
READ_BUFFER_BYTES = 256 * 1024

CONNECT_TIMEOUT = 5.0  # seconds
EARLY_CONNECTIONS = 2  # opened by connect_ahead (see there)
COPY_MAX_BYTES = 5 * 1024**3  # the most one CopyObject moves (its deadline allows for it)

# Server-side encryption that makes the ETag something other than the MD5 of the bytes
# (SSE-S3, "AES256", keeps the MD5; SSE-KMS, DSSE-KMS and SSE-C do not).
_OPAQUE_ETAG_ENCRYPTION = ("aws:kms", "aws:kms:dsse")


@dataclass(frozen=True, slots=True)
class ClientSettings:
    concurrency: int
    connect_timeout: float = CONNECT_TIMEOUT
    read_timeout: float = default_of("--request-timeout")  # seconds of silence
    max_attempts: int = 5
    # Every request ends within deadline_base + its bytes at deadline_rate (http11 docstring);
    # the base defaults to twice the read timeout.
    deadline_base: float | None = None
    deadline_rate: float = DEADLINE_RATE
    addressing_style: str = default_of("--addressing-style")  # auto, path or virtual
    bucket_options: BucketOptions = field(default_factory=BucketOptions)  # per-request headers

    @property
    def base_seconds(self) -> float:
        return 2 * self.read_timeout if self.deadline_base is None else self.deadline_base

    def fresh_budget(self) -> InflightBudget:
        """The in-flight budget a store starts with: START_BUDGET, or the concurrency when
        lower, growing up to the concurrency (retry.py)."""
        return InflightBudget(self.concurrency, START_BUDGET)

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            attempt_base=self.base_seconds,
            attempt_rate=self.deadline_rate,
        )


def _region_from_env() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def connect_ahead(bucket: str, addressing_style: str) -> None:
    """Open the first connections to the bucket's endpoint now, on threads
    (http11.connect_early): a one-shot sync calls this before its own imports and set-up,
    which then overlap the handshakes' round trip. Two: a listing's first round trip sends
    up to two requests (the flat first page and the delimited listing, or the second page
    and the delimited listing). Not through a proxy (its tunnel takes steps of its own);
    nothing when the address cannot be made (the store then says why)."""
    try:
        address = resolve_address(bucket, endpoint_from_env(), _region_from_env(), addressing_style)
    except S3Error:
        return
    if proxy_from_env(address.scheme, address.host) is None:
        connect_early(address.host, address.port, CONNECT_TIMEOUT, count=EARLY_CONNECTIONS)


class ObjectStore:
    """One bucket. Use as an async context manager.

    Every operation goes over sidecar.s3.http11's kept-alive connections, signed by
    sidecar.s3.sigv4 (_send): botocore spends ~1.7 ms of CPU per request and aiohttp's client
    ~0.26 ms, which caps a 2-core pod at a few hundred small files per second. One address,
    one error mapper and one retry loop for all of them. Credentials come from the
    environment or botocore's provider chain (sidecar.s3.credentials).
    """

    def __init__(self, bucket: str, settings: ClientSettings) -> None:
        self.bucket = bucket
        self.settings = settings
        self.budget = settings.fresh_budget()
        self.retry_policy = settings.retry_policy()
        self.retries = 0  # counted in _exchange alone
        self.conditional_writes = True  # until the server says NotImplemented
        self.metadata_rewrites = True  # until a rewrite proves invisible in listings
        self._stack = contextlib.AsyncExitStack()
        self._credentials = Credentials(bucket)
        self._region = "us-east-1"
        self._followed_region = False  # a redirect moved us to the bucket's region once
        self._signer: Signer | None = None
        self._pool: ConnectionPool | None = None
        self._read_buffers: list[bytearray] = []  # reused by get_object, one per stream
        self._host = ""
        self._path_prefix = ""
        self._address: Address | None = None
        options = settings.bucket_options
        self._sse_c = SseCKey(options.sse_c_key_file) if options.sse_c_key_file else None

    @property
    def in_flight(self) -> int:
        return self.budget.in_use

    def warm(self, requests: int) -> None:
        """Requests are coming (`requests` of them, e.g. a first pull's listed objects): on a
        long link, open connections for them ahead, as many as the budget lets fly at once,
        so the first wave pays no handshake (on loopback one costs ~0.1 ms: not worth it)."""
        round_trip = self.round_trip
        if self._pool is None or round_trip is None or round_trip < LONG_LINK_SECONDS:
            return
        self._pool.warm(min(requests, self.budget.current))

    @property
    def round_trip(self) -> float | None:
        """The quickest answer so far, in seconds (http11.ConnectionPool.round_trip)."""
        return self._pool.round_trip if self._pool is not None else None

    async def __aenter__(self) -> ObjectStore:
        self._region = _region_from_env()
        if self._sse_c is not None:
            self._sse_c.headers()  # an unusable key file fails the sync before any request
        self._open_pool(*self._configure_urls(endpoint_from_env(), self._region))
        return self

    def _open_pool(self, scheme: str, host: str, port: int) -> None:
        self._pool = ConnectionPool(
            scheme,
            host,
            port,
            connect_timeout=self.settings.connect_timeout,
            read_timeout=self.settings.read_timeout,
            max_idle=self.settings.concurrency,
            ssl_context=ssl_context() if scheme == "https" else None,
            proxy=proxy_from_env(scheme, host),
            deadline_base=self.settings.base_seconds,
            deadline_rate=self.settings.deadline_rate,
        )
        self._stack.push_async_callback(self._pool.close)

    def _configure_urls(self, endpoint: str | None, region: str) -> tuple[str, str, int]:
        """Sets the signed Host and the path prefix; returns (scheme, host, port) to dial."""
        address = resolve_address(self.bucket, endpoint, region, self.settings.addressing_style)
        self._address = address
        self._host = address.signed_host
        self._path_prefix = address.path_prefix
        return address.scheme, address.host, address.port

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()
        log.debug(
            "in-flight budget at the end: %s; quickest answer %s s",
            self.budget.status(),
            f"{self.round_trip:.4f}" if self.round_trip is not None else "-",
        )

    def _follow_region(self, region: str) -> bool:
        """A redirect (301/307, or a 400 naming the region) says the bucket lives in
        `region`: sign for it from now on, and on AWS send to its regional endpoint, as the
        SDKs do. Once per store: a second move means something else is wrong (False)."""
        if region == self._region:
            return True  # another request moved us already: sign for it, send again
        if self._followed_region:
            return False
        log.warning(
            "bucket %s is in region %s, not %s: following the redirect; set AWS_REGION=%s "
            "to save the detour",
            self.bucket,
            region,
            self._region,
            region,
        )
        self._followed_region = True
        self._region = region
        old = self._pool
        scheme, host, port = self._configure_urls(endpoint_from_env(), region)
        if old is None or (old.host, old.port) != (host, port):
            self._open_pool(scheme, host, port)  # the old one closes with the store
        return True

    async def _current_signer(self) -> Signer:
        access_key, secret_key, token = await self._credentials.frozen()
        signer = self._signer
        if (
            signer is None
            or signer.access_key != access_key
            or signer.secret_key != secret_key
            or signer.session_token != token
            or signer.region != self._region
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
        error_in_200: bool = False,
        work_bytes: int = 0,
    ) -> Response:
        """One signed request, retried by the policy (_exchange), its answer read whole:
        the Response, released, its bytes in `response.body`. `response.retried`: an earlier
        attempt failed (it may have been applied, its answer lost).

        `error_in_200`: the operation may answer 200 and then an <Error> (S3 sends the head
        before a Complete or a copy is done): such an answer is that error, counted as a
        500, as botocore counts it: retried. `work_bytes`: see ConnectionPool.request."""
        read: Callable[[Response], Awaitable[Response]] = _read_whole
        if error_in_200:
            name = key if key is not None else self.bucket

            async def read(response: Response) -> Response:
                await _read_whole(response)
                if answers.is_error_in_200(response.body or b""):
                    raise http_error(name, 500, response.body or b"", response.headers)
                return response

        return await self._exchange(
            method, key, read, query=query, headers=headers, data=data, work_bytes=work_bytes
        )

    async def _signed(
        self,
        method: str,
        key: str | None,
        path: str,
        query: dict[str, str] | None,
        headers: dict[str, str] | None,
        options: BucketOptions,
    ) -> tuple[dict[str, str], Signer | None]:
        """The headers of one attempt, signed, and the signer (None: not signed)."""
        outgoing = dict(headers or {})
        outgoing.update(
            option_headers(
                options,
                operation_of(method, key is not None, query or {}, outgoing),
                self._sse_c.headers() if self._sse_c is not None else None,
            )
        )
        if options.no_sign_request:
            # Public bucket: no credentials looked up, nothing signed.
            signer: Signer | None = None
            signed = outgoing
        else:
            signer = await self._current_signer()
            signed = signer.sign(method, self._host, path, query or {}, outgoing, datetime.now(UTC))
        signed["Host"] = self._host
        signed["User-Agent"] = USER_AGENT
        return signed, signer

    async def _exchange(
        self,
        method: str,
        key: str | None,
        read: Callable[[Response], Awaitable[T]],
        *,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        data: bytes | memoryview | None = None,
        expected_bytes: int = 0,
        work_bytes: int = 0,
    ) -> T:
        """One signed request and its answer: read(response) on a 2xx, while the slot is
        held; the response is released after it. Every attempt takes a slot of the budget,
        gives it back before any backoff, and tells it whether it went through or was
        throttled. A failed attempt (an error answer, a broken exchange, a body cut mid-way:
        an OSError or TimeoutError from read, or a retryable S3Error from it) is tried again
        as the policy says, read() included: read must start its work afresh each time it
        is called, and wrap its own non-wire OSErrors (_SinkFailed). A redirect to the
        bucket's region is followed once (_follow_region), not counted as an attempt.
        `expected_bytes`: the answer's body when known (it sizes the deadline). The only
        place retries are counted."""
        assert self._pool is not None
        name = key if key is not None else self.bucket
        followed = False
        path, target = self._target(key, query)
        options = self.settings.bucket_options
        budget = self.budget
        tries: Attempts | None = None
        started = time.monotonic()
        while True:
            granted = await budget.acquire()
            try:
                # Keys asked for once the slot is held, not before the wait for it: a request
                # queued behind slow ones must not sign with keys that expired meanwhile.
                signed, signer = await self._signed(method, key, path, query, headers, options)
                try:
                    response = await self._pool.request(
                        method, target, signed, data, work_bytes=work_bytes
                    )
                except HTTP_TRANSIENT as exc:
                    error = error_from(name, exc)
                else:
                    response.retried = tries is not None
                    try:
                        if response.status < 300:
                            result = await read(response)
                            self._went_through()
                            return result
                        body = await _read_all(response)
                        error = http_error(name, response.status, body, response.headers)
                    except HTTP_TRANSIENT as exc:  # the body broke mid-way
                        error = error_from(name, exc)
                    except S3Error as exc:
                        if not exc.retryable:
                            raise
                        error = exc
                    finally:
                        response.release()
            finally:
                budget.release()
            if (
                error.region
                and error.region != (signer.region if signer is not None else self._region)
                and not followed
                and self._follow_region(error.region)
            ):
                followed = True
                continue
            self._tell_budget(error, granted)
            if tries is None:
                sent = (len(data) if data is not None else 0) + expected_bytes + work_bytes
                tries = self._first_retry(error, name, sent, started)
            await tries.again(error)  # raises `error` when no more attempts are due
            self.retries += 1

    def _went_through(self) -> None:
        budget = self.budget
        level = budget.current
        budget.succeeded(time.monotonic())
        if budget.current > level:  # raised: its new requests find connections ready
            self.warm(budget.current)

    def _tell_budget(self, error: S3Error, granted: int) -> None:
        if error.throttled:
            self.budget.throttled(granted)
        elif error.retryable:
            self.budget.failed()

    def _target(self, key: str | None, query: dict[str, str] | None) -> tuple[str, str]:
        """The path that is signed, and the request target (path and query, encoded)."""
        # The bucket itself is /bkt (path style) or / (virtual), as botocore sends it.
        path = self._path_prefix + "/" + key if key is not None else self._path_prefix or "/"
        target = uri_encode_path(path)
        if query:
            target += "?" + canonical_query(query)
        return path, target

    def _first_retry(self, error: S3Error, name: str, sent: int, started: float) -> Attempts:
        """The bookkeeping of a request's retries, from its first failure on; a failure not
        worth retrying is raised here (the common one, 404 or 412: no bookkeeping)."""
        if not error.retryable:
            raise error
        return Attempts(self.retry_policy, name, sent, started)

    # ---- reading ---------------------------------------------------------------------
    list_page_keys = 1000  # S3's most; tests list a small tree in many pages

    # Below this method, `list` in this class's annotations is the method: builtins.list.
    async def list(
        self,
        prefix: str,
        pace: Callable[[], Awaitable[None]] | None = None,
        expect_keys: int = 0,
        warm: bool = False,
        skip: frozenset[str] = frozenset(),
        skipped: Callable[[str], None] | None = None,
    ) -> AsyncGenerator[list[ObjectInfo], None]:
        """Pages of the listing under prefix, in key order (metadata is never in listings).

        A prefix larger than one page is listed folder by folder, many at once
        (sidecar.s3.fanout): the same objects in the same order as one chain of pages.
        `pace` is awaited before each page request (--max-requests-per-second): pages
        handed on and requests sent no longer match one to one. `expect_keys` (e.g. how
        many the last sync of this prefix saw): above one page, the delimited listing is sent
        beside the first page (one round trip less; one request wasted if it was not needed).
        `warm`: each object listed is a request to come (a first pull), so connections for
        them are opened while the listing goes on (warm()).
        `skip`: sub-prefixes a large listing does not descend into (`skipped` is told each one
        left out); the first page may still hold some of their keys.
        """
        fetch = self._list_page
        if pace is not None:

            async def fetch(
                prefix: str, token: str | None, start_after: str | None, delimited: bool
            ) -> bytes:
                await pace()
                return await self._list_page(prefix, token, start_after, delimited)

        listing = FanOutListing(fetch, speculate=expect_keys > self.list_page_keys, skip=skip)
        listed = 0
        async with contextlib.aclosing(listing.pages(prefix)) as pages:
            async for page in pages:
                if warm:
                    listed += len(page)
                    self.warm(listed)
                yield page
        if skipped is not None:
            for sub in listing.skipped:
                skipped(sub)

    async def _list_page(
        self, prefix: str, token: str | None, start_after: str | None, delimited: bool
    ) -> bytes:
        query = {"list-type": "2", "prefix": prefix, "max-keys": str(self.list_page_keys)}
        query["encoding-type"] = "url"
        if token:
            query["continuation-token"] = token
        if start_after:
            query["start-after"] = start_after
        if delimited:
            query["delimiter"] = DELIMITER
        response = await self._send("GET", None, query=query)
        return response.body or b""

    async def head(self, key: str) -> ObjectInfo:
        response = await self._send("HEAD", key)
        headers = response.headers
        modified = headers.get("last-modified")
        return ObjectInfo(
            key,
            int(headers.get("content-length", "0")),
            unquote_etag(headers.get("etag", "")),
            meta.from_headers(headers),
            etag_is_opaque=(
                headers.get("x-amz-server-side-encryption", "").lower() in _OPAQUE_ETAG_ENCRYPTION
                or "x-amz-server-side-encryption-customer-algorithm" in headers
            ),
            modified_seconds=answer_seconds({"date": modified}) if modified else 0,
        )

    async def get_object(
        self,
        key: str,
        etag: str | None,
        sink: Callable[[bytes | memoryview], None],
        restart: Callable[[], None] | None = None,
        size: int = 0,
    ) -> dict[str, str]:
        """Stream the whole object to sink(data); returns the metadata.

        Pinned to `etag` with If-Match. The slot is held while the body streams. `data` is
        only valid during the sink call (a view of a reused buffer): the body goes from the
        socket into that buffer and from there to the sink, uncopied. A body cut mid-way is
        fetched again from its start, under the same retry policy as the request, after
        restart() (the sink starts over); without restart, only until a byte reached the
        sink. `size`, when known, sizes the request's deadline. Ranges of large objects go
        through get_range_into instead. An OSError of the sink is raised as it is.
        """
        headers = {"If-Match": f'"{etag}"'} if etag else {}
        delivered = False

        async def read(response: Response) -> dict[str, str]:
            nonlocal delivered
            if delivered:
                assert restart is not None
                restart()
                delivered = False
            if response.body is not None:  # small: it came with the head
                _feed(sink, response.body)
                delivered = True
                return meta.from_headers(response.headers)
            buffer = (
                self._read_buffers.pop() if self._read_buffers else bytearray(READ_BUFFER_BYTES)
            )
            view = memoryview(buffer)
            try:
                while True:
                    try:
                        count = await response.read_into(view)
                    except HTTP_TRANSIENT as exc:
                        error = error_from(key, exc)
                        # Bytes the sink cannot take back: not retried without restart.
                        error.transient = restart is not None or not delivered
                        raise error from exc
                    if not count:
                        break
                    _feed(sink, view[:count])
                    delivered = True
            finally:
                if len(self._read_buffers) < self.settings.concurrency:
                    self._read_buffers.append(buffer)
            return meta.from_headers(response.headers)

        try:
            return await self._exchange("GET", key, read, headers=headers, expected_bytes=size)
        except _SinkFailed as exc:
            assert exc.__cause__ is not None
            raise exc.__cause__ from None

    async def get_range_into(
        self,
        key: str,
        offset: int,
        view: memoryview,
        etag: str | None,
        received: Callable[[int], None],
    ) -> dict[str, str]:
        """Bytes [offset, offset+len(view)) of the object, received straight into view;
        returns the metadata. Pinned to `etag` with If-Match; received(n) as bytes arrive
        (received(-n) takes back the bytes of an attempt cut mid-way, whose range is
        fetched again under the retry policy)."""
        length = len(view)
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        if etag:
            headers["If-Match"] = f'"{etag}"'

        async def read(response: Response) -> dict[str, str]:
            filled = 0
            try:
                while filled < length:
                    count = await response.read_into(view[filled:])
                    if not count:
                        break
                    filled += count
                    received(count)
                if await response.read_into(memoryview(bytearray(1))):
                    filled += 1  # more than asked for: reported below
            except HTTP_TRANSIENT:
                received(-filled)
                raise
            if filled != length:
                received(-filled)
                if filled > length:
                    raise S3Error(
                        key, "RangeIgnored", f"asked for {length} bytes, the server sent more"
                    )
                raise S3Error(
                    key, "ShortRead", f"expected {length} bytes, got {filled}", transient=True
                )
            return meta.from_headers(response.headers)

        return await self._exchange("GET", key, read, headers=headers, expected_bytes=length)

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
        response = await self._send("PUT", key, query=query, headers=headers, data=body)
        return Written(
            unquote_etag(response.headers.get("etag", "")), answer_seconds(response.headers)
        )

    async def put(
        self,
        key: str,
        body: bytes | memoryview,
        metadata: dict[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> Written:
        headers = meta.to_headers(metadata)
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

    async def _small_request(
        self,
        method: str,
        key: str | None,
        *,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        error_in_200: bool = False,
        work_bytes: int = 0,
    ) -> tuple[Response, bytes]:
        """One request of the rare operations (multipart, copy, delete): the answer and its
        whole (small) body."""
        response = await self._send(
            method,
            key,
            query=query,
            headers=headers,
            data=data,
            error_in_200=error_in_200,
            work_bytes=work_bytes,
        )
        return response, response.body or b""

    async def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        """A new upload's id. An attempt whose answer was lost (reset, timeout, cut body) may
        have created an upload we never learn the id of: after a retried or failed create,
        the other uploads of this key are aborted (never orphaned)."""
        try:
            response, body = await self._small_request(
                "POST", key, query={"uploads": ""}, headers=meta.to_headers(metadata)
            )
            upload_id = _read_answer(key, "CreateMultipartUpload", answers.upload_id, body)
        except S3Error:
            with contextlib.suppress(S3Error):  # else the next sync does it (StateStore.creating)
                await self.abort_strays(key)
            raise
        if response.retried:
            with contextlib.suppress(S3Error):
                await self.abort_strays(key, keep=upload_id)
        return upload_id

    async def abort_strays(self, key: str, keep: str | None = None) -> builtins.list[str]:
        """Abort the multipart uploads of exactly `key` but `keep`; returns their ids (one that
        cannot be aborted is left as it was). Raises S3Error if they cannot be listed.

        Not filtered by start time: servers differ (moto reports one fixed date for every
        upload), and an upload of this key nobody completed is billed for nothing. Another
        writer's upload of this very key in progress is aborted too: its Complete fails by
        name and its next sync sends the file again; nothing is lost."""
        strays: list[str] = []
        query = {"uploads": "", "prefix": key, "encoding-type": "url"}
        while True:
            _response, body = await self._small_request("GET", None, query=query)
            page = _read_answer(key, "ListMultipartUploads", answers.uploads_page, body)
            strays.extend(
                upload_id
                for listed, upload_id in page.uploads
                if key in listed and upload_id and upload_id != keep
            )
            if page.next_markers is None:
                break
            query = {**query, "key-marker": page.next_markers[0]}
            query["upload-id-marker"] = page.next_markers[1]
        aborted = []
        for upload_id in strays:
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
        part_etags: builtins.list[str],
        if_match: str | None = None,
        if_none_match: bool = False,
        expected: tuple[int, dict[str, str]] | None = None,
    ) -> Written:
        """Complete the upload. `expected` (size, metadata) is what the object holds once
        it is complete: a retried Complete whose first answer was lost (412, or NoSuchUpload
        as the upload is gone) counts as done when the object holds exactly that."""
        document = answers.complete_body(part_etags)

        async def write(conditions: dict[str, str]) -> Written:
            response, body = await self._small_request(
                "POST",
                key,
                query={"uploadId": upload_id},
                headers=conditions,
                data=document,
                error_in_200=True,
            )
            result = _read_answer(key, "CompleteMultipartUpload", answers.complete_result, body)
            return Written(result.etag, answer_seconds(response.headers))

        try:
            return await self._write_conditionally(if_match, if_none_match, write)
        except S3Error as exc:
            lost = exc.retried and (exc.precondition_failed or exc.code == "NoSuchUpload")
            if lost and expected is not None:
                done = await self._landed_already(key, *expected)
                if done is not None:
                    return done
            raise

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            await self._small_request("DELETE", key, query={"uploadId": upload_id})
        except S3Error as exc:
            if exc.code not in ("NoSuchUpload", "404", "NotFound"):
                raise

    async def delete(self, key: str, if_match: str | None = None) -> None:
        """Delete the key; with if_match, only while it still holds that version (a writer
        racing in between gets a 412, and its object stays)."""

        async def write(conditions: dict[str, str]) -> None:
            await self._small_request("DELETE", key, headers=conditions)

        await self._write_conditionally(if_match, False, write)

    def _copy_source(self, key: str, etag: str | None) -> dict[str, str]:
        """The copy-source headers: bucket/key percent-encoded as botocore encodes them
        (every byte but unreserved characters and '/'), pinned to `etag` when given."""
        headers = {"x-amz-copy-source": uri_encode_path(f"{self.bucket}/{key}")}
        if etag:
            headers["x-amz-copy-source-if-match"] = f'"{etag}"'
        return headers

    async def _copy(self, key: str, headers: dict[str, str]) -> tuple[Response, answers.Result]:
        """One CopyObject onto key. It may answer 200 and then an <Error> (S3 sends the head
        before the copy is done), and moves up to 5 GiB before it answers: its deadline
        allows for that."""
        response, body = await self._small_request(
            "PUT", key, headers=headers, error_in_200=True, work_bytes=COPY_MAX_BYTES
        )
        return response, _read_answer(key, "CopyObject", answers.copy_result, body)

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
        headers = self._copy_source(source_key, source_etag)
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
                _response, result = await self._copy(dest_key, {**headers, "If-None-Match": "*"})
            except S3Error as exc:
                # Not the server-wide switch _write_conditionally flips: a server may refuse
                # the condition on a copy yet honour it on PUT.
                if exc.code not in NOT_IMPLEMENTED_CODES:
                    raise
                _response, result = await self._copy(dest_key, headers)
        else:
            _response, result = await self._copy(dest_key, headers)
        return result.etag

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
        headers = {
            **self._copy_source(key, etag),
            "x-amz-metadata-directive": "REPLACE",
            "Content-Type": "application/octet-stream",  # REPLACE would reset it otherwise
            **meta.to_headers(metadata),
        }
        response, result = await self._copy(key, headers)
        if not result.etag or not result.last_modified:
            self.metadata_rewrites = False
            return None
        return Written(result.etag, answer_seconds(response.headers))

    # ---- backups and versions (issue 14) ---------------------------------------------
    copy_part_threshold = COPY_MAX_BYTES  # tests lower it to exercise UploadPartCopy

    def _versioned_source(
        self, source_key: str, if_match: str | None, version_id: str | None
    ) -> dict[str, str]:
        headers = self._copy_source(source_key, if_match)
        if version_id:
            headers["x-amz-copy-source"] += f"?versionId={quote(version_id, safe='')}"
        return headers

    async def copy_object(
        self,
        source_key: str,
        dest_key: str,
        *,
        if_match: str | None = None,
        version_id: str | None = None,
        size: int = 0,
    ) -> Written:
        """Server-side copy with the source's metadata, conditional on the source's ETag
        (x-amz-copy-source-if-match: a 412 S3Error when the source is another version now)
        and/or of one version. Above 5 GiB (`size`), a multipart copy (UploadPartCopy).
        Some servers ignore the condition (moto): callers compare the returned ETag."""
        if size > self.copy_part_threshold:
            return await self._copy_in_parts(source_key, dest_key, if_match, version_id, size)
        headers = self._versioned_source(source_key, if_match, version_id)
        response, result = await self._copy(dest_key, headers)
        return Written(result.etag, answer_seconds(response.headers))

    async def _copy_in_parts(
        self,
        source_key: str,
        dest_key: str,
        if_match: str | None,
        version_id: str | None,
        size: int,
    ) -> Written:
        info, _version = await self.head_version(source_key, if_match, version_id)
        upload_id = await self.create_multipart(dest_key, info.metadata)
        part = max(self.copy_part_threshold // 2, -(-size // 10_000), 5 * 1024**2)
        source = self._versioned_source(source_key, if_match, version_id)
        completed = False
        try:
            etags = []
            for number, start in enumerate(range(0, size, part), 1):
                headers = {
                    **source,
                    "x-amz-copy-source-range": f"bytes={start}-{min(start + part, size) - 1}",
                }
                query = {"partNumber": str(number), "uploadId": upload_id}
                _response, body = await self._small_request(
                    "PUT",
                    dest_key,
                    query=query,
                    headers=headers,
                    error_in_200=True,
                    work_bytes=min(part, size - start),
                )
                etags.append(_read_answer(dest_key, "UploadPartCopy", answers.copy_result, body))
            written = await self.complete_multipart(dest_key, upload_id, [e.etag for e in etags])
            completed = True
        finally:
            if not completed:
                with contextlib.suppress(Exception):
                    await self.abort_multipart(dest_key, upload_id)
        return written

    async def head_version(
        self, key: str, if_match: str | None = None, version_id: str | None = None
    ) -> tuple[ObjectInfo, str]:
        """HEAD (of one version, and/or only while it has ETag `if_match`: else a 412
        S3Error); the object and its version id ('' where the bucket keeps none; "null":
        the version it had before versioning was enabled, still a version)."""
        headers = {"If-Match": f'"{if_match}"'} if if_match else None
        query = {"versionId": version_id} if version_id else None
        response = await self._send("HEAD", key, query=query, headers=headers)
        answer = response.headers
        info = ObjectInfo(
            key,
            int(answer.get("content-length", "0")),
            unquote_etag(answer.get("etag", "")),
            meta.from_headers(answer),
        )
        return info, answer.get("x-amz-version-id", "")

    async def bucket_versioning(self) -> str:
        """GetBucketVersioning: 'Enabled', 'Suspended' or '' (never enabled)."""
        _response, body = await self._small_request("GET", None, query={"versioning": ""})
        return _xml_text(body, "Status")

    async def get_bytes(self, key: str) -> bytes:
        """A small object's bytes (history records)."""
        chunks: list[bytes] = []
        await self.get_object(key, None, lambda data: chunks.append(bytes(data)))
        return b"".join(chunks)

    async def list_versions(self, prefix: str) -> builtins.list[ObjectVersion]:
        """ListObjectVersions under prefix, every page: versions and delete markers."""
        found: list[ObjectVersion] = []
        query = {"versions": "", "prefix": prefix, "max-keys": "1000"}
        while True:
            _response, body = await self._small_request("GET", None, query=query)
            root = _read_answer(prefix or "/", "ListObjectVersions", answers.parse, body)
            for item in root:
                if item.tag not in ("Version", "DeleteMarker"):
                    continue
                found.append(
                    ObjectVersion(
                        item.findtext("Key") or "",
                        item.findtext("VersionId") or "",
                        item.findtext("LastModified") or "",
                        unquote_etag(item.findtext("ETag") or ""),
                        int(item.findtext("Size") or 0),
                        item.tag == "DeleteMarker",
                    )
                )
            if (root.findtext("IsTruncated") or "").lower() != "true":
                return found
            query = {
                **query,
                "key-marker": root.findtext("NextKeyMarker") or "",
                "version-id-marker": root.findtext("NextVersionIdMarker") or "",
            }

    async def delete_version(self, key: str, version_id: str) -> None:
        """Delete one version of an object for good."""
        await self._small_request("DELETE", key, query={"versionId": version_id})


def _xml_text(body: bytes, tag: str) -> str:
    """The text of the first <tag> of a small S3 answer ('' if absent)."""
    import html  # rare operations only

    match = re.search(rb"<%s>([^<]*)</%s>" % (tag.encode(), tag.encode()), body)
    return html.unescape(match.group(1).decode()) if match else ""


def _read_answer(key: str, operation: str, read: Callable[[bytes], T], body: bytes) -> T:
    """read(body), an unreadable answer an S3Error naming the key and the operation."""
    try:
        return read(body)
    except answers.BadAnswer as exc:
        raise S3Error(key, "BadAnswer", f"unreadable {operation} answer: {exc}") from None


async def _read_whole(response: Response) -> Response:
    response.body = await response.read_all()
    return response


class _SinkFailed(Exception):
    """The caller's sink raised: not the wire's failure, never retried (its cause is)."""


def _feed(sink: Callable[[bytes | memoryview], None], data: bytes | memoryview) -> None:
    try:
        sink(data)
    except OSError as exc:
        raise _SinkFailed from exc


async def _read_all(response: Response) -> bytes:
    try:
        return await response.read_all()
    except HTTP_TRANSIENT:
        return b""
