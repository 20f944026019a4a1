"""The metrics the monitoring (k8s/monitoring/: alert rules and Grafana dashboard) relies
on: every series they query exists in the /metrics of a real `sidecar serve`, and the
lifecycle gauges added for them (start time, time-to-ready, unpushed changes) say the truth."""

from __future__ import annotations

import time

from daemon_support import StartDaemon, http

from sidecar.locals3 import LocalS3
from sidecar.metrics import Metrics
from tests.deploy.monitoring import exposed_names, expressions, metric_names


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

    metrics.started_at, metrics.time_to_ready = 1_700_000_000.0, 12.5
    metrics.unpushed = lambda: (3, 42.25)
    text = metrics.render()
    assert 'sidecar_start_time_seconds{volume="v"} 1700000000' in text
    assert 'sidecar_time_to_ready_seconds{volume="v"} 12.5' in text
    assert 'sidecar_auto_sync_pending_changes{volume="v"} 3' in text
    assert 'sidecar_auto_sync_oldest_unpushed_change_seconds{volume="v"} 42.25' in text
