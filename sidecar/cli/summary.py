"""The text of a sync's summary, one writer for `sidecar pull|finalize --once` (its result,
in this process) and for the daemon's answer to `sidecar pull|finalize` (the same summary as
JSON): planned steps (dry run), notes and conflicts on stdout; errors, a failure and withheld
deletes on stderr; then the one-line summary on stdout."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TextIO


def write_summary(summary: Mapping[str, Any], out: TextIO, err: TextIO) -> None:
    """`summary` is SyncResult.as_dict() with its one_line() as "summary"."""
    for step in summary.get("plan", []):
        copy = f" (conflict copy: {step['conflict_copy']})" if step.get("conflict_copy") else ""
        out.write(f"{step['action']}\t{step['path']}{copy}\n")
    for note in summary.get("notes", []):
        out.write(f"note\t{note}\n")
    for conflict in summary.get("conflicts", []):
        out.write(f"conflict\t{conflict['path']}: {conflict['kind']}, {conflict['resolution']}\n")
    for error in summary.get("errors", []):
        err.write(f"error\t{error['path']}: {error['reason']}\n")
    if summary.get("fatal"):
        err.write(f"sidecar: {summary['operation']} failed: {summary['fatal']}\n")
    if summary.get("deletes_blocked"):
        err.write(f"sidecar: {summary['deletes_blocked']}\n")
    out.write(summary.get("summary", json.dumps(summary)) + "\n")
