"""Store: the object-store operations the engine calls, as a type.

ObjectStore is the one implementation that speaks S3; the engine also holds it behind
wrappers that keep its interface (sidecar/engine/limits.py's LimitedStore, the process's
--bwlimit and --max-requests-per-second), so the engine is typed against this Protocol, not
against the class. The signatures are ObjectStore's own; mypy checks that it still fits
wherever an ObjectStore is used as a Store.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Protocol

from sidecar.s3.objects import ObjectInfo, ObjectVersion, Written
from sidecar.s3.store import ClientSettings


class Store(Protocol):
    @property
    def settings(self) -> ClientSettings: ...

    @property
    def round_trip(self) -> float | None: ...

    def list(
        self,
        prefix: str,
        pace: Callable[[], Awaitable[None]] | None = None,
        expect_keys: int = 0,
        warm: bool = False,
        skip: frozenset[str] = frozenset(),
        skipped: Callable[[str], None] | None = None,
    ) -> AsyncGenerator[builtins.list[ObjectInfo], None]: ...

    async def list_versions(self, prefix: str) -> builtins.list[ObjectVersion]: ...

    async def head(self, key: str) -> ObjectInfo: ...

    async def head_version(
        self, key: str, if_match: str | None = None, version_id: str | None = None
    ) -> tuple[ObjectInfo, str]: ...

    async def get_object(
        self,
        key: str,
        etag: str | None,
        sink: Callable[[bytes | memoryview], None],
        restart: Callable[[], None] | None = None,
        size: int = 0,
    ) -> dict[str, str]: ...

    async def get_range_into(
        self,
        key: str,
        offset: int,
        view: memoryview,
        etag: str | None,
        received: Callable[[int], None],
    ) -> dict[str, str]: ...

    async def get_bytes(self, key: str) -> bytes: ...

    async def put(
        self,
        key: str,
        body: bytes | memoryview,
        metadata: dict[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> Written: ...

    async def create_multipart(self, key: str, metadata: dict[str, str]) -> str: ...

    async def upload_part(
        self, key: str, upload_id: str, number: int, body: bytes | memoryview
    ) -> str: ...

    async def complete_multipart(
        self,
        key: str,
        upload_id: str,
        part_etags: builtins.list[str],
        if_match: str | None = None,
        if_none_match: bool = False,
        expected: tuple[int, dict[str, str]] | None = None,
    ) -> Written: ...

    async def abort_multipart(self, key: str, upload_id: str) -> None: ...

    async def abort_strays(self, key: str, keep: str | None = None) -> builtins.list[str]: ...

    async def delete(self, key: str, if_match: str | None = None) -> None: ...

    async def copy(
        self,
        source_key: str,
        dest_key: str,
        source_etag: str | None,
        if_none_match: bool = False,
    ) -> str: ...

    async def copy_object(
        self,
        source_key: str,
        dest_key: str,
        *,
        if_match: str | None = None,
        version_id: str | None = None,
        size: int = 0,
    ) -> Written: ...

    async def rewrite_metadata(
        self, key: str, etag: str, metadata: dict[str, str]
    ) -> Written | None: ...

    async def bucket_versioning(self) -> str: ...
