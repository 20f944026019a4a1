"""Delimiter fan-out of large listings (issue 12 item 2): the same objects in the same order
as one chain of pages, on an in-memory model of ListObjectsV2 (random trees). The same on both
servers: tests/integration/test_listing_servers.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.s3 import S3Error
from sidecar.s3.fanout import FanOutListing, key_order


class ModelBucket:
    """ListObjectsV2 over a set of keys, as S3 answers it: byte order, CommonPrefixes at the
    place of their first key, max-keys counting both, opaque continuation tokens."""

    def __init__(self, keys: set[str], page_keys: int, *, honour_start_after: bool = True):
        self.keys = sorted(keys, key=key_order)
        self.page_keys = page_keys
        self.honour_start_after = honour_start_after
        self.in_flight = 0
        self.most_in_flight = 0
        self.requests = 0
        self.fail_prefix: str | None = None

    async def fetch(
        self, prefix: str, token: str | None, start_after: str | None, delimited: bool
    ) -> bytes:
        self.requests += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)  # let the others start: concurrency is what is counted
            if prefix == self.fail_prefix:
                raise S3Error(prefix, "InternalError", "failed on purpose")
            return self._page(prefix, token, start_after, delimited)
        finally:
            self.in_flight -= 1

    def _page(self, prefix: str, token: str | None, after: str | None, delimited: bool) -> bytes:
        under = [k for k in self.keys if k.startswith(prefix)]
        if after is not None and self.honour_start_after:
            under = [k for k in under if key_order(k) > key_order(after)]
        items: list[tuple[str, bool]] = []
        for key in under:
            cut = key.find("/", len(prefix)) if delimited else -1
            if cut < 0:
                items.append((key, False))
            elif not items or items[-1] != (key[: cut + 1], True):
                items.append((key[: cut + 1], True))
        start = int(token or 0)
        page = items[start : start + self.page_keys]
        more = start + self.page_keys < len(items)
        body = ["<ListBucketResult><EncodingType>url</EncodingType>"]
        body.append(f"<KeyCount>{len(page)}</KeyCount>")
        body.append(f"<IsTruncated>{'true' if more else 'false'}</IsTruncated>")
        if more:
            body.append(f"<NextContinuationToken>{start + self.page_keys}</NextContinuationToken>")
        for name, is_prefix in page:
            encoded = quote(name.encode("utf-8", "surrogateescape"), safe="/")
            if is_prefix:
                body.append(f"<CommonPrefixes><Prefix>{encoded}</Prefix></CommonPrefixes>")
            else:
                body.append(f"<Contents><Key>{encoded}</Key><Size>{len(name)}</Size>")
                body.append("<ETag>&quot;e&quot;</ETag></Contents>")
        body.append("</ListBucketResult>")
        return "".join(body).encode()


async def _listed(fetch: Callable[..., Awaitable[bytes]], prefix: str, lookahead: int) -> list[str]:
    return [
        info.key async for page in FanOutListing(fetch, lookahead).pages(prefix) for info in page
    ]


KEY_TEXT = st.text(alphabet=["a", "b", "/", "-", ".", "0", "\u00e9", "\udcff"], max_size=7)


@given(
    keys=st.sets(KEY_TEXT, max_size=60),
    prefix=st.sampled_from(["", "a", "a/", "a/b"]),
    page_keys=st.integers(1, 4),
    lookahead=st.integers(0, 3),
    honour_start_after=st.booleans(),
)
def test_fan_out_lists_exactly_the_keys_in_order(
    keys: set[str], prefix: str, page_keys: int, lookahead: int, honour_start_after: bool
) -> None:
    bucket = ModelBucket(keys, page_keys, honour_start_after=honour_start_after)
    listed = asyncio.run(_listed(bucket.fetch, prefix, lookahead))
    assert listed == [k for k in bucket.keys if k.startswith(prefix)]


def _tree(folders: int, files: int) -> set[str]:
    return {f"vol/d{d:03d}/f{f:03d}" for d in range(folders) for f in range(files)}


async def test_folders_are_listed_side_by_side_within_the_lookahead() -> None:
    bucket = ModelBucket(_tree(40, 25), page_keys=10)
    listed = await _listed(bucket.fetch, "vol/", lookahead=4)
    assert listed == bucket.keys
    # The folder being read plus four ahead, each with at most two requests out (a folder of
    # more than a page asks for its next page beside its delimited listing), and the next
    # delimited page of the top.
    assert 4 <= bucket.most_in_flight <= 2 * (4 + 1) + 1


async def test_small_prefix_is_one_request() -> None:
    bucket = ModelBucket(_tree(3, 3), page_keys=10)
    assert await _listed(bucket.fetch, "vol/", lookahead=16) == bucket.keys
    assert bucket.requests == 1


async def test_failure_of_a_folder_reaches_the_reader_and_stops_the_rest() -> None:
    bucket = ModelBucket(_tree(30, 5), page_keys=4)
    bucket.fail_prefix = "vol/d017/"
    seen: list[str] = []
    with pytest.raises(S3Error, match="failed on purpose"):
        async for page in FanOutListing(bucket.fetch, 8).pages("vol/"):
            seen.extend(info.key for info in page)
    assert seen == [k for k in bucket.keys if k < "vol/d017/"]
    await asyncio.sleep(0.05)
    assert bucket.in_flight == 0
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_reader_that_stops_early_leaves_nothing_running() -> None:
    bucket = ModelBucket(_tree(30, 5), page_keys=4)
    async with asyncio.timeout(30):
        pages = FanOutListing(bucket.fetch, 8).pages("vol/")
        async for _page in pages:
            break
        await pages.aclose()
    await asyncio.sleep(0.05)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


# The tree of the server tests (tests/integration/test_listing_servers.py), also the round-trip
# model's. Keys around "/" ("-" and "." sort before it, "0" after), a folder marker with and without
# content (rclone keeps markers as folders: an empty one lists as a 0-byte key), deep and
# wide folders, spaces, "+", non-ASCII, and neighbours of the prefix that must stay out.
TREE = [
    "vol/a-b",
    "vol/a.c",
    "vol/a/b/c.txt",
    "vol/a/b/d.txt",
    "vol/a/b-",
    "vol/a/b.x",
    "vol/a/b0",
    "vol/a0",
    "vol/aa/q",
    "vol/deep/1/2/3/4/f",
    "vol/deep/1/2/3/4/g",
    "vol/deep/1/2/x",
    "vol/empty/",
    "vol/marker/",
    "vol/space dir/plus+name",
    "vol/\u00e9t\u00e9/caf\u00e9",
    "vol/z",
    *[f"vol/many/f{n:02d}" for n in range(23)],
    "vol-other/x",
    "vol0",
]
