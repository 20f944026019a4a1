"""The backup-overhead benchmark runs (a few files, one run): it cannot rot."""

from __future__ import annotations

from pathlib import Path

from tests.bench.backup_overhead import measure, report


def test_backup_overhead_smoke(workdir: Path) -> None:
    times = measure(20, 1, workdir)
    assert len(times["off"]) == len(times["copy"]) == 1
    assert "overhead" in report(times, 20)
