"""Helpers for the daemon tests: a scripted fake engine (coordination tests only), small HTTP
helpers, and a handle on a `sidecar serve` subprocess. Fixtures live in tests/conftest.py."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from sidecar.core.backup import UndoReport, format_utc
from sidecar.core.model import Direction
from sidecar.core.progress import Progress
from sidecar.core.result import SyncResult


@dataclass
class FakeEngine:
    """Each run blocks until the test releases it, then returns the scripted result.

    A run "scans" (moves its progress past "starting") at once, or only once `before_scan`
    is set when a test gives one.
    """

    in_flight: int = 0
    retries_total: int = 0
    calls: list[tuple[Direction, bool]] = field(default_factory=list)
    gates: list[asyncio.Event] = field(default_factory=list)
    results: list[SyncResult | BaseException] = field(default_factory=list)
    auto_release: bool = False
    called: asyncio.Condition = field(default_factory=asyncio.Condition)
    before_scan: asyncio.Event | None = None
    undone: list[str] = field(default_factory=list)  # undo and restore targets, in order

    async def undo(self, sync_id: str, *, dry_run: bool = False, force: bool = False) -> UndoReport:
        self.undone.append(sync_id)
        return UndoReport("undo", sync_id, dry_run=dry_run, sync_id="undo-of-" + sync_id)

    async def restore(
        self, path: str, at: datetime, *, local: bool = False, dry_run: bool = False
    ) -> UndoReport:
        self.undone.append(path)
        return UndoReport("restore", f"{path} at {format_utc(at)}", dry_run=dry_run)

    async def run(
        self, direction: Direction, *, dry_run: bool = False, progress: Progress | None = None
    ) -> SyncResult:
        self.calls.append((direction, dry_run))
        gate = asyncio.Event()
        self.gates.append(gate)
        async with self.called:
            self.called.notify_all()
        if self.before_scan is not None:
            await self.before_scan.wait()
        if progress is not None:
            progress.phase = "transferring"
            progress.files_total, progress.bytes_total = 2, 2048
            progress.files_done, progress.bytes_done = 1, 1024
        if not self.auto_release:
            await gate.wait()
        scripted = self.results.pop(0) if self.results else None
        if isinstance(scripted, BaseException):
            raise scripted
        result = scripted or SyncResult(operation=direction, files_transferred=1)
        result.operation, result.dry_run = direction, dry_run
        return result

    async def wait_calls(self, count: int) -> None:
        async with asyncio.timeout(5), self.called:
            await self.called.wait_for(lambda: len(self.calls) >= count)

    def release(self, index: int = -1) -> None:
        self.gates[index].set()


def failed(direction: Direction = Direction.PULL, fatal: str = "boom") -> SyncResult:
    return SyncResult(operation=direction, fatal=fatal)


def http(
    method: str, url: str, body: bytes | None = None, timeout: float = 60.0
) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def http_json(method: str, url: str, timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    status, text = http(method, url, timeout=timeout)
    return status, json.loads(text)


def non_loopback_ipv4() -> str | None:
    """An address of this machine that is not loopback, to play a peer outside the pod."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))  # picks a route; a UDP connect sends nothing
            address = str(sock.getsockname()[0])
    except OSError:
        return None
    return None if address.startswith("127.") else address


def answers_ok(url: str) -> bool:
    try:
        return http("GET", url, timeout=2)[0] == 200
    except OSError:
        return False


class S3Endpoint(Protocol):
    """What start_daemon needs of a server: tests/conftest.py's S3Server (moto) has it."""

    def env(self) -> dict[str, str]: ...


@dataclass
class Daemon:
    """A `sidecar serve` subprocess and where to reach it."""

    process: subprocess.Popen[bytes]
    control: str
    probe: str
    local_dir: Path
    bucket_dir: Path | None  # the rclone backing folder of the bucket (objects are files here)
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """The JSON log lines (the daemon runs with --log-format json)."""
        found = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
        return found

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited ({self.process.returncode}):\n{self.log()}")
            if check():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n{self.log()}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        self.wait_until(lambda: answers_ok(self.probe + "/readyz"), timeout, "readiness")

    def status(self) -> dict[str, Any]:
        return http_json("GET", self.probe + "/status")[1]

    def client(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A client verb (`sidecar status`, `finalize`, `undo`...) against this daemon."""
        return run_client(self.control, *args)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send `sig` (0: none, just wait) and wait for the exit code."""
        if sig and self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"daemon did not stop within {timeout}s\n{self.log()}") from None


def client_argv(control: str, *args: str) -> list[str]:
    """`sidecar <args>` pointed at a daemon's control API: the verbs for people."""
    return [sys.executable, "-m", "sidecar", *args, "--control-url", control]


def run_client(control: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """client_argv run to its end, its output captured as text."""
    return subprocess.run(
        client_argv(control, *args), capture_output=True, text=True, timeout=timeout
    )


StartDaemon = Callable[..., Daemon]  # the start_daemon fixture: (s3, *flags, env=, control_host=)
