"""The daemon tests' `rclone serve s3` stays idle when nothing is asked of it.

With `--dir-cache-time 0s` rclone's directory-cache cleanup re-ran back to back and took
~1.6 cores for the server's whole life: every request slowed to seconds and, on a busy
machine, a server-side copy in the daemon undo test outlasted the 30 s read timeout."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from sidecar.locals3 import LocalS3
from sidecar.s3 import ClientSettings, ObjectStore

BUCKET = "vol"
IDLE_SECONDS = 2.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_the_fixture_server_does_not_spin_when_idle(s3: LocalS3) -> None:
    async def work() -> None:
        os.environ.update(s3.env())  # ObjectStore reads the endpoint and keys from there
        async with ObjectStore(BUCKET, ClientSettings(concurrency=2)) as store:
            # What a finalize with backups does: nested folders, puts, server-side copies.
            await store.put("a.txt", b"a one", {})
            await store.copy_object("a.txt", ".netvol/backup/s1/a.txt", size=5)
            await store.put(".netvol/history/s1.json", b"{}", {})

    saved = dict(os.environ)
    try:
        asyncio.run(work())
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert s3.process is not None
    before, started = cpu_seconds(s3.process.pid), time.monotonic()
    time.sleep(IDLE_SECONDS)
    used = cpu_seconds(s3.process.pid) - before
    elapsed = time.monotonic() - started
    # An idle server uses next to nothing; the spinning one used more than a core. A loaded
    # machine can only lower what a spinning server gets, never raise an idle one's.
    assert used < 0.25 * elapsed, f"rclone used {used:.2f}s of CPU in {elapsed:.1f}s idle"
