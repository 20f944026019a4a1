"""A loopback TCP proxy that makes a link look like a WAN: round-trip time, TCP window, bandwidth.

The benchmark's WAN profile (issue 16) puts it between every tool and the server. Bytes pass
untouched (raw TCP, like countproxy: SigV4 and aws-chunked bodies survive); only *when* they
arrive changes:

- Latency: every chunk read from one side is delivered to the other RTT/2 later, in order. So
  a request's answer starts one RTT after the request left, as on a real link, and a
  keep-alive connection pays that on every exchange.
- Handshake: a new connection's first bytes reach the server no sooner than one RTT after the
  connection was accepted (SYN, SYN-ACK), so the first request on it costs two RTTs. Caveat:
  the kernel completes a loopback connect() at once, so a client that awaits one connect
  before starting the next is charged less than on a real network (its handshakes overlap);
  a client that sends as soon as it connects is charged exactly.
- Window: a connection has at most `window` bytes in flight per direction (read from one
  side, not yet acknowledged: an RTT after they were read), as a TCP window does: one
  connection moves at most window / RTT bytes per second. Linux's receive-buffer autotuning
  tops out at 3-6 MiB, hence the 4 MiB default.
- Bandwidth (optional): each direction is one link of `bandwidth` bytes per second shared by
  every connection: a chunk starts when the link is free and takes size / bandwidth to pass.

`rtt` may change between runs (the benchmark steps 20 ms -> 80 ms on one proxy); a change
applies to chunks read after it. The proxy's own CPU time is `cpu_seconds()`: it runs on the
same cores as the tools it slows down, and the benchmark shows it per run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

from tests.support.proxyserver import ThreadedProxy

_READ_SIZE = 1 << 18
DEFAULT_WINDOW = 4 << 20


class _Link:
    """One direction's shared capacity: when the next chunk can start passing."""

    def __init__(self) -> None:
        self.free_at = 0.0


class DelayProxy(ThreadedProxy):
    """127.0.0.1:<port> -> upstream with a round-trip time, a window and a bandwidth cap."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        rtt: float = 0.0,
        *,
        window: int = DEFAULT_WINDOW,
        bandwidth: float | None = None,
    ) -> None:
        super().__init__(upstream_host, upstream_port)
        self.rtt = rtt  # seconds
        self.window = window  # bytes in flight per connection and direction
        self.bandwidth = bandwidth  # bytes per second per direction, all connections; None: no cap
        self._up = _Link()
        self._down = _Link()

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        ready_at = self._loop.time() + self.rtt  # the handshake's round trip
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            return
        pipes = [
            asyncio.create_task(self._carry(client_r, upstream_w, self._up, ready_at)),
            asyncio.create_task(self._carry(upstream_r, client_w, self._down, 0.0)),
        ]
        try:
            await asyncio.gather(*pipes)
        finally:
            for pipe in pipes:
                pipe.cancel()
            upstream_w.close()

    async def _carry(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        ready_at: float,
    ) -> None:
        """One direction: read, stamp each chunk with when it arrives, deliver it then."""
        loop = self._loop
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        queued = asyncio.Event()
        in_flight: collections.deque[tuple[float, int]] = collections.deque()  # (acked at, n)
        flight = 0

        delivering = asyncio.create_task(_deliver(queue, queued, writer, loop))
        try:
            while not delivering.done():  # a dead receiver ends the pipe
                # The window: wait until enough of what was sent is acknowledged.
                while in_flight and (flight >= self.window or in_flight[0][0] <= loop.time()):
                    acked_at, size = in_flight[0]
                    if acked_at > loop.time():
                        await asyncio.sleep(acked_at - loop.time())
                    in_flight.popleft()
                    flight -= size
                data = await reader.read(min(_READ_SIZE, self.window - flight))
                now = loop.time()
                start = max(now, ready_at)
                if data and self.bandwidth:
                    start = max(start, link.free_at)
                    link.free_at = start + len(data) / self.bandwidth
                    start = link.free_at
                half = self.rtt / 2
                queue.append((start + half, data))
                queued.set()
                if not data:
                    break
                in_flight.append((start + self.rtt, len(data)))
                flight += len(data)
            await delivering
        except (ConnectionError, OSError):
            writer.close()
        finally:
            delivering.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await delivering


async def _deliver(
    queue: collections.deque[tuple[float, bytes]],
    queued: asyncio.Event,
    writer: asyncio.StreamWriter,
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Writes each queued chunk when it is due; an empty chunk is the sender's half-close."""
    while True:
        while not queue:
            queued.clear()
            await queued.wait()
        due, data = queue.popleft()
        if not data:
            if writer.can_write_eof():
                writer.write_eof()  # pass the half-close on: the peer may still answer
            return
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        writer.write(data)
        await writer.drain()
