"""k8s/monitoring/ read the way Prometheus and Grafana would: the alert rules, the dashboard,
and every PromQL expression in them, with the sidecar metric names those expressions use."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import yaml

from .k8s import MONITORING

RULES = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "dashboard.json"

_METRIC = re.compile(r"\bsidecar_[a-z0-9_]+\b")


def rule_groups() -> list[dict[str, Any]]:
    return list(yaml.safe_load(RULES.read_text())["spec"]["groups"])


def alerts() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep theirs inside


def expressions() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every query: alert rules, panel targets, template variables."""
    for rule in alerts():
        yield f"alert {rule['alert']}", str(rule["expr"])
    board = dashboard()
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable {variable['name']}", variable["query"]["query"]


def metric_names(expr: str) -> set[str]:
    return set(_METRIC.findall(expr))


def exposed_names(text: str) -> set[str]:
    """Sample names in a Prometheus text exposition (histograms: _bucket, _sum, _count)."""
    return {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
