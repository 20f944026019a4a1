"""Where the memory of a sync of N files goes (issue 12): tracemalloc by source line.

    python -m tests.bench.profile_scale --files 100000 --rows noop-pull,noop-finalize
    python -m tests.bench.profile_scale --files 50000 --rows changed-finalize --no-trace \
        --cprofile /dev/shm/changed.pstats

N files of 64 bytes in N/1000 folders are made on tmpfs, once as a bucket folder that an
`rclone serve s3` serves (made before it starts: its folder cache would miss them) and once
as the local folder; one untimed pull records BASE, then each row runs in-process with
tracemalloc on: its traced peak, the process's peak RSS, and the allocation sites that held
the most when the plan was made (scan, listing and BASE all alive). tracemalloc makes the
run 2-3x slower: read the times as relative. `changed-finalize` rewrites 10 files (same
size, new bytes) before its finalize, as the peer benchmark's CHANGED row does;
`first-pull` pulls the bucket into a new folder (`--rows first-pull` alone makes no local
copy), `first-finalize` pushes the local copy under a new prefix; `--cprofile` writes each
row's cProfile stats (FILE.<row>) and prints the top functions by cumulative time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import sidecar.engine.sync as sync_module
from sidecar.core.model import Direction
from sidecar.core.options import SyncConfig
from sidecar.engine.sync import SyncEngine
from sidecar.locals3 import LocalS3

FRESH_STATE = ("adopt-pull", "first-pull", "first-finalize")  # rows with a state of their own
_snapshots: list[tracemalloc.Snapshot] = []
_phases: list[tuple[str, float, float]] = []  # (phase, monotonic, CPU) as each began


_peak: list[tracemalloc.Snapshot] = []  # at the highest traced memory seen (every 0.5 s)


def _watch_peak(stop: threading.Event) -> None:
    """Snapshot whenever traced memory is 10% above the last snapshot's: the last one is the
    allocations alive near the traced peak (the plan-time snapshot misses the transfers)."""
    best = 0
    while not stop.wait(0.5):
        current = tracemalloc.get_traced_memory()[0]
        if current > best * 1.1:
            best = current
            _peak[:] = [tracemalloc.take_snapshot()]


_requests: dict[str, list[float]] = {}  # "METHOD kind" -> each one's seconds


def _spy_requests() -> None:
    """Every S3 request the store sends, by method (and list/copy), with its wall time."""
    from sidecar.s3.store import ObjectStore

    original = ObjectStore._exchange

    async def exchange(self: ObjectStore, method: str, key: str | None, *a: Any, **k: Any) -> Any:
        query, headers = k.get("query") or {}, k.get("headers") or {}
        kind = "LIST" if "list-type" in query else method
        kind += " copy" if "x-amz-copy-source" in headers else ""
        started = time.monotonic()
        try:
            return await original(self, method, key, *a, **k)
        finally:
            _requests.setdefault(kind, []).append(time.monotonic() - started)

    ObjectStore._exchange = exchange  # type: ignore[method-assign]


def _spy_phases() -> None:
    """When the sync enters each phase (Progress.phase), in wall and CPU seconds."""
    from sidecar.core.progress import Progress

    original = Progress.__setattr__

    def setattr_(self: Progress, name: str, value: Any) -> None:
        if name == "phase":
            _phases.append((value, time.monotonic(), time.process_time()))
        original(self, name, value)

    Progress.__setattr__ = setattr_  # type: ignore[method-assign]


def _spy_plan() -> None:
    """A snapshot when every path is decided (the planner's walk ends in `finish`)."""
    original = sync_module.finish

    def finish(*args: Any, **kwargs: Any) -> Any:
        if tracemalloc.is_tracing():
            _snapshots.append(tracemalloc.take_snapshot())
        return original(*args, **kwargs)

    sync_module.finish = finish  # type: ignore[assignment]


def _make(root: Path, count: int) -> None:
    for n in range(count):
        folder = root / f"d{n // 1000:04d}"
        if n % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"f{n:07d}.bin"
        path.write_bytes(b"%064d" % n)
        os.utime(path, (1_700_000_000, 1_700_000_000))


async def _run(config: SyncConfig, direction: Direction) -> Any:
    async with SyncEngine(config) as engine:
        return await engine.run(direction)


def _change(local: Path, count: int = 10) -> None:
    """Rewrite the first `count` files (as _make names them): same size, new bytes."""
    for n in range(count):
        path = local / f"d{n // 1000:04d}" / f"f{n:07d}.bin"
        path.write_bytes(b"%064d" % (time.time_ns() + n))


def _child(
    row: str, scratch: Path, top: int, files: int, trace: bool, cprofile: str | None
) -> None:
    """One row in this process: its own peak RSS, and the traced allocations."""
    _spy_plan()
    _spy_phases()
    _spy_requests()
    local = scratch / "local"
    state = scratch / ("state-" + row if row in FRESH_STATE else "state")
    config = SyncConfig("bench", "vol/", local, state, concurrency=32)
    direction = Direction.FINALIZE if row.endswith("finalize") else Direction.PULL
    if row == "first-pull":
        config = SyncConfig("bench", "vol/", scratch / "fresh", state, concurrency=32)
    if row == "first-finalize":  # the local tree pushed under a new prefix
        config = SyncConfig("bench", "new/", local, state, concurrency=32)
    if row == "changed-finalize":
        _change(local)
    stop = threading.Event()
    if trace:
        tracemalloc.start(1)
        threading.Thread(target=_watch_peak, args=(stop,), daemon=True).start()
    profiler = cProfile.Profile() if cprofile else None
    started, cpu = time.monotonic(), time.process_time()
    cpu_started = cpu
    if profiler is not None:
        profiler.enable()
    result = asyncio.run(_run(config, direction))
    if profiler is not None:
        profiler.disable()
    seconds, cpu = time.monotonic() - started, time.process_time() - cpu
    stop.set()
    peak = tracemalloc.get_traced_memory()[1] if trace else 0
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    traced = f", traced peak {peak / 2**20:.1f} MiB (2-3x slower)" if trace else ""
    print(f"\n== {row}: {seconds:.1f} s, CPU {cpu:.2f} s, peak RSS {rss:.0f} MiB{traced}")
    print(f"   {result.one_line()}")
    ends = [*_phases[1:], ("end", started + seconds, cpu_started + cpu)]
    steps = [
        f"{phase} {end - begin:.1f} s (CPU {cpu_end - cpu_begin:.1f})"
        for (phase, begin, cpu_begin), (_next, end, cpu_end) in zip(_phases, ends, strict=False)
    ]
    print("   phases: " + ", ".join(steps))
    asked = [f"{kind} {len(times)} ({sum(times):.1f} s)" for kind, times in _requests.items()]
    print("   requests (summed wall): " + ", ".join(asked))
    if profiler is not None and cprofile:
        profiler.dump_stats(f"{cprofile}.{row}")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)
    for when, taken in (("when the plan was made", _snapshots), ("near the traced peak", _peak)):
        if not taken:
            continue
        stats = taken[-1].statistics("lineno")
        total = sum(s.size for s in stats)
        print(f"   held {when}: {total / 2**20:.1f} MiB")
        for stat in stats[:top]:
            frame = stat.traceback[0]
            where = f"{Path(frame.filename).name}:{frame.lineno}"
            print(f"   {stat.size / 2**20:7.1f} MiB {stat.size / files:6.0f} B/file  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--rows", default="noop-pull,noop-finalize")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--no-trace", action="store_true", help="RSS and time only")
    parser.add_argument("--cprofile", help="write each row's cProfile stats to FILE.<row>")
    parser.add_argument("--dir", default="/dev/shm", help="where the scratch trees go (tmpfs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        trace = not args.no_trace
        _child(args.child, Path(args.scratch), args.top, args.files, trace, args.cprofile)
        return
    scratch = Path(tempfile.mkdtemp(prefix="profile-scale-", dir=args.dir))
    try:
        _make(scratch / "s3" / "bench" / "vol", args.files)
        rows = args.rows.split(",")
        if rows != ["first-pull"]:  # the others sync the local copy (1 M files: ~4 GiB each)
            shutil.copytree(scratch / "s3" / "bench" / "vol", scratch / "local")
        with LocalS3(scratch / "s3") as server:
            env = dict(os.environ, **server.env())
            env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = "/dev/null"
            child = [sys.executable, "-m", "tests.bench.profile_scale", "--scratch", str(scratch)]
            child += ["--files", str(args.files), "--top", str(args.top)]
            child += ["--no-trace"] if args.no_trace else []
            child += ["--cprofile", args.cprofile] if args.cprofile else []
            if any(row.startswith(("noop", "changed")) for row in rows):  # BASE for these
                subprocess.run([*child, "--child", "setup", "--no-trace"], env=env, check=True)
            for row in rows:
                subprocess.run([*child, "--child", row], env=env, check=True)
                for leftover in ("fresh", *(f"state-{row}" for row in FRESH_STATE)):
                    shutil.rmtree(scratch / leftover, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
