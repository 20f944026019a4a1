"""Fixtures for the daemon tests: the fake engine, a real loopback `rclone serve s3` and
`sidecar serve` as a real subprocess against it. Helpers are in daemon_support.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
from daemon_support import (
    FRESH_LISTINGS,
    Daemon,
    FakeEngine,
    S3Endpoint,
    StartDaemon,
    answers_ok,
)

from sidecar.locals3 import LocalS3, environ_with, free_port

BUCKET = "vol"


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[LocalS3]:
    server = LocalS3(tmp_path / "s3", log_path=tmp_path / "rclone.log")
    # Tests write objects straight into the backing folder; rclone must not serve a
    # directory listing it cached before that.
    server.start(extra_args=FRESH_LISTINGS)
    server.make_bucket(BUCKET)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    """start_daemon(s3, *extra_flags, env=..., control_host=..., bucket=..., preexec_fn=...)
    -> a listening Daemon. `s3` is the rclone `s3` fixture or a tests/conftest.py S3Server
    (moto: keys no file system can hold; give its `bucket`)."""
    started: list[Daemon] = []

    def start(
        s3: LocalS3 | S3Endpoint,
        *flags: str,
        env: dict[str, str] | None = None,
        control_host: str = "127.0.0.1",
        bucket: str = BUCKET,
        preexec_fn: Callable[[], None] | None = None,
    ) -> Daemon:
        index = len(started)
        local_dir = tmp_path / f"local{index}"
        local_dir.mkdir(exist_ok=True)

        def launch(attempt: int) -> Daemon:
            control_port, probe_port = free_port(), free_port()
            log_path = tmp_path / f"daemon{index}{f'.retry{attempt}' if attempt else ''}.log"
            command = [
                sys.executable, "-m", "sidecar", "serve",
                "--remote", f"s3://{bucket}/",
                "--local-dir", str(local_dir),
                "--state-dir", str(tmp_path / f"state{index}"),
                "--control-addr", f"{control_host}:{control_port}",
                "--probe-addr", f"127.0.0.1:{probe_port}",
                "--log-format", "json",
                *flags,
            ]  # fmt: skip
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=environ_with({**s3.env(), **(env or {})}),
                    preexec_fn=preexec_fn,
                )
            return Daemon(
                process=process,
                control=f"http://127.0.0.1:{control_port}",
                probe=f"http://127.0.0.1:{probe_port}",
                local_dir=local_dir,
                bucket_dir=s3.root / bucket if isinstance(s3, LocalS3) else None,
                log_path=log_path,
            )

        for attempt in range(3):
            daemon = launch(attempt)
            try:
                daemon.wait_until(partial(answers_ok, daemon.probe + "/healthz"), 30, "listeners")
            except AssertionError:
                # A port picked free, then taken before the daemon bound it (by a program
                # that does not claim ports as free_port does): again on new ports. Any
                # other failure is the test's.
                if attempt == 2 or "cannot listen on" not in daemon.log():
                    daemon.process.kill()
                    daemon.process.wait()
                    raise
                continue
            started.append(daemon)
            return daemon
        raise AssertionError("unreachable")

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
