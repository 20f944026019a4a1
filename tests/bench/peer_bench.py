"""Peer benchmark: `sidecar pull/finalize --once` against s5cmd, rclone and aws cli.

    python -m tests.bench.peer_bench [--workloads LARGE,SMALL,NOOP,SCALE,FIRST] [--runs 3]
                                     [--tools sidecar,s5cmd,rclone,aws] [--json out.json]

One `rclone serve s3` (or `--server seaweed`, for the scale rows: servers.py) on loopback
serves every run; its data and all generated data live on tmpfs (/dev/shm): on this
machine's ext4 /tmp, creating and deleting thousands of files varies several-fold between
runs and drowns the signal. The workspace is removed at exit, also on an error or a TERM.

Per workload and direction (pull = bucket -> local folder, push = local folder -> bucket):
1. the data set is generated once (random content, whole-second mtimes) and, for pulls, seeded
   into a bucket by writing the server's folder directly (no tool is favoured by having written
   it; objects carry no user metadata, like objects from any other S3 client);
2. re-sync rows (NOOP, SCALE) first give each tool a warm destination: a copy of the data with
   the same mtimes, then one untimed sync by that tool (its own verb; the sidecar records BASE
   in a state dir it keeps for the timed runs);
3. one untimed counting run per tool through a counting proxy (see countproxy.py): the request
   counts in the table come from it. It also warms the server (rclone computes ETags lazily);
4. `--runs` timed runs, straight to the server, interleaved tool by tool (run 1 of every tool,
   then run 2, ...; the starting tool rotates so no tool always follows the same neighbour).
   Copy rows get a fresh, empty destination each run (a new folder, or a new prefix), deleted
   right after; every destination is checked (file count and bytes) after every run.

Wall time is measured around the whole process (start-up included: that is what a Job or a
pod start waits for). "CPU s" is the tool's user + system time (median): on a shared 2-core
machine it is far steadier than wall time, and it is what a per-request cost shows up in.
Peak RSS: see measure.py. MB/s = data-set bytes (10^6) / median wall. "vs best" on the
sidecar's row is its median wall / the best peer's (< 1: sidecar faster). The JSON also holds
every run's wall, CPU, RSS and the 1-minute load average as the run started: other work on the
machine shows up there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.bench.countproxy import LISTING_OPS, CountingProxy
from tests.bench.delayproxy import DEFAULT_WINDOW, DelayProxy
from tests.bench.measure import Measurement, run_measured
from tests.bench.peers import TOOL_NAMES, VARIANTS, Job, Mode, Server, Tool, label, make_tools
from tests.bench.servers import SERVERS, client_of, make_server
from tests.bench.workloads import (
    DataSet,
    KiB,
    MiB,
    check_tree,
    copy_tree,
    generate,
    remove,
)

PREFIX = "vol"  # every volume lives under s3://BUCKET/vol, as a sidecar volume would
PUSH_BUCKET = "push"
WORKLOADS = ("LARGE", "SMALL", "NOOP", "SCALE")
# Opt-in (never in the default run): FIRST-N, a first pull/push of the SCALE-N data set into
# an empty destination (issue 12's "first pull of 200,000 tiny files", with peak RSS);
# MEDIUM, a few mid-sized files; DAEMON, `curl -X POST .../pull|finalize` against a running
# `sidecar serve` (see daemon_bench.py).
OPT_IN_WORKLOADS = ("FIRST", "MEDIUM", "DAEMON", "CHANGED")
# CHANGED-N (opt-in, push only): the warm SCALE-N tree with CHANGED_FILES files rewritten
# before each timed run (same size, new bytes, mtime now): a finalize must move exactly those.
CHANGED_FILES = 10
# `--profile wan` (issue 16): every tool at its defaults and tuned, through the delay proxy at
# each round trip, on the data sets; the daemon rows on loopback and on each RTT.
WAN_PROFILE = {
    "workloads": ["SMALL", "NOOP", "MEDIUM", "LARGE", "DAEMON"],
    "rtt_ms": [20.0, 80.0],
    "variants": ["default", "tuned"],
    "small_files": 2000,
}
PAGE = 4096  # tmpfs stores even a 1-byte file in a whole page
# Peak RSS per file of a peer's re-sync, measured at 200,000 files on SeaweedFS: s5cmd `sync`
# lists both sides whole and sorts them in memory (2.0-3.7 GiB over two runs, up to 19.2 KiB a
# file). A tool whose projected peak exceeds --peer-memory is left out of that row with a
# printed reason: at 1,000,000 files s5cmd `sync` would hold ~19 GiB of a shared 24 GiB machine.
SYNC_BYTES_PER_FILE = {"s5cmd": 20 * KiB}
PEER_MEMORY = 4 << 30


@dataclass(frozen=True)
class Sizes:
    large_files: int = 4
    large_size: int = 256 * MiB
    small_files: int = 5000
    small_size: int = 16 * KiB
    medium_files: int = 2
    medium_size: int = 128 * MiB
    scale_counts: tuple[int, ...] = (1000, 10000, 50000)
    scale_size: int = 64


@dataclass(frozen=True)
class Scenario:
    """One table group: a workload in one direction, every tool."""

    workload: str
    dataset: DataSet
    direction: str  # "pull" or "push"
    mode: Mode

    @property
    def key(self) -> str:
        return f"{self.workload}-{self.direction}".lower()


@dataclass
class Row:
    workload: str
    direction: str
    tool: str  # label: the name, and the variant unless it is "bench"
    files: int
    bytes: int  # data-set bytes a copy moves; 0 for re-sync rows
    rtt_ms: float = 0.0  # 0: straight to the server (loopback); else through the delay proxy
    walls: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)  # user + system of the tool
    rss_kib: list[int] = field(default_factory=list)
    load_1min: list[float] = field(default_factory=list)  # machine load as each run started
    proxy_cpu_s: list[float] = field(default_factory=list)  # the delay proxy's CPU in each run
    errors: list[str] = field(default_factory=list)
    requests: dict[str, int] | None = None
    median_s: float | None = None
    median_cpu_s: float | None = None
    median_proxy_cpu_s: float | None = None
    median_load: float | None = None
    mb_per_s: float | None = None
    peak_rss_mib: float | None = None
    total_requests: int | None = None
    object_requests: int | None = None
    vs_best_peer: float | None = None
    best_peer: str | None = None


def plan(workloads: list[str], directions: list[str], sizes: Sizes) -> list[Scenario]:
    large = DataSet("large", sizes.large_files, sizes.large_size)
    medium = DataSet("medium", sizes.medium_files, sizes.medium_size)
    small = DataSet("small", sizes.small_files, sizes.small_size, per_dir=50)
    fixed: dict[str, tuple[DataSet, Mode]] = {
        "LARGE": (large, "copy"),
        "MEDIUM": (medium, "copy"),
        "SMALL": (small, "copy"),
        "NOOP": (small, "sync"),
        "DAEMON": (small, "daemon"),
    }
    # One row per --scale-counts count, each on its own data set.
    scaled: dict[str, Mode] = {"SCALE": "sync", "CHANGED": "sync", "FIRST": "copy"}
    rows: list[tuple[str, DataSet, Mode, list[str]]] = []
    for spec in workloads:
        # NAME:DIRECTION runs one direction of that workload only (e.g. FIRST:pull)
        workload, _, only = spec.partition(":")
        ways = [only.lower()] if only else directions
        if workload in fixed:
            rows.append((workload, *fixed[workload], ways))
        elif workload in scaled:
            for count in sizes.scale_counts:
                dataset = DataSet(f"scale{count}", count, sizes.scale_size, per_dir=100)
                rows.append((f"{workload}-{count}", dataset, scaled[workload], ways))
        else:
            names = ", ".join(WORKLOADS + OPT_IN_WORKLOADS)
            raise ValueError(f"unknown workload {workload}; choose from {names}")
    # CHANGED rewrites files of the shared source tree (and, on SeaweedFS, the peers push them
    # into the shared source bucket): after every other row of its data set, and each data
    # set's rows together, so that its files are freed before the next one's are made.
    rows.sort(
        key=lambda row: (
            row[1].files if row[1].name.startswith("scale") else 0,
            row[0].startswith("CHANGED"),
        )
    )
    return [
        Scenario(name, dataset, direction, mode)
        for name, dataset, mode, ways in rows
        # the daemon scenario measures both ways on one daemon
        for direction in (ways if mode != "daemon" else ["pull+push"])
        if not (name.startswith("CHANGED") and direction != "push")
    ]


def memory_skip(tool: Tool, scenario: Scenario, budget: int) -> str | None:
    """Why the tool is left out of the scenario's row (its projected peak RSS exceeds the
    budget), or None."""
    per_file = SYNC_BYTES_PER_FILE.get(tool.name)
    if per_file is None or scenario.mode != "sync":
        return None
    projected = per_file * scenario.dataset.files
    if projected <= budget:
        return None
    return (
        f"{label(tool)} left out of {scenario.workload} {scenario.direction}: `sync` would hold "
        f"~{projected / 2**30:.1f} GiB ({per_file // KiB} KiB a file, measured at 200,000), "
        f"over --peer-memory {budget / 2**30:.1f} GiB"
    )


def tmpfs_bytes(dataset: DataSet) -> int:
    return dataset.files * (-(-dataset.size // PAGE) * PAGE + PAGE)  # data pages + inode, dirs


def peak_space(scenarios: list[Scenario], tools: int, shared: bool = False) -> int:
    """A generous bound on the tmpfs bytes the plan holds at once."""
    worst = 0
    for scenario in scenarios:
        if shared:
            # source + (copy pull: one destination); SeaweedFS keeps ~1 KiB an object
            copies = 1 + (scenario.mode == "copy" and scenario.direction == "pull")
            stored = scenario.dataset.total_bytes + 1024 * scenario.dataset.files
            worst = max(worst, copies * tmpfs_bytes(scenario.dataset) + 2 * stored)
            continue
        # source + its bucket copy + (copy: one destination | sync: one warm copy per tool)
        copies = 2 + (1 if scenario.mode == "copy" else tools)
        worst = max(worst, copies * tmpfs_bytes(scenario.dataset))
    return worst


@dataclass(frozen=True)
class Link:
    """What lies between the tools and the server in timed runs."""

    rtt_ms: list[float] = field(default_factory=lambda: [0.0])  # 0: nothing (loopback)
    window: int = DEFAULT_WINDOW
    bandwidth: float | None = None  # bytes per second per direction


class Bench:
    """Owns the workspace, the server and the proxies for one benchmark run."""

    def __init__(
        self,
        workspace: Path,
        tools: list[Tool],
        runs: int,
        count: bool,
        timeout: float,
        link: Link | None = None,
        server: str = "rclone",
        peer_memory: int = PEER_MEMORY,
    ):
        self.ws = workspace
        self.peer_memory = peer_memory
        self.tools = tools
        self.runs = runs
        self.count = count
        self.timeout = timeout
        self.link = link or Link()
        self.server = make_server(server, workspace)
        # SeaweedFS is seeded through S3 (minutes for a million objects), not by copying
        # files: every tool's warm destination is the source bucket or the source tree.
        # Only CHANGED writes there, and only the sidecar keeps state (BASE) that another
        # tool's write would turn into a conflict: it runs first, and with more than one
        # run it pushes into a bucket of its own (see push_bucket).
        self.shared = self.server.kind == "seaweed"
        if self.shared:
            self.tools = sorted(tools, key=lambda tool: not keeps_state(tool))
        self.proxy: CountingProxy | None = None
        self.wan: DelayProxy | None = None
        self.sources: dict[str, Path] = {}
        self.seeded: set[str] = set()
        self.base_env = clean_env()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, scenarios: list[Scenario]) -> None:
        self.server.start(self.bucket_names(scenarios))
        if self.count:
            self.proxy = CountingProxy("127.0.0.1", self.server.port).start()
        if any(self.link.rtt_ms):
            self.wan = DelayProxy(
                "127.0.0.1",
                self.server.port,
                window=self.link.window,
                bandwidth=self.link.bandwidth,
            ).start()

    def stop(self) -> None:
        for proxy in (self.proxy, self.wan):
            if proxy is not None:
                proxy.stop()
        self.server.stop()

    def bucket_names(self, scenarios: list[Scenario]) -> list[str]:
        names = {PUSH_BUCKET}
        for scenario in scenarios:
            if scenario.mode == "daemon":
                names.add(DAEMON_BUCKET)
                continue
            names.add(source_bucket(scenario.dataset))
            if scenario.mode == "sync" and scenario.direction == "push":
                names.update(self.push_bucket(scenario, tool) for tool in self.tools)
        return sorted(names)

    def push_bucket(self, scenario: Scenario, tool: Tool) -> str:
        """The bucket a tool's re-sync push (SCALE, CHANGED) goes to."""
        if not self.shared:
            return warm_bucket(scenario, label(tool))
        # With one run each, the one sidecar's finalize comes before any peer's write.
        alone = sum(map(keeps_state, self.tools)) == 1
        if not keeps_state(tool) or (alone and (self.runs == 1 or len(self.tools) == 1)):
            return source_bucket(scenario.dataset)
        return f"own-{scenario.dataset.name}-{label(tool)}"

    def direct(self) -> Server:
        return self.server.server()

    def via_proxy(self) -> Server:
        assert self.proxy is not None
        direct = self.direct()
        return Server(self.proxy.endpoint, direct.access_key, direct.secret_key)

    def over_link(self, rtt_ms: float) -> Server:
        """Where timed runs go: the server, or the delay proxy set to this round trip."""
        if not rtt_ms:
            return self.direct()
        assert self.wan is not None
        self.wan.rtt = rtt_ms / 1000
        direct = self.direct()
        return Server(self.wan.endpoint, direct.access_key, direct.secret_key)

    def proxy_cpu(self) -> float:
        return self.wan.cpu_seconds() if self.wan is not None else 0.0

    # -- data --------------------------------------------------------------------------------

    def source(self, dataset: DataSet) -> Path:
        if dataset.name not in self.sources:
            path = self.ws / "src" / dataset.name
            started = time.perf_counter()
            generate(dataset, path)
            log(f"generated {dataset.name}: {dataset.files} files in {since(started)}")
            self.sources[dataset.name] = path
        return self.sources[dataset.name]

    def seed(self, dataset: DataSet) -> str:
        """The bucket holding the data set under PREFIX (see servers.py for how)."""
        return self.fill(dataset, source_bucket(dataset), align_mtimes=True)

    def fill(self, dataset: DataSet, bucket: str, align_mtimes: bool = False) -> str:
        if bucket not in self.seeded:
            started = time.perf_counter()
            self.server.fill(self.source(dataset), bucket, PREFIX, align_mtimes)
            self.seeded.add(bucket)
            log(f"seeded {bucket}: {dataset.files} objects in {since(started)}")
        return bucket

    def drop(self, dataset: DataSet) -> None:
        """Free tmpfs once no later scenario needs this data set."""
        if dataset.name in self.sources:
            remove(self.sources.pop(dataset.name))
        for warm in (self.ws / "warm").glob(f"{dataset.name}-*"):
            remove(warm)
        if self.shared:
            # SeaweedFS keeps ~1 KiB an object and deletes one at a time (200,000 took
            # minutes): its data goes with the workspace at exit.
            return
        for bucket in sorted(self.seeded):
            if bucket == source_bucket(dataset) or bucket.startswith(f"own-{dataset.name}-"):
                self.server.remove(bucket, PREFIX)
                self.seeded.discard(bucket)

    # -- one scenario ------------------------------------------------------------------------

    def tools_for(self, scenario: Scenario) -> list[Tool]:
        """The tools that run the scenario: those whose memory the machine can hold."""
        kept = []
        for tool in self.tools:
            reason = memory_skip(tool, scenario, self.peer_memory)
            if reason:
                log(reason)
            else:
                kept.append(tool)
        return kept

    def run_scenario(self, scenario: Scenario) -> list[Row]:
        if scenario.mode == "daemon":
            from tests.bench.daemon_bench import run_daemon  # only this scenario needs it

            return run_daemon(self, scenario)
        dataset = scenario.dataset
        tools = self.tools_for(scenario)
        rows = {
            (rtt, label(tool)): new_row(scenario, label(tool), rtt)
            for rtt in self.link.rtt_ms
            for tool in tools
        }
        warm: dict[str, Job] = {}
        try:
            if scenario.mode == "sync":
                # Stateless tools first: in a shared warm folder the sidecar's BASE then
                # sees the files as they stay.
                ordered = sorted(tools, key=keeps_state)
                warm = {label(tool): self.warm_up(scenario, tool) for tool in ordered}
            if self.proxy is not None:
                for tool in tools:
                    requests = self.count_requests(scenario, tool, warm)
                    for rtt in self.link.rtt_ms:
                        rows[rtt, label(tool)].requests = requests
            for rtt in self.link.rtt_ms:
                for run in range(self.runs):
                    for tool in rotated(tools, run):
                        self.timed_run(scenario, tool, run, warm, rows[rtt, label(tool)])
        finally:
            for tool_name in warm:
                self.remove_warm(scenario, tool_name)
        log(f"done {scenario.workload} {scenario.direction} ({dataset.files} files)")
        return list(rows.values())

    def job(self, scenario: Scenario, tool: Tool, tag: str, warm: dict[str, Job]) -> Job:
        """The warm job of a re-sync row, else a fresh, empty destination named by tag."""
        if scenario.mode == "sync":
            return warm[label(tool)]
        scratch = self.ws / "run" / f"{scenario.key}-{label(tool)}-{tag}"
        if scenario.direction == "pull":
            bucket = self.seed(scenario.dataset)
            return Job("pull", "copy", bucket, PREFIX, scratch / "dst", scratch / "state")
        prefix = f"{scenario.key}-{label(tool)}-{tag}"
        local = self.source(scenario.dataset)
        return Job("push", "copy", PUSH_BUCKET, prefix, local, scratch / "state")

    def check(self, job: Job, dataset: DataSet, changed_at: float | None = None) -> str | None:
        """None if the job's destination holds exactly the data set's count and bytes, and,
        for a CHANGED run started at changed_at, the objects written since are exactly the
        changed files, with their new bytes."""
        if job.direction == "pull":
            return check_tree(job.local, dataset)
        objects = self.server.objects(job.bucket, job.prefix)
        where = f"s3://{job.bucket}/{job.prefix}"
        total = sum(size for _key, size, _modified in objects)
        if (len(objects), total) != (dataset.files, dataset.total_bytes):
            return (
                f"{where}: {len(objects)} objects / {total} bytes, "
                f"expected {dataset.files} / {dataset.total_bytes}"
            )
        if changed_at is None:
            return None
        # LastModified has whole seconds: anything written in the run's first second counts
        written = {key for key, _size, modified in objects if modified >= int(changed_at)}
        expected = set(dataset.paths()[:CHANGED_FILES])
        if written != expected:
            return (
                f"{where}: {len(written)} objects written during the run, expected exactly "
                f"the {len(expected)} changed (not changed: {sorted(written - expected)[:3]}, "
                f"missed: {sorted(expected - written)[:3]})"
            )
        client = client_of(self.direct())
        for key in sorted(expected):
            body = client.get_object(Bucket=job.bucket, Key=f"{job.prefix}/{key}")["Body"].read()
            if body != (job.local / key).read_bytes():
                return f"{where}/{key}: not the changed file's bytes"
        return None

    def cleanup(self, scenario: Scenario, job: Job) -> None:
        if scenario.mode == "sync":
            return
        remove(job.state_dir.parent)
        if job.direction == "push" and not self.shared:  # fresh prefixes: see drop()
            self.server.remove(job.bucket, job.prefix)

    def warm_up(self, scenario: Scenario, tool: Tool) -> Job:
        dataset = scenario.dataset
        state = self.ws / "warm" / f"{scenario.key}-{label(tool)}" / "state"
        if self.shared:
            # One destination per data set: one warm-up (and one BASE) per tool serves every
            # row of it (at a million files a sidecar's first sync takes minutes).
            bucket = self.push_bucket(scenario, tool)
            state = self.ws / "warm" / f"{dataset.name}-{label(tool)}-{bucket}" / "state"
        warmed = state.parent.exists()
        state.parent.mkdir(parents=True, exist_ok=True)
        if scenario.direction == "pull":
            bucket = self.seed(dataset)  # first: seeding may set the source tree's mtimes
            local = self.source(dataset) if self.shared else state.parent / "dst"
            if not self.shared:
                copy_tree(self.source(dataset), local)
            job = Job("pull", "sync", bucket, PREFIX, local, state)
        else:
            bucket = self.push_bucket(scenario, tool)
            if bucket == source_bucket(dataset):
                self.seed(dataset)
            else:
                self.fill(dataset, bucket)
            job = Job("push", "sync", bucket, PREFIX, self.source(dataset), state)
        if warmed:
            return job
        result = self.execute(tool, job, self.direct(), "warm-up")
        if not result.ok:
            raise BenchError(
                f"{label(tool)} warm-up for {scenario.key} failed: {result.output_tail}"
            )
        return job

    def remove_warm(self, scenario: Scenario, tool_name: str) -> None:
        if self.shared:
            return  # kept for the data set's next rows; drop() ends them
        remove(self.ws / "warm" / f"{scenario.key}-{tool_name}")
        if scenario.direction == "push":
            bucket = warm_bucket(scenario, tool_name)
            self.server.remove(bucket, PREFIX)
            self.seeded.discard(bucket)

    def count_requests(
        self, scenario: Scenario, tool: Tool, warm: dict[str, Job]
    ) -> dict[str, int] | None:
        assert self.proxy is not None
        job = self.job(scenario, tool, "count", warm)
        self.proxy.reset()
        try:
            result = self.execute(tool, job, self.via_proxy(), "count")
            counts = self.proxy.counts()
            problem = None if result.ok else result.output_tail
            problem = problem or self.check(job, scenario.dataset)
        finally:
            self.cleanup(scenario, job)
        if problem:
            log(f"  {label(tool)}: counting run failed: {problem}")
            return None
        return dict(counts.most_common())

    def timed_run(
        self, scenario: Scenario, tool: Tool, run: int, warm: dict[str, Job], row: Row
    ) -> None:
        # A tag of its own per RTT too: a push prefix is deleted on disk after its run, and
        # the server's listing cache would keep a re-used one's folder "existing".
        tag = f"r{run}" if not row.rtt_ms else f"{row.rtt_ms:g}ms-r{run}"
        job = self.job(scenario, tool, tag, warm)
        server = self.over_link(row.rtt_ms)
        changed_at = None
        if scenario.workload.startswith("CHANGED"):
            change_files(job.local, scenario.dataset, f"{label(tool)} {tag}")
            changed_at = time.time()
        load = os.getloadavg()[0]
        proxy_cpu = self.proxy_cpu()
        try:
            result = self.execute(tool, job, server, tag)
            proxy_cpu = self.proxy_cpu() - proxy_cpu
            problem = None if result.ok else f"exit {result.returncode}: {result.output_tail}"
            problem = problem or self.check(job, scenario.dataset, changed_at)
        finally:
            self.cleanup(scenario, job)
        if problem:
            row.errors.append(problem)
            log(f"  {label(tool)} run {run + 1}: FAILED: {problem[-500:]}")
            return
        row.walls.append(result.wall_s)
        row.cpu_s.append(result.cpu_s)
        row.rss_kib.append(result.max_rss_kib)
        row.load_1min.append(load)
        if row.rtt_ms:
            row.proxy_cpu_s.append(proxy_cpu)
        log(
            f"  {scenario.workload:>11} {scenario.direction} {row.rtt_ms:3.0f}ms "
            f"{label(tool):<15} run {run + 1}: {result.wall_s:7.2f} s  cpu {result.cpu_s:6.2f} s"
            f"  proxy {proxy_cpu:5.2f} s  {result.max_rss_kib / 1024:4.0f} MiB  (load {load:.1f})"
        )

    def execute(self, tool: Tool, job: Job, server: Server, tag: str) -> Measurement:
        argv, extra = tool.command(job, server)
        env = self.base_env | extra
        logs = self.ws / "logs"
        logs.mkdir(exist_ok=True)
        log_path = logs / f"{label(tool)}-{job.direction}-{tag}.log"
        return run_measured(argv, env, log_path, self.timeout)


def change_files(root: Path, dataset: DataSet, why: str) -> None:
    """Rewrite the first CHANGED_FILES files of the data set under root: the same size, bytes
    no earlier run wrote, mtime now (a tool comparing mtimes with LastModified must see them
    as newer than its last upload)."""
    now = time.time() + 1
    for relative in dataset.paths()[:CHANGED_FILES]:
        path = root / relative
        seed = f"{why} {now} {relative} ".encode()
        path.write_bytes((seed * (dataset.size // len(seed) + 1))[: dataset.size])
        os.utime(path, (now, now))


class BenchError(RuntimeError):
    pass


def new_row(scenario: Scenario, tool: str, rtt_ms: float = 0.0) -> Row:
    moved = scenario.dataset.total_bytes if scenario.mode == "copy" else 0
    return Row(scenario.workload, scenario.direction, tool, scenario.dataset.files, moved, rtt_ms)


DAEMON_BUCKET = "daemon"


def source_bucket(dataset: DataSet) -> str:
    return f"src-{dataset.name}"


def warm_bucket(scenario: Scenario, tool: str) -> str:
    # CHANGED-N has buckets of its own: SCALE-N's are emptied on disk after its row, and the
    # server's folder cache then shows a stale view of them to the next row that fills them.
    kind = "changed-" if scenario.workload.startswith("CHANGED") else ""
    return f"warm-{kind}{scenario.dataset.name}-{tool}"


def keeps_state(tool: Tool) -> bool:
    """The sidecar keeps BASE between runs; the peers compare the two sides afresh."""
    return tool.name == "sidecar"


def rotated(tools: list[Tool], run: int) -> list[Tool]:
    shift = run % len(tools)
    return tools[shift:] + tools[:shift]


def clean_env() -> dict[str, str]:
    """The caller's environment without any S3 or tool settings that could leak in."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("AWS_", "RCLONE_", "SIDECAR_", "S3_"))
    }
    env["AWS_CONFIG_FILE"] = "/dev/null"
    env["AWS_SHARED_CREDENTIALS_FILE"] = "/dev/null"
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return env


# -- results ---------------------------------------------------------------------------------


def summarise(rows: list[Row]) -> None:
    for row in rows:
        if row.walls:
            row.median_s = statistics.median(row.walls)
            row.median_cpu_s = statistics.median(row.cpu_s)
            row.peak_rss_mib = max(row.rss_kib) / 1024 if row.rss_kib else None
            row.median_load = statistics.median(row.load_1min) if row.load_1min else None
            if row.proxy_cpu_s:
                row.median_proxy_cpu_s = statistics.median(row.proxy_cpu_s)
            if row.bytes:
                row.mb_per_s = row.bytes / 1e6 / row.median_s
        if row.requests is not None:
            row.total_requests = sum(row.requests.values())
            row.object_requests = sum(n for op, n in row.requests.items() if op not in LISTING_OPS)
    best: dict[tuple[float, str, str], Row] = {}
    for row in rows:
        if not is_sidecar(row) and row.median_s is not None:
            key = (row.rtt_ms, row.workload, row.direction)
            if key not in best or row.median_s < (best[key].median_s or 0.0):
                best[key] = row
    for row in rows:
        workload = DAEMON_PEER_ROW.get(row.workload, row.workload)
        peer = best.get((row.rtt_ms, workload, row.direction))
        if is_sidecar(row) and peer is not None and row.median_s is not None:
            row.vs_best_peer = row.median_s / (peer.median_s or 1.0)
            row.best_peer = peer.tool if workload == row.workload else f"{peer.tool} {workload}"


# The daemon's rows answer the question these one-shot rows answer (daemon_bench.py).
DAEMON_PEER_ROW = {"DAEMON-START": "SMALL", "DAEMON-NOOP": "NOOP", "DAEMON-1": "NOOP"}


def is_sidecar(row: Row) -> bool:
    return row.tool.split("-")[0] == "sidecar"


def groups(rows: list[Row]) -> Iterator[list[Row]]:
    seen: dict[tuple[float, str, str], list[Row]] = {}
    for row in rows:
        seen.setdefault((row.rtt_ms, row.workload, row.direction), []).append(row)
    yield from seen.values()


OP_SHORT = {
    "ListObjectsV2": "LIST",
    "ListObjects": "LIST1",
    "GetObject": "GET",
    "HeadObject": "HEAD",
    "PutObject": "PUT",
    "UploadPart": "PART",
    "CreateMultipartUpload": "MPU",
    "CompleteMultipartUpload": "DONE",
    "HeadBucket": "HEADB",
    "GetBucketLocation": "LOC",
    "ListBuckets": "BUCKETS",
    "DeleteObject": "DEL",
    "DeleteObjects": "DELS",
    "CopyObject": "COPY",
}

COLUMNS = (
    ("workload", 11),
    ("dir", 9),
    ("RTT ms", 6),
    ("tool", 15),
    ("median s", 8),
    ("CPU s", 6),
    ("proxy CPU", 9),
    ("MB/s", 7),
    ("RSS MiB", 7),
    ("load", 4),
    ("requests", 8),
    ("per-obj", 7),
    ("vs best", 30),
    ("requests by operation", 0),
)


def format_table(rows: list[Row]) -> str:
    header = "  ".join(f"{name:>{width}}" if width else name for name, width in COLUMNS)
    lines = [header, "-" * (len(header) + 20)]
    for row in rows:
        cells = [
            row.workload,
            row.direction,
            f"{row.rtt_ms:g}" if row.rtt_ms else "lo",
            row.tool,
            fmt(
                row.median_s,
                "{:.2f}" if row.median_s and row.median_s >= 0.1 else "{:.3f}",
                "FAIL" if row.errors else "-",
            ),
            fmt(row.median_cpu_s, "{:.2f}"),
            fmt(row.median_proxy_cpu_s, "{:.2f}"),
            fmt(row.mb_per_s, "{:.0f}"),
            fmt(row.peak_rss_mib, "{:.0f}"),
            fmt(row.median_load, "{:.1f}"),
            fmt(row.total_requests, "{:d}"),
            fmt(row.object_requests, "{:d}"),
            f"{row.vs_best_peer:.2f} ({row.best_peer})" if row.vs_best_peer else "",
            ops_text(row.requests),
        ]
        lines.append(
            "  ".join(f"{c:>{w}}" if w else c for c, (_, w) in zip(cells, COLUMNS, strict=True))
        )
    return "\n".join(lines)


def fmt(value: float | int | None, pattern: str, missing: str = "-") -> str:
    return missing if value is None else pattern.format(value)


def ops_text(requests: dict[str, int] | None) -> str:
    if requests is None:
        return "-"
    return " ".join(f"{OP_SHORT.get(op, op)}={n}" for op, n in requests.items())


def machine() -> dict[str, object]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": tool_versions(),
    }


def tool_versions() -> dict[str, str]:
    from tests.bench.peers import executable, s5cmd_binary

    commands = {
        "rclone": [executable("rclone"), "version"],
        "s5cmd": [s5cmd_binary(), "version"],
        "aws": [executable("aws"), "--version"],
        "sidecar": ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
    }
    versions = {}
    for name, argv in commands.items():
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            versions[name] = (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            versions[name] = "?"
    return versions


def write_json(path: Path, rows: list[Row], settings: dict[str, object]) -> None:
    payload = {
        "machine": machine(),
        "settings": settings,
        "columns": [name for name, _ in COLUMNS],
        "rows": [asdict(row) for row in rows],
    }
    # default=str: settings hold paths (--wait-for, --sidecar-exe), written as text
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


# -- command line ----------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def since(started: float) -> str:
    return f"{time.perf_counter() - started:.1f} s"


def parse_size(text: str) -> int:
    units = {"k": KiB, "m": MiB, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.peer_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--profile",
        choices=["loopback", "wan"],
        default="loopback",
        help="wan: the issue-16 WAN profile (defaults for the next four flags, and 2,000 "
        "SMALL files); flags given explicitly still win",
    )
    parser.add_argument(
        "--server",
        choices=SERVERS,
        default="rclone",
        help="seaweed: SeaweedFS, for the scale rows (servers.py says why)",
    )
    parser.add_argument("--workloads", type=comma_list, default=None)
    parser.add_argument("--directions", type=comma_list, default=["pull", "push"])
    parser.add_argument("--tools", type=comma_list, default=list(TOOL_NAMES))
    parser.add_argument(
        "--variants",
        type=comma_list,
        default=None,
        help=f"tool settings to run, of {', '.join(VARIANTS)} (see peers.py); default bench",
    )
    parser.add_argument(
        "--rtt-ms",
        type=lambda t: [float(n) for n in comma_list(t)],
        default=None,
        help="round trips to run every row at, through the delay proxy (0: straight)",
    )
    parser.add_argument(
        "--window", type=parse_size, default=DEFAULT_WINDOW, help="TCP window of the link"
    )
    parser.add_argument(
        "--bandwidth", type=parse_size, default=None, help="bytes/s per direction, e.g. 100MB"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the table (and every run) as JSON here")
    parser.add_argument("--no-count", action="store_true", help="skip the request-counting runs")
    parser.add_argument("--sidecar-args", default="", help="extra sidecar flags, one string")
    parser.add_argument(
        "--sidecar-exe",
        help="the `sidecar` to run (default: this venv's), e.g. another checkout's venv, "
        "to compare two versions on one seeded server",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per tool run")
    parser.add_argument(
        "--peer-memory",
        type=parse_size,
        default=PEER_MEMORY,
        help="leave a peer out of a re-sync row whose projected peak RSS exceeds this "
        "(s5cmd `sync` at 1,000,000 files: ~19 GiB); default 4GiB",
    )
    parser.add_argument("--workdir", type=Path, default=default_workdir())
    parser.add_argument("--keep", action="store_true", help="keep the workspace (logs) at exit")
    parser.add_argument(
        "--wait-for", type=Path, help="seed first, then start the rows once this path exists"
    )
    sizes = Sizes()
    parser.add_argument("--large-files", type=int, default=sizes.large_files)
    parser.add_argument("--large-size", type=parse_size, default=sizes.large_size)
    parser.add_argument("--medium-files", type=int, default=sizes.medium_files)
    parser.add_argument("--medium-size", type=parse_size, default=sizes.medium_size)
    parser.add_argument("--small-files", type=int, default=None)
    parser.add_argument("--small-size", type=parse_size, default=sizes.small_size)
    parser.add_argument(
        "--scale-counts",
        type=lambda t: tuple(int(n) for n in comma_list(t)),
        default=sizes.scale_counts,
    )
    parser.add_argument("--scale-size", type=parse_size, default=sizes.scale_size)
    args = parser.parse_args(argv)
    profile = WAN_PROFILE if args.profile == "wan" else {}
    defaults = {
        "workloads": list(WORKLOADS),
        "rtt_ms": [0.0],
        "variants": ["bench"],
        "small_files": sizes.small_files,
    }
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, profile.get(name, default))
    return args


def default_workdir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def compile_sidecar() -> None:
    """Byte-compile the sidecar as an install does (pip, and the container image's build).

    In an editable checkout with PYTHONDONTWRITEBYTECODE set (as on this machine) every run
    would otherwise compile the package's sources again: ~50 ms per run that no installed
    copy pays, and the no-op rows take ~0.3 s in all.
    """
    import compileall

    import sidecar

    compileall.compile_dir(str(Path(sidecar.__file__).parent), quiet=1)


def main(argv: list[str] | None = None) -> int:
    # A TERM (a timeout, a stopped job) unwinds like an error: the server stops and the
    # workspace on tmpfs (gigabytes at scale) is removed.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    args = parse_args(argv)
    sizes = Sizes(
        args.large_files,
        args.large_size,
        args.small_files,
        args.small_size,
        args.medium_files,
        args.medium_size,
        args.scale_counts,
        args.scale_size,
    )
    scenarios = plan([w.upper() for w in args.workloads], args.directions, sizes)
    compile_sidecar()
    workspace = Path(tempfile.mkdtemp(prefix="netvol-bench-", dir=args.workdir))
    try:
        tools = make_tools(
            args.tools,
            workspace,
            shlex.split(args.sidecar_args),
            tuple(args.variants),
            args.sidecar_exe,
        )
        check_space(workspace, peak_space(scenarios, len(tools), args.server == "seaweed"))
        rows = run_all(workspace, tools, scenarios, args)
    finally:
        if args.keep:
            log(f"workspace kept: {workspace}")
        else:
            shutil.rmtree(workspace, ignore_errors=True)
    summarise(rows)
    print(format_table(rows), flush=True)
    if args.json:
        settings = {**vars(args), "json": str(args.json), "workdir": str(args.workdir)}
        write_json(args.json, rows, settings)
    return 1 if any(row.median_s is None for row in rows) else 0


def run_all(
    workspace: Path, tools: list[Tool], scenarios: list[Scenario], args: argparse.Namespace
) -> list[Row]:
    link = Link(args.rtt_ms, args.window, args.bandwidth)
    bench = Bench(
        workspace,
        tools,
        args.runs,
        not args.no_count,
        args.timeout,
        link,
        args.server,
        args.peer_memory,
    )
    rows: list[Row] = []
    try:
        bench.start(scenarios)
        if args.wait_for:
            wait_for(bench, scenarios, args.wait_for)
        for index, scenario in enumerate(scenarios):
            rows.extend(bench.run_scenario(scenario))
            later = {s.dataset.name for s in scenarios[index + 1 :]}
            if scenario.dataset.name not in later:
                bench.drop(scenario.dataset)
    finally:
        bench.stop()
    return rows


def wait_for(bench: Bench, scenarios: list[Scenario], path: Path) -> None:
    """Seed every data set the rows pull, then wait until path exists: the seeding (many
    minutes at scale) overlaps whatever the rows must wait for, such as a build to measure."""
    for scenario in scenarios:
        if scenario.mode != "daemon":
            bench.seed(scenario.dataset)
    log(f"seeded; waiting for {path} to start the rows")
    while not path.exists():
        time.sleep(5)


def check_space(workspace: Path, needed: int) -> None:
    free = shutil.disk_usage(workspace).free
    if needed > free:
        raise SystemExit(
            f"the plan needs about {needed / 2**30:.1f} GiB in {workspace}, "
            f"{free / 2**30:.1f} GiB free: use fewer tools or smaller workloads"
        )


if __name__ == "__main__":
    sys.exit(main())
