"""Time to ready, --ready-when all vs priority (issue 13 item 6).

A volume of 4 x 1 GiB + 5,000 x 16 KiB (100 folders) in one bucket, the 5,000 small files
alone in another, on one `rclone serve s3` on loopback, all data on tmpfs. Each run starts a
`sidecar serve` into an empty folder and times process start -> `/readyz` 200 (what a pod
start waits for), and with priority also start -> every file local (`/status`
background_pull complete). Rows, interleaved run by run:

- SMALL all:       the small files alone, --ready-when all (the baseline of the target);
- MIXED all:       the whole volume, --ready-when all (today's behaviour);
- MIXED priority:  the whole volume, --ready-when priority (default 8MiB: the small files).

Target: MIXED priority ready <= 1.2 x SMALL all ready. With `--rtt-ms 20,80` the same rows
run again through the WAN delay proxy (tests/bench/delayproxy.py) at each round trip.

    python -m tests.bench.priority_bench --runs 3 --rtt-ms 0,20
    pytest -m bench tests/bench/priority_bench.py -s          # BENCH_PRIORITY_ARGS for flags
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidecar.locals3 import LocalS3, environ_with, free_port
from tests.bench.delayproxy import DelayProxy

GiB = 1024**3
SMALL_FILES = 5000
SMALL_SIZE = 16 * 1024
BIG_FILES = 4
READY_TIMEOUT = 900.0


@dataclass
class Row:
    rtt_ms: float
    case: str
    ready: list[float] = field(default_factory=list)
    complete: list[float] = field(default_factory=list)

    @property
    def ready_median(self) -> float:
        return statistics.median(self.ready)

    @property
    def complete_median(self) -> float | None:
        return statistics.median(self.complete) if self.complete else None


def seed(bucket: Path, big: bool) -> None:
    block = os.urandom(1 << 20)
    for i in range(SMALL_FILES):
        path = bucket / f"code/d{i % 100:02d}/f{i:05d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(block[(i * 7) % 1000 :][:SMALL_SIZE].ljust(SMALL_SIZE, b"x"))
    if big:
        (bucket / "checkpoints").mkdir(exist_ok=True)
        for i in range(BIG_FILES):
            with open(bucket / f"checkpoints/step{i}.bin", "wb") as out:
                for j in range(1024):
                    out.write(block[j % 512 :] + block[: j % 512])


def prime(server: LocalS3, bucket: str) -> None:
    """rclone computes MD5 ETags on the first listing (~1.8 s per GiB): once, untimed."""
    import botocore.session

    env = server.env()
    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    for _page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        pass


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def one_run(
    env: dict[str, str], bucket: str, mode: str, work: Path, extra: list[str]
) -> tuple[float, float | None]:
    """(seconds to ready, seconds to every file local) of one daemon start."""
    local, state = work / "local", work / "state"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    probe = f"127.0.0.1:{free_port()}"
    argv = [
        sys.executable,
        "-m",
        "sidecar",
        "serve",
        *("--remote", f"s3://{bucket}/", "--local-dir", str(local)),
        *("--state-dir", str(state), "--ready-when", mode),
        *("--control-addr", f"127.0.0.1:{free_port()}", "--probe-addr", probe),
        *("--log-format", "json", "--log-level", "info", *extra),
    ]
    with open(work / "daemon.log", "wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        ready = complete = None
        while time.monotonic() - started < READY_TIMEOUT:
            if process.poll() is not None:
                raise RuntimeError(f"daemon exited: {(work / 'daemon.log').read_text()[-2000:]}")
            if ready is None and _get(f"http://{probe}/readyz")[0] == 200:
                ready = time.monotonic() - started
                if mode == "all":
                    return ready, ready
            if ready is not None:
                status, body = _get(f"http://{probe}/status")
                if status == 200:
                    background = json.loads(body)["background_pull"]
                    if background["state"].startswith("complete"):
                        complete = time.monotonic() - started
                        return ready, complete
            time.sleep(0.01 if ready is None else 0.05)
        raise RuntimeError("not ready/complete before the timeout")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        logs = work.parent / "logs"
        logs.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copy(work / "daemon.log", logs / f"{bucket}-{mode}-{time.time():.0f}.log")
        shutil.rmtree(work, ignore_errors=True)


def run(runs: int, rtts: list[float], workdir: Path, extra: list[str]) -> list[Row]:
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "s3"
    shutil.rmtree(root, ignore_errors=True)
    log(f"seeding {BIG_FILES} x 1 GiB + {SMALL_FILES} x 16 KiB under {root}")
    seed(root / "mixed", big=True)
    seed(root / "small", big=False)
    server = LocalS3(root, log_path=workdir / "rclone.log").start()
    rows: list[Row] = []
    try:
        for bucket in ("mixed", "small"):
            prime(server, bucket)
        for rtt in rtts:
            proxy = None
            env = server.env()
            if rtt:
                proxy = DelayProxy("127.0.0.1", server.port, rtt / 1000).start()
                env = {**env, "AWS_ENDPOINT_URL": proxy.endpoint}
            full_env = environ_with(env)
            cases = [("SMALL all", "small", "all"), ("MIXED all", "mixed", "all")]
            cases.append(("MIXED priority", "mixed", "priority"))
            here = {name: Row(rtt, name) for name, _b, _m in cases}
            try:
                for index in range(runs):
                    for name, bucket, mode in cases[index % 3 :] + cases[: index % 3]:
                        # rclone forgets its MD5 ETags with its listing cache (5 min): a
                        # listing that recomputes 4 GiB of them would be timed as ours.
                        prime(server, bucket)
                        ready, complete = one_run(full_env, bucket, mode, workdir / "run", extra)
                        here[name].ready.append(ready)
                        if mode == "priority" and complete is not None:
                            here[name].complete.append(complete)
                        log(f"rtt {rtt:g} ms {name}: ready {ready:.2f}s, complete {complete}")
            finally:
                if proxy is not None:
                    proxy.stop()
            rows += here.values()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| RTT ms | case | ready s (median) | runs | every file local s | ready / SMALL all |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = next(r for r in rows if r.rtt_ms == row.rtt_ms and r.case == "SMALL all")
        complete = row.complete_median
        lines.append(
            f"| {row.rtt_ms:g} | {row.case} | {row.ready_median:.2f} | "
            f"{', '.join(f'{x:.2f}' for x in row.ready)} | "
            f"{'-' if complete is None else f'{complete:.2f}'} | "
            f"{row.ready_median / base.ready_median:.2f} |"
        )
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[priority-bench] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rtt-ms", default="0", help="comma-separated round trips; 0 = direct")
    parser.add_argument("--workdir", default="/dev/shm/netvol-priority-bench")
    parser.add_argument("--sidecar-args", default="", help="extra flags for sidecar serve")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    rtts = [float(x) for x in args.rtt_ms.split(",") if x.strip()]
    rows = run(args.runs, rtts, Path(args.workdir), shlex.split(args.sidecar_args))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps([row.__dict__ for row in rows], indent=2), encoding="utf-8"
        )
    return 0


@pytest.mark.bench
def test_priority_ready_bench() -> None:
    assert main(shlex.split(os.environ.get("BENCH_PRIORITY_ARGS", "--runs 3 --rtt-ms 0,20"))) == 0


if __name__ == "__main__":
    sys.exit(main())
