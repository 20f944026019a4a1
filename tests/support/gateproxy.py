"""A loopback proxy in front of S3 that holds the GETs of chosen keys until the test lets
them through, and records the order in which objects were asked for: a background pull
pinned at a known point for as long as a test needs, without sleeping."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

from tests.bench.countproxy import forward_observed
from tests.support.proxyserver import ThreadedProxy


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

        await forward_observed(self.upstream, client_r, client_w, on_request, gate)
