"""A fault-injecting HTTP/1.1 reverse proxy for S3 on loopback (tests of issue 9).

Clients point AWS_ENDPOINT_URL at it; every request is read whole, and a seeded schedule
decides its fate before it is forwarded to the real server (moto):

- `500`, `503 SlowDown`: an S3 XML error answered by the proxy; the server never sees it;
- `reset-before`: the request is read, then the connection is reset (RST), not forwarded;
- `reset-after`: forwarded, the server applies it and answers, then RST instead of the answer
  (the case where a retry meets its own first write);
- `truncate`: the answer's head promises Content-Length bytes, half of them come, then close;
- `stall`: forwarded, the head and half the body are sent, then silence until the client
  gives up (closes the connection) or `stall_seconds` pass;
- `trickle`: forwarded, the answer is relayed one byte every `trickle_interval` seconds
  (below the client's idle timeout, so only an overall deadline can end it).

Why not tests/bench/countproxy.py: it pumps raw bytes and never reads an answer, so it cannot
fail one request after the server applied it; this one parses both directions. It borrows
countproxy's `s3_operation` to name what it faulted. Why bodies are read whole and re-framed
with Content-Length: a truncated or trickled answer needs the exact body; S3 answers here are
at most one part (5 MiB). SigV4 signatures survive: the Host header and the path pass untouched
(and moto does not check signatures).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from tests.bench.countproxy import s3_operation
from tests.support.proxyserver import ThreadedProxy


class Fault(StrEnum):
    NONE = "none"
    ERROR_500 = "500"
    SLOWDOWN_503 = "503-slowdown"
    RESET_BEFORE = "reset-before"
    RESET_AFTER = "reset-after"
    TRUNCATE = "truncate"
    STALL = "stall"
    TRICKLE = "trickle"


ALL_FAULTS = tuple(f for f in Fault if f is not Fault.NONE)
# The server applied the request, the client never learns its answer.
AFTER_APPLY = (Fault.RESET_AFTER, Fault.TRUNCATE, Fault.STALL, Fault.TRICKLE)
BIG_BODY = 256 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    head: bytes  # as received, without the Expect header
    body: bytes

    @property
    def operation(self) -> str:
        return s3_operation(self.method, self.target, self.headers)

    @property
    def big(self) -> bool:
        """Carries or asks for a part (an UploadPart, a ranged GET of a multipart download)."""
        return len(self.body) > BIG_BODY or "range" in self.headers


Chooser = Callable[[Request], Fault]


class Schedule:
    """Seeded: each request is faulted with probability `rate`, the kind drawn from `kinds`
    (`small_only` kinds are drawn for small requests only; `spared` (fault, operation) pairs
    never happen). Decisions are made on the proxy's one event loop: the sequence is the
    seed's, the order of requests is the client's."""

    def __init__(
        self,
        seed: int,
        rate: float,
        kinds: Iterable[Fault] = ALL_FAULTS,
        small_only: Iterable[Fault] = (),
        spared: Iterable[tuple[Fault, str]] = (),
    ) -> None:
        self.rng = random.Random(seed)
        self.rate = rate
        self.kinds = tuple(kinds)
        self.small_only = frozenset(small_only)
        self.spared = frozenset(spared)

    def __call__(self, request: Request) -> Fault:
        if not self.kinds or self.rng.random() >= self.rate:
            return Fault.NONE
        fault = self.rng.choice(self.kinds)
        if (fault in self.small_only and request.big) or (
            (fault, request.operation) in self.spared
        ):
            return Fault.NONE
        return fault


class FaultProxy(ThreadedProxy):
    """127.0.0.1:<port> -> upstream, faulting the requests `choose` picks."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        choose: Chooser,
        *,
        stall_seconds: float = 60.0,
        trickle_interval: float = 0.3,
    ) -> None:
        super().__init__(upstream_host, upstream_port)
        self.choose = choose
        self.stall_seconds = stall_seconds
        self.trickle_interval = trickle_interval
        self._counts: Counter[tuple[Fault, str]] = Counter()
        self._active: Counter[tuple[Fault, str]] = Counter()  # answers being faulted now
        self._lock = threading.Lock()

    def counts(self) -> Counter[tuple[Fault, str]]:
        """(fault, S3 operation) -> requests; Fault.NONE counts the untouched ones."""
        with self._lock:
            return Counter(self._counts)

    def active(self) -> list[str]:
        """The faults being answered right now (what a hung client is waiting on)."""
        with self._lock:
            return [f"{f} {op} x{n}" for (f, op), n in self._active.items() if n and f != "none"]

    def faults(self) -> Counter[Fault]:
        out: Counter[Fault] = Counter()
        for (fault, _op), count in self.counts().items():
            if fault is not Fault.NONE:
                out[fault] += count
        return out

    def table(self) -> str:
        """Faults injected, by kind and operation, for the test's output."""
        counts = self.counts()
        total = sum(counts.values())
        lines = [f"{'fault':14} {'operation':24} {'count':>6}"]
        for (fault, op), count in sorted(counts.items()):
            if fault is not Fault.NONE:
                lines.append(f"{fault:14} {op:24} {count:6}")
        injected = sum(self.faults().values())
        lines.append(f"{injected} faults in {total} requests ({injected / max(total, 1):.0%})")
        return "\n".join(lines)

    # ---- one client connection ----
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            while (request := await _read_request(reader, writer)) is not None:
                fault = self.choose(request)
                what = (fault, request.operation)
                with self._lock:
                    self._counts[what] += 1
                    self._active[what] += 1
                try:
                    if not await self._answer(request, fault, reader, writer):
                        return
                finally:
                    with self._lock:
                        self._active[what] -= 1

    async def _answer(
        self,
        request: Request,
        fault: Fault,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer one request; False when the connection is done for."""
        if fault is Fault.ERROR_500:
            writer.write(_error(500, "InternalError", "We encountered an internal error."))
            await writer.drain()
            return True
        if fault is Fault.SLOWDOWN_503:
            writer.write(_error(503, "SlowDown", "Please reduce your request rate."))
            await writer.drain()
            return True
        if fault is Fault.RESET_BEFORE:
            _reset(writer)
            return False
        answer, body_at = await self._forward(request)
        if fault is Fault.RESET_AFTER:
            _reset(writer)
            return False
        if fault is Fault.TRUNCATE:
            writer.write(answer[: _middle(answer, body_at)])
            await writer.drain()
            return False
        if fault is Fault.STALL:
            writer.write(answer[: _middle(answer, body_at)])
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(), self.stall_seconds)  # the client's EOF
            return False
        if fault is Fault.TRICKLE:
            for index in range(len(answer)):
                writer.write(answer[index : index + 1])
                await writer.drain()
                if reader.at_eof():
                    return False
                await asyncio.sleep(self.trickle_interval)
            return True
        writer.write(answer)
        await writer.drain()
        return True

    async def _forward(self, request: Request) -> tuple[bytes, int]:
        """The server's answer to request, re-framed with Content-Length; and where its body
        starts. One fresh upstream connection per request: no state shared between faults."""
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            head = _set_header(request.head, "connection", "close")
            if request.body or "content-length" in request.headers:
                head = _set_header(head, "content-length", str(len(request.body)))
                head = _drop_header(head, "transfer-encoding")
            up_writer.write(head + request.body)
            await up_writer.drain()
            raw_head = await up_reader.readuntil(b"\r\n\r\n")
            status_line, headers = _parse_head(raw_head)
            status = int(status_line.split(b" ", 2)[1])
            if request.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                body = b""
                out_head = _drop_header(raw_head, "connection")
            else:
                body = await _read_body(up_reader, headers, until_eof=True)
                out_head = _drop_header(_drop_header(raw_head, "connection"), "transfer-encoding")
                out_head = _set_header(out_head, "content-length", str(len(body)))
            return out_head + body, len(out_head)
        finally:
            up_writer.close()


def _middle(answer: bytes, body_at: int) -> int:
    """Half the body if there is one, else half the head: a cut the client must notice."""
    if len(answer) > body_at:
        return body_at + (len(answer) - body_at) // 2
    return body_at // 2


# ---- HTTP/1.1 framing --------------------------------------------------------------------------
async def _read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None  # the client closed its kept-alive connection
    first, headers = _parse_head(head)
    method, target, _version = first.decode("latin-1").split(" ", 2)
    if "100-continue" in headers.get("expect", ""):
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # we take the body; the server never asks
        await writer.drain()
        head = _drop_header(head, "expect")
    body = await _read_body(reader, headers)
    return Request(method, target, headers, head, body)


async def _read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], until_eof: bool = False
) -> bytes:
    """A message's body by its framing; `until_eof`: an answer without Content-Length or
    chunks ends when the server closes (we asked it to: Connection: close)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read() if until_eof else b""


def _parse_head(head: bytes) -> tuple[bytes, dict[str, str]]:
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def _drop_header(head: bytes, name: str) -> bytes:
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    kept = [lines[0]] + [
        line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() != name.encode()
    ]
    return b"\r\n".join(kept) + b"\r\n\r\n"


def _set_header(head: bytes, name: str, value: str) -> bytes:
    return _drop_header(head, name)[:-2] + f"{name}: {value}\r\n\r\n".encode("latin-1")


def _error(status: int, code: str, message: str) -> bytes:
    reason = {500: "Internal Server Error", 503: "Service Unavailable"}[status]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>faultproxy</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: what a dropped connection or a dying load balancer sends."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
