"""The scaffolding every loopback test proxy shares: an asyncio TCP server on an event loop in
a thread of its own, forwarding to one upstream (the S3 server under test).

Subclasses write `handle` (one client connection); this base starts and stops the server,
keeps each connection's task alive until it ends, cancels what is left at `stop`, and reports
the CPU seconds the proxy's thread has used (a proxy shares the machine with the tools it
measures: its cost must show).

Why a thread and not a process: tests and the benchmark drive the proxy directly (counts,
gates, a round-trip time changed between runs) without any IPC; the harness's own thread only
waits on child processes while a tool runs, so the proxy's loop has the interpreter to itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Self

from sidecar.locals3 import free_port


class ThreadedProxy:
    """127.0.0.1:<port> -> upstream, on an event loop in a thread of its own."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        # The loop holds tasks weakly and Python 3.11's start_server keeps no reference to the
        # per-connection task: without this set, a connection idle in a client's pool can be
        # garbage-collected mid-stream ("Task was destroyed but it is pending").
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def start(self) -> Self:
        self._thread.start()
        self.port = free_port()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port), self._loop
        )
        self._server = future.result(timeout=10)
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            await self._settle()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cpu_seconds(self) -> float:
        """User + system seconds the proxy's thread has used so far."""
        ident = self._thread.ident
        if ident is None:
            return 0.0
        with contextlib.suppress(OSError):
            return time.clock_gettime(time.pthread_getcpuclockid(ident))
        return 0.0  # the thread has ended

    async def _settle(self) -> None:
        """At stop, before open connections are cancelled (e.g. let held requests end)."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection (the base closes its writer afterwards)."""
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)
        try:
            await self.handle(reader, writer)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
