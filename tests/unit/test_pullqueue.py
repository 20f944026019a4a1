"""PullQueue (sidecar/daemon/pullqueue.py) with a scripted work function: order, one large file at a
time after the priority set, boosts, and a stop that lets files in flight land for a grace
period and then cancels them. No servers, no sleeping on the wall clock beyond a tiny grace."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sidecar.core.model import Action, ActionKind, FileError, RemoteObject
from sidecar.core.priority import PriorityRules
from sidecar.daemon.pullqueue import PullQueue

BIG = 100


def download(path: str, size: int) -> Action:
    return Action(ActionKind.DOWNLOAD, path, remote=RemoteObject(path, size, "etag"))


def queue_of(files: dict[str, int], grace: float = 5.0) -> PullQueue:
    return PullQueue([download(p, s) for p, s in files.items()], PriorityRules(10, ()), BIG, grace)


async def test_priority_first_then_smallest_and_one_large_file_at_a_time() -> None:
    files = {"big2": 300, "s1": 5, "big1": 200, "mid": 50, "s0": 1}
    queue = queue_of(files)
    started: list[str] = []
    in_flight: set[str] = set()
    most_large = 0

    async def work(action: Action) -> FileError | None:
        nonlocal most_large
        started.append(action.path)
        in_flight.add(action.path)
        most_large = max(most_large, sum(files[p] >= BIG for p in in_flight))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        in_flight.discard(action.path)
        return None

    done: list[str] = []
    await queue.drain(work, 4, lambda a, e: done.append(a.path), lambda a: False)
    assert started[:2] == ["s0", "s1"]  # the priority set first
    assert started[2:] == ["mid", "big1", "big2"]
    assert most_large == 1
    assert sorted(done) == sorted(files)


async def test_a_boosted_path_goes_next() -> None:
    queue = queue_of({f"f{i}": 20 + i for i in range(5)})
    started: list[str] = []

    async def work(action: Action) -> FileError | None:
        started.append(action.path)
        if action.path == "f0":
            queue.boost(["f4"])
        return None

    await queue.drain(work, 1, lambda a, e: None, lambda a: False)
    assert started == ["f0", "f4", "f1", "f2", "f3"]


async def test_a_stop_lets_files_in_flight_land_then_cancels_what_is_stuck() -> None:
    queue = queue_of({"a": 20, "b": 21, "stuck": 22, "later": 30}, grace=0.05)
    landed: list[str] = []
    cancelled: list[str] = []
    stuck = asyncio.Event()  # never set: a stalled connection

    async def work(action: Action) -> FileError | None:
        if action.path == "stuck":
            try:
                queue.stop("a finalize is waiting")
                await stuck.wait()
            except asyncio.CancelledError:
                cancelled.append(action.path)
                raise
        await asyncio.sleep(0)
        return None

    await asyncio.wait_for(
        queue.drain(work, 3, lambda a, e: landed.append(a.path), lambda a: False), 10
    )
    assert sorted(landed) == ["a", "b"]  # in flight at the stop: they landed
    assert cancelled == ["stuck"]  # cut after the grace
    assert queue.untaken() == 1  # "later" never started: it stays pending


def test_auto_sync_ignores_what_the_background_pull_placed(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from sidecar.daemon.autosync import ChangeFilter
    from sidecar.daemon.pullqueue import PriorityPull

    pull = PriorityPull(
        SimpleNamespace(ready=True),  # type: ignore[arg-type]
        tmp_path,
        PriorityRules(10, ()),
        BIG,
        lambda folder, name: b"",
        track_own_writes=True,
    )
    (tmp_path / "d/e").mkdir(parents=True)
    for name in ("d/e/placed.bin", "d/edited.bin"):
        (tmp_path / name).write_bytes(b"from the bucket")
        pull._arrived(download(name, 15))
    (tmp_path / "d/edited.bin").write_bytes(b"the user's edit")
    (tmp_path / "mine.txt").write_bytes(b"new")
    watch = ChangeFilter(str(tmp_path), pull.own_write)
    added = 1  # watchfiles.Change.added
    assert not watch(added, str(tmp_path / "d/e/placed.bin"))  # arrived as placed
    assert not watch(added, str(tmp_path / "d/e"))  # a folder the pull made
    assert watch(added, str(tmp_path / "d/edited.bin"))  # changed since: the user's
    assert watch(added, str(tmp_path / "mine.txt"))


def test_sidecar_status_shows_the_background_pull() -> None:
    from sidecar.cli.client import describe_status

    background = {
        "enabled": True,
        "state": "pulling",
        "files_pending": 3,
        "bytes_pending": 3 * 1024**3,
        "eta_seconds": 90,
        "failed_count": 1,
    }
    text = describe_status({"ready": True, "background_pull": background}, now=0.0)
    assert "background pull: pulling, 3 file(s) (3.0 GiB) to come, ETA 1m30s, 1 failed" in text
    done = describe_status(
        {"ready": True, "background_pull": {**background, "state": "complete"}}, 0
    )
    assert "background pull" not in done
