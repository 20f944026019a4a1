"""Sync metrics and their Prometheus text exposition (format 0.0.4), written by hand.

A client library would bring a global registry; here one `Metrics` object belongs to one
daemon, so tests can build as many as they like. Gauges that mirror live state (requests in
flight, readiness) are read through callbacks at scrape time instead of being copied around.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.core.result import SyncResult

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Syncs range from a no-op listing (well under a second) to multi-hour first pulls.
DURATION_BUCKETS: tuple[float, ...] = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)

Labels = tuple[tuple[str, str], ...]

# What the coordinator runs one at a time: the syncs, and undo and restore (they take the
# sync locks, so they queue with them): each is a `sidecar_sync_running` series.
RUNNING_OPERATIONS = ("pull", "finalize", "undo", "restore")


class Listener(Protocol):
    """What the metrics read of a listener's connection guard."""

    name: str
    shed_total: dict[str, int]

    @property
    def open_connections(self) -> int: ...


def outcome(result: SyncResult) -> str:
    """The `outcome` label: success, noop, dry_run, failure or cancelled."""
    if result.fatal is not None and result.fatal.startswith("cancelled"):
        return "cancelled"
    if not result.ok:
        return "failure"
    if result.dry_run:
        return "dry_run"
    moved = result.files_transferred or result.files_deleted or result.conflicts
    return "success" if moved else "noop"


@dataclass
class _Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1


class SyncSource(Protocol):
    """What the metrics read of the coordinator (sidecar.daemon.coordinator.Coordinator)."""

    counters: SyncCounters
    ready: bool
    degraded: dict[str, Any] | None
    engine: Any  # in_flight, retries_total; inflight_budget, fleet_status when it has them

    def running_operation(self) -> str | None: ...


@dataclass
class SyncCounters:
    """What finished syncs add up to: the coordinator records each one (it owns these from
    its construction), the metrics render them."""

    counters: dict[str, dict[Labels, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    durations: dict[Labels, _Histogram] = field(default_factory=dict)
    last_success: dict[Labels, float] = field(default_factory=dict)

    def record(self, result: SyncResult, finished_at: float) -> None:
        """Count one finished sync; `finished_at` is wall-clock seconds since the epoch."""
        op = (("operation", str(result.operation)),)
        self.counters["syncs_total"][(*op, ("outcome", outcome(result)))] += 1
        self.counters["conflicts_total"][op] += len(result.conflicts)
        self.counters["errors_total"][op] += len(result.errors) + (1 if result.fatal else 0)
        if not result.dry_run:
            self.counters["bytes_transferred_total"][op] += result.bytes_transferred
            self.counters["objects_transferred_total"][op] += result.files_transferred
            self.counters["objects_deleted_total"][op] += result.files_deleted
        histogram = self.durations.setdefault(op, _Histogram(DURATION_BUCKETS))
        histogram.observe(result.seconds)
        if result.ok and not result.dry_run:
            self.last_success[op] = finished_at


@dataclass(frozen=True)
class Metrics:
    """The sync counters plus live gauges, read through callables at scrape time.

    Every source is given at construction (`Metrics.of` for a daemon's coordinator); the
    defaults stand for "not known" or "off", so a test can build one with what it needs.
    """

    counters: SyncCounters = field(default_factory=SyncCounters)
    volume: str | None = None
    in_flight: Callable[[], int] = lambda: 0
    retries: Callable[[], int] = lambda: 0
    # SyncEngine.inflight_budget: the S3 in-flight budget; None: not known.
    budget: Callable[[], dict[str, int] | None] = lambda: None
    ready: Callable[[], bool] = lambda: False
    degraded: Callable[[], dict[str, Any] | None] = lambda: None
    watching: Callable[[], bool | None] = lambda: None  # None: auto-sync is off
    http: Callable[[], Iterable[Listener]] = lambda: ()
    running: Callable[[], str | None] = lambda: None
    # (changes seen, age in seconds of the oldest one) not yet pushed; None: auto-sync is off.
    unpushed: Callable[[], tuple[int, float] | None] = lambda: None
    # SyncEngine.fleet_status: shard, limits, seconds waited on them; None: not known.
    fleet: Callable[[], dict[str, Any] | None] = lambda: None
    started_at: float | None = None  # wall-clock start of the daemon
    # Seconds from start to ready; None until then.
    time_to_ready: Callable[[], float | None] = lambda: None
    # --ready-when priority: seconds from start until nothing of the initial pull is pending,
    # and (files, bytes) still pending; None: not known (or --ready-when all).
    time_to_complete: Callable[[], float | None] = lambda: None
    background: Callable[[], tuple[int, int] | None] = lambda: None

    @classmethod
    def of(cls, coordinator: SyncSource, **live: Any) -> Metrics:
        """The metrics of a daemon around `coordinator`: its counters, readiness and running
        operation, its engine's gauges, plus the `live` sources of the other parts."""
        engine = coordinator.engine
        fleet = getattr(engine, "fleet_status", None)
        return cls(
            counters=coordinator.counters,
            in_flight=lambda: engine.in_flight,
            retries=lambda: engine.retries_total,
            budget=lambda: getattr(engine, "inflight_budget", None),
            fleet=fleet if fleet is not None else (lambda: None),
            ready=lambda: coordinator.ready,
            degraded=lambda: coordinator.degraded,
            running=coordinator.running_operation,
            **live,
        )

    def render(self) -> str:
        lines: list[str] = []
        counters = (
            ("syncs_total", "Syncs finished, by operation and outcome."),
            ("bytes_transferred_total", "Bytes moved by syncs (dry runs excluded)."),
            ("objects_transferred_total", "Files downloaded or uploaded by syncs."),
            ("objects_deleted_total", "Files or objects deleted by syncs."),
            ("conflicts_total", "Conflicts found; the losing version was kept as a copy."),
            ("errors_total", "Per-file errors plus syncs that could not run at all."),
        )
        for name, help_text in counters:
            lines += _family(
                f"sidecar_{name}",
                "counter",
                help_text,
                self.counters.counters[name].items(),
                self.volume,
            )
        lines += self._render_durations()
        lines += _family(
            "sidecar_last_success_timestamp_seconds",
            "gauge",
            "Wall-clock time of the last successful sync, by operation.",
            self.counters.last_success.items(),
            self.volume,
        )
        lines += self._render_lifecycle()
        lines += self._render_fleet()
        lines += self._render_budget()
        running = self.running()
        degraded = self.degraded()
        live: tuple[tuple[str, str, str, float], ...] = (
            ("sidecar_retries_total", "counter", "S3 requests retried.", self.retries()),
            ("sidecar_in_flight_requests", "gauge", "S3 requests in flight.", self.in_flight()),
            ("sidecar_ready", "gauge", "1 once the initial pull is done.", float(self.ready())),
            (
                "sidecar_degraded",
                "gauge",
                "1 while the last pull that ran through left paths out or withheld deletes.",
                float(degraded is not None),
            ),
            (
                "sidecar_degraded_skipped_paths",
                "gauge",
                "Paths the last pull that ran through left out (bad keys, per-file errors).",
                float(degraded["skipped_count"] if degraded else 0),
            ),
            (
                "sidecar_degraded_deletes_withheld",
                "gauge",
                "1 while the last pull that ran through had its deletes withheld.",
                float(bool(degraded and degraded["deletes_withheld"])),
            ),
        )
        for name, kind, help_text, value in live:
            lines += _family(name, kind, help_text, [((), value)], self.volume)
        watching = self.watching()
        if watching is not None:
            lines += _family(
                "sidecar_auto_sync_watching",
                "gauge",
                "1 while auto-sync watches the folder (0: waiting for it, or restarting).",
                [((), float(watching))],
                self.volume,
            )
        unpushed = self.unpushed()
        if unpushed is not None:
            lines += _family(
                "sidecar_auto_sync_pending_changes",
                "gauge",
                "Changes auto-sync saw in the folder that no push has taken yet.",
                [((), float(unpushed[0]))],
                self.volume,
            )
            lines += _family(
                "sidecar_auto_sync_oldest_unpushed_change_seconds",
                "gauge",
                "Age of the oldest change not yet pushed (0: nothing waits): the work a "
                "pod killed now would lose.",
                [((), unpushed[1])],
                self.volume,
            )
        listeners = list(self.http())
        lines += _family(
            "sidecar_http_connections",
            "gauge",
            "Client connections open, by listener.",
            [((("listener", x.name),), float(x.open_connections)) for x in listeners],
            self.volume,
        )
        lines += _family(
            "sidecar_http_connections_closed_total",
            "counter",
            "Client connections the daemon closed: timeout (no whole request in time), "
            "evicted or refused (at the cap), shutdown (idle at SIGTERM).",
            [
                ((("listener", x.name), ("reason", reason)), float(count))
                for x in listeners
                for reason, count in x.shed_total.items()
            ],
            self.volume,
        )
        lines += _family(
            "sidecar_sync_running",
            "gauge",
            "1 for the operation running now (an undo or restore takes the sync's turn).",
            [((("operation", op),), float(op == running)) for op in RUNNING_OPERATIONS],
            self.volume,
        )
        return "\n".join(lines) + "\n"

    def _render_lifecycle(self) -> list[str]:
        lines: list[str] = []
        if self.started_at is not None:
            lines += _family(
                "sidecar_start_time_seconds",
                "gauge",
                "Wall-clock time the daemon started.",
                [((), self.started_at)],
                self.volume,
            )
        time_to_ready = self.time_to_ready()
        if time_to_ready is not None:
            lines += _family(
                "sidecar_time_to_ready_seconds",
                "gauge",
                "Seconds from the daemon's start until it was ready (initial pull done).",
                [((), time_to_ready)],
                self.volume,
            )
        complete = self.time_to_complete()
        if complete is not None:
            lines += _family(
                "sidecar_time_to_complete_seconds",
                "gauge",
                "Seconds from the daemon's start until every file of the initial pull was "
                "local (--ready-when priority: the background pull included).",
                [((), complete)],
                self.volume,
            )
        background = self.background()
        if background is not None:
            lines += _family(
                "sidecar_background_pull_files_pending",
                "gauge",
                "Files of the pull still to come in the background (--ready-when priority).",
                [((), background[0])],
                self.volume,
            )
            lines += _family(
                "sidecar_background_pull_bytes_pending",
                "gauge",
                "Bytes of the pull still to come in the background (--ready-when priority).",
                [((), background[1])],
                self.volume,
            )
        return lines

    def _render_budget(self) -> list[str]:
        budget = self.budget()
        if budget is None:
            return []
        lines: list[str] = []
        for name, help_text, value in (
            (
                "sidecar_s3_inflight_budget",
                "S3 requests allowed in flight now (grows with throughput, cut on throttling).",
                budget["current"],
            ),
            (
                "sidecar_s3_inflight_budget_max",
                "The most S3 requests allowed in flight (--concurrency).",
                budget["max"],
            ),
        ):
            lines += _family(name, "gauge", help_text, [((), float(value))], self.volume)
        lines += _family(
            "sidecar_s3_throttled_total",
            "counter",
            "S3 answers that asked for fewer requests (503 SlowDown, 429, throttling codes).",
            [((), float(budget["throttled_total"]))],
            self.volume,
        )
        return lines

    def _render_fleet(self) -> list[str]:
        fleet = self.fleet()
        if fleet is None:
            return []
        lines: list[str] = []
        if fleet["shard"]:
            index, _, count = fleet["shard"].partition("/")
            lines += _family(
                "sidecar_shard_index",
                "gauge",
                "This process's shard I of --shard I/N.",
                [((), float(index))],
                self.volume,
            )
            lines += _family(
                "sidecar_shard_count",
                "gauge",
                "The shard count N of --shard I/N.",
                [((), float(count))],
                self.volume,
            )
        limits = fleet["limits"]
        rates = [
            ((("direction", way),), float(limits[f"{way}_bytes_per_second"]))
            for way in ("download", "upload")
            if limits[f"{way}_bytes_per_second"] is not None
        ]
        if rates:
            lines += _family(
                "sidecar_bwlimit_bytes_per_second",
                "gauge",
                "--bwlimit, by direction (absent: no limit).",
                rates,
                self.volume,
            )
        if limits["requests_per_second"] is not None:
            lines += _family(
                "sidecar_max_requests_per_second",
                "gauge",
                "--max-requests-per-second.",
                [((), float(limits["requests_per_second"]))],
                self.volume,
            )
        lines += _family(
            "sidecar_limit_wait_seconds_total",
            "counter",
            "Seconds transfers waited on --bwlimit (download, upload) and "
            "--max-requests-per-second (requests), summed over transfers.",
            [((("limit", kind),), s) for kind, s in fleet["limit_waited_seconds"].items()],
            self.volume,
        )
        return lines

    def _render_durations(self) -> list[str]:
        name = "sidecar_sync_duration_seconds"
        lines = [
            f"# HELP {name} How long syncs took, by operation.",
            f"# TYPE {name} histogram",
        ]
        for labels, histogram in sorted(self.counters.durations.items()):
            base = _with_volume(labels, self.volume)
            for bound, count in zip(histogram.buckets, histogram.counts, strict=True):
                lines.append(f"{name}_bucket{_labels((*base, ('le', _number(bound))))} {count}")
            lines.append(f"{name}_bucket{_labels((*base, ('le', '+Inf')))} {histogram.count}")
            lines.append(f"{name}_sum{_labels(base)} {_number(histogram.total)}")
            lines.append(f"{name}_count{_labels(base)} {histogram.count}")
        return lines


def _family(
    name: str,
    kind: str,
    help_text: str,
    samples: Iterable[tuple[Labels, float]],
    volume: str | None,
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in sorted(samples):
        lines.append(f"{name}{_labels(_with_volume(labels, volume))} {_number(value)}")
    return lines


def _with_volume(labels: Labels, volume: str | None) -> Labels:
    return (("volume", volume), *labels) if volume else labels


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    body = ",".join(f'{key}="{_escape(value)}"' for key, value in labels)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))
