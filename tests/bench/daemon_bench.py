"""The daemon path (issue 16 item 2): what a notebook user waits for on `curl -X POST .../pull`.

One `sidecar serve` per round trip (loopback, then each `--rtt-ms` through the delay proxy)
on the SMALL data set in a bucket of its own; per run, timed by curl itself (`%{time_total}`:
request sent to answer read, the user's wait, curl's own start not counted):

- DAEMON-NOOP pull / push: `POST /pull` and `POST /finalize` with nothing changed;
- DAEMON-1 pull: one object rewritten (same size, new bytes, by a direct PUT), `POST /pull`;
- DAEMON-1 push: one local file rewritten, `POST /finalize`;
- DAEMON-START pull: process start to `/readyz` answering 200 (the initial pull into an empty
  folder: what a pod start waits for), one per daemon; compared with the peers' SMALL pull.

CPU s is the daemon's user + system time over the request (from /proc); RSS its high-water
mark (VmHWM) at the end. "vs best" compares with the best peer's one-shot NOOP at the same
round trip: the issue's target is daemon NOOP <= 0.5 x that.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.locals3 import free_port
from tests.bench.peers import Server, Sidecar, aws_env, executable

if TYPE_CHECKING:
    from tests.bench.peer_bench import Bench, Row, Scenario

TOOL = "sidecar-daemon"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def run_daemon(bench: Bench, scenario: Scenario) -> list[Row]:
    from tests.bench.peer_bench import DAEMON_BUCKET

    dataset = scenario.dataset
    bench.fill(dataset, DAEMON_BUCKET)
    extra = next((t.extra_args for t in bench.tools if isinstance(t, Sidecar)), [])
    rows: list[Row] = []
    for rtt in sorted({0.0, *bench.link.rtt_ms}):
        folder = bench.ws / "daemon" / f"rtt{rtt:g}"
        try:
            daemon = Daemon(bench, folder, bench.over_link(rtt), extra)
            rows += daemon.measure(scenario, rtt)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return rows


class Daemon:
    """One `sidecar serve` on the bench's daemon bucket, started at construction."""

    def __init__(self, bench: Bench, folder: Path, server: Server, extra: list[str]) -> None:
        from tests.bench.peer_bench import DAEMON_BUCKET, PREFIX

        self.bench = bench
        self.local = folder / "dst"
        self.control = f"http://127.0.0.1:{free_port()}"
        probe_port = free_port()
        self.probe = f"http://127.0.0.1:{probe_port}"
        self.key_prefix = PREFIX
        self.bucket = DAEMON_BUCKET
        folder.mkdir(parents=True, exist_ok=True)
        argv = [
            executable("sidecar"),
            "serve",
            *("--remote", f"s3://{DAEMON_BUCKET}/{PREFIX}", "--local-dir", str(self.local)),
            *("--state-dir", str(folder / "state")),
            *("--control-addr", self.control.removeprefix("http://")),
            *("--probe-addr", f"127.0.0.1:{probe_port}"),
            *extra,
        ]
        self.log_path = folder / "serve.log"
        self.started = time.perf_counter()
        self.proxy_cpu_at_start = bench.proxy_cpu()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                env=bench.base_env | aws_env(server),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def measure(self, scenario: Scenario, rtt: float) -> list[Row]:
        from tests.bench.peer_bench import log, new_row

        def row(workload: str, direction: str) -> Row:
            made = new_row(scenario, TOOL, rtt)
            made.workload, made.direction = workload, direction
            return made

        start = row("DAEMON-START", "pull")
        noop_pull, one_pull = row("DAEMON-NOOP", "pull"), row("DAEMON-1", "pull")
        noop_push, one_push = row("DAEMON-NOOP", "push"), row("DAEMON-1", "push")
        rows = [start, noop_pull, one_pull, noop_push, one_push]
        try:
            self.wait_ready(start)
            files = sorted(p for p in self.local.rglob("*") if p.is_file())
            if len(files) != scenario.dataset.files:
                raise RuntimeError(f"initial pull placed {len(files)} of {scenario.dataset.files}")
            changed = files[0]
            key = f"{self.key_prefix}/{changed.relative_to(self.local).as_posix()}"
            for run in range(self.bench.runs):
                self.timed(noop_pull, "pull")
                content = os.urandom(scenario.dataset.size)
                self.put_object(key, content)
                self.timed(one_pull, "pull")
                if changed.read_bytes() != content:
                    one_pull.errors.append(f"{changed} not updated by the pull")
                self.timed(noop_push, "finalize")
                changed.write_bytes(os.urandom(scenario.dataset.size))
                self.timed(one_push, "finalize")
                log(
                    f"  DAEMON {rtt:3.0f}ms run {run + 1}: pull noop {noop_pull.walls[-1]:.3f} "
                    f"1 file {one_pull.walls[-1]:.3f}  finalize noop {noop_push.walls[-1]:.3f} "
                    f"1 file {one_push.walls[-1]:.3f} s"
                )
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            rows[0].errors.append(f"{exc}; log: {self.log_tail()}")
            log(f"  DAEMON {rtt:g} ms: FAILED: {exc}")
        finally:
            hwm = self.peak_rss_kib()
            self.stop()
        for made in rows:
            if made.walls:
                made.rss_kib = [hwm]
        return rows

    def wait_ready(self, row: Row) -> None:
        deadline = self.started + self.bench.timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar serve exited {self.proc.returncode}")
            if self.ready():
                row.walls.append(time.perf_counter() - self.started)
                row.cpu_s.append(self.cpu_seconds())
                row.load_1min.append(os.getloadavg()[0])
                if row.rtt_ms:
                    row.proxy_cpu_s.append(self.bench.proxy_cpu() - self.proxy_cpu_at_start)
                return
            time.sleep(0.02)
        raise RuntimeError("not ready before the timeout")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.probe}/readyz", timeout=5) as answer:
                return answer.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def timed(self, row: Row, route: str) -> None:
        """One `curl -X POST` as a user types it; curl's own timer gives the wait."""
        load = os.getloadavg()[0]
        cpu, proxy_cpu = self.cpu_seconds(), self.bench.proxy_cpu()
        done = subprocess.run(
            [
                "curl",
                *("-sS", "-o", "-", "-w", "\n%{http_code} %{time_total}"),
                *("-X", "POST", f"{self.control}/{route}"),
            ],
            capture_output=True,
            text=True,
            timeout=self.bench.timeout,
            check=False,
        )
        cpu, proxy_cpu = self.cpu_seconds() - cpu, self.bench.proxy_cpu() - proxy_cpu
        body, _, trailer = done.stdout.rpartition("\n")
        status, _, seconds = trailer.partition(" ")
        if done.returncode != 0 or status != "200" or not json.loads(body or "{}").get("ok"):
            row.errors.append(f"{route}: curl {done.returncode} HTTP {status}: {body[-500:]}")
            return
        row.walls.append(float(seconds))
        row.cpu_s.append(cpu)
        row.load_1min.append(load)
        if row.rtt_ms:
            row.proxy_cpu_s.append(proxy_cpu)

    def put_object(self, key: str, content: bytes) -> None:
        from tests.bench.servers import client_of

        client_of(self.bench.direct()).put_object(Bucket=self.bucket, Key=key, Body=content)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime

    def peak_rss_kib(self) -> int:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-1500:]
        return ""

    def stop(self) -> None:
        """SIGTERM (the daemon's final finalize, nothing to send), then wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
