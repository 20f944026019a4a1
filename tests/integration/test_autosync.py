"""Auto-sync: which changes count, when a push is due, and the loop with a real watcher."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from watchfiles import Change, awatch

from sidecar.core.model import Direction
from sidecar.core.paths import temp_name
from sidecar.daemon import autosync
from sidecar.daemon.autosync import AutoSync, ChangeFilter
from sidecar.daemon.coordinator import Coordinator
from tests.support.daemon_support import FakeEngine, failed


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_filter_ignores_checkpoints_caches_and_our_temp_files() -> None:
    root = "/data/__pycache__/vol"  # the folder itself may sit under any name
    keep = ChangeFilter(root)
    assert keep(Change.added, f"{root}/a.txt")
    assert keep(Change.modified, f"{root}/.git/index")  # users' repos are synced
    assert not keep(Change.added, f"{root}/__pycache__/a.cpython-311.pyc")
    assert not keep(Change.added, f"{root}/nb/.ipynb_checkpoints/x-checkpoint.ipynb")
    assert not keep(Change.added, f"{root}/models/{temp_name()}")
    assert keep(Change.added, f"{root}/models/.netvol-tmp.notours")
    assert not keep(Change.modified, root)
    assert not keep(Change.added, "/data/__pycache__/vol2/a.txt")


def test_filter_ignores_the_sidecars_bookkeeping_as_the_sync_does() -> None:
    """The change filter is the sync's PathFilter: .netvol/ at the top is never synced, so a
    change there triggers no push (it did, a no-op one, while the filter was its own copy)."""
    root = "/data/vol"
    keep = ChangeFilter(root)
    assert not keep(Change.added, f"{root}/.netvol/history/x")
    assert not keep(Change.added, f"{root}/.netvol")
    assert keep(Change.added, f"{root}/sub/.netvol")


def test_push_is_due_after_quiet_or_at_max_delay() -> None:
    clock = Clock()
    auto = AutoSync(Coordinator(FakeEngine()), Path("/x"), debounce=2, max_delay=5, clock=clock)
    assert auto.due_at() is None
    auto.note_changes(1)
    assert auto.due_at() == 102
    clock.now = 101
    auto.note_changes(3)
    assert auto.due_at() == 103  # quiet restarts with each change...
    for _ in range(10):
        clock.now += 1
        auto.note_changes(1)
    assert auto.due_at() == 105  # ...but never later than max_delay after the first one
    status = auto.status()
    assert status["pending_changes"] == 14
    assert status["oldest_unpushed_change_seconds"] == 11
    assert status["next_push_in_seconds"] == 0


@pytest.fixture
async def ready(engine: FakeEngine) -> AsyncIterator[Coordinator]:
    engine.auto_release = True
    async with Coordinator(engine) as coordinator:
        await coordinator.submit(Direction.PULL).result()
        yield coordinator


class ScriptedWatch:
    """An injected watcher (AutoSync.watch): yields the batches the test sends, filtered with
    the filter AutoSync gives it as watchfiles.awatch filters them, and send() returns once
    AutoSync has taken the batch in. So a test proves "this change is no reason to push" by
    waiting for its batch to be handled, not by sleeping and seeing nothing."""

    def __init__(self) -> None:
        self.batches: asyncio.Queue[set[tuple[Change, str]]] = asyncio.Queue()
        self.started = 0  # watches started (AutoSync restarts them)

    async def send(self, *changes: tuple[Change, Path]) -> None:
        await self.batches.put({(change, str(path)) for change, path in changes})
        await self.batches.join()

    async def __call__(
        self, _folder: Path, *, watch_filter: ChangeFilter, stop_event: asyncio.Event, **_: Any
    ) -> AsyncIterator[set[tuple[Change, str]]]:
        self.started += 1
        while not stop_event.is_set():
            batch = asyncio.ensure_future(self.batches.get())
            stopped = asyncio.ensure_future(stop_event.wait())
            await asyncio.wait({batch, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not batch.done():
                batch.cancel()
                return
            kept = {change for change in batch.result() if watch_filter(*change)}
            if kept:
                yield kept  # resumed once AutoSync noted the batch: then it is taken in
            self.batches.task_done()


class CountingWatch:
    """The real watcher, counting the watches started: each one registers its inotify watch
    before its first await, so `started == n` means the n-th watch sees every later write."""

    def __init__(self) -> None:
        self.started = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> AsyncIterator[set[tuple[Change, str]]]:
        self.started += 1
        async for changes in awatch(*args, **kwargs):
            yield changes


async def wait_for_pushes(auto: AutoSync, count: int) -> None:
    """Until `count` pushes have finished (polling: AutoSync has no event for this)."""
    async with asyncio.timeout(10):
        while auto.pushes < count:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_changes_are_pushed_once_they_settle(
    tmp_path: Path, engine: FakeEngine, ready: Coordinator
) -> None:
    watch = ScriptedWatch()
    auto = AutoSync(ready, tmp_path, debounce=0.3, max_delay=5, watch=watch)
    stop = asyncio.Event()
    loop = asyncio.create_task(auto.run(stop))
    try:
        # Watching started after readiness: one catch-up push for what nobody saw.
        await wait_for_pushes(auto, 1)
        await watch.send(
            (Change.added, tmp_path / temp_name()),  # ours: never a reason to push
            (Change.added, tmp_path / "__pycache__"),
            (Change.added, tmp_path / "__pycache__" / "m.pyc"),
        )
        # Taken in, and nothing noted: no push is due, none ran.
        assert auto.pending_changes == 0 and auto.due_at() is None
        assert engine.calls == [(Direction.PULL, False), (Direction.FINALIZE, False)]
        await watch.send((Change.added, tmp_path / "notes.txt"))
        assert auto.pending_changes == 1
        await wait_for_pushes(auto, 2)
        assert auto.pushes == 2 and auto.last_push is not None and auto.last_push["ok"]
        assert auto.pending_changes == 0
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)
    assert auto.state == "stopped"


async def test_failed_push_is_retried_with_backoff(
    tmp_path: Path, engine: FakeEngine, ready: Coordinator
) -> None:
    engine.results = [failed(Direction.FINALIZE, fatal="503 SlowDown")]
    watch = ScriptedWatch()
    auto = AutoSync(ready, tmp_path, debounce=0.1, max_delay=1, watch=watch)
    stop = asyncio.Event()
    loop = asyncio.create_task(auto.run(stop))
    try:
        await watch.send((Change.added, tmp_path / "a.txt"))
        await wait_for_pushes(auto, 2)
        assert auto.failures_in_row == 0
        assert [call[0] for call in engine.calls].count(Direction.FINALIZE) == 2
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)


async def test_folder_created_after_start_is_watched_and_pushed(
    tmp_path: Path, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The initial pull creates the folder: auto-sync must not sit silently idle."""
    monkeypatch.setattr(autosync, "FOLDER_POLL", 0.05, raising=False)
    engine.auto_release = True
    folder = tmp_path / "not-yet"
    async with Coordinator(engine) as coordinator:
        auto = AutoSync(coordinator, folder, debounce=0.1, max_delay=1)
        stop = asyncio.Event()
        loop = asyncio.create_task(auto.run(stop))
        try:
            await wait_for(lambda: auto.watcher_state == "waiting for the folder")
            waiting = auto.status()
            folder.mkdir()  # what the initial pull does
            await coordinator.submit(Direction.PULL).result()
            await wait_for_pushes(auto, 1)  # the catch-up push: nobody watched before
            (folder / "notes.txt").write_bytes(b"written once the notebook started")
            await wait_for_pushes(auto, 2)
            assert waiting["watching"] is False
            assert waiting["watcher_state"] == "waiting for the folder"
            assert auto.status()["watching"] is True
        finally:
            stop.set()
            await asyncio.wait_for(loop, 5)
        assert auto.status()["watching"] is False


async def test_replaced_folder_and_dead_watcher_are_watched_again(
    tmp_path: Path, engine: FakeEngine, ready: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(autosync, "FOLDER_POLL", 0.05, raising=False)
    monkeypatch.setattr(autosync, "WATCH_RETRY", 0.05, raising=False)
    folder = tmp_path / "vol"
    folder.mkdir()
    watch = CountingWatch()
    auto = AutoSync(ready, folder, debounce=0.1, max_delay=1, watch=watch)
    stop = asyncio.Event()
    loop = asyncio.create_task(auto.run(stop))
    try:
        await wait_for(lambda: watch.started == 1, "the first watch")
        (folder / "first.txt").write_bytes(b"first")
        await wait_for_pushes(auto, 1)
        folder.rename(tmp_path / "old")
        folder.mkdir()  # same path, another folder: the old watch sees nothing here
        await wait_for(lambda: watch.started == 2, "a watch of the new folder")
        pushes = auto.pushes
        (folder / "a.txt").write_bytes(b"a")
        await wait_for_pushes(auto, pushes + 1)
        assert auto.watcher_restarts >= 1 and auto.watching
        assert auto._watcher is not None
        restarts = auto.watcher_restarts
        watcher = auto._watcher
        # A watcher that dies for any reason is restarted. One cancel can be absorbed by
        # watchfiles' anyio task group when it lands just as a batch of changes ends its
        # cancel scope (seen under load): cancel until the task is really gone.
        while not watcher.done():
            watcher.cancel()
            await asyncio.sleep(0.05)
        await wait_for(lambda: auto.watcher_restarts > restarts and watch.started == 3)
        pushes = auto.pushes
        (folder / "b.txt").write_bytes(b"b")
        await wait_for_pushes(auto, pushes + 1)
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)


async def wait_for(check: Callable[[], bool], what: object = None) -> None:
    try:
        async with asyncio.timeout(10):
            while not check():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out; {what}") from None
