"""What backups cost a push that replaces every file (issue 14): the SMALL data set (5,000 x
16 KiB in 100 folders) pushed once, then every file rewritten and pushed again, timed with
`--backup off` and `--backup copy` (one server-side copy per replaced object, then one history
record). `sidecar finalize --once` against `rclone serve s3` on loopback, data on tmpfs.

    python -m tests.bench.backup_overhead [--files 5000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sidecar.locals3 import LocalS3
from tests.bench.workloads import DataSet, generate

BUCKET = "bench"


def push(local: Path, state: Path, server: LocalS3, backup: str) -> float:
    env = {**os.environ, **server.env(), "SIDECAR_BACKUP": backup}
    args = [sys.executable, "-m", "sidecar", "finalize", "--once", "--remote"]
    args += [f"s3://{BUCKET}/vol", "--local-dir", str(local), "--state-dir", str(state)]
    started = time.monotonic()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"finalize --backup {backup} failed:\n{done.stderr}")
    return seconds


def rewrite_all(root: Path) -> None:
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            path.write_bytes(os.urandom(path.stat().st_size))


def measure(files: int, runs: int, scratch: Path) -> dict[str, list[float]]:
    dataset = DataSet("SMALL", files, 16 * 1024, per_dir=50)
    server = LocalS3(scratch / "s3", log_path=scratch / "rclone.log").start()
    times: dict[str, list[float]] = {"off": [], "copy": []}
    try:
        server.make_bucket(BUCKET)
        local, state = scratch / "local", scratch / "state"
        generate(dataset, local)
        push(local, state, server, "off")  # the first push creates: no backups either way
        for _run in range(runs):
            for mode in ("off", "copy"):  # interleaved: load drifts hit both alike
                rewrite_all(local)
                times[mode].append(push(local, state, server, mode))
    finally:
        server.stop()
    return times


def report(times: dict[str, list[float]], files: int) -> str:
    off, copy = statistics.median(times["off"]), statistics.median(times["copy"])
    return (
        f"{files} files replaced: --backup off {off:.2f} s, copy {copy:.2f} s (median of "
        f"{len(times['off'])}); overhead {copy - off:+.2f} s ({(copy / off - 1) * 100:+.0f}%)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="netvol-backup-bench-", dir="/dev/shm"))
    try:
        times = measure(args.files, args.runs, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(report(times, args.files))
    print({mode: [round(t, 2) for t in values] for mode, values in times.items()})


if __name__ == "__main__":
    main()
