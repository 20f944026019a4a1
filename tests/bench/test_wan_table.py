"""The README's WAN tables from the benchmark's JSON (wan_table.py): the CPU table's ratio is
the sidecar's CPU over the best peer's of either variant."""

from __future__ import annotations

from typing import Any

from tests.bench.wan_table import cpu_table


def row(tool: str, cpu: float | None, rss: float | None = None) -> dict[str, Any]:
    return {
        "workload": "MEDIUM",
        "direction": "pull",
        "rtt_ms": 20.0,
        "tool": tool,
        "median_cpu_s": cpu,
        "peak_rss_mib": rss,
    }


def test_cpu_table_divides_by_the_cheapest_peer_of_either_variant() -> None:
    rows = [
        row("sidecar-default", 0.36, 92),
        row("sidecar-tuned", 0.40, 95),
        row("s5cmd-default", 0.20),
        row("s5cmd-tuned", 0.18),
        row("rclone-default", 0.60),
        row("rclone-tuned", None),  # failed runs have no median
    ]
    line = cpu_table(rows).splitlines()[-1]
    assert line == (
        "| MEDIUM pull | 20 | 0.36 / 0.40 | 0.20 / 0.18 | 0.60 / - | - / - "
        "| 2.00 / 2.22 (s5cmd-tuned) | 95 |"
    )
