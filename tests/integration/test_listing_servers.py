"""Listings on the real servers (issue 12 item 2, issue 16): the delimiter fan-out lists what
one chain of pages lists on both servers (keys that sort around "/", folder markers, empty
folders, a folder of many files), --max-requests-per-second charges each request sent, and
the store speculates only when told the prefix is large. The same rules on an in-memory model
of ListObjectsV2: tests/unit/test_listing_fanout.py and test_listing_round_trips.py."""

from __future__ import annotations

from collections import Counter

from sidecar.s3 import ClientSettings, ObjectStore
from sidecar.s3.fanout import key_order
from sidecar.s3.objects import ObjectInfo
from tests.conftest import S3Server
from tests.unit.test_listing_fanout import TREE

RCLONE_SKIPS = {"vol/marker/"}  # rclone cannot hold a marker beside content: see below
MARKED = ["vol/marker/inside"]


async def _listing(store: ObjectStore, page_keys: int, lookahead: int) -> list[tuple]:
    store.list_page_keys = page_keys
    import sidecar.s3.fanout as fanout

    saved, fanout.LOOKAHEAD = fanout.LOOKAHEAD, lookahead
    try:
        found: list[ObjectInfo] = [info async for page in store.list("vol/") for info in page]
    finally:
        fanout.LOOKAHEAD = saved
    return [(i.key, i.size, i.etag, i.last_modified) for i in found]


async def test_fan_out_lists_what_one_chain_lists(server: S3Server) -> None:
    client = server.client()
    bucket = server.new_bucket()
    for key in TREE + MARKED:
        if server.kind == "rclone" and key in RCLONE_SKIPS:
            continue
        client.put_object(Bucket=bucket, Key=key, Body=b"" if key.endswith("/") else key.encode())
    async with ObjectStore(bucket, ClientSettings(concurrency=8)) as store:
        single = await _listing(store, 1000, 16)  # fits one page: one chain, as before
        paged = [
            (o["Key"], o["Size"], o["ETag"].strip('"'))
            for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix="vol/"
            )
            for o in page.get("Contents", [])
        ]
        assert [row[:3] for row in single] == paged
        assert [k for k, *_ in single] == sorted((k for k, *_ in single), key=key_order)
        assert len(single) >= 35
        for page_keys, lookahead in [(1, 0), (2, 1), (3, 16), (7, 2)]:
            assert await _listing(store, page_keys, lookahead) == single, (page_keys, lookahead)


async def test_max_requests_per_second_charges_each_listing_request_sent(
    moto: S3Server, request_counter: Counter[str]
) -> None:
    """--max-requests-per-second charges a fanned-out listing per request sent (folders
    listed side by side), not per page handed on: the two differ once a listing fans out."""
    from sidecar.engine.limits import LimitedStore, Limits

    client = moto.client()
    bucket = moto.new_bucket()
    for key in TREE:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    charged = 0

    class CountingLimits(Limits):
        async def request(self) -> None:
            nonlocal charged
            charged += 1

    async with ObjectStore(bucket, ClientSettings(concurrency=8)) as store:
        store.list_page_keys = 2
        limited = LimitedStore(store, CountingLimits())
        pages = [page async for page in limited.list("vol/")]
    sent = request_counter["list_objects_v2"]
    assert sum(map(len, pages)) == len(TREE) - 2  # not "vol-other/x" nor "vol0"
    assert sent > len(pages)  # the fan-out's delimited pages hand on no page of their own
    assert charged == sent


async def test_store_speculates_only_when_told_the_prefix_is_large(
    moto: S3Server, request_counter: Counter[str]
) -> None:
    client = moto.client()
    bucket = moto.new_bucket()
    for key in TREE:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    expected = sorted(k for k in TREE if k.startswith("vol/"))
    async with ObjectStore(bucket, ClientSettings(concurrency=8)) as store:
        store.list_page_keys = 1000
        before = request_counter["list_objects_v2"]
        listed = [i.key async for page in store.list("vol/") for i in page]
        assert request_counter["list_objects_v2"] - before == 1  # one page, one request
        before = request_counter["list_objects_v2"]
        told = [i.key async for page in store.list("vol/", expect_keys=5000) for i in page]
        assert request_counter["list_objects_v2"] - before == 2  # the unneeded delimited one
    assert sorted(listed) == sorted(told) == expected
