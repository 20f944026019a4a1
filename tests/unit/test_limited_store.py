"""What LimitedStore (sidecar/engine/limits.py) charges each store operation: one request
each, plus the bytes known before the request (ranged GET, PUT, part), or for a whole-object
GET the bytes it received; a listing is paced per request it sends. A table over a store
that records its calls, no server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from sidecar.engine.limits import LimitedStore, Limits

NOTHING = {"abort_multipart", "delete"}


class RecordingStore:
    """Every coroutine answers its name (those of the Store protocol that return nothing:
    None); get_object streams 7 bytes into its sink."""

    settings = "the store's settings"
    round_trip = 0.25
    list_page_keys = 1000  # a plain attribute a test may set

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            return None if name in NOTHING else name

        return call

    async def get_object(self, *args: Any, **kwargs: Any) -> dict[str, str]:
        self.calls.append(("get_object", args, kwargs))
        sink = args[2] if len(args) > 2 else kwargs["sink"]
        sink(b"1234")
        sink(memoryview(b"567"))
        return {"etag": "e"}

    async def list(self, prefix: str, pace: Any = None, **kwargs: Any) -> AsyncIterator[list[str]]:
        for page in range(3):
            if pace is not None:
                await pace()
            yield [f"{prefix}{page}"]


class RecordingLimits(Limits):
    def __init__(self) -> None:
        super().__init__()
        self.charged: list[tuple[str, int]] = []

    async def request(self) -> None:
        self.charged.append(("request", 1))

    async def reserve(self, kind: str, nbytes: int) -> None:
        self.charged.append((kind, nbytes))

    async def until_clear(self, kind: str) -> None:
        self.charged.append((f"{kind} clear", 0))

    def charge(self, kind: str, nbytes: int) -> None:
        self.charged.append((f"{kind} paid", nbytes))


REQUEST = [("request", 1)]
WHOLE_GET = [*REQUEST, ("download clear", 0), ("download paid", 7), ("download clear", 0)]

CASES: list[tuple[str, Callable[[LimitedStore], Any], list[tuple[str, int]]]] = [
    ("head", lambda s: s.head("k"), REQUEST),
    ("head_version", lambda s: s.head_version("k", if_match='"e"'), REQUEST),
    ("list_versions", lambda s: s.list_versions("p/"), REQUEST),
    ("get_bytes", lambda s: s.get_bytes("k"), REQUEST),
    (
        "get_range_into",
        lambda s: s.get_range_into("k", 0, memoryview(bytearray(9)), None, print),
        [*REQUEST, ("download", 9)],
    ),
    (
        "get_range_into kw",
        lambda s: s.get_range_into(
            "k", 0, view=memoryview(bytearray(5)), etag=None, received=print
        ),
        [*REQUEST, ("download", 5)],
    ),
    ("get_object", lambda s: s.get_object("k", None, lambda data: None), WHOLE_GET),
    ("get_object kw", lambda s: s.get_object("k", None, sink=lambda data: None), WHOLE_GET),
    ("put", lambda s: s.put("k", b"12345", {}), [*REQUEST, ("upload", 5)]),
    (
        "put kw",
        lambda s: s.put("k", body=b"123", metadata={}, if_none_match=True),
        [*REQUEST, ("upload", 3)],
    ),
    ("create_multipart", lambda s: s.create_multipart("k", {}), REQUEST),
    ("upload_part", lambda s: s.upload_part("k", "u", 1, b"1234"), [*REQUEST, ("upload", 4)]),
    ("complete_multipart", lambda s: s.complete_multipart("k", "u", ["e"]), REQUEST),
    ("abort_multipart", lambda s: s.abort_multipart("k", "u"), REQUEST),
    ("abort_strays", lambda s: s.abort_strays("k"), REQUEST),
    ("delete", lambda s: s.delete("k", if_match='"e"'), REQUEST),
    ("copy", lambda s: s.copy("a", "b", None), REQUEST),
    ("copy_object", lambda s: s.copy_object("a", "b", version_id="v"), REQUEST),
    ("rewrite_metadata", lambda s: s.rewrite_metadata("k", "e", {}), REQUEST),
    ("bucket_versioning", lambda s: s.bucket_versioning(), REQUEST),
]


@pytest.mark.parametrize(("name", "call", "charged"), CASES, ids=[c[0] for c in CASES])
def test_each_operation_is_charged_before_it_reaches_the_store(
    name: str, call: Callable[[LimitedStore], Any], charged: list[tuple[str, int]]
) -> None:
    store, limits = RecordingStore(), RecordingLimits()
    answer = asyncio.run(call(LimitedStore(store, limits)))  # type: ignore[arg-type]
    operation = name.split()[0]
    expected = {"get_object": {"etag": "e"}}.get(operation, operation)
    assert answer == (None if operation in NOTHING else expected)
    assert limits.charged == charged
    assert [c[0] for c in store.calls] == [operation]


def test_a_listing_is_paced_per_request_and_the_rest_is_the_stores() -> None:
    store, limits = RecordingStore(), RecordingLimits()
    limited = LimitedStore(store, limits)  # type: ignore[arg-type]

    async def pages() -> list[list[str]]:
        return [page async for page in limited.list("p/")]

    assert asyncio.run(pages()) == [["p/0"], ["p/1"], ["p/2"]]
    assert limits.charged == REQUEST * 3
    assert (limited.settings, limited.round_trip, limited.list_page_keys) == (
        "the store's settings",
        0.25,
        1000,
    )
    assert limited.unlimited is store
    assert asyncio.run(limited.some_other_call(1)) == "some_other_call"  # type: ignore[attr-defined]
    assert limits.charged == REQUEST * 4
