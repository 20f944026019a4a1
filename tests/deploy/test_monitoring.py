"""k8s/monitoring/: the PrometheusRule passes `promtool check rules` and its own unit tests
(`promtool test rules`, tests/deploy/monitoring_rules_test.yaml), every alert says what to do,
and the Grafana dashboard is well formed. That every metric they use exists in a running
daemon's /metrics is tests/e2e/test_monitoring_metrics.py. Schemas: test_manifests.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .k8s import MONITORING
from .monitoring import DASHBOARD, RULES, alerts, dashboard, expressions, panels, rule_groups
from .test_manifests import _require

RULES_TEST = Path(__file__).with_name("monitoring_rules_test.yaml")


def _promtool() -> str:
    found = shutil.which("promtool")
    _require(
        found is not None,
        "promtool not found (Debian package `prometheus`: apt-get install prometheus; "
        ".ci/run installs it)",
    )
    assert found is not None
    return found


def _plain_rules(tmp_path: Path, annotations: bool = True) -> Path:
    """The rule file Prometheus gets from the operator: the PrometheusRule's spec.

    Without annotations for `promtool test rules`, which would otherwise want every case
    to repeat each alert's text; `check rules` has already parsed their templates."""
    groups = rule_groups()
    if not annotations:
        for group in groups:
            for rule in group["rules"]:
                rule.pop("annotations", None)
    path = tmp_path / "netvol-sidecar.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


def test_promtool_check_rules(tmp_path: Path) -> None:
    rules = _plain_rules(tmp_path)
    done = subprocess.run(
        [_promtool(), "check", "rules", str(rules)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    _plain_rules(tmp_path, annotations=False)
    test_file = tmp_path / RULES_TEST.name
    test_file.write_text(RULES_TEST.read_text())
    done = subprocess.run(
        [_promtool(), "test", "rules", test_file.name],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_tested_by_promtool() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    untested = {rule["alert"] for rule in alerts()} - tested
    assert not untested, f"alerts with no promtool case that fires them: {sorted(untested)}"


def test_every_alert_has_a_runbook_summary_and_severity() -> None:
    found = alerts()
    assert len(found) >= 6
    for rule in found:
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert annotations.get(key, "").strip(), f"{rule['alert']}: no {key}"
        assert rule.get("labels", {}).get("severity") in ("info", "warning", "critical"), (
            f"{rule['alert']}: severity"
        )
    names = [rule["alert"] for rule in found]
    assert len(names) == len(set(names)), names


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "volume"} <= variables
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            # Every panel follows the namespace and volume pickers.
            assert 'namespace=~"$namespace"' in target["expr"], panel["title"]
            assert 'volume=~"$volume"' in target["expr"], panel["title"]


def test_dashboard_covers_what_the_platform_team_watches() -> None:
    used = " ".join(expr for _where, expr in expressions())
    for name in (
        "sidecar_syncs_total",  # outcomes over time
        "sidecar_bytes_transferred_total",
        "sidecar_objects_transferred_total",
        "sidecar_sync_duration_seconds_bucket",
        "sidecar_conflicts_total",
        "sidecar_errors_total",
        "sidecar_retries_total",
        "sidecar_time_to_ready_seconds",
        "sidecar_last_success_timestamp_seconds",  # age of the last push per volume
    ):
        assert name in used, f"the dashboard shows nothing of {name}"


def test_dashboard_ships_as_a_grafana_configmap() -> None:
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert RULES.name in kustomization["resources"]
    (generator,) = kustomization["configMapGenerator"]
    assert generator["options"]["labels"] == {"grafana_dashboard": "1"}
    (entry,) = generator["files"]
    assert entry.split("=", 1)[1] == DASHBOARD.name


@pytest.mark.parametrize(("where", "expr"), list(expressions()))
def test_expressions_name_sidecar_metrics(where: str, expr: str) -> None:
    assert "sidecar_" in expr, f"{where}: queries no sidecar metric"
