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
import builtins
import functools
import inspect
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sidecar.core.options import SyncConfig
from sidecar.core.tokenbucket import TokenBucket
from sidecar.s3 import ClientSettings, ObjectInfo, ObjectVersion, Store, Written


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
    """An ObjectStore whose every call first passes the process's limits. The Store protocol's
    operations are methods of its own, so mypy checks them against sidecar.s3.Store (see
    `_is_a_store`); anything else (attributes, counters, settings the tests set) is the
    store's own, through `__getattr__`, its coroutines charged one request each too."""

    def __init__(self, store: Store, limits: Limits) -> None:
        self._store = store
        self._limits = limits

    @property
    def unlimited(self) -> Store:
        return self._store

    # ---- the Store protocol --------------------------------------------------------------
    @property
    def settings(self) -> ClientSettings:
        return self._store.settings

    @property
    def round_trip(self) -> float | None:
        return self._store.round_trip

    def list(
        self,
        prefix: str,
        pace: Callable[[], Awaitable[None]] | None = None,
        expect_keys: int = 0,
        warm: bool = False,
        skip: frozenset[str] = frozenset(),
        skipped: Callable[[str], None] | None = None,
    ) -> AsyncGenerator[builtins.list[ObjectInfo], None]:
        # A listing sends its page requests itself, several folders at once: each is charged
        # as it goes out, not per page handed on.
        return self._store.list(
            prefix,
            pace=self._limits.request if pace is None else pace,
            expect_keys=expect_keys,
            warm=warm,
            skip=skip,
            skipped=skipped,
        )

    async def list_versions(self, prefix: str) -> builtins.list[ObjectVersion]:
        await self._limits.request()
        return await self._store.list_versions(prefix)

    async def head(self, key: str) -> ObjectInfo:
        await self._limits.request()
        return await self._store.head(key)

    async def head_version(
        self, key: str, if_match: str | None = None, version_id: str | None = None
    ) -> tuple[ObjectInfo, str]:
        await self._limits.request()
        return await self._store.head_version(key, if_match, version_id)

    async def get_object(
        self,
        key: str,
        etag: str | None,
        sink: Callable[[bytes | memoryview], None],
        restart: Callable[[], None] | None = None,
        size: int = 0,
    ) -> dict[str, str]:
        """A whole-object GET: its size is known only as it streams (the sink is synchronous),
        so it waits for the bucket to be clear, then pays for what it received before
        returning. At most one GET per worker runs ahead of the rate, never more."""
        limits = self._limits
        await limits.request()
        await limits.until_clear("download")
        received = 0

        def counting(data: bytes | memoryview) -> None:
            nonlocal received
            received += len(data)
            sink(data)

        try:
            return await self._store.get_object(key, etag, counting, restart, size)
        finally:
            limits.charge("download", received)
            # Paid before the caller goes on: the last files of a sync are paid for too.
            await limits.until_clear("download")

    async def get_range_into(
        self,
        key: str,
        offset: int,
        view: memoryview,
        etag: str | None,
        received: Callable[[int], None],
    ) -> dict[str, str]:
        await self._limits.request()
        await self._limits.reserve("download", len(view))
        return await self._store.get_range_into(key, offset, view, etag, received)

    async def get_bytes(self, key: str) -> bytes:
        await self._limits.request()
        return await self._store.get_bytes(key)

    async def put(
        self,
        key: str,
        body: bytes | memoryview,
        metadata: dict[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> Written:
        await self._limits.request()
        await self._limits.reserve("upload", len(body))
        return await self._store.put(key, body, metadata, if_match, if_none_match)

    async def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        await self._limits.request()
        return await self._store.create_multipart(key, metadata)

    async def upload_part(
        self, key: str, upload_id: str, number: int, body: bytes | memoryview
    ) -> str:
        await self._limits.request()
        await self._limits.reserve("upload", len(body))
        return await self._store.upload_part(key, upload_id, number, body)

    async def complete_multipart(
        self,
        key: str,
        upload_id: str,
        part_etags: builtins.list[str],
        if_match: str | None = None,
        if_none_match: bool = False,
        expected: tuple[int, dict[str, str]] | None = None,
    ) -> Written:
        await self._limits.request()
        return await self._store.complete_multipart(
            key, upload_id, part_etags, if_match, if_none_match, expected
        )

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await self._limits.request()
        await self._store.abort_multipart(key, upload_id)

    async def abort_strays(self, key: str, keep: str | None = None) -> builtins.list[str]:
        await self._limits.request()
        return await self._store.abort_strays(key, keep)

    async def delete(self, key: str, if_match: str | None = None) -> None:
        await self._limits.request()
        await self._store.delete(key, if_match)

    async def copy(
        self,
        source_key: str,
        dest_key: str,
        source_etag: str | None,
        if_none_match: bool = False,
    ) -> str:
        await self._limits.request()
        return await self._store.copy(source_key, dest_key, source_etag, if_none_match)

    async def copy_object(
        self,
        source_key: str,
        dest_key: str,
        *,
        if_match: str | None = None,
        version_id: str | None = None,
        size: int = 0,
    ) -> Written:
        await self._limits.request()
        return await self._store.copy_object(
            source_key, dest_key, if_match=if_match, version_id=version_id, size=size
        )

    async def rewrite_metadata(
        self, key: str, etag: str, metadata: dict[str, str]
    ) -> Written | None:
        await self._limits.request()
        return await self._store.rewrite_metadata(key, etag, metadata)

    async def bucket_versioning(self) -> str:
        await self._limits.request()
        return await self._store.bucket_versioning()

    # ---- the rest of the store -----------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if name.startswith("_"):
            return target
        if inspect.isasyncgenfunction(target):
            return functools.partial(target, pace=self._limits.request)
        if inspect.iscoroutinefunction(target):
            return self._limited(target)
        return target

    def _limited(self, target: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        limits = self._limits

        @functools.wraps(target)
        async def call(*args: Any, **kwargs: Any) -> Any:
            await limits.request()
            return await target(*args, **kwargs)

        return call


def _is_a_store(limited: LimitedStore) -> Store:
    return limited  # mypy: LimitedStore fits the Store protocol the engine is typed against
