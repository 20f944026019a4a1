"""Syncs through an HTTP proxy, as pods behind an egress proxy run them: HTTP_PROXY /
HTTPS_PROXY / NO_PROXY as botocore and curl read them. The proxy is a small real one on
loopback (CONNECT tunnels; absolute-form requests rewritten to origin-form and forwarded),
the S3 servers are real (rclone serve s3, plain and over TLS)."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trustme

from sidecar.core.model import Direction
from sidecar.core.options import SyncConfig
from sidecar.engine.sync import SyncEngine
from sidecar.locals3 import LocalS3

MiB = 1024 * 1024
# A name only the proxy resolves: a request that went around the proxy cannot succeed.
PROXY_ONLY = "s3.proxy-only.test"


class LoopbackProxy:
    def __init__(self, credentials: str | None = None) -> None:
        self.required = (
            "Basic " + base64.b64encode(credentials.encode()).decode() if credentials else None
        )
        self.tunnels: list[str] = []  # CONNECT targets
        self.forwarded: list[str] = []  # absolute-form targets
        self.refused = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> LoopbackProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def _authorized(self, head: bytes) -> bool:
        if self.required is None:
            return True
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "proxy-authorization":
                return value.strip() == self.required
        return False

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            if not self._authorized(head):
                self.refused += 1
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                await writer.drain()
                return
            if method == "CONNECT":
                self.tunnels.append(target)
                host, port = target.rsplit(":", 1)
                up_reader, up_writer = await asyncio.open_connection(_resolve(host), int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await asyncio.gather(
                    _pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
                )
                return
            url = urlsplit(target)
            assert url.hostname is not None
            up_reader, up_writer = await asyncio.open_connection(_resolve(url.hostname), url.port)
            answers = asyncio.ensure_future(_pipe(up_reader, writer))
            try:
                while head:
                    self.forwarded.append(head.split(b" ", 2)[1].decode())
                    await _forward_request(head, reader, up_writer)
                    try:
                        head = await reader.readuntil(b"\r\n\r\n")
                    except asyncio.IncompleteReadError:
                        head = b""
            finally:
                up_writer.close()
                await asyncio.gather(answers, return_exceptions=True)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def _resolve(host: str) -> str:
    return "127.0.0.1" if host == PROXY_ONLY else host


async def _forward_request(
    head: bytes, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter
) -> None:
    """One absolute-form request, rewritten to origin-form, with its Content-Length body."""
    first, rest = head.split(b"\r\n", 1)
    method, target, version = first.split(b" ", 2)
    url = urlsplit(target.decode())
    origin = (url.path or "/") + (f"?{url.query}" if url.query else "")
    lines = [line for line in rest.split(b"\r\n") if not line.lower().startswith(b"proxy-")]
    length = 0
    for line in lines:
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    upstream.write(b" ".join((method, origin.encode(), version)) + b"\r\n" + b"\r\n".join(lines))
    if length:
        upstream.write(await reader.readexactly(length))
    await upstream.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@dataclass
class Servers:
    http: LocalS3
    https: LocalS3
    ca: Path


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("proxy-s3")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", PROXY_ONLY)
    cert.private_key_and_cert_chain_pem.write_to_path(root / "server.pem")
    cert.private_key_pem.write_to_path(root / "server.key")
    ca.cert_pem.write_to_path(root / "ca.pem")
    plain = LocalS3(root / "plain", log_path=root / "plain.log")
    tls = LocalS3(
        root / "tls", log_path=root / "tls.log", tls=(root / "server.pem", root / "server.key")
    )
    for server in (plain, tls):
        server.make_bucket("vol")
        server.start()
    try:
        yield Servers(plain, tls, root / "ca.pem")
    finally:
        plain.stop()
        tls.stop()


@pytest.fixture
async def proxy() -> AsyncIterator[LoopbackProxy]:
    running = await LoopbackProxy("user:p@ss").start()
    try:
        yield running
    finally:
        await running.stop()


def use(
    monkeypatch: pytest.MonkeyPatch,
    server: LocalS3,
    ca: Path,
    proxy_url: str,
    no_proxy: str = "",
    host: str = PROXY_ONLY,
) -> None:
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint.replace("127.0.0.1", host))
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca))
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    monkeypatch.setenv("HTTPS_PROXY", proxy_url)
    monkeypatch.setenv("NO_PROXY", no_proxy)


async def round_trip(tmp_path: Path) -> None:
    source = tmp_path / "a"
    (source / "d").mkdir(parents=True)
    (source / "d" / "small.txt").write_bytes(b"through the proxy")
    (source / "big.bin").write_bytes(os.urandom(6 * MiB))  # multipart: botocore's way too
    common = {"bucket": "vol", "prefix": f"{tmp_path.name}/", "concurrency": 4}
    sizes = {"part_size": 5 * MiB, "multipart_threshold": 5 * MiB}
    async with SyncEngine(
        SyncConfig(local_dir=source, state_dir=tmp_path / "sa", **common, **sizes)
    ) as engine:
        pushed = await engine.run(Direction.FINALIZE)
    assert pushed.ok, pushed.as_dict()
    async with SyncEngine(
        SyncConfig(local_dir=tmp_path / "b", state_dir=tmp_path / "sb", **common, **sizes)
    ) as engine:
        pulled = await engine.run(Direction.PULL)
    assert pulled.ok, pulled.as_dict()
    for name in ("d/small.txt", "big.bin"):
        assert (tmp_path / "b" / name).read_bytes() == (source / name).read_bytes()


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_sync_goes_through_the_proxy(
    servers: Servers,
    proxy: LoopbackProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scheme: str,
) -> None:
    server = servers.https if scheme == "https" else servers.http
    use(monkeypatch, server, servers.ca, f"http://user:p%40ss@127.0.0.1:{proxy.port}")
    await round_trip(tmp_path)
    # The endpoint's name resolves only at the proxy: every request took it.
    if scheme == "https":
        assert set(proxy.tunnels) == {f"{PROXY_ONLY}:{server.port}"} and not proxy.forwarded
    else:
        assert proxy.forwarded and not proxy.tunnels
        assert all(t.startswith(f"http://{PROXY_ONLY}:{server.port}/") for t in proxy.forwarded)
        assert any("list-type=2" in t for t in proxy.forwarded)  # ours, not only botocore's
    assert proxy.refused == 0


async def test_no_proxy_goes_direct(
    servers: Servers,
    proxy: LoopbackProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = servers.https
    use(monkeypatch, server, servers.ca, f"http://127.0.0.1:{proxy.port}", "127.0.0.1", "127.0.0.1")
    await round_trip(tmp_path)
    assert not proxy.tunnels and not proxy.forwarded and proxy.refused == 0


async def test_a_proxy_that_refuses_is_named(
    servers: Servers,
    proxy: LoopbackProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use(monkeypatch, servers.https, servers.ca, f"http://user:wrong@127.0.0.1:{proxy.port}")
    async with SyncEngine(
        SyncConfig(bucket="vol", prefix="x/", local_dir=tmp_path / "b", state_dir=tmp_path / "s")
    ) as engine:
        result = await engine.run(Direction.PULL)
    assert not result.ok
    assert f"proxy 127.0.0.1:{proxy.port} refused the tunnel" in str(result.fatal), result.fatal
    assert "407" in str(result.fatal)
