"""Round trips in a row before a large listing's keys flow (issue 16): the delimited listing
of the prefix goes out beside the flat first page when the caller expects a large prefix, so
the folders are listed after two round trips, not three; the result stays the one chain's.

Round trips are counted without a clock: the model answers requests in waves, all that are
in flight together at once, after the event loop has run everything that was ready."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from sidecar.s3.fanout import FanOutListing
from tests.unit.test_listing_fanout import KEY_TEXT, ModelBucket, _tree

SETTLE = 200  # event-loop turns with no new request before a wave is answered


class WaveBucket(ModelBucket):
    """ModelBucket whose answers come in waves: `sent` holds (wave, prefix, delimited) of each
    request, the wave being the round trip (from 0) in which it went out."""

    def __init__(self, keys: set[str], page_keys: int) -> None:
        super().__init__(keys, page_keys)
        self.wave = 0
        self.sent: list[tuple[int, str, bool]] = []
        self._answered = asyncio.Event()

    async def fetch(
        self, prefix: str, token: str | None, start_after: str | None, delimited: bool
    ) -> bytes:
        self.requests += 1
        self.sent.append((self.wave, prefix, delimited))
        answered = self._answered
        self.in_flight += 1
        try:
            await answered.wait()
            return self._page(prefix, token, start_after, delimited)
        finally:
            self.in_flight -= 1

    async def answer_in_waves(self) -> None:
        """Runs beside the listing: answers what is in flight once nothing new goes out."""
        while True:
            seen = len(self.sent)
            for _ in range(SETTLE):
                await asyncio.sleep(0)
            if len(self.sent) != seen or self.in_flight == 0:
                continue
            answered, self._answered = self._answered, asyncio.Event()
            self.wave += 1
            answered.set()


async def _listed_in_waves(
    bucket: WaveBucket, prefix: str, speculate: bool, lookahead: int = 16
) -> tuple[list[str], FanOutListing]:
    driver = asyncio.ensure_future(bucket.answer_in_waves())
    listing = FanOutListing(bucket.fetch, lookahead, speculate=speculate)
    try:
        keys = [info.key async for page in listing.pages(prefix) for info in page]
    finally:
        driver.cancel()
    return keys, listing


async def test_large_listing_reaches_its_folders_after_two_round_trips() -> None:
    bucket = WaveBucket(_tree(40, 25), page_keys=10)
    keys, listing = await _listed_in_waves(bucket, "vol/", speculate=True)
    assert keys == bucket.keys
    # Round trip 0: the flat first page and the delimited listing, together.
    assert sorted((p, d) for w, p, d in bucket.sent if w == 0) == [("vol/", False), ("vol/", True)]
    first_folder = min(w for w, p, _ in bucket.sent if p != "vol/")
    assert first_folder == 1  # was 2: flat page, then delimited listing, then the folders
    # The first folder, entered after the first page's last key, holds two pages more: its
    # delimited listing, sent beside its second page, is the one request not needed.
    assert listing.wasted == 1
    assert bucket.requests == len(bucket.sent)


async def test_without_speculation_the_delimited_listing_waits_for_the_first_page() -> None:
    bucket = WaveBucket(_tree(40, 25), page_keys=10)
    keys, _ = await _listed_in_waves(bucket, "vol/", speculate=False)
    assert keys == bucket.keys
    assert min(w for w, p, _ in bucket.sent if p != "vol/") == 2


async def test_speculation_on_a_prefix_of_one_page_wastes_one_request_and_leaves_nothing() -> None:
    bucket = WaveBucket(_tree(3, 3), page_keys=10)
    keys, listing = await _listed_in_waves(bucket, "vol/", speculate=True)
    assert keys == bucket.keys
    assert listing.wasted == 1
    assert bucket.requests == 2
    await asyncio.sleep(0)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_small_prefix_without_speculation_stays_one_request() -> None:
    bucket = WaveBucket(_tree(3, 3), page_keys=10)
    keys, listing = await _listed_in_waves(bucket, "vol/", speculate=False)
    assert keys == bucket.keys
    assert bucket.requests == 1 and listing.wasted == 0


@given(
    keys=st.sets(KEY_TEXT, max_size=60),
    prefix=st.sampled_from(["", "a", "a/", "a/b"]),
    page_keys=st.integers(1, 4),
    lookahead=st.integers(0, 3),
)
def test_speculative_listing_is_the_one_chain_with_both_first_requests_together(
    keys: set[str], prefix: str, page_keys: int, lookahead: int
) -> None:
    bucket = WaveBucket(keys, page_keys)
    listed, _ = asyncio.run(_listed_in_waves(bucket, prefix, True, lookahead))
    assert listed == [k for k in bucket.keys if k.startswith(prefix)]
    # Both listings of the prefix go out in the first round trip, whatever the tree.
    assert sorted((p, d) for w, p, d in bucket.sent if w == 0) == [(prefix, False), (prefix, True)]


async def test_prefix_of_two_pages_ends_one_round_trip_after_the_first_page() -> None:
    # Not known to be large: the second page goes out beside the delimited listing, and ends
    # it (was: the delimited listing, then its folders: a round trip more per wave of 16).
    bucket = WaveBucket(_tree(40, 5), page_keys=100)
    keys, listing = await _listed_in_waves(bucket, "vol/", speculate=False)
    assert keys == bucket.keys
    assert max(w for w, _, _ in bucket.sent) == 1
    assert sorted((w, p, d) for w, p, d in bucket.sent) == [
        (0, "vol/", False),
        (1, "vol/", False),
        (1, "vol/", True),
    ]
    assert listing.wasted == 1


async def test_folders_of_few_keys_are_listed_as_the_chain_of_pages() -> None:
    # 5,000 keys in 100 folders of 50 (the benchmark's SMALL): 16 folders a round trip move
    # 800 keys, a page 1,000, so the rest goes on as the chain: 5 round trips, not 1 + 5 waves.
    bucket = WaveBucket(_tree(100, 50), page_keys=1000)
    keys, listing = await _listed_in_waves(bucket, "vol/", speculate=True)
    assert keys == bucket.keys
    assert {p for _, p, _ in bucket.sent} == {"vol/"}  # no folder listed on its own
    assert max(w for w, _, _ in bucket.sent) == 4
    assert listing.wasted == 1  # the delimited listing, sent beside the first page
