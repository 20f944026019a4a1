"""Listing time behind per-page latency: one chain of pages vs delimiter fan-out (issue 12).

    python -m tests.bench.listing_latency --keys 20000 --folders 20 --delay 0.02

Files are made on tmpfs in the folder an `rclone serve s3` then serves (before it starts:
its folder cache would miss them otherwise); every listing request waits `--delay` seconds
before it is sent, as a WAN round trip would. "one chain" is the same code with a lookahead
of 0 and pages as big as the listing: it is the single sequential chain of before.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

import sidecar.s3.fanout as fanout
from sidecar.locals3 import LocalS3
from sidecar.s3 import ClientSettings, ObjectStore


class DelayedStore(ObjectStore):
    delay = 0.0

    async def _list_page(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        await asyncio.sleep(self.delay)
        return await super()._list_page(*args, **kwargs)


async def _time(bucket: str, delay: float, lookahead: int, fan_out: bool) -> tuple[float, int]:
    saved = fanout.LOOKAHEAD
    fanout.LOOKAHEAD = lookahead
    try:
        async with DelayedStore(bucket, ClientSettings(concurrency=32)) as store:
            store.delay = delay
            started = time.monotonic()
            count = 0
            if fan_out:
                async for page in store.list("vol/"):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--folders", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
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
            for name, delay, fan_out in [
                ("one chain, no delay", 0.0, False),
                ("fan-out, no delay", 0.0, True),
                (f"one chain, {args.delay * 1000:.0f} ms/page", args.delay, False),
                (f"fan-out, {args.delay * 1000:.0f} ms/page", args.delay, True),
            ]:
                times = []
                for _ in range(args.runs):
                    seconds, count = asyncio.run(_time("bench", delay, fanout.LOOKAHEAD, fan_out))
                    assert count == args.keys, count
                    times.append(seconds)
                print(f"{name:32s} {min(times):6.2f} s (best of {args.runs}), {count} keys")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
