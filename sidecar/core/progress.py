"""Progress of the running sync: counters the engine bumps and /status and the CLI read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sidecar.core.units import format_bytes, format_duration


@dataclass(slots=True)
class Progress:
    operation: str
    started: float  # monotonic seconds
    # scanning (the walk: the folder and the listing streamed in key order, each path
    # compared and decided as it goes by), planning (the rules over the whole plan),
    # transferring, committing, done.
    phase: str = "scanning"
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0  # may go back when a part is retried
    # The walk's counts, growing while it runs: a long walk (a first sync over a folder that
    # holds the data hashes every file and asks the bucket about every object) shows it moves.
    files_scanned: int = 0  # local files taken from the folder
    objects_listed: int = 0  # objects taken from the bucket's listing
    paths_compared: int = 0  # paths compared (folder, bucket, BASE) and decided
    files_hashed: int = 0  # local files read to compare their content
    objects_checked: int = 0  # objects asked about (a HEAD) to compare their content
    _samples: list[tuple[float, int]] = field(default_factory=list)

    def walk_restarted(self) -> None:
        """The walk starts over (a listing out of key order: decided again over a sorted
        copy): its counts with it."""
        self.files_scanned = self.objects_listed = self.paths_compared = 0
        self.files_hashed = self.objects_checked = 0

    def add_bytes(self, count: int) -> None:
        self.bytes_done += count

    def sample(self, now: float) -> None:
        """Remember (time, bytes) so rate() looks at the last few seconds, not the average."""
        self._samples.append((now, self.bytes_done))
        cutoff = now - 5.0
        while len(self._samples) > 2 and self._samples[0][0] < cutoff:
            self._samples.pop(0)

    def rate(self, now: float) -> float:
        """Bytes per second over the recent window (whole run if there are no samples)."""
        if len(self._samples) >= 2:
            (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
            if t1 > t0:
                return max(0.0, (b1 - b0) / (t1 - t0))
        elapsed = now - self.started
        return self.bytes_done / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float) -> float | None:
        rate = self.rate(now)
        remaining = self.bytes_total - self.bytes_done
        if rate <= 0 or remaining < 0:
            return None
        return remaining / rate

    def as_dict(self, now: float) -> dict[str, Any]:
        eta = self.eta(now)
        return {
            "operation": self.operation,
            "phase": self.phase,
            "files_done": self.files_done,
            "files_total": self.files_total,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "rate_bytes_per_second": round(self.rate(now), 1),
            "eta_seconds": None if eta is None else round(eta, 1),
            "elapsed_seconds": round(now - self.started, 3),
            "files_scanned": self.files_scanned,
            "objects_listed": self.objects_listed,
            "paths_compared": self.paths_compared,
            "files_hashed": self.files_hashed,
            "objects_checked": self.objects_checked,
        }

    def line(self, now: float) -> str:
        """One human-readable progress line for a terminal."""
        if self.phase == "scanning":  # nothing counted in files_total/bytes_total yet
            return (
                f"{self.operation} scanning: {self.files_scanned} files in the folder, "
                f"{self.objects_listed} objects listed, {self.paths_compared} paths compared "
                f"({self.files_hashed} files hashed, {self.objects_checked} objects checked)"
            )
        eta = self.eta(now)
        pct = 100.0 * self.bytes_done / self.bytes_total if self.bytes_total else 100.0
        return (
            f"{self.operation} {self.phase}: {self.files_done}/{self.files_total} files, "
            f"{format_bytes(self.bytes_done)}/{format_bytes(self.bytes_total)} ({pct:.0f}%), "
            f"{format_bytes(self.rate(now))}/s, "
            f"ETA {'?' if eta is None else format_duration(eta)}"
        )
