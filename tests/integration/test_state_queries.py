"""What state.db costs per record, counted in SQL statements (not seconds): a first pull
records BASE and the hash cache file by file, in near key order (transfers end out of
order within --concurrency); a no-op looks every path up in key order. Both must cost a
query per window of paths, not one per path, and a flush per FLUSH_AT records."""

from __future__ import annotations

import random
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import sidecar.engine.state as state_module
from sidecar.core.model import BaseEntry
from sidecar.engine.state import StateStore

FILES = 20_000
CONCURRENCY = 32


def _entry(index: int) -> BaseEntry:
    return BaseEntry(index, f"{index:032x}", (f"{index:032d}",), False, "2026-12-03T10:00:00.000Z")


def _paths() -> list[str]:
    return [f"d{n // 100:04d}/f{n:07d}.bin" for n in range(FILES)]


def _as_transfers_end(paths: list[str], seed: int = 3) -> list[str]:
    """Key order, shuffled within each run of CONCURRENCY (the order downloads finish in)."""
    rng = random.Random(seed)
    out: list[str] = []
    for start in range(0, len(paths), CONCURRENCY):
        run = paths[start : start + CONCURRENCY]
        rng.shuffle(run)
        out += run
    return out


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every statement state.db runs, by its first word."""
    seen: Counter[str] = Counter()
    configure = state_module._configure

    def counted(db: sqlite3.Connection) -> None:
        configure(db)
        db.set_trace_callback(lambda sql: seen.update([sql.split()[0].upper()]))

    monkeypatch.setattr(state_module, "_configure", counted)
    return seen


def _store(directory: Path) -> StateStore:
    state = StateStore(directory, "s3://b/p/", Path("/data"))
    state.load()
    return state


def test_first_pull_records_cost_a_query_per_window_not_per_file(
    tmp_path: Path, statements: Counter[str]
) -> None:
    state = _store(tmp_path)
    for n, path in enumerate(_as_transfers_end(_paths())):
        state.set_base(path, _entry(n))
        state.set_hash(path, (n, 1_796_000_000_000_000_000 + n, 10**6 + n, f"{n:032x}"))
    state.commit()
    flushes = 2 * FILES // state_module.FLUSH_AT + 1
    assert statements["COMMIT"] <= flushes + 1, statements
    # 20,000 files: 68 SELECTs measured; one per file would be 40,000.
    assert statements["SELECT"] <= FILES // 100, statements


def test_a_no_op_looks_paths_up_a_window_at_a_time(
    tmp_path: Path, statements: Counter[str]
) -> None:
    state = _store(tmp_path)
    paths = _paths()
    for n, path in enumerate(paths):
        state.set_base(path, _entry(n))
    state.commit()
    state.close_journal()
    statements.clear()
    again = _store(tmp_path)
    found: list[Any] = [again.base.get(path) for path in paths]  # as the planner asks
    assert found == [_entry(n) for n in range(FILES)]
    assert list(again.base) == paths
    assert statements["SELECT"] <= FILES // 200, statements
    assert statements["INSERT"] == statements["UPDATE"] == statements["DELETE"] == 0
