"""Peak RSS of a `--ready-when priority` first pull of N tiny files (issue 12, the priority
queue's memory): a real `sidecar serve` into an empty folder, against an `rclone serve s3`
on loopback, all data on tmpfs.

    python -m tests.bench.priority_scale --files 200000 --workdir /dev/shm/me
    python -m tests.bench.priority_scale --files 200000 --sidecar-args "--priority-max-size 0"

N files of 64 bytes in N/1000 folders are made in the bucket's folder before the server
starts (profile_scale's layout). The daemon is polled until `/status` says the background
pull is complete; then its peak RSS (VmHWM) and CPU seconds are read from /proc before it
is stopped. With the default --priority-max-size every file is in the priority set (ready
at the end); with `--priority-max-size 0` every one is in the background (ready at once).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from sidecar.locals3 import LocalS3, free_port
from tests.bench.priority_bench import _get
from tests.bench.profile_scale import _make

TIMEOUT = 3600.0


def _proc(pid: int) -> tuple[float, float]:
    """(peak RSS in MiB, CPU seconds) of a running process."""
    hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return hwm, (int(fields[11]) + int(fields[12])) / ticks


def one_run(env: dict[str, str], work: Path, extra: list[str]) -> dict[str, float | None]:
    local, state = work / "local", work / "state"
    probe = f"127.0.0.1:{free_port()}"
    argv = [
        sys.executable,
        "-m",
        "sidecar",
        "serve",
        *("--remote", "s3://bench/vol/", "--local-dir", str(local)),
        *("--state-dir", str(state), "--ready-when", "priority"),
        *("--control-addr", f"127.0.0.1:{free_port()}", "--probe-addr", probe),
        *("--log-format", "json", "--log-level", "info", *extra),
    ]
    with open(work / "daemon.log", "wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    ready = None
    try:
        while time.monotonic() - started < TIMEOUT:
            if process.poll() is not None:
                raise RuntimeError(f"daemon exited: {(work / 'daemon.log').read_text()[-2000:]}")
            if ready is None and _get(f"http://{probe}/readyz")[0] == 200:
                ready = time.monotonic() - started
            status, body = _get(f"http://{probe}/status")
            if ready is not None and status == 200:
                state_now = json.loads(body)["background_pull"]["state"]
                if state_now.startswith("complete"):
                    complete = time.monotonic() - started
                    rss, cpu = _proc(process.pid)
                    load = os.getloadavg()[0]
                    return {"ready": ready, "complete": complete, "rss": rss, "cpu": cpu,
                            "load": load}  # fmt: skip
            time.sleep(0.5)
        raise RuntimeError("not complete before the timeout")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(600)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--workdir", required=True, help="a folder on tmpfs, removed after")
    parser.add_argument("--sidecar-args", default="", help="extra flags for sidecar serve")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        _make(work / "s3" / "bench" / "vol", args.files)
        with LocalS3(work / "s3") as server:
            env = dict(os.environ, **server.env())
            env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = "/dev/null"
            row = one_run(env, work, shlex.split(args.sidecar_args))
        print(
            f"priority first pull of {args.files} files: ready {row['ready']:.1f} s, "
            f"complete {row['complete']:.1f} s, CPU {row['cpu']:.1f} s, "
            f"peak RSS {row['rss']:.0f} MiB, load {row['load']:.1f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
