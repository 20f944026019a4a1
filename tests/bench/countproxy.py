"""A loopback TCP proxy that counts the S3 requests passing through it.

Why a proxy and not the server's log: `rclone serve s3 -vv` logs listings ("LIST BUCKET") but
not every GET/PUT/HEAD, and turning debug logging on would slow the one server every timed run
uses. Why raw TCP and not an HTTP reverse proxy: SigV4 signs the Host header, the exact path
and several headers; an HTTP proxy that re-encodes any of them breaks the signature, and
Expect: 100-continue and aws-chunked bodies must pass untouched. This proxy forwards bytes as
they are and only *reads* the client->server stream, following HTTP/1.1 framing
(Content-Length or chunked bodies, keep-alive) to find each request line.

It costs time (every byte is copied through Python), so the benchmark never times through it:
each tool gets one extra, untimed counting run through the proxy, and the timed runs go
straight to the server.

Crash tests use it as a gate too: requests of the operations in `hold` are counted when they
arrive but not passed on until `release()`, which pins a client at a known point (e.g. its
first UploadPart sent, never answered) for as long as the test needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import parse_qs

from tests.support.proxyserver import ThreadedProxy

_READ_SIZE = 1 << 18

# Operations that touch the listing or the bucket, not one object: the ones a no-op sync may
# send. Everything else is a per-object request.
LISTING_OPS = frozenset(
    {"ListObjectsV2", "ListObjects", "ListBuckets", "HeadBucket", "GetBucketLocation"}
)


def s3_operation(method: str, target: str, headers: dict[str, str]) -> str:
    """Name the S3 operation of a path-style request (all our clients use path style on an IP)."""
    path, _, query = target.partition("?")
    params = parse_qs(query, keep_blank_values=True)
    bucket, _, key = path.lstrip("/").partition("/")
    if not bucket:
        return "ListBuckets" if method == "GET" else f"{method} /"
    if not key:
        return _bucket_operation(method, params)
    if method == "GET":
        return "GetObject"
    if method == "HEAD":
        return "HeadObject"
    if method == "PUT":
        copy = "x-amz-copy-source" in headers
        if "uploadId" in params:
            return "UploadPartCopy" if copy else "UploadPart"
        return "CopyObject" if copy else "PutObject"
    if method == "POST":
        if "uploads" in params:
            return "CreateMultipartUpload"
        if "uploadId" in params:
            return "CompleteMultipartUpload"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in params else "DeleteObject"
    return f"{method} object"


def _bucket_operation(method: str, params: dict[str, list[str]]) -> str:
    if method == "GET":
        if "location" in params:
            return "GetBucketLocation"
        if "uploads" in params:
            return "ListMultipartUploads"
        return "ListObjectsV2" if params.get("list-type") == ["2"] else "ListObjects"
    if method == "POST" and "delete" in params:
        return "DeleteObjects"
    return {"HEAD": "HeadBucket", "PUT": "CreateBucket", "DELETE": "DeleteBucket"}.get(
        method, f"{method} bucket"
    )


class RequestParser:
    """Follows HTTP/1.1 request framing on one connection; reports each request's head."""

    def __init__(self, on_request: Callable[[str, str, dict[str, str]], None]) -> None:
        self._on_request = on_request
        self._state = "head"
        self._buffer = bytearray()
        self._remaining = 0  # body or chunk bytes still to skip

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._state in ("body", "chunk-data"):
                step = min(self._remaining, len(view))
                self._remaining -= step
                view = view[step:]
                if self._remaining == 0:
                    self._state = "head" if self._state == "body" else "chunk-size"
                continue
            view = self._feed_line_state(view)

    def _feed_line_state(self, view: memoryview) -> memoryview:
        """States that need a delimiter: buffer until it arrives (heads are small)."""
        delimiter = b"\r\n\r\n" if self._state == "head" else b"\r\n"
        start = max(0, len(self._buffer) - len(delimiter) + 1)
        self._buffer += view
        end = self._buffer.find(delimiter, start)
        if end < 0:
            return view[len(view) :]
        consumed = end + len(delimiter) - (len(self._buffer) - len(view))
        block = bytes(self._buffer[:end])
        self._buffer.clear()
        self._handle_block(block)
        return view[consumed:]

    def _handle_block(self, block: bytes) -> None:
        if self._state == "head":
            self._handle_head(block)
        elif self._state == "chunk-size":
            size = int(block.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                self._state = "trailers"
            else:
                self._state, self._remaining = "chunk-data", size + 2  # data + CRLF
        elif self._state == "trailers" and not block:
            self._state = "head"  # the empty line that ends the trailers

    def _handle_head(self, block: bytes) -> None:
        if not block.strip():
            return  # stray CRLF between requests is allowed
        lines = block.decode("latin-1").split("\r\n")
        method, target, *_rest = [*lines[0].split(" "), "", ""]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self._on_request(method, target, headers)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = "chunk-size"
        elif int(headers.get("content-length", "0") or 0) > 0:
            self._state, self._remaining = "body", int(headers["content-length"])


class CountingProxy(ThreadedProxy):
    """127.0.0.1:<port> -> upstream, counting requests by S3 operation."""

    def __init__(self, upstream_host: str, upstream_port: int, hold: Iterable[str] = ()) -> None:
        super().__init__(upstream_host, upstream_port)
        self.hold = frozenset(hold)  # operations held back until release()
        self._released = asyncio.Event()
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def release(self) -> None:
        """Pass held requests on, and every later one."""
        self._loop.call_soon_threadsafe(self._released.set)

    async def _settle(self) -> None:
        if self.hold:
            # Held connections end once their (gone) client's EOF can pass: let them.
            self._released.set()
            if self._connections:
                await asyncio.wait(self._connections, timeout=10)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)

    def _count(self, method: str, target: str, headers: dict[str, str]) -> None:
        operation = s3_operation(method, target, headers)
        with self._lock:
            self._counts[operation] += 1

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        holding = False

        def on_request(method: str, target: str, headers: dict[str, str]) -> None:
            nonlocal holding
            self._count(method, target, headers)
            holding = holding or s3_operation(method, target, headers) in self.hold

        async def gate() -> None:
            if holding:
                await self._released.wait()

        await forward_observed(self.upstream, client_r, client_w, on_request, gate)


async def forward_observed(
    upstream: tuple[str, int],
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    on_request: Callable[[str, str, dict[str, str]], None],
    gate: Callable[[], Awaitable[None]],
) -> None:
    """Forward one client connection to upstream untouched, reporting each request's head to
    `on_request` and awaiting `gate` before passing each chunk of it on."""
    try:
        upstream_r, upstream_w = await asyncio.open_connection(*upstream)
    except OSError:
        return
    parser = RequestParser(on_request)
    to_server = asyncio.create_task(_pump(client_r, upstream_w, parser.feed, gate))
    to_client = asyncio.create_task(_pump(upstream_r, client_w, None))
    try:
        await asyncio.wait({to_server, to_client}, return_when=asyncio.FIRST_EXCEPTION)
        with contextlib.suppress(Exception):
            await to_client  # the server closes after the client did, or on its own
    finally:
        to_server.cancel()
        to_client.cancel()
        upstream_w.close()


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    observe: Callable[[bytes], None] | None,
    gate: Callable[[], Awaitable[None]] | None = None,
) -> None:
    try:
        while data := await reader.read(_READ_SIZE):
            if observe is not None:
                observe(data)
            if gate is not None:
                await gate()  # after observe: the chunk holding a held request waits too
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # pass the half-close on: the peer may still answer
    except (ConnectionError, OSError):
        writer.close()
