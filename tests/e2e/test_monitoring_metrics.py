"""The metrics the monitoring (k8s/monitoring/: alert rules and Grafana dashboard) relies
on: every series they query exists in the /metrics of a real `sidecar serve`, and the
lifecycle gauges added for them (start time, time-to-ready, unpushed changes) say the truth."""

from __future__ import annotations

import time

from sidecar.daemon.metrics import Metrics
from sidecar.locals3 import LocalS3
from tests.deploy.monitoring import exposed_names, expressions, metric_names
from tests.support.daemon_support import StartDaemon, http


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def test_every_metric_the_monitoring_uses_is_exposed(
    s3: LocalS3, start_daemon: StartDaemon
) -> None:
    (s3.root / "vol" / "seed.txt").write_bytes(b"seed")
    before = time.time()
    # Auto-sync on: its gauges exist only then, and the push alert is about that mode.
    daemon = start_daemon(s3, "--volume", "team-data", "--auto-sync")
    daemon.wait_ready()
    (daemon.local_dir / "notes.md").write_bytes(b"hello")
    status, _ = http("POST", daemon.control + "/finalize")
    assert status == 200
    status, text = http("GET", daemon.probe + "/metrics")
    assert status == 200

    exposed = exposed_names(text)
    missing = {
        f"{name} (in {where})"
        for where, expr in expressions()
        for name in metric_names(expr)
        if name not in exposed
    }
    assert not missing, f"queried by k8s/monitoring/ but not in /metrics: {sorted(missing)}"

    started = _value(text, "sidecar_start_time_seconds")
    assert before - 5 <= started <= time.time()
    assert 0 < _value(text, "sidecar_time_to_ready_seconds") <= time.time() - before
    finalized = _value(
        text, 'sidecar_last_success_timestamp_seconds{volume="team-data",operation="finalize"}'
    )
    assert started <= finalized <= time.time()


def test_lifecycle_gauges_render_only_once_known() -> None:
    metrics = Metrics(volume="v")
    text = metrics.render()
    for name in (
        "sidecar_start_time_seconds",
        "sidecar_time_to_ready_seconds",
        "sidecar_auto_sync_pending_changes",
    ):
        assert name not in exposed_names(text), name  # absent, not a misleading 0

    metrics = Metrics(
        volume="v",
        started_at=1_700_000_000.0,
        time_to_ready=lambda: 12.5,
        unpushed=lambda: (3, 42.25),
    )
    text = metrics.render()
    assert 'sidecar_start_time_seconds{volume="v"} 1700000000' in text
    assert 'sidecar_time_to_ready_seconds{volume="v"} 12.5' in text
    assert 'sidecar_auto_sync_pending_changes{volume="v"} 3' in text
    assert 'sidecar_auto_sync_oldest_unpushed_change_seconds{volume="v"} 42.25' in text


def test_status_and_metrics_show_the_shard_the_limits_and_the_time_waited(
    s3: LocalS3, start_daemon: StartDaemon
) -> None:
    from sidecar.core.shard import shard_of

    files = {f"f{i:02d}.bin": bytes([i]) * 40_000 for i in range(30)}
    for name, data in files.items():
        (s3.root / "vol" / name).write_bytes(data)
    ours = sorted(n for n in files if shard_of(n, 3) == 1)
    daemon = start_daemon(
        s3, "--shard", "1/3", "--bwlimit", "256KiB:1MiB", "--max-requests-per-second", "200"
    )
    daemon.wait_ready()
    assert sorted(p.name for p in daemon.local_dir.iterdir()) == ours, "only shard 1 pulled"
    status = daemon.status()
    assert status["shard"] == "1/3"
    assert status["limits"] == {
        "download_bytes_per_second": 256 * 1024,
        "upload_bytes_per_second": 1024 * 1024,
        "requests_per_second": 200.0,
    }
    waited = status["limit_waited_seconds"]
    # ~40 kB per file of shard 1 at 256 KiB/s: the pull waited on the download limit.
    assert waited["download"] > 0 and waited["upload"] == 0, waited

    status_code, text = http("GET", daemon.probe + "/metrics")
    assert status_code == 200
    assert _value(text, "sidecar_shard_index") == 1
    assert _value(text, "sidecar_shard_count") == 3
    assert _value(text, 'sidecar_bwlimit_bytes_per_second{direction="download"}') == 256 * 1024
    assert _value(text, 'sidecar_bwlimit_bytes_per_second{direction="upload"}') == 1024 * 1024
    assert _value(text, "sidecar_max_requests_per_second") == 200
    assert _value(text, 'sidecar_limit_wait_seconds_total{limit="download"}') > 0


def test_unsharded_unlimited_daemon_shows_none() -> None:
    fleet = {
        "shard": None,
        "limits": {
            "download_bytes_per_second": None,
            "upload_bytes_per_second": None,
            "requests_per_second": None,
        },
        "limit_waited_seconds": {"download": 0.0, "upload": 0.0, "requests": 0.0},
    }
    metrics = Metrics(volume="v", fleet=lambda: fleet)
    names = exposed_names(metrics.render())
    assert "sidecar_shard_index" not in names and "sidecar_bwlimit_bytes_per_second" not in names
    assert "sidecar_limit_wait_seconds_total" in names  # 0: a counter that exists from the start
