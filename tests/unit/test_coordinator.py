"""Coordination rules of the daemon, with a scripted fake engine (no I/O)."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.core.model import Direction, FileError
from sidecar.core.result import SyncResult
from sidecar.daemon.coordinator import Coordinator, Refused
from sidecar.daemon.metrics import Metrics
from tests.support.daemon_support import FakeEngine, failed

PULL, FINALIZE = Direction.PULL, Direction.FINALIZE


async def ready_coordinator(engine: FakeEngine, **kwargs: object) -> Coordinator:
    coordinator = Coordinator(engine, **kwargs)  # type: ignore[arg-type]
    await coordinator.__aenter__()
    ticket = coordinator.submit(PULL, origin="initial")
    await engine.wait_calls(1)
    engine.release()
    await ticket.result()
    assert coordinator.ready
    return coordinator


async def test_request_joins_a_run_that_has_not_scanned_yet(engine: FakeEngine) -> None:
    engine.before_scan = asyncio.Event()
    async with Coordinator(engine) as coordinator:
        first = coordinator.submit(PULL)
        await engine.wait_calls(1)
        assert coordinator.current is not None and coordinator.current.unscanned
        second = coordinator.submit(PULL)
        assert (first.state, second.state) == ("started", "joined")
        engine.before_scan.set()
        engine.release()
        one, two = await asyncio.gather(first.result(), second.result())
        assert one is two
        assert engine.calls == [(PULL, False)]


async def test_status_shows_the_walks_counts_while_it_scans(engine: FakeEngine) -> None:
    """/status's `current` during the walk (README, The daemon): the counts the engine grows,
    and a line that says them, not "0/0 files"."""
    engine.before_scan = asyncio.Event()
    async with Coordinator(engine) as coordinator:
        ticket = coordinator.submit(PULL)
        await engine.wait_calls(1)
        assert coordinator.current is not None and coordinator.current.progress is not None
        progress = coordinator.current.progress
        progress.phase = "scanning"  # as the engine sets it, then grows the counts
        progress.files_scanned, progress.objects_listed, progress.paths_compared = 3, 5, 2
        progress.files_hashed, progress.objects_checked = 1, 4
        current = coordinator.status()["current"]
        walk = ("files_scanned", "objects_listed", "paths_compared", "files_hashed")
        assert [current[name] for name in (*walk, "objects_checked")] == [3, 5, 2, 1, 4]
        assert current["line"] == (
            "pull scanning: 3 files in the folder, 5 objects listed, 2 paths compared "
            "(1 files hashed, 4 objects checked)"
        )
        engine.before_scan.set()
        engine.release()
        assert (await ticket.result()).ok


async def test_request_after_the_scan_queues_and_later_requests_share_that_run(
    engine: FakeEngine,
) -> None:
    """A finalize that already scanned cannot answer for a file saved before the request."""
    coordinator = await ready_coordinator(engine)
    try:
        running = coordinator.submit(FINALIZE)
        await engine.wait_calls(2)
        assert coordinator.status()["current"]["phase"] == "transferring"
        late = [coordinator.submit(FINALIZE) for _ in range(3)]
        assert [ticket.state for ticket in late] == ["queued"] * 3
        assert all(ticket.run is late[0].run is not running.run for ticket in late)
        assert late[0].run.requesters == 3
        engine.release()
        await running.result()
        await engine.wait_calls(3)
        engine.release()
        results = await asyncio.gather(*(ticket.result() for ticket in late))
        assert all(result is results[0] for result in results)
        assert results[0] is not await running.result()
        assert engine.calls == [(PULL, False), (FINALIZE, False), (FINALIZE, False)]
    finally:
        await coordinator.__aexit__(None, None, None)


async def test_other_operation_waits_its_turn(engine: FakeEngine) -> None:
    coordinator = await ready_coordinator(engine)
    try:
        pull = coordinator.submit(PULL)
        await engine.wait_calls(2)
        finalize = coordinator.submit(FINALIZE)
        assert finalize.state == "queued"
        await asyncio.sleep(0.05)
        assert len(engine.calls) == 2, "finalize must not start while the pull runs"
        engine.release()
        await pull.result()
        await engine.wait_calls(3)
        assert engine.calls[-1] == (FINALIZE, False)
        engine.release()
        assert (await finalize.result()).operation is FINALIZE
    finally:
        await coordinator.__aexit__(None, None, None)


async def test_waiting_requests_for_the_same_operation_share_one_run(engine: FakeEngine) -> None:
    coordinator = await ready_coordinator(engine)
    try:
        coordinator.submit(PULL)
        await engine.wait_calls(2)
        waiting = [coordinator.submit(FINALIZE) for _ in range(3)]
        assert len(coordinator.pending) == 1
        assert coordinator.pending[0].requesters == 3
        engine.release()
        await engine.wait_calls(3)
        engine.release()
        results = await asyncio.gather(*(ticket.result() for ticket in waiting))
        assert all(result is results[0] for result in results)
        assert [call[0] for call in engine.calls] == [PULL, PULL, FINALIZE]
    finally:
        await coordinator.__aexit__(None, None, None)


async def test_join_running_false_waits_for_a_fresh_run(engine: FakeEngine) -> None:
    coordinator = await ready_coordinator(engine)
    try:
        running = coordinator.submit(FINALIZE)
        await engine.wait_calls(2)
        fresh = coordinator.submit(FINALIZE, join_running=False, origin="auto-sync")
        assert fresh.run is not running.run
        engine.release()
        await engine.wait_calls(3)
        engine.release()
        assert await fresh.result() is not await running.result()
    finally:
        await coordinator.__aexit__(None, None, None)


async def test_dry_run_does_not_join_a_real_run(engine: FakeEngine) -> None:
    async with Coordinator(engine) as coordinator:
        real = coordinator.submit(PULL)
        await engine.wait_calls(1)
        dry = coordinator.submit(PULL, dry_run=True)
        assert dry.run is not real.run
        engine.release()
        await engine.wait_calls(2)
        engine.release()
        assert (await dry.result()).dry_run
        assert engine.calls == [(PULL, False), (PULL, True)]


async def test_read_only_refuses_finalize_with_a_clear_reason(engine: FakeEngine) -> None:
    coordinator = await ready_coordinator(engine, read_only=True)
    try:
        with pytest.raises(Refused, match="read-only") as caught:
            coordinator.submit(FINALIZE)
        assert not caught.value.retry_later
        with pytest.raises(Refused):
            coordinator.submit(FINALIZE, dry_run=True)
    finally:
        await coordinator.__aexit__(None, None, None)


async def test_ready_only_after_a_successful_real_pull(engine: FakeEngine) -> None:
    engine.auto_release = True
    engine.results = [SyncResult(PULL), failed(fatal="403 InvalidAccessKeyId"), SyncResult(PULL)]
    async with Coordinator(engine) as coordinator:
        await coordinator.submit(PULL, dry_run=True).result()
        assert not coordinator.ready, "a dry run fills nothing"
        await coordinator.submit(PULL).result()
        assert not coordinator.ready
        assert coordinator.last_error is not None
        assert "InvalidAccessKeyId" in coordinator.last_error["message"]
        await coordinator.submit(PULL).result()
        assert coordinator.ready
        await asyncio.wait_for(coordinator.wait_ready(), 1)


async def test_finalize_before_the_initial_pull_is_refused(engine: FakeEngine) -> None:
    async with Coordinator(engine) as coordinator:
        with pytest.raises(Refused, match="initial pull") as caught:
            coordinator.submit(FINALIZE)
        assert caught.value.retry_later
        # Queued behind a pull that then fails: refused when its turn comes, never run.
        pull = coordinator.submit(PULL)
        finalize = coordinator.submit(FINALIZE)
        await engine.wait_calls(1)
        engine.results = [failed()]
        engine.release()
        await pull.result()
        with pytest.raises(Refused, match="last error: boom"):
            await finalize.result()
        assert engine.calls == [(PULL, False)]


async def test_cancelling_a_waiter_does_not_cancel_the_sync(engine: FakeEngine) -> None:
    async with Coordinator(engine) as coordinator:
        ticket = coordinator.submit(PULL)
        impatient = asyncio.ensure_future(ticket.result())
        await engine.wait_calls(1)
        impatient.cancel()
        await asyncio.sleep(0)
        engine.release()
        result = await ticket.result()
        assert result.ok


async def test_cancel_current_reports_a_cancelled_result(engine: FakeEngine) -> None:
    async with Coordinator(engine) as coordinator:
        metrics = Metrics.of(coordinator)
        ticket = coordinator.submit(PULL)
        await engine.wait_calls(1)
        assert coordinator.cancel_current("test") is ticket.run
        result = await ticket.result()
        assert result.fatal is not None and result.fatal.startswith("cancelled")
        assert 'outcome="cancelled"' in metrics.render()
        assert not coordinator.ready


async def test_engine_crash_becomes_a_failed_result_and_next_run_works(
    engine: FakeEngine,
) -> None:
    engine.auto_release = True
    engine.results = [RuntimeError("bug in engine")]
    async with Coordinator(engine) as coordinator:
        crashed = await coordinator.submit(PULL).result()
        assert crashed.fatal is not None and "bug in engine" in crashed.fatal
        assert (await coordinator.submit(PULL).result()).ok


async def test_close_drops_queued_runs_cancels_pull_and_keeps_taking_finalize(
    engine: FakeEngine,
) -> None:
    coordinator = await ready_coordinator(engine)
    try:
        pull = coordinator.submit(PULL)
        await engine.wait_calls(2)
        queued_dry = coordinator.submit(FINALIZE, dry_run=True)
        coordinator.close("shutting down")
        assert (await pull.result()).fatal == "cancelled: cancelled before it finished"
        assert (await queued_dry.result()).fatal == "cancelled: shutting down"
        with pytest.raises(Refused, match="shutting down"):
            coordinator.submit(PULL)
        engine.auto_release = True
        assert (await coordinator.submit(FINALIZE).result()).ok
        coordinator.refuse_new_work()
        with pytest.raises(Refused):
            coordinator.submit(FINALIZE)
    finally:
        await coordinator.__aexit__(None, None, None)


async def test_status_shows_progress_queue_results_and_errors(engine: FakeEngine) -> None:
    coordinator = await ready_coordinator(engine)
    try:
        engine.results = [
            SyncResult(FINALIZE, errors=[FileError("data/a.bin", "permission denied")])
        ]
        coordinator.submit(FINALIZE)
        await engine.wait_calls(2)
        coordinator.submit(PULL)
        status = coordinator.status()
        assert status["current"]["operation"] == "finalize"
        assert status["current"]["bytes_total"] == 2048
        assert "finalize transferring" in status["current"]["line"]
        assert [q["operation"] for q in status["queued"]] == ["pull"]
        assert status["last_results"]["pull"]["ok"] is True
        engine.release()
        await engine.wait_calls(3)
        engine.release()
        await coordinator.idle()
        status = coordinator.status()
        assert status["last_results"]["finalize"]["errors"] == [
            {"path": "data/a.bin", "reason": "permission denied"}
        ]
        assert status["last_error"]["message"] == "data/a.bin: permission denied"
        assert status["current"] is None and status["queued"] == []
    finally:
        await coordinator.__aexit__(None, None, None)


async def test_a_running_undo_shows_in_status_and_the_running_metric(engine: FakeEngine) -> None:
    """An undo or restore takes the sync's turn (submit_work): while it runs, /status says
    what runs and `sidecar_sync_running` is 1 for it (it read 0 for every operation)."""
    coordinator = await ready_coordinator(engine)
    metrics = Metrics.of(coordinator, volume="vol")
    started, done = asyncio.Event(), asyncio.Event()

    async def undo() -> str:
        started.set()
        await done.wait()
        return "undone"

    try:
        ticket = coordinator.submit_work("undo S1", undo)
        async with asyncio.timeout(30):
            await started.wait()
        current = coordinator.status()["current"]
        assert (current["operation"], current["work"]) == ("undo", "undo S1")
        assert current["line"].startswith("undo S1: running for "), current["line"]
        text = metrics.render()
        assert 'sidecar_sync_running{volume="vol",operation="undo"} 1' in text
        assert 'sidecar_sync_running{volume="vol",operation="pull"} 0' in text
        assert 'sidecar_sync_running{volume="vol",operation="restore"} 0' in text
        done.set()
        assert await ticket.run.outcome() == "undone"
        await coordinator.idle()
        assert 'sidecar_sync_running{volume="vol",operation="undo"} 0' in metrics.render()
        assert coordinator.status()["current"] is None
    finally:
        await coordinator.__aexit__(None, None, None)


def bad_key(path: str) -> FileError:
    return FileError(path, "skipped: key would escape the folder or has an empty segment")


async def test_pull_that_applied_all_it_safely_could_makes_ready_but_degraded(
    engine: FakeEngine,
) -> None:
    """Bad keys or withheld deletes must not keep the pod not-ready forever."""
    engine.auto_release = True
    engine.results = [
        # Ran through but still moved files: the errors may be a server failing half-way.
        SyncResult(PULL, files_transferred=5, errors=[bad_key("a//b")]),
        # Nothing moved and the same problem: it is what another attempt will not change.
        SyncResult(
            PULL,
            errors=[bad_key("a//b")],
            deletes_blocked="would delete 8 of 10 local files (more than 50%)",
        ),
        SyncResult(PULL),
    ]
    async with Coordinator(engine) as coordinator:
        metrics = Metrics.of(coordinator)
        await coordinator.submit(PULL).result()
        assert not coordinator.ready
        await coordinator.submit(PULL).result()
        assert coordinator.ready
        status = coordinator.status()
        assert status["degraded"] is True
        assert status["degraded_by"]["skipped"] == [bad_key("a//b").as_dict()]
        assert "would delete 8 of 10" in status["degraded_by"]["deletes_withheld"]
        text = metrics.render()
        assert "sidecar_degraded 1" in text
        assert "sidecar_degraded_skipped_paths 1" in text
        assert "sidecar_degraded_deletes_withheld 1" in text
        assert (await coordinator.submit(FINALIZE).result()).ok, "finalize is taken when ready"
        await coordinator.submit(PULL).result()
        assert coordinator.ready and coordinator.status()["degraded"] is False
        assert "sidecar_degraded 0" in metrics.render()


async def test_fatal_pull_never_makes_ready_nor_clears_degraded(engine: FakeEngine) -> None:
    engine.auto_release = True
    engine.results = [
        failed(fatal="cannot reach the S3 endpoint"),
        SyncResult(PULL, errors=[bad_key("a//b")]),
        failed(fatal="cannot reach the S3 endpoint"),
    ]
    async with Coordinator(engine) as coordinator:
        await coordinator.submit(PULL).result()
        assert not coordinator.ready and coordinator.degraded is None
        await coordinator.submit(PULL).result()
        assert coordinator.ready and coordinator.degraded is not None
        await coordinator.submit(PULL).result()
        assert coordinator.ready and coordinator.degraded is not None


async def test_same_problems_twice_are_lasting_even_while_new_files_keep_arriving(
    engine: FakeEngine,
) -> None:
    """A bucket that receives objects all the time must not keep a bad key from counting."""
    engine.auto_release = True
    engine.results = [
        SyncResult(PULL, files_transferred=5, errors=[bad_key("a//b")]),
        SyncResult(PULL, files_transferred=1, errors=[bad_key("a//b")]),
    ]
    async with Coordinator(engine) as coordinator:
        await coordinator.submit(PULL).result()
        assert not coordinator.ready
        await coordinator.submit(PULL).result()
        assert coordinator.ready and coordinator.degraded is not None
