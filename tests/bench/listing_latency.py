"""Listing time behind per-page latency: one chain of pages vs delimiter fan-out (issue 12).

    python -m tests.bench.listing_latency --keys 20000 --folders 20 --delay 0.02
    python -m tests.bench.listing_latency --model --keys 1000000 --folders 1000 --delay 0.03

`--model`: no server; an in-memory ListObjectsV2 (bisect over sorted keys, S3's paging and
CommonPrefixes) answers after `--delay`, at most 32 requests at once (the store's slots), so
a million keys cost what our side costs: fan-out, parsing, and the round trips.

Files are made on tmpfs in the folder an `rclone serve s3` then serves (before it starts:
its folder cache would miss them otherwise); every listing request waits `--delay` seconds
before it is sent, as a WAN round trip would. "one chain" is the same code with a lookahead
of 0 and pages as big as the listing: it is the single sequential chain of before.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import sidecar.s3.fanout as fanout
from sidecar.locals3 import LocalS3
from sidecar.s3 import ClientSettings, ObjectStore


class DelayedStore(ObjectStore):
    delay = 0.0

    async def _list_page(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        await asyncio.sleep(self.delay)
        return await super()._list_page(*args, **kwargs)


async def _time(
    bucket: str, delay: float, lookahead: int, fan_out: bool, expect_keys: int = 0
) -> tuple[float, int]:
    saved = fanout.LOOKAHEAD
    fanout.LOOKAHEAD = lookahead
    try:
        async with DelayedStore(bucket, ClientSettings(concurrency=32)) as store:
            store.delay = delay
            started = time.monotonic()
            count = 0
            if fan_out:
                async for page in store.list("vol/", expect_keys=expect_keys):
                    count += len(page)
            else:  # the chain of before: page after page, each asking with the last token
                token = None
                while True:
                    body = await store._list_page("vol/", token, None, False)
                    entries, _, token = fanout._parse("vol/", body)
                    count += len(entries)
                    if not token:
                        break
            return time.monotonic() - started, count
    finally:
        fanout.LOOKAHEAD = saved


class ModelServer:
    """ListObjectsV2 over sorted ASCII keys, a page in O(page) (bisect)."""

    def __init__(self, keys: list[str], delay: float, slots: int = 32) -> None:
        self.keys = keys
        self.delay = delay
        self.slots = asyncio.Semaphore(slots)
        self.requests = 0

    async def fetch(
        self, prefix: str, token: str | None, start_after: str | None, delimited: bool
    ) -> bytes:
        async with self.slots:
            self.requests += 1
            await asyncio.sleep(self.delay)
            return self._page(prefix, token, start_after, delimited)

    def _page(self, prefix: str, token: str | None, after: str | None, delimited: bool) -> bytes:
        keys = self.keys
        end = bisect.bisect_left(keys, prefix + "\x7f")
        if token:
            i = int(token)
        elif after:
            i = bisect.bisect_right(keys, after)
        else:
            i = bisect.bisect_left(keys, prefix)
        body = ["<ListBucketResult>"]
        count = 0
        while i < end and count < 1000:
            key = keys[i]
            cut = key.find("/", len(prefix)) if delimited else -1
            if cut >= 0:
                common = key[: cut + 1]
                body.append(f"<CommonPrefixes><Prefix>{common}</Prefix></CommonPrefixes>")
                i = bisect.bisect_left(keys, key[:cut] + "0", i)  # past every key under it
            else:
                body.append(f"<Contents><Key>{key}</Key><Size>64</Size><ETag>e</ETag>")
                body.append("<LastModified>2026-12-03T10:00:00.000Z</LastModified></Contents>")
                i += 1
            count += 1
        more = i < end
        body.append(f"<IsTruncated>{'true' if more else 'false'}</IsTruncated>")
        if more:
            body.append(f"<NextContinuationToken>{i}</NextContinuationToken>")
        body.append("</ListBucketResult>")
        return "".join(body).encode()


async def _model_time(
    server: ModelServer, fan_out: bool, speculate: bool = False
) -> tuple[float, float, int, int]:
    server.requests = 0
    started, cpu = time.monotonic(), time.process_time()
    count = 0
    if fan_out:
        async for page in fanout.FanOutListing(server.fetch, speculate=speculate).pages("vol/"):
            count += len(page)
    else:
        token = None
        while True:
            entries, _, token = fanout._parse(
                "vol/", await server.fetch("vol/", token, None, False)
            )
            count += len(entries)
            if not token:
                break
    return time.monotonic() - started, time.process_time() - cpu, count, server.requests


def _model(args: argparse.Namespace) -> None:
    per_folder = -(-args.keys // args.folders)
    keys = sorted(f"vol/d{n // per_folder:05d}/f{n:08d}.jpg" for n in range(args.keys))
    for delay in (0.0, args.delay):
        server = ModelServer(keys, delay)
        for name, fan_out, speculate in (
            ("one chain", False, False),
            ("fan-out", True, False),
            ("fan-out, speculative", True, True),
        ):
            label = f"{name}, {delay * 1000:.0f} ms/page"
            if not fan_out and delay and args.keys > 200_000:
                pages = -(-args.keys // 1000)
                print(f"{label:32s} >= {pages * delay:6.2f} s (the round trips alone)")
                continue
            seconds, cpu, count, requests = asyncio.run(_model_time(server, fan_out, speculate))
            assert count == args.keys, count
            print(f"{label:32s} {seconds:6.2f} s, CPU {cpu:5.2f} s, {requests} requests")
    tracemalloc.start()
    asyncio.run(_model_time(ModelServer(keys, args.delay), True))
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    print(f"fan-out, traced peak of the listing (pages handed on and dropped): {peak:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--folders", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", action="store_true", help="in-memory server, no HTTP")
    args = parser.parse_args()
    if args.model:
        _model(args)
        return
    root = Path(tempfile.mkdtemp(prefix="listing-latency-", dir="/dev/shm"))
    try:
        per_folder = -(-args.keys // args.folders)
        for n in range(args.keys):
            folder = root / "data" / "bench" / "vol" / f"d{n // per_folder:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"f{n:07d}").write_bytes(b"x")
        with LocalS3(root / "data") as server:
            os.environ.update(server.env())
            os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = "/dev/null"
            asyncio.run(_time("bench", 0, 16, True))  # warm the server's caches, untimed
            ms = f"{args.delay * 1000:.0f} ms/page"
            for name, delay, fan_out, expect in [
                ("one chain, no delay", 0.0, False, 0),
                ("fan-out, no delay", 0.0, True, 0),
                ("fan-out speculative, no delay", 0.0, True, args.keys),
                (f"one chain, {ms}", args.delay, False, 0),
                (f"fan-out, {ms}", args.delay, True, 0),
                (f"fan-out speculative, {ms}", args.delay, True, args.keys),
            ]:
                times = []
                for _ in range(args.runs):
                    seconds, count = asyncio.run(
                        _time("bench", delay, fanout.LOOKAHEAD, fan_out, expect)
                    )
                    assert count == args.keys, count
                    times.append(seconds)
                print(f"{name:32s} {min(times):6.2f} s (best of {args.runs}), {count} keys")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
