"""PullQueue (sidecar/daemon/pullqueue.py) with a scripted work function: order, one large file at a
time after the priority set, boosts, and a stop that lets files in flight land for a grace
period and then cancels them. No servers, no sleeping on the wall clock beyond a tiny grace."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sidecar.core.model import Action, ActionKind, FileError, RemoteObject
from sidecar.core.priority import PriorityRules
from sidecar.daemon.pullqueue import PriorityPull, PullQueue

BIG = 100


def download(path: str, size: int) -> Action:
    return Action(ActionKind.DOWNLOAD, path, remote=RemoteObject(path, size, "etag"))


def queue_of(files: dict[str, int], grace: float = 5.0) -> PullQueue:
    return PullQueue.of(
        [download(p, s) for p, s in files.items()], PriorityRules(10, ()), BIG, grace
    )


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


def test_auto_sync_remembers_the_latest_arrivals_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arrivals the watcher never reports (it stopped, or lost events) are not kept one per
    file: the oldest are forgotten, and taken for user changes (a push that sends nothing)."""
    from types import SimpleNamespace

    import sidecar.daemon.pullqueue as pullqueue

    monkeypatch.setattr(pullqueue, "PLACED_KEPT", 3)
    pull = PriorityPull(
        SimpleNamespace(ready=True),  # type: ignore[arg-type]
        tmp_path,
        PriorityRules(10, ()),
        BIG,
        lambda folder, name: b"",
        track_own_writes=True,
    )
    names = [f"f{i}.bin" for i in range(5)]
    for name in names:
        (tmp_path / name).write_bytes(b"from the bucket")
        pull._arrived(download(name, 15))
    assert [pull.own_write(name) for name in names] == [False, False, True, True, True]


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


# -- /wait at the edges: a path not in the pull, asked twice, asked after it arrived, a pull
# stopped and resumed. The queue lives in its store on disk (sidecar/daemon/pullstore.py):
# the order and the answers are the ones the queue in memory gave.

FILES = {"a": 1, "b": 20, "c": 21, "d": 22, "e": 23}  # a: the priority set; b-e after it


class Script:
    """The downloads of a pull, one at a time: each writes its file; a held path waits in
    flight until the test releases it."""

    def __init__(self, local: Path, *held: str) -> None:
        self.local = local
        self.started: list[str] = []
        self.reached = {path: asyncio.Event() for path in held}
        self.release = {path: asyncio.Event() for path in held}

    async def __call__(self, action: Action) -> FileError | None:
        self.started.append(action.path)
        if action.path in self.release:
            self.reached[action.path].set()
            await self.release[action.path].wait()
        target = self.local / action.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x" * FILES.get(action.path, 1))
        return None


def priority_pull(tmp_path: Path) -> PriorityPull:
    from sidecar.daemon.coordinator import Coordinator
    from tests.support.daemon_support import FakeEngine

    (tmp_path / "local").mkdir()
    (tmp_path / "state").mkdir()
    pull = PriorityPull(
        Coordinator(FakeEngine()),
        tmp_path / "local",
        PriorityRules(10, ()),
        BIG,
        lambda folder, name: b"",
    )
    pull.spool_dir = tmp_path / "state"  # the queue on disk, as the daemon has it
    return pull


def pulling(pull: PriorityPull, work: Script, files: dict[str, int]) -> asyncio.Task[set[str]]:
    downloads = (download(path, size) for path, size in files.items())
    return asyncio.ensure_future(pull.run(downloads, work, 1))


async def waiting(pull: PriorityPull, count: int) -> None:
    """Until `count` requests wait (each registers before its first real suspension)."""
    for _turn in range(100):
        if pull.status()["waiting_requests"] == count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{pull.status()['waiting_requests']} waiting, not {count}")


async def test_wait_for_a_path_not_in_the_pull_is_404_and_moves_nothing(tmp_path: Path) -> None:
    pull = priority_pull(tmp_path)
    (tmp_path / "local/mine.txt").write_bytes(b"the user's, not in the bucket")
    work = Script(tmp_path / "local", "b")
    run = pulling(pull, work, FILES)
    await asyncio.wait_for(work.reached["b"].wait(), 10)
    answer = await pull.wait(["nope"], 5)
    assert answer.status == 404 and answer.body["unknown"] == ["nope"]
    both = await pull.wait(["nope", "d"], 5)  # unknown beside a pending path: 404, no wait
    assert both.status == 404 and both.body["unknown"] == ["nope"]
    assert (await pull.wait(["mine.txt"], 0)).status == 200  # local, not pulled: here
    assert pull.status()["waiting_requests"] == 0
    work.release["b"].set()
    await asyncio.wait_for(run, 10)
    assert work.started == ["a", "b", "c", "d", "e"]  # nothing jumped the queue


async def test_a_path_waited_for_twice_goes_next_once_and_answers_both(tmp_path: Path) -> None:
    pull = priority_pull(tmp_path)
    work = Script(tmp_path / "local", "b")
    run = pulling(pull, work, FILES)
    await asyncio.wait_for(work.reached["b"].wait(), 10)
    first = asyncio.ensure_future(pull.wait(["d"], None))
    second = asyncio.ensure_future(pull.wait(["./d", "d"], None))  # the same path, twice
    await waiting(pull, 2)
    work.release["b"].set()
    answers = await asyncio.wait_for(asyncio.gather(first, second, run), 10)
    assert [answer.status for answer in answers[:2]] == [200, 200]
    assert answers[1].body["paths"] == ["d"]
    assert work.started == ["a", "b", "d", "c", "e"]  # d once, before c; then the order


async def test_a_path_waited_for_after_it_arrived_answers_at_once(tmp_path: Path) -> None:
    pull = priority_pull(tmp_path)
    work = Script(tmp_path / "local", "c")
    run = pulling(pull, work, FILES)
    await asyncio.wait_for(work.reached["c"].wait(), 10)
    assert (await pull.wait(["b"], 0)).status == 200  # arrived while the pull goes on
    assert (await pull.wait(["a", "b"], 0)).status == 200
    in_flight = await pull.wait(["c"], 0)  # started, not arrived: still pending
    assert in_flight.status == 504 and in_flight.body["pending"] == ["c"]
    assert pull.status()["waiting_requests"] == 0
    work.release["c"].set()
    await asyncio.wait_for(run, 10)
    assert work.started == ["a", "b", "c", "d", "e"]
    assert (await pull.wait(["c", "e"], 0)).status == 200  # the pull is over


async def test_a_stopped_pull_keeps_its_waiters_and_the_next_one_serves_them_first(
    tmp_path: Path,
) -> None:
    pull = priority_pull(tmp_path)
    work = Script(tmp_path / "local", "b")
    run = pulling(pull, work, FILES)
    await asyncio.wait_for(work.reached["b"].wait(), 10)
    assert pull.queue is not None
    pull.queue.stop("a request is waiting")  # what preempt does: b lands, nothing new starts
    work.release["b"].set()
    await asyncio.wait_for(run, 10)
    status = pull.status()
    assert (status["state"], status["files_pending"], status["bytes_pending"]) == (
        "paused",
        3,
        21 + 22 + 23,
    )
    timed_out = await pull.wait(["d", "c"], 0.01)
    assert timed_out.status == 504, timed_out.body
    assert (timed_out.body["pending"], timed_out.body["pending_count"]) == (["c", "d"], 2)
    assert timed_out.body["bytes_pending"] == 21 + 22
    assert (await pull.wait(["b"], 0)).status == 200  # arrived before the stop
    assert pull.progress(["c", "d", "e"]) == (3, 21 + 22 + 23)
    waiter = asyncio.ensure_future(pull.wait(["e"], None))
    await waiting(pull, 1)
    # The next pull plans the rest again (a fresh listing): the waited path first.
    work.started.clear()
    rest = {path: FILES[path] for path in ("c", "d", "e")}
    await asyncio.wait_for(pulling(pull, work, rest), 10)
    assert (await asyncio.wait_for(waiter, 10)).status == 200
    assert work.started == ["e", "c", "d"]
    status = pull.status()
    assert (status["state"], status["files_pending"], status["files_arrived"]) == (
        "complete",
        0,
        5,
    )


async def test_a_new_syncpriority_comes_first_and_orders_the_rest(tmp_path: Path) -> None:
    """The bucket's .syncpriority is fetched before anything else and its patterns, not the
    ones of the file it replaces, decide the order: `huge` (large) joins the priority set,
    `b` (`!b`) goes last, `c` (named by the old file only) is background again."""
    from sidecar.engine.sync import read_syncignore

    pull = priority_pull(tmp_path)
    pull.read_file = read_syncignore
    local = tmp_path / "local"
    (local / ".syncpriority").write_text("c\n")  # the one here before the pull
    ready_when: dict[str, bool] = {}
    script = Script(local)

    async def work(action: Action) -> FileError | None:
        ready_when[action.path] = pull.coordinator.ready
        if action.path == ".syncpriority":
            (local / ".syncpriority").write_text("huge\n!b\n")
            script.started.append(action.path)
            return None
        return await script(action)

    files = {"c": 21, "huge": 5 * BIG, ".syncpriority": 10, "b": 20, "a": 1}
    await asyncio.wait_for(pull.run((download(p, s) for p, s in files.items()), work, 1), 10)
    assert script.started == [".syncpriority", "a", "huge", "c", "b"]
    assert [path for path, ready in ready_when.items() if not ready] == [
        ".syncpriority",
        "a",
        "huge",
    ]
    assert pull.status()["files_arrived"] == 5
