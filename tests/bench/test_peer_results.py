"""The JSON table is written whatever the flags hold: a run of an hour must not end in a
traceback after its table (it did with `--wait-for PATH`: a Path among the settings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench import peer_bench
from tests.bench.peer_bench import Row, write_json


def test_settings_holding_paths_are_written_as_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer_bench, "machine", lambda: {"cpus": 2})  # no tool versions asked
    out = tmp_path / "table.json"
    row = Row("SCALE-20", "pull", "sidecar", 20, 0, walls=[1.0])
    write_json(out, [row], {"wait_for": tmp_path / "go", "workdir": tmp_path, "runs": 1})
    table = json.loads(out.read_text())
    assert table["settings"]["wait_for"] == str(tmp_path / "go")
    assert table["rows"][0]["walls"] == [1.0]
