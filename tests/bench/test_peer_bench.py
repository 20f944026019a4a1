"""The full peer benchmark (minutes, several GiB of tmpfs): `pytest -m bench tests/bench -s`.

Extra harness flags come from BENCH_ARGS (e.g. BENCH_ARGS="--workloads LARGE --runs 5"); the
JSON table goes to BENCH_JSON (default: bench-results.json in the pytest temp folder).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.bench
def test_peer_bench(tmp_path: Path) -> None:
    out = Path(os.environ.get("BENCH_JSON", tmp_path / "bench-results.json"))
    argv = [sys.executable, "-m", "tests.bench.peer_bench", "--json", str(out)]
    argv += shlex.split(os.environ.get("BENCH_ARGS", ""))
    # Output goes straight to the terminal (-s): the table, and progress as it runs.
    done = subprocess.run(argv, cwd=REPO, check=False)
    print(f"JSON table: {out}")
    rows = json.loads(out.read_text())["rows"]
    failed = [
        (r["workload"], r["direction"], r["tool"], r["errors"][-1:]) for r in rows if r["errors"]
    ]
    assert done.returncode == 0 and not failed, failed
