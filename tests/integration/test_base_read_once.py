"""A sync reads each BASE row of state.db once: the HEADs a decision needs and what the
listing teaches BASE are worked out in the planner's one walk (StreamedWalk._walk), not in
passes of their own (three decodes of every row cost ~10 us a file on a no-op).
Counted in rows decoded, not in seconds."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import sidecar.engine.state as state_module
from sidecar.core.model import BaseEntry
from sidecar.engine import walk as walk_module
from tests.conftest import S3Server
from tests.support.engine_support import FIN, PULL, config, sync, tree, write

FILES = 300


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every BASE row decoded from state.db, by path."""
    seen: Counter[str] = Counter()
    decode = state_module._base_of_row

    def counted(row: Any) -> BaseEntry:
        seen[row[0]] += 1
        return decode(row)

    monkeypatch.setattr(state_module, "_base_of_row", counted)
    return seen


async def test_a_no_op_decodes_each_base_row_once(
    moto: S3Server, workdir: Path, decoded: Counter[str]
) -> None:
    bucket = moto.new_bucket()
    local = workdir / "l"
    for n in range(FILES):
        write(local / f"d{n % 7}" / f"f{n:04d}.bin", b"x%d" % n)
    cfg = config(bucket, local, workdir / "state")
    assert (await sync(cfg, FIN)).ok
    decoded.clear()
    for direction in (PULL, FIN):
        result = await sync(cfg, direction)
        assert result.ok and result.files_skipped == FILES
        # Before: 2 each in the pull (the HEAD pass, the listing's lesson; the planner read
        # the entries learnt from memory), 3 in the finalize (and the planner's walk).
        assert len(decoded) == FILES and set(decoded.values()) == {1}, decoded.most_common(3)
        decoded.clear()


async def test_paths_waiting_for_a_head_are_decided_in_key_order(
    moto: S3Server, workdir: Path, decoded: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lost state over equal trees: every path needs a HEAD. Small batches, so the walk holds
    and lets go many times; the decisions are those of one batch, each row still read once."""
    monkeypatch.setattr(walk_module._Held, "ASK_BATCH", 3)
    monkeypatch.setattr(walk_module._Held, "HOLD_MAX", 5)
    bucket = moto.new_bucket()
    a, b = workdir / "a", workdir / "b"
    for n in range(40):
        write(a / f"f{n:03d}", os.urandom(50 + n))
    assert (await sync(config(bucket, a, workdir / "s1"), FIN)).ok
    assert (await sync(config(bucket, b, workdir / "s2"), PULL)).ok
    # b: a third of the files changed (same size), a third deleted, one new file.
    for n in range(0, 40, 3):
        write(b / f"f{n:03d}", os.urandom(50 + n))
    for n in range(1, 40, 3):
        (b / f"f{n:03d}").unlink()
    write(b / "new", b"new")
    decoded.clear()
    # A fresh state for a: no BASE, so each object is asked about (same size both sides).
    adopted = await sync(config(bucket, a, workdir / "s1-lost"), PULL)
    assert adopted.ok and adopted.files_adopted == 40 and adopted.files_transferred == 0
    pushed = await sync(config(bucket, b, workdir / "s2"), FIN, dry_run=True)
    planned = [(x.kind.value, x.path) for x in pushed.planned]
    assert planned == sorted(planned, key=lambda kp: kp[1])  # key order, held or not
    assert Counter(kind for kind, _ in planned) == {"upload": 15, "delete-remote": 13}
    assert set(decoded.values()) == {1}, decoded.most_common(3)
    assert tree(a).keys() == {f"f{n:03d}" for n in range(40)}
