"""Schemas of the custom resources under k8s/, which kubernetes-validate does not know.

Transcribed from the CRD's openAPIV3Schema (Prometheus Operator, monitoring.coreos.com/v1
PrometheusRule, operator 0.82), with `additionalProperties: false` added where the API server
would prune or, under `kubectl --validate=strict`, reject an unknown field: a misspelt `for:`
must fail here, not silently vanish in the cluster. `metadata` is checked separately as an
ObjectMeta by kubernetes-validate (see `validate_custom`).
"""

from __future__ import annotations

from typing import Any

# Go's duration syntax as the CRD spells it (promtool accepts the same).
_DURATION = {
    "type": "string",
    "pattern": (
        r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
        r"(([0-9]+)ms)?)$"
    ),
}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}

_RULE = {
    "type": "object",
    "required": ["expr"],
    "additionalProperties": False,
    "properties": {
        "alert": {"type": "string"},
        "record": {"type": "string"},
        "expr": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "for": _DURATION,
        "keep_firing_for": {**_DURATION, "minLength": 1},
        "labels": _STRINGS,
        "annotations": _STRINGS,
    },
    # "Only one of `record` and `alert` must be set."
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
}

_GROUP = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "interval": _DURATION,
        "query_offset": _DURATION,
        "limit": {"type": "integer"},
        "labels": _STRINGS,
        "partial_response_strategy": {"type": "string", "pattern": "^(?i)(abort|warn)?$"},
        "rules": {"type": "array", "items": _RULE},
    },
}

PROMETHEUS_RULE: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"groups": {"type": "array", "items": _GROUP}},
        },
    },
}

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
}


def is_custom(doc: dict[str, Any]) -> bool:
    return (doc.get("apiVersion"), doc.get("kind")) in SCHEMAS


def validate_custom(doc: dict[str, Any], version: str) -> list[str]:
    """Every problem found in one custom resource, as `path: message` lines."""
    import jsonschema
    import kubernetes_validate

    schema = SCHEMAS[(doc["apiVersion"], doc["kind"])]
    problems = [
        f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in jsonschema.Draft7Validator(schema).iter_errors(doc)
    ]
    # ObjectMeta is the same for every kind: let the Kubernetes schema judge it, strictly.
    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})}
    try:
        kubernetes_validate.validate(carrier, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        problems.append(f"{'.'.join(str(p) for p in exc.path)}: {exc.message}")
    return problems
