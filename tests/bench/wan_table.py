"""The README's WAN table from one or more `peer_bench --json` files of the WAN profile.

    python -m tests.bench.wan_table wan.json [more.json ...] > table.md

One line per workload, direction and RTT: each tool's median seconds at its defaults / tuned,
the sidecar's ratio to the best peer of either variant, the delay proxy's CPU (the range over
the row's tools) and the machine's load as the row ran. Then the same rows in CPU seconds
(what a loaded machine blurs less than wall time) with the sidecar's peak RSS. Daemon rows
follow in a table of their own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TOOLS = ("sidecar", "s5cmd", "rclone", "aws")
VARIANTS = ("default", "tuned")


def load(paths: list[Path]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows += json.loads(path.read_text())["rows"]
    return rows


def seconds(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if row["median_s"] is None:
        return "FAIL"
    value = row["median_s"]
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def peer_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "row",
        "RTT ms",
        *(f"{tool} def / tuned" for tool in TOOLS),
        "sidecar / best peer (def, tuned)",
        "proxy CPU s",
        "load",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[tuple[str, str, float], dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row["workload"].startswith("DAEMON"):
            continue
        groups.setdefault((row["workload"], row["direction"], row["rtt_ms"]), {})[row["tool"]] = row
    for (workload, direction, rtt), by_tool in groups.items():
        cells = [f"{workload} {direction}", f"{rtt:g}"]
        for tool in TOOLS:
            cells.append(" / ".join(seconds(by_tool.get(f"{tool}-{v}")) for v in VARIANTS))
        ratios = [by_tool.get(f"sidecar-{v}", {}).get("vs_best_peer") for v in VARIANTS]
        best = next((r["best_peer"] for v in VARIANTS if (r := by_tool.get(f"sidecar-{v}"))), "")
        cells.append(
            " / ".join(f"{r:.2f}" if r else "-" for r in ratios) + (f" ({best})" if best else "")
        )
        proxy = [r["median_proxy_cpu_s"] for r in by_tool.values() if r["median_proxy_cpu_s"]]
        cells.append(f"{min(proxy):.2f}-{max(proxy):.2f}" if proxy else "-")
        loads = [r["median_load"] for r in by_tool.values() if r["median_load"] is not None]
        cells.append(f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str, float], dict[str, Any]]:
    groups: dict[tuple[str, str, float], dict[str, Any]] = {}
    for row in rows:
        if not row["workload"].startswith("DAEMON"):
            key = (row["workload"], row["direction"], row["rtt_ms"])
            groups.setdefault(key, {})[row["tool"]] = row
    return groups


def cpu_table(rows: list[dict[str, Any]]) -> str:
    """Median CPU seconds, default / tuned; the sidecar's (each variant) over the best peer's
    of either variant; the sidecar's peak RSS."""
    header = [
        "row",
        "RTT ms",
        *(f"{tool} CPU s" for tool in TOOLS),
        "sidecar CPU / best peer CPU (def, tuned)",
        "sidecar RSS MiB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (workload, direction, rtt), by_tool in _groups(rows).items():
        cpu = {
            name: row["median_cpu_s"]
            for name, row in by_tool.items()
            if row["median_cpu_s"] is not None
        }
        cells = [f"{workload} {direction}", f"{rtt:g}"]
        for tool in TOOLS:
            values = [cpu.get(f"{tool}-{v}") for v in VARIANTS]
            cells.append(" / ".join(f"{c:.2f}" if c is not None else "-" for c in values))
        peers = {name: c for name, c in cpu.items() if not name.startswith("sidecar")}
        best = min(peers, key=peers.__getitem__) if peers else None
        ratios = [
            f"{cpu[f'sidecar-{v}'] / peers[best]:.2f}"
            if best and peers[best] and f"sidecar-{v}" in cpu
            else "-"
            for v in VARIANTS
        ]
        cells.append(" / ".join(ratios) + (f" ({best})" if best else ""))
        rss = [
            row["peak_rss_mib"]
            for name, row in by_tool.items()
            if name.startswith("sidecar") and row["peak_rss_mib"]
        ]
        cells.append(f"{max(rss):.0f}" if rss else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def daemon_table(rows: list[dict[str, Any]]) -> str:
    header = ["daemon row", "RTT ms", "median s", "CPU s", "RSS MiB", "vs best peer", "load"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if not row["workload"].startswith("DAEMON"):
            continue
        ratio = row["vs_best_peer"]
        cells = [
            f"{row['workload']} {row['direction']}",
            f"{row['rtt_ms']:g}" if row["rtt_ms"] else "lo",
            seconds(row),
            f"{row['median_cpu_s']:.2f}" if row["median_cpu_s"] is not None else "-",
            f"{row['peak_rss_mib']:.0f}" if row["peak_rss_mib"] else "-",
            f"{ratio:.2f} ({row['best_peer']})" if ratio else "-",
            f"{row['median_load']:.1f}" if row["median_load"] is not None else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    rows = load([Path(arg) for arg in argv])
    print(peer_table(rows))
    print()
    print(cpu_table(rows))
    if any(row["workload"].startswith("DAEMON") for row in rows):
        print()
        print(daemon_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
