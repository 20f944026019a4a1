"""A loopback proxy in front of S3 that holds the GETs of chosen keys until the test lets
them through, and records the order in which objects were asked for: a background pull
pinned at a known point for as long as a test needs, without sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

from tests.bench.countproxy import RequestParser, _pump
from tests.proxyserver import ThreadedProxy


class KeyGate(ThreadedProxy):
    def __init__(self, upstream: str, hold: Iterable[str] = ()) -> None:
        url = urlsplit(upstream)
        super().__init__(url.hostname or "127.0.0.1", url.port or 80)
        self._held = set(hold)  # object keys (without the bucket) whose GETs wait
        self._open = asyncio.Event()  # set: nothing is held any more
        self._lock = threading.Lock()
        self.gets: list[str] = []  # keys of GETs, in the order they arrived

    def release(self) -> None:
        """Let every held GET through, and every later one."""
        self.loop.call_soon_threadsafe(self._open.set)

    def got(self, key: str) -> int:
        with self._lock:
            return self.gets.count(key)

    async def _settle(self) -> None:
        self._open.set()
        if self._connections:
            await asyncio.wait(self._connections, timeout=10)

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            return
        holding = False

        def on_request(method: str, target: str, headers: dict[str, str]) -> None:
            nonlocal holding
            path = unquote(urlsplit(target).path).lstrip("/")
            key = path.partition("/")[2]  # path style: /bucket/key
            if method == "GET" and key and "list-type" not in target:
                with self._lock:
                    self.gets.append(key)
            holding = method == "GET" and key in self._held

        async def gate() -> None:
            if holding:
                await self._open.wait()

        parser = RequestParser(on_request)
        to_server = asyncio.create_task(_pump(client_r, upstream_w, parser.feed, gate))
        to_client = asyncio.create_task(_pump(upstream_r, client_w, None))
        try:
            await asyncio.wait({to_server, to_client}, return_when=asyncio.FIRST_EXCEPTION)
            with contextlib.suppress(Exception):
                await to_client
        finally:
            to_server.cancel()
            to_client.cancel()
            upstream_w.close()
