"""The plan consumed as it is produced (issue 12): a sync's actions go to a spool on disk as
the planner decides them and come back phase by phase, so memory at plan and execute time
does not grow with the number of actions; and the spool hands back exactly what went in, in
the order sidecar/core/phases.py decides.

Memory is measured with tracemalloc (bytes, never wall time) in a forked child, as in
tests/integration/test_scale_memory.py.
"""

from __future__ import annotations

import asyncio
import random
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from sidecar.core import filters
from sidecar.core.model import Action, ActionKind, BaseEntry, LocalFile, RemoteObject
from sidecar.core.phases import Phase, biggest_first, phases
from sidecar.core.progress import Progress
from sidecar.engine.spool import SPOOL_NAME, PlanSpool
from sidecar.engine.state import FLUSH_AT, StateStore, state_path_for
from sidecar.engine.sync import SyncEngine
from tests.conftest import S3Server
from tests.integration.test_scale_memory import _in_forked_child
from tests.support.engine_support import FIN, PULL, config, sync, tree, write


def _forget_peak(moto: S3Server, root: Path, count: int) -> int:
    """Traced peak (bytes) of a pull whose plan is `count` FORGETs: BASE knows `count` paths
    that neither the empty bucket nor the empty folder has. No request per path: the plan
    and its execution alone."""
    local = root / "local"
    local.mkdir(parents=True)
    cfg = config(moto.new_bucket(), local, root / "state")
    state = StateStore(state_path_for(cfg.state_dir, cfg.remote_url, local), cfg.remote_url, local)
    state.load()
    for index in range(count):
        entry = BaseEntry(index, f"{index:032x}", (f"{index:032d}",), False, "")
        state.set_base(f"d{index // 1000:03d}/f{index:06d}.bin", entry)
    state.commit()
    state.close_journal()

    async def pull() -> int:
        async with SyncEngine(cfg) as engine:
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                result = await engine.run(PULL)
                peak = tracemalloc.get_traced_memory()[1] - before
            finally:
                tracemalloc.stop()
            assert result.ok, result
            assert not engine.state.base, "BASE forgot nothing"
            assert not (engine.state.directory / SPOOL_NAME).exists(), "the spool stayed"
            return peak

    return asyncio.run(pull())


@_in_forked_child
def test_plan_and_execution_hold_no_action_per_path(
    moto: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peak memory of a sync grows by a few bytes per planned action, not by the action
    (an Action in the plan's list, again in each phase's list). Measured: 239 B/action
    before the spool, 30 after (caches still growing to their caps at these sizes, such as
    BASE's lookup window of at most 2,048 rows)."""
    # BASE's changes are held until FLUSH_AT of them are pending: the same number pending at
    # the end of both runs. The path filter's verdicts (a bounded cache, 65,536 by default)
    # are kept to a few, as they are in a volume of a million files.
    monkeypatch.setattr(filters, "VERDICTS_KEPT", 1024)
    # pathlib interns every path component it parses, so the interpreter's table of interned
    # strings churns with the paths and now and then grows: one block of ~200 KiB in the
    # traced peak, in one run or the other depending on how full the table was (what the
    # xdist worker ran before). Over 2 x FLUSH_AT actions that read 54-78 B/action; over 6 x
    # it reads 29 whatever the table held (measured with 0-180,000 strings interned before).
    small = 5_000
    large = small + 6 * FLUSH_AT
    low = _forget_peak(moto, tmp_path / "small", small)
    high = _forget_peak(moto, tmp_path / "large", large)
    per_action = (high - low) / (large - small)
    assert per_action < 60, f"{per_action:.0f} B per action ({low} -> {high} B peak)"


def _random_action(rng: random.Random, index: int) -> Action:
    kind = rng.choice(list(ActionKind))
    local = remote = None
    if rng.random() < 0.7:
        local = LocalFile(
            rng.randrange(10),
            1_700_000_000 * 10**9 + index,
            2**40 + index,
            rng.random() < 0.5,
            f"{index:032x}",
        )
    if rng.random() < 0.7:
        remote = RemoteObject(
            f"vol/p{index}",
            rng.randrange(10),
            f"e{index}",
            rng.choice(["", "2026-12-03T10:00:00.000Z"]),
            rng.choice([None, f"{index:032x}"]),
            rng.choice([None, True, False]),
            rng.choice([None, True, False]),
        )
    copy = rng.choice([None, f"p{index}.conflict-20261203T100000.000Z"])
    return Action(kind, f"p{index:05d}/é", local, remote, copy is not None, copy)


def test_the_spool_hands_back_each_phase_as_the_phases_order_it(tmp_path: Path) -> None:
    """Every field comes back; in-place and deletes in plan order, transfers biggest first
    (plan order among equal sizes), as sidecar/core/phases.py decides for a list; what
    `keeps` refuses stays out; reset empties it; close removes the file."""
    rng = random.Random(12)
    actions = [_random_action(rng, index) for index in range(2_500)]
    spool = PlanSpool(tmp_path)
    for action in actions[:40]:
        spool.add(action)
    spool.reset()  # a walk that starts over (OutOfOrder)
    for action in actions:
        spool.add(action)
    split = phases(actions)
    assert list(spool.phase(Phase.IN_PLACE)) == split.in_place
    assert list(spool.phase(Phase.DELETE)) == split.deletes
    assert list(spool.phase(Phase.TRANSFER)) == biggest_first(split.transfers)
    assert list(spool.transfers_in_plan_order()) == split.transfers
    assert spool.counts.actions == len(actions)
    assert spool.counts.transfers == len(split.transfers)
    downloads = [a for a in actions if a.kind is ActionKind.DOWNLOAD and a.remote is not None]
    assert spool.counts.download_bytes == sum(a.remote.size for a in downloads if a.remote)
    spool.keeps = lambda action: action.kind is not ActionKind.UPLOAD
    assert list(spool.phase(Phase.TRANSFER)) == [
        a for a in biggest_first(split.transfers) if a.kind is not ActionKind.UPLOAD
    ]
    assert (tmp_path / SPOOL_NAME).exists()
    spool.close()
    assert not (tmp_path / SPOOL_NAME).exists()


def test_a_spool_left_by_a_killed_sync_is_replaced(tmp_path: Path) -> None:
    (tmp_path / SPOOL_NAME).write_bytes(b"not a database")
    spool = PlanSpool(tmp_path)
    spool.add(Action(ActionKind.FORGET, "a"))
    assert [a.path for a in spool.phase(Phase.IN_PLACE)] == ["a"]
    spool.close()


# ---- what the engine reads from the spool: the guards' counts and the progress totals ----
async def test_free_space_counts_only_the_downloads_that_go_ahead(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download a file/folder clash refuses is not counted: 3,000 bytes refused at 'a'
    (a folder here) and 10 bytes to come fit in 1,000 bytes free. The totals are what moves."""
    import shutil

    import sidecar.engine.sync

    bucket = moto.new_bucket()
    s3 = moto.client()
    s3.put_object(Bucket=bucket, Key="vol/a", Body=b"x" * 3000)
    s3.put_object(Bucket=bucket, Key="vol/b", Body=b"y" * 10)
    local = workdir / "l"
    write(local / "a" / "mine.txt", b"mine")
    real = shutil.disk_usage

    def tiny_disk(path: Any) -> Any:
        usage = real(path)
        return type(usage)(usage.total, usage.total - 1000, 1000)

    monkeypatch.setattr(sidecar.engine.sync.shutil, "disk_usage", tiny_disk)
    progress = Progress("pull", 0.0)
    result = await sync(config(bucket, local, workdir / "s"), PULL, progress=progress)
    assert result.fatal is None, result.as_dict()
    assert [e.path for e in result.errors] == ["a"], result.as_dict()
    assert "folder" in result.errors[0].reason
    assert tree(local) == {"a/mine.txt": b"mine", "b": b"y" * 10}
    assert (progress.files_total, progress.bytes_total) == (1, 10)


async def test_writes_below_a_file_whose_delete_failed_are_dropped(
    moto: S3Server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bucket's file 'd' became a local folder 'd/x': its delete fails, so 'd/x' is not
    sent (never a file and a folder at once), with an error each, and the progress totals
    drop it."""
    from sidecar.engine.transfer import TransferError, Transfers

    bucket = moto.new_bucket()
    s3 = moto.client()
    for name in ("d", "e1", "e2", "e3"):
        s3.put_object(Bucket=bucket, Key=f"vol/{name}", Body=name.encode())
    local = workdir / "l"
    cfg = config(bucket, local, workdir / "s")
    assert (await sync(cfg, PULL)).ok
    (local / "d").unlink()
    write(local / "d" / "x", b"now a folder")
    write(local / "big", b"z" * 100)

    async def refused(self: Transfers, action: Action) -> None:
        raise TransferError(action.path, "refused by the test")

    monkeypatch.setattr(Transfers, "delete_remote", refused)
    progress = Progress("finalize", 0.0)
    result = await sync(cfg, FIN, progress=progress)
    assert [(e.path, e.reason) for e in result.errors] == [
        ("d", "refused by the test"),
        ("d/x", "not sent: 'd' is still a file (its delete failed)"),
    ]
    assert result.files_transferred == 1 and s3.get_object(Bucket=bucket, Key="vol/big")
    assert (progress.files_total, progress.bytes_total) == (1, 100)
