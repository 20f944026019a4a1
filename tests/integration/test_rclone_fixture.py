"""The daemon tests' fixtures: `rclone serve s3` stays idle when nothing is asked of it, and
start_daemon survives a port taken under it.

With `--dir-cache-time 0s` rclone's directory-cache cleanup re-ran back to back and took
~1.6 cores for the server's whole life: every request slowed to seconds and, on a busy
machine, a server-side copy in the daemon undo test outlasted the 30 s read timeout."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from sidecar.locals3 import LocalS3
from sidecar.s3 import ClientSettings, ObjectStore
from tests.support.daemon_support import StartDaemon

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


def test_start_daemon_retries_a_port_taken_before_the_daemon_binds_it(
    s3: LocalS3, start_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parallel test workers: a port picked free can be taken before the daemon binds it (by
    a program that does not claim ports as free_port does). The daemon exits saying it
    cannot listen, and start_daemon starts it again on other ports instead of failing."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        offered = iter([port])
        real = start_daemon.__globals__["free_port"]  # the fixture module's own name
        monkeypatch.setitem(
            start_daemon.__globals__, "free_port", lambda: next(offered, 0) or real()
        )
        daemon = start_daemon(s3)
        assert f":{port}" not in daemon.control
        first_try = daemon.log_path.with_name("daemon0.log")  # the retry logs beside it
        assert "cannot listen on" in first_try.read_text()
        daemon.wait_ready()
