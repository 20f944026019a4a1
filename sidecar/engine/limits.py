"""--bwlimit and --max-requests-per-second: one set of token buckets per process, in front of
every call to the object store (LimitedStore), so every transfer, listing page and HEAD of
every sync of the process shares them.

The buckets (sidecar/core/tokenbucket.py) are charged in bytes and requests. Bytes whose
count is known before the request (a ranged GET, a PUT, a part) are reserved before it is
sent; a whole-object GET waits until earlier reservations are paid, then is charged what it
received, so many small files keep to the rate as one big file does.

The limit sits at the store's API, not inside its HTTP client (sidecar/s3/): a request the
store retries internally counts once.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from sidecar.core.options import SyncConfig
from sidecar.core.tokenbucket import TokenBucket
from sidecar.s3 import Store


@dataclass
class Limits:
    """The process's buckets (None: no limit that way) and the seconds callers waited."""

    down: TokenBucket | None = None
    up: TokenBucket | None = None
    requests: TokenBucket | None = None
    clock: Callable[[], float] = time.monotonic
    waited: dict[str, float] = field(
        default_factory=lambda: {"download": 0.0, "upload": 0.0, "requests": 0.0}
    )

    @classmethod
    def from_config(cls, config: SyncConfig, clock: Callable[[], float] = time.monotonic) -> Limits:
        now = clock()
        return cls(
            down=TokenBucket(config.bwlimit_down, now) if config.bwlimit_down else None,
            up=TokenBucket(config.bwlimit_up, now) if config.bwlimit_up else None,
            requests=(
                TokenBucket(config.max_requests_per_second, now, burst=1.0)
                if config.max_requests_per_second
                else None
            ),
            clock=clock,
        )

    @property
    def active(self) -> bool:
        return any(b is not None for b in (self.down, self.up, self.requests))

    def describe(self) -> dict[str, float | None]:
        """The limits as configured, for /status and metrics (None: unlimited)."""
        return {
            "download_bytes_per_second": self.down.rate if self.down else None,
            "upload_bytes_per_second": self.up.rate if self.up else None,
            "requests_per_second": self.requests.rate if self.requests else None,
        }

    def status(self, shard: str | None) -> dict[str, Any]:
        """The /status block: the shard (--shard), the limits, and the seconds transfers
        waited on each (summed over transfers: 16 downloads waiting 1 s each count 16 s)."""
        return {
            "shard": shard,
            "limits": self.describe(),
            "limit_waited_seconds": {kind: round(s, 3) for kind, s in self.waited.items()},
        }

    async def _sleep(self, kind: str, seconds: float) -> None:
        if seconds > 0:
            self.waited[kind] += seconds
            await asyncio.sleep(seconds)

    async def request(self) -> None:
        if self.requests is not None:
            await self._sleep("requests", self.requests.reserve(1, self.clock()))

    async def reserve(self, kind: str, nbytes: int) -> None:
        bucket = self.down if kind == "download" else self.up
        if bucket is not None and nbytes > 0:
            await self._sleep(kind, bucket.reserve(nbytes, self.clock()))

    async def until_clear(self, kind: str) -> None:
        bucket = self.down if kind == "download" else self.up
        if bucket is not None:
            await self._sleep(kind, bucket.until_clear(self.clock()))

    def charge(self, kind: str, nbytes: int) -> None:
        bucket = self.down if kind == "download" else self.up
        if bucket is not None and nbytes > 0:
            bucket.charge(nbytes, self.clock())


class LimitedStore:
    """An ObjectStore whose every call first passes the process's limits; everything else
    (attributes, settings, counters) is the store's own. The engine holds it as a
    sidecar.s3.Store: its operations come through `__getattr__`, so mypy takes it for one."""

    def __init__(self, store: Store, limits: Limits) -> None:
        self._store = store
        self._limits = limits

    @property
    def unlimited(self) -> Store:
        return self._store

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if name.startswith("_"):
            return target
        if inspect.isasyncgenfunction(target):
            return self._paged(target)
        if inspect.iscoroutinefunction(target):
            return self._limited(name, target)
        return target

    def _paged(self, target: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
        # A listing sends its page requests itself, several folders at once: each is charged
        # as it goes out, not per page handed on.
        return functools.partial(target, pace=self._limits.request)

    def _limited(self, name: str, target: Callable[..., Any]) -> Callable[..., Any]:
        limits = self._limits

        @functools.wraps(target)
        async def call(*args: Any, **kwargs: Any) -> Any:
            await limits.request()
            if name == "get_range_into":
                await limits.reserve("download", len(_arg(args, kwargs, 2, "view")))
            elif name == "get_object":
                return await _get_object_charged(limits, target, args, kwargs)
            elif name == "put":
                await limits.reserve("upload", len(_arg(args, kwargs, 1, "body")))
            elif name == "upload_part":
                await limits.reserve("upload", len(_arg(args, kwargs, 3, "body")))
            return await target(*args, **kwargs)

        return call


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs[name]


async def _get_object_charged(
    limits: Limits, target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """A whole-object GET: its size is known only as it streams (the sink is synchronous),
    so it waits for the bucket to be clear, then pays for what it received before returning.
    At most one GET per worker runs ahead of the rate, never more."""
    await limits.until_clear("download")
    received = 0
    sink = _arg(args, kwargs, 2, "sink")

    def counting(data: Any) -> None:
        nonlocal received
        received += len(data)
        sink(data)

    if len(args) > 2:
        args = (*args[:2], counting, *args[3:])
    else:
        kwargs = {**kwargs, "sink": counting}
    try:
        return await target(*args, **kwargs)
    finally:
        limits.charge("download", received)
        # Paid before the caller goes on: the last files of a sync are paid for too.
        await limits.until_clear("download")
