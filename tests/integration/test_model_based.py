"""Model-based stateful test of the sync engine (issue 9): random local edits, outside writers
and syncs against moto, with the promises of README "How a sync decides" checked after every sync.

Hypothesis drives a `SyncWorld` (tests/support/model_world.py): one replica (a local folder, a
state dir and an in-process SyncEngine) and an outside writer (boto3, with or without our
metadata) sharing one moto bucket. Every sync checks (SyncWorld.sync):

- no version is lost: every content that was the newest at a path on either side before the
  sync (it differs from what both sides last agreed on) is afterwards at that path or in a
  `.conflict-` copy, locally or in the bucket; every object holds bytes some actor wrote;
- errors only where the input holds a file/folder clash, never a fatal failure;
- every new conflict copy is reported; no temp file is visible on either side;
- a no-op re-sync moves nothing (neither side changes);
- after a pull and a finalize with no outside edit in between, both sides are equal
  (content and executable bit).

The default run (~1,000 steps) is part of the default suite; the long one is
`pytest -m slow tests/integration/test_model_based.py` (SIDECAR_MODEL_STEPS steps, default 20,000).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, get_state_machine_test, initialize, rule

from sidecar.core.backup import BackupMode
from sidecar.core.model import Direction
from tests.conftest import S3Server
from tests.support.model_world import PATHS, STATS, SyncWorld

# Small contents from a tiny pool (equal content on both sides happens often) or from a wide
# range (a lost version cannot hide behind an equal copy elsewhere).
CONTENTS = st.one_of(
    st.sampled_from([b"", b"x", b"y"]),
    st.integers(0, 10**6).map(lambda n: b"v%d" % n),
)
PATH = st.sampled_from(PATHS)
# An existing file is picked by index: which files exist depends on the clock (conflict copy
# names), and hypothesis needs draws that do not.
PICK = st.integers(0, 15)


def _on_picked(paths: list[str], index: int, act: Callable[[str], None]) -> None:
    """`act` on the path `index` picks among `paths`, if there is any."""
    if paths:
        act(paths[index % len(paths)])


# ---- the steps: small values with a readable repr, so a shrunk failure reads as a script -----
@dataclass(frozen=True)
class LocalWrite:
    path: str
    content: bytes
    executable: bool
    in_place: bool  # False: an editor's save (new file renamed over the old one)

    def apply(self, world: SyncWorld) -> None:
        world.local_write(self.path, self.content, self.executable, self.in_place)


@dataclass(frozen=True)
class LocalDelete:
    pick: int

    def apply(self, world: SyncWorld) -> None:
        _on_picked(world.local_files(), self.pick, world.local_delete)


@dataclass(frozen=True)
class LocalChmod:
    pick: int

    def apply(self, world: SyncWorld) -> None:
        _on_picked(world.local_files(), self.pick, world.local_chmod)


@dataclass(frozen=True)
class LocalRename:
    pick: int
    to: str

    def apply(self, world: SyncWorld) -> None:
        _on_picked(world.local_files(), self.pick, lambda path: world.local_rename(path, self.to))


@dataclass(frozen=True)
class OutsidePut:
    path: str
    content: bytes
    our_metadata: bool  # another replica; False: aws cli, the console
    executable: bool
    keep_clash: bool  # leave 'a' when writing 'a/q' (a bucket no filesystem can hold)

    def apply(self, world: SyncWorld) -> None:
        world.outside_put(
            self.path, self.content, self.our_metadata, self.executable, self.keep_clash
        )


@dataclass(frozen=True)
class BothEdit:
    """The notebook user and another writer change one path between two syncs."""

    path: str
    local_content: bytes
    remote_content: bytes
    our_metadata: bool

    def apply(self, world: SyncWorld) -> None:
        world.local_write(self.path, self.local_content, False, True)
        world.outside_put(self.path, self.remote_content, self.our_metadata, False, False)


@dataclass(frozen=True)
class OutsideDelete:
    pick: int

    def apply(self, world: SyncWorld) -> None:
        _on_picked(world.remote_paths(), self.pick, world.outside_delete)


@dataclass(frozen=True)
class OutsideChmod:
    """Another replica's mode-only finalize: the object's metadata rewritten in place."""

    pick: int
    # In a second after the last sync: listings date objects to the second, so only then is
    # the rewrite promised to be seen by this replica.
    later: bool

    def apply(self, world: SyncWorld) -> None:
        def chmod(path: str) -> None:
            if self.later:
                world.wait_for_next_second()
            world.outside_chmod(path)

        _on_picked(world.remote_paths(), self.pick, chmod)


@dataclass(frozen=True)
class Sync:
    direction: Direction

    def apply(self, world: SyncWorld) -> None:
        world.sync(self.direction)


@dataclass(frozen=True)
class Restart:
    """A new process: a fresh engine that loads BASE from the state dir."""

    def apply(self, world: SyncWorld) -> None:
        world.restart_engine()


Step = (
    LocalWrite
    | LocalDelete
    | LocalChmod
    | LocalRename
    | OutsidePut
    | BothEdit
    | OutsideDelete
    | OutsideChmod
    | Sync
    | Restart
)


def _outside_put(keep_clash: bool) -> st.SearchStrategy[Step]:
    return st.builds(OutsidePut, PATH, CONTENTS, st.booleans(), st.booleans(), st.just(keep_clash))


_WEIGHTED: list[tuple[int, Callable[[], st.SearchStrategy[Step]]]] = [
    (8, lambda: st.builds(LocalWrite, PATH, CONTENTS, st.booleans(), st.booleans())),
    (2, lambda: st.builds(LocalDelete, PICK)),
    (2, lambda: st.builds(LocalChmod, PICK)),
    (2, lambda: st.builds(LocalRename, PICK, PATH)),
    # Mostly a writer that keeps the bucket a tree; sometimes one that leaves 'a' and 'a/q'.
    (5, lambda: _outside_put(keep_clash=False)),
    (1, lambda: _outside_put(keep_clash=True)),
    (2, lambda: st.builds(OutsideDelete, PICK)),
    (2, lambda: st.builds(OutsideChmod, PICK, st.booleans())),
    # Conflicts (and several on one path within a second) need both sides to change a path.
    (4, lambda: st.builds(BothEdit, PATH, CONTENTS, CONTENTS, st.booleans())),
    (4, lambda: st.builds(Sync, st.just(Direction.PULL))),
    (4, lambda: st.builds(Sync, st.just(Direction.FINALIZE))),
    (1, lambda: st.just(Restart())),
]
# One rule drawing from a weighted mix: hypothesis's per-rule swarm testing left most short
# runs with one kind of step only (400 deletes of nothing, or syncs of an empty folder).
# Equal strategies count once in one_of: each unit of weight builds its own.
STEPS: st.SearchStrategy[Step] = st.one_of(
    [make() for weight, make in _WEIGHTED for _ in range(weight)]
)


class SyncMachine(RuleBasedStateMachine):
    # Set by _run before each run.
    server: S3Server
    scratch: Path
    backup: BackupMode = BackupMode.OFF

    def __init__(self) -> None:
        super().__init__()
        self.world: SyncWorld | None = None
        self.history: list[str] = []

    @initialize(force_delete=st.booleans())
    def start(self, force_delete: bool) -> None:
        # Half the runs keep the delete guard (>50% of the other side withholds deletes).
        self.world = SyncWorld(
            self.server, self.scratch, force_delete=force_delete, backup=self.backup
        )
        self.history = [f"start(force_delete={force_delete})"]

    @rule(step=STEPS)
    def act(self, step: Step) -> None:
        assert self.world is not None
        STATS["steps"] += 1
        STATS[type(step).__name__] += 1
        self.history.append(repr(step))
        try:
            step.apply(self.world)
        except AssertionError as exc:
            # Hypothesis prints the shrunk steps, but a failure that depends on the clock
            # (two writes in one second) may not replay: keep the steps that did fail.
            steps = "\n".join(self.history)
            raise AssertionError(f"{exc}\nsteps of this run:\n{steps}") from None

    def teardown(self) -> None:
        if self.world is not None:
            self.world.close()


# database=None: no example database in the repo or a CI cache (a stale one replays old
# sequences); deadline=None: a sync's duration depends on the machine's load, not the code.
_COMMON = {
    "deadline": None,
    "database": None,
    "print_blob": True,  # a failure of a random run prints how to replay it exactly
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


def _run(
    server: S3Server,
    scratch: Path,
    caplog: pytest.LogCaptureFixture,
    run_settings: settings,
    run_seed: int | None,
    machine: type[SyncMachine] = SyncMachine,
) -> None:
    # The engine logs every sync; thousands of them would bury the shrunk steps of a failure.
    caplog.set_level(logging.CRITICAL, logger="sidecar")
    machine.server = server
    machine.scratch = scratch
    test = get_state_machine_test(machine, settings=run_settings)
    if run_seed is not None:
        test = seed(run_seed)(test)
    test()


def _explore(
    server: S3Server,
    scratch: Path,
    caplog: pytest.LogCaptureFixture,
    steps: int,
    machine: type[SyncMachine] = SyncMachine,
) -> None:
    """The long runs: random seeds, so each explores new sequences (a failure prints the
    shrunk steps), until `steps` steps ran."""
    while STATS["steps"] < steps:
        _run(
            server,
            scratch,
            caplog,
            settings(max_examples=50, stateful_step_count=100, **_COMMON),
            run_seed=None,
            machine=machine,
        )


@pytest.fixture
def model_s3(moto_s3: S3Server, s3_env) -> S3Server:  # type: ignore[no-untyped-def]
    """moto, with the engine's credentials in the environment and the counts at zero."""
    s3_env(moto_s3)
    STATS.clear()
    return moto_s3


def test_model_based_short(
    model_s3: S3Server, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A fixed seed: CI runs the same ~1,000 steps every time, so a red run is reproducible.
    _run(
        model_s3,
        workdir,
        caplog,
        settings(max_examples=27, stateful_step_count=50, **_COMMON),
        run_seed=20261203,
    )
    print(f"model-based short run: {dict(STATS)}")
    # A change of the generator that stops exercising the engine fails here, not silently.
    assert STATS["steps"] >= 900, STATS
    assert min(STATS["conflicts"], STATS["deleted"], STATS["equality checks"]) > 10, STATS


@pytest.mark.slow
def test_model_based_long(
    model_s3: S3Server, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _explore(model_s3, workdir, caplog, int(os.environ.get("SIDECAR_MODEL_STEPS", "20000")))
    print(f"model-based long run: {dict(STATS)}")


class BackupMachine(SyncMachine):
    """Copy backups on: after each sync, every object it replaced or deleted is recoverable
    through its history record (SyncWorld._check_backups)."""

    backup = BackupMode.COPY


def test_model_based_with_backups_short(
    model_s3: S3Server, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Few steps: the default run stays fast; the slow variant below runs more.
    _run(
        model_s3,
        workdir,
        caplog,
        settings(max_examples=6, stateful_step_count=40, **_COMMON),
        run_seed=20261204,
        machine=BackupMachine,
    )
    print(f"model-based run with backups: {dict(STATS)}")
    assert STATS["backups checked"] > 5, STATS


@pytest.mark.slow
def test_model_based_with_backups_long(
    model_s3: S3Server, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    steps = int(os.environ.get("SIDECAR_MODEL_STEPS", "20000")) // 4
    _explore(model_s3, workdir, caplog, steps, BackupMachine)
    print(f"model-based long run with backups: {dict(STATS)}")


# ---- failures the model found, kept as their shrunk steps ----------------------------------
FOUND = {
    # Both sides added the same bytes, only the local copy executable: the first sync
    # adopted them with the local mode in BASE, so no later sync ever pushed the mode.
    "equal-bytes-other-mode": [
        BothEdit("a", b"", b"", our_metadata=False),
        LocalChmod(0),
        Sync(Direction.PULL),
        Sync(Direction.FINALIZE),
    ],
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_model_found(  # type: ignore[no-untyped-def]
    name: str, moto_s3: S3Server, s3_env, workdir: Path
) -> None:
    s3_env(moto_s3)
    world = SyncWorld(moto_s3, workdir, force_delete=False)
    try:
        for step in FOUND[name]:
            step.apply(world)
    finally:
        world.close()
