"""The listing of a large prefix as many chains of pages at once (delimiter fan-out).

ListObjectsV2 pages come one after another: each needs the token of the one before. At
20-50 ms a page on a real S3, a million keys (1,000 pages) take 20-50 s as one chain. So a
prefix whose first page does not hold it all is split at its "/" folders: a listing with
delimiter "/" names its own keys and its sub-prefixes, the sub-prefixes are listed
concurrently (split again where one is large), each into a small buffer, and the pages are
handed on in key order. The result is the single listing's, object for object, in its order.

Why handing the pieces on one after the other is enough: every key under a common prefix Q
sorts together (a key not under Q differs from Q before Q's end, so it sorts before or after
all of them, whatever characters surround the "/"). The delimited listing's items, in key
order, each expanded in place, are the whole listing in key order.

Memory stays bounded: at most LOOKAHEAD sub-prefixes are listed ahead of the one being read,
each buffering one page; the one being read is always allowed to run, so a reader never
waits on a listing that waits on the reader. A folder of a million direct files is still one
chain (no delimiter splits it); it costs what the single listing costs plus one page.

Round trips before keys flow: the flat first page, then the delimited listing, then the
folders. When the caller expects a large prefix (`speculate`: e.g. the last sync of it held
more than a page of keys), the delimited listing is sent beside the flat first page, so a
large listing costs two round trips before the fan-out instead of three. If the flat page
turns out to hold it all, the delimited request is cancelled (or its answer dropped): one
request wasted, counted in `wasted`. Small prefixes are never speculated on: a second request
for every one-page listing would double the requests of a small volume.

`skip`: sub-prefixes the fan-out does not descend into (the sidecar's own `.netvol/`, whose
backups may outnumber the data). The flat first page may still hold some of their keys: the
caller filters those.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, Awaitable, Callable

from sidecar.s3.errors import S3Error
from sidecar.s3.listing import listing_entries, listing_prefixes, listing_token
from sidecar.s3.objects import ObjectInfo

# (prefix, continuation token, start-after, delimited) -> the page's body
FetchPage = Callable[[str, str | None, str | None, bool], Awaitable[bytes]]

LOOKAHEAD = 16  # sub-prefixes listed ahead of the one being read, for the whole listing
DELIMITER = "/"


def key_order(key: str) -> bytes:
    """S3's order: the key's UTF-8 bytes (invalid bytes kept as listed: surrogateescape)."""
    return key.encode("utf-8", "surrogateescape")


def _parse(prefix: str, body: bytes) -> tuple[list[ObjectInfo], list[str], str | None]:
    try:
        token = listing_token(body)
        prefixes = listing_prefixes(body)
        return listing_entries(body, len(prefixes)), prefixes, token
    except ValueError as exc:
        raise S3Error(prefix or "/", "BadListing", f"unreadable listing page: {exc}") from None


class FanOutListing:
    """Pages of the listing under one prefix, in key order, listed LOOKAHEAD-wide."""

    def __init__(
        self,
        fetch: FetchPage,
        lookahead: int | None = None,
        *,
        speculate: bool = False,
        skip: frozenset[str] = frozenset(),
    ) -> None:
        self._fetch = fetch
        self._free = LOOKAHEAD if lookahead is None else lookahead  # lookahead slots not taken
        self._speculate = speculate
        self._skip = skip
        self.wasted = 0  # speculative delimited requests whose answer was not needed
        self.skipped: list[str] = []  # sub-prefixes of `skip` the fan-out met and left out

    async def pages(self, prefix: str) -> AsyncGenerator[list[ObjectInfo], None]:
        async with contextlib.aclosing(self._walk(prefix, None, self._speculate)) as pages:
            async for page in pages:
                yield page

    async def _walk(
        self, prefix: str, after: str | None, speculate: bool = False
    ) -> AsyncGenerator[list[ObjectInfo], None]:
        """The keys under prefix after `after` (all of them when None)."""
        ahead = None
        if speculate and after is None:  # the delimited listing, beside the flat first page
            ahead = asyncio.ensure_future(self._fetch(prefix, None, None, True))
        try:
            async with contextlib.aclosing(self._flat_then_fan_out(prefix, after, ahead)) as pages:
                async for page in pages:
                    yield page
        finally:
            if ahead is not None and not ahead.done():
                ahead.cancel()  # the fan-out did not take it (or ended before reading it)
            elif ahead is not None and not ahead.cancelled():
                ahead.exception()  # an unneeded answer's failure is nobody's: retrieve it

    async def _flat_then_fan_out(
        self, prefix: str, after: str | None, ahead: asyncio.Future[bytes] | None
    ) -> AsyncGenerator[list[ObjectInfo], None]:
        entries, token, last = await self._first_page(prefix, after)
        if entries:
            yield entries
        if token is None:
            if ahead is not None:
                self.wasted += 1
            return
        seen = _Seen(prefix, len(entries) or 1)
        seen.add(entries)
        delimited = ahead or asyncio.ensure_future(self._fetch(prefix, None, None, True))
        as_chain = False
        try:
            if ahead is None:
                # Not known to be large: the chain's next page goes out beside the delimited
                # listing. A prefix of two pages then ends one round trip after the first
                # page (the delimited answer unused); a larger one is split with the same
                # round trips as before, after the keys of two pages.
                body = await self._fetch(prefix, token, after, False)
                entries, _, token = _parse(prefix, body)
                if entries:
                    last = entries[-1].key
                    seen.add(entries)
                    yield entries
            if token is not None:
                as_chain = await self._quicker_as_chain(prefix, delimited, last, seen)
        finally:
            if not delimited.done():  # not needed after all, or the reader stopped
                delimited.cancel()
        if token is None or as_chain:
            self.wasted += 1  # the delimited listing's answer
        if token is not None:
            fan_out = self._fan_out(prefix, last, delimited)  # the folders, side by side
            rest = self._chain(prefix, token, after) if as_chain else fan_out
            async with contextlib.aclosing(rest) as pages:
                async for page in pages:
                    yield page

    async def _chain(
        self, prefix: str, token: str, after: str | None
    ) -> AsyncGenerator[list[ObjectInfo], None]:
        """The flat pages from `token` on, one after another (start-after sent again with each
        token, as the SDKs' paginators do: a server may need it to place the token)."""
        next_token: str | None = token
        while next_token is not None:
            body = await self._fetch(prefix, next_token, after, False)
            entries, _, next_token = _parse(prefix, body)
            if entries:
                yield entries

    async def _first_page(
        self, prefix: str, after: str | None
    ) -> tuple[list[ObjectInfo], str | None, str | None]:
        """The flat first page's keys after `after`, its token, and the last key it listed."""
        entries, _, token = _parse(prefix, await self._fetch(prefix, None, after, False))
        last = entries[-1].key if entries else after
        if after is not None:  # a server that ignores start-after costs a filter, not a key
            bound = key_order(after)
            entries = [e for e in entries if key_order(e.key) > bound]
            if last is not None and key_order(last) < bound:
                last = after
        return entries, token, last

    async def _quicker_as_chain(
        self, prefix: str, delimited: asyncio.Future[bytes], last: str | None, seen: _Seen
    ) -> bool:
        """Whether the rest (after `last`) lists quicker as the chain of pages than folder
        by folder, going by the folders the delimited listing names (_Seen)."""
        _, prefixes, more = _parse(prefix, await delimited)
        if more is not None:  # more than a page of folders: fan out
            return False
        bound = key_order(last) if last is not None else b""
        left = 0
        for sub in prefixes:
            order = key_order(sub)
            if order > bound or bound.startswith(order):
                left += 1
        return seen.chain_is_quicker(left, max(self._free, 1))

    async def _fan_out(
        self, prefix: str, after: str | None, first: asyncio.Future[bytes] | None = None
    ) -> AsyncGenerator[list[ObjectInfo], None]:
        bound = key_order(after) if after is not None else None
        fetch = (
            first
            if first is not None
            else asyncio.ensure_future(self._fetch(prefix, None, None, True))
        )
        children: list[_Child] = []
        try:
            while True:
                entries, prefixes, token = _parse(prefix, await fetch)
                if token:  # the server lists the next page while we read this one
                    fetch = asyncio.ensure_future(self._fetch(prefix, token, None, True))
                items = _in_order(entries, [p for p in prefixes if not self._left_out(p)], bound)
                children = [item for item in items if isinstance(item, _Child)]
                self._start_ahead(children)
                run: list[ObjectInfo] = []
                for item in items:
                    if isinstance(item, ObjectInfo):
                        run.append(item)
                        continue
                    if run:
                        yield run
                        run = []
                    if item.task is None:
                        item.start(self, slot=False)  # the one being read always runs
                    while (page := await item.next()) is not None:
                        yield page
                    self._start_ahead(children)
                if run:
                    yield run
                if not token:
                    return
        finally:
            if not fetch.done():
                fetch.cancel()
            for child in children:
                child.cancel()

    def _left_out(self, sub: str) -> bool:
        if sub in self._skip:
            self.skipped.append(sub)
            return True
        return False

    def _start_ahead(self, children: list[_Child]) -> None:
        for child in children:
            if self._free <= 0:
                return
            if child.task is None:
                self._free -= 1
                child.start(self, slot=True)


class _Seen:
    """The keys of a prefix's flat pages so far, and what they say about its folders: is the
    rest quicker to list as the chain of pages, or folder by folder?

    The chain moves one page per round trip. The fan-out lists `lookahead` folders per round
    trip, each at most a page; so folders of a few keys each move fewer keys per round trip
    than the chain does (16 folders of 50 keys: 800 keys where a page holds 1,000), and it
    pays a handshake for its new connections. 2,000 keys in 40 folders behind 80 ms: 0.21 s
    as a chain, 0.28-0.39 s fanned out (`listing_latency --model`)."""

    __slots__ = ("folders", "keys", "page", "prefix")

    def __init__(self, prefix: str, page: int) -> None:
        self.prefix = prefix
        self.page = page  # keys a page holds (the first page's count)
        self.keys = 0
        self.folders: set[str] = set()

    def add(self, entries: list[ObjectInfo]) -> None:
        start = len(self.prefix)
        for entry in entries:
            key = entry.key
            cut = key.find(DELIMITER, start)
            self.folders.add(key[start : cut + 1] if cut >= 0 else key)
        self.keys += len(entries)

    def chain_is_quicker(self, folders_left: int, lookahead: int) -> bool:
        """Round trips for `folders_left` folders of the density seen so far: as the chain,
        and fanned out (one more for the new connections' handshakes)."""
        per_folder = self.keys / max(len(self.folders), 1)
        chain = math.ceil(folders_left * per_folder / self.page)
        fan_out = 1 + math.ceil(folders_left / lookahead) * math.ceil(per_folder / self.page)
        return chain <= fan_out


def _in_order(
    entries: list[ObjectInfo], prefixes: list[str], bound: bytes | None
) -> list[ObjectInfo | _Child]:
    """One delimited page's keys and sub-prefixes in key order, without what sorts at or
    before `bound` (the last key already handed on)."""
    items: list[tuple[bytes, ObjectInfo | _Child]] = []
    for entry in entries:
        order = key_order(entry.key)
        if bound is None or order > bound:
            items.append((order, entry))
    for sub in prefixes:
        order = key_order(sub)
        if bound is None or order > bound:
            items.append((order, _Child(sub, None)))
        elif bound.startswith(order):  # the last key handed on is inside: go on after it
            items.append((order, _Child(sub, bound.decode("utf-8", "surrogateescape"))))
        # else every key under it sorts before the bound: handed on already
    items.sort(key=lambda item: item[0])
    return [item for _, item in items]


class _Child:
    """One sub-prefix listed into a buffer of one page."""

    __slots__ = ("after", "prefix", "queue", "slot", "task")

    def __init__(self, prefix: str, after: str | None) -> None:
        self.prefix = prefix
        self.after = after
        self.queue: asyncio.Queue[list[ObjectInfo] | BaseException | None] = asyncio.Queue(1)
        self.task: asyncio.Future[None] | None = None
        self.slot = False

    def start(self, listing: FanOutListing, *, slot: bool) -> None:
        self.slot = slot
        self.task = asyncio.ensure_future(self._pump(listing))

    async def _pump(self, listing: FanOutListing) -> None:
        try:
            async with contextlib.aclosing(listing._walk(self.prefix, self.after)) as pages:
                async for page in pages:
                    await self.queue.put(page)
            await self.queue.put(None)
        except Exception as exc:  # handed to the reader, in its place in the order
            await self.queue.put(exc)
        finally:
            if self.slot:
                self.slot = False
                listing._free += 1

    async def next(self) -> list[ObjectInfo] | None:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
