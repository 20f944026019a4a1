"""sidecar.s3.http11 over TLS and through an HTTP proxy, against scripted loopback servers
(issue 10 item 6): a CA made here (trustme), CONNECT tunnels for https and absolute-form
requests for http, keep-alive through both, and cut bodies over TLS. The end-to-end syncs
through a proxy and over TLS with real servers are in test_proxy.py and test_tls.py."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trustme

from sidecar.s3.http11 import ConnectError, ConnectionPool, ProtocolError, Proxy
from tests.integration.test_http11 import (
    Handler,
    Server,
    answer,
    chunked,
    keep_answering,
    read_request,
    serving,
)
from tests.integration.test_proxy import PROXY_ONLY, LoopbackProxy

POOL = {"connect_timeout": 5, "read_timeout": 5, "max_idle": 4}
AUTH = "Basic dXNlcjpwQHNz"  # user:p@ss, as LoopbackProxy("user:p@ss") requires


@dataclass
class Tls:
    server: ssl.SSLContext  # presents a certificate for 127.0.0.1 and PROXY_ONLY
    client: ssl.SSLContext  # trusts the test CA only
    other_name: ssl.SSLContext  # a certificate of the same CA for another name


@pytest.fixture(scope="module")
def tls() -> Iterator[Tls]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", PROXY_ONLY).configure_cert(server)
    other = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("elsewhere.test").configure_cert(other)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    yield Tls(server, client, other)


@asynccontextmanager
async def pool_to(
    port: int, host: str, tls: Tls | None, **options: Any
) -> AsyncIterator[ConnectionPool]:
    settings = {**POOL, **options}
    if tls is not None:
        settings["ssl_context"] = tls.client
    pool = ConnectionPool("https" if tls else "http", host, port, **settings)
    try:
        yield pool
    finally:
        await pool.close()


async def get(pool: ConnectionPool, target: str = "/b/k") -> tuple[int, bytes]:
    response = await pool.request("GET", target, {"Host": "h"})
    try:
        return response.status, await response.read_all()
    finally:
        response.release()


# ---- TLS -----------------------------------------------------------------------------
async def test_keep_alive_over_tls_with_large_and_chunked_bodies(tls: Tls) -> None:
    large = bytes(range(256)) * 4096  # 1 MiB: past the read-ahead, into read_into

    async def handler(reader, writer, server: Server):
        while await read_request(reader, server) is not None:
            index = len(server.requests)
            if index == 1:
                writer.write(answer(200, large))
            elif index == 2:
                writer.write(chunked(b"5\r\nhello\r\n", b"6\r\n world\r\n", b"0\r\n\r\n"))
            else:
                writer.write(answer(404, b"<Error><Code>NoSuchKey</Code></Error>"))
            await writer.drain()

    async with (
        serving(handler, tls.server) as (server, port),
        pool_to(port, "127.0.0.1", tls) as pool,
    ):
        assert await get(pool) == (200, large)
        assert await get(pool) == (200, b"hello world")
        status, body = await get(pool)
        assert status == 404 and b"NoSuchKey" in body
        assert await get(pool) == (404, body)  # after an error answer read whole: reused
    assert server.connections == 1


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_body_cut_over_tls_is_a_protocol_error_and_not_reused(
    tls: Tls, framing: str
) -> None:
    async def handler(reader, writer, server: Server):
        while await read_request(reader, server) is not None:
            if len(server.requests) == 1:
                if framing == "length":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 500000\r\n\r\n" + b"z" * 70_000
                    )
                else:
                    writer.write(chunked(b"ffff\r\n", b"z" * 1000))
                await writer.drain()
                writer.transport.abort()  # no close_notify: cut as a reset would
                return
            writer.write(answer(200, b"next"))
            await writer.drain()

    async with (
        serving(handler, tls.server) as (server, port),
        pool_to(port, "127.0.0.1", tls) as pool,
    ):
        response = await pool.request("GET", "/b/k", {"Host": "h"})
        with pytest.raises(ProtocolError):
            await response.read_all()
        response.release()
        assert await get(pool) == (200, b"next")
    assert server.connections == 2


async def test_a_certificate_for_another_name_says_so_not_private_ca(tls: Tls) -> None:
    """Issue 10: a trusted certificate for another host (a bucket in the host name, a wrong
    endpoint) used to be reported as "not trusted (a private CA?)"."""
    async with (
        serving(keep_answering, tls.other_name) as (_server, port),
        pool_to(port, "127.0.0.1", tls) as pool,
    ):
        with pytest.raises(ConnectError) as caught:
            await get(pool)
    message = str(caught.value)
    assert caught.value.permanent
    assert "not for 127.0.0.1" in message and "private CA" not in message, message


async def test_an_untrusted_certificate_is_refused_naming_the_bundle(tls: Tls) -> None:
    async with serving(keep_answering, tls.server) as (_server, port):
        pool = ConnectionPool(
            "https", "127.0.0.1", port, ssl_context=ssl.create_default_context(), **POOL
        )
        try:
            with pytest.raises(ConnectError, match="AWS_CA_BUNDLE") as caught:
                await get(pool)
        finally:
            await pool.close()
    assert caught.value.permanent


# ---- through a proxy -----------------------------------------------------------------
@asynccontextmanager
async def proxying(credentials: str | None = "user:p@ss") -> AsyncIterator[LoopbackProxy]:
    proxy = await LoopbackProxy(credentials).start()
    try:
        yield proxy
    finally:
        await proxy.stop()


def recording(log: list[bytes]) -> Handler:
    """keep_answering, and the head of every request as the server received it."""

    async def handler(reader, writer, server: Server):
        while (head := await read_request(reader, server)) is not None:
            log.append(head)
            writer.write(answer(200 if b"/missing" not in head else 404, b"hello"))
            await writer.drain()

    return handler


async def test_http_through_a_proxy_is_absolute_form_with_its_credentials_kept_alive() -> None:
    heads: list[bytes] = []
    async with serving(recording(heads)) as (server, port), proxying() as proxy:
        via = Proxy("127.0.0.1", proxy.port, AUTH)
        async with pool_to(port, PROXY_ONLY, None, proxy=via) as pool:
            assert await get(pool, "/b/k?x=1") == (200, b"hello")
            assert (await get(pool, "/b/missing"))[0] == 404
            assert await get(pool, "/b/k2") == (200, b"hello")
    # The name resolves only at the proxy: every request went through it, as absolute-form.
    assert proxy.forwarded == [
        f"http://{PROXY_ONLY}:{port}/b/k?x=1",
        f"http://{PROXY_ONLY}:{port}/b/missing",
        f"http://{PROXY_ONLY}:{port}/b/k2",
    ]
    assert proxy.refused == 0 and not proxy.tunnels
    # One connection to the proxy, kept alive across the 404 (one upstream behind it).
    assert server.connections == 1 and len(heads) == 3


async def test_https_through_a_proxy_is_one_connect_tunnel_kept_alive(tls: Tls) -> None:
    heads: list[bytes] = []
    async with serving(recording(heads), tls.server) as (server, port), proxying() as proxy:
        via = Proxy("127.0.0.1", proxy.port, AUTH)
        async with pool_to(port, PROXY_ONLY, tls, proxy=via) as pool:
            for target in ("/b/k", "/b/missing", "/b/k"):
                await get(pool, target)
    assert proxy.tunnels == [f"{PROXY_ONLY}:{port}"] and not proxy.forwarded
    assert server.connections == 1 and len(heads) == 3
    # Inside the tunnel the server sees origin-form requests, never the proxy's credentials.
    assert all(head.startswith(b"GET /b/") for head in heads)
    assert not any(b"proxy-authorization" in head.lower() for head in heads)


def scripted_proxy(answer_to_connect: bytes | None) -> Handler:
    """A proxy that answers CONNECT with `answer_to_connect`, or closes (None)."""

    async def handler(reader, writer, server: Server):
        head = await reader.readuntil(b"\r\n\r\n")
        server.requests.append((head, b""))
        if answer_to_connect is not None:
            writer.write(answer_to_connect)
            await writer.drain()

    return handler


@pytest.mark.parametrize(
    ("raw", "message", "permanent"),
    [
        (b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", "refused the tunnel", True),
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", "refused the tunnel", True),
        (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n", "refused the tunnel", False),
        (None, "closed the connection on CONNECT", False),
    ],
)
async def test_a_proxy_that_will_not_tunnel_is_named(
    tls: Tls, raw: bytes | None, message: str, permanent: bool
) -> None:
    async with serving(scripted_proxy(raw)) as (proxy_server, proxy_port):
        via = Proxy("127.0.0.1", proxy_port, AUTH)
        async with pool_to(443, "s3.example.test", tls, proxy=via) as pool:
            with pytest.raises(ConnectError, match=message) as caught:
                await get(pool)
    assert f"127.0.0.1:{proxy_port}" in str(caught.value)
    assert caught.value.permanent == permanent
    head = proxy_server.requests[0][0]
    assert head.startswith(b"CONNECT s3.example.test:443 HTTP/1.1\r\n")
    assert f"Proxy-Authorization: {AUTH}".encode() in head


async def test_a_tunnelled_server_with_a_wrong_certificate_is_refused(tls: Tls) -> None:
    async with serving(keep_answering, tls.other_name) as (_server, port), proxying() as proxy:
        via = Proxy("127.0.0.1", proxy.port, AUTH)
        async with pool_to(port, PROXY_ONLY, tls, proxy=via) as pool:
            with pytest.raises(ConnectError, match=f"not for {PROXY_ONLY}") as caught:
                await get(pool)
    assert caught.value.permanent
