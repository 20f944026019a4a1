"""The service object's stop, carried out against a fake engine: the edges of policy.py's
`plan_stop` (what runs, what is pushed, the exit code), event-driven, no wall clock."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.core.model import Direction, FileError
from sidecar.core.options import ServeConfig, SyncConfig
from sidecar.core.result import SyncResult
from sidecar.daemon.coordinator import Refused
from sidecar.daemon.service import SidecarService, Signals
from tests.support.daemon_support import FakeEngine, failed

PULL, FINALIZE = Direction.PULL, Direction.FINALIZE


def serve_config(tmp_path: Path, **serve: object) -> ServeConfig:
    sync = SyncConfig("vol", "", tmp_path / "local", tmp_path / "state", volume="vol")
    return ServeConfig(sync, **serve)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidecar")


@pytest.fixture
async def service(engine: FakeEngine, tmp_path: Path) -> AsyncIterator[SidecarService]:
    async with SidecarService(serve_config(tmp_path), engine) as service:
        yield service


def sigterm(times: int = 1) -> Signals:
    signals = Signals()
    for _ in range(times):
        signals.fire(signal.SIGTERM)
    return signals


async def make_ready(service: SidecarService, engine: FakeEngine) -> None:
    ticket = service.coordinator.submit(PULL, origin="initial")
    await engine.wait_calls(len(engine.calls) + 1)
    engine.release()
    await ticket.result()
    assert service.readiness().text == "ready"


async def test_stop_during_the_initial_pull_cancels_it_and_pushes_nothing(
    service: SidecarService, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    initial = service.coordinator.submit(PULL, origin="initial")
    await engine.wait_calls(1)
    assert await service.stop(sigterm()) == 0
    assert (await initial.result()).fatal == "cancelled: cancelled before it finished"
    assert engine.calls == [(PULL, False)], "no final push from a folder never filled"
    assert "exiting; the initial pull never succeeded" in caplog.text
    assert service.readiness().text == "not ready: shutting down"


async def test_stop_when_idle_and_ready_pushes_then_exits_0(
    service: SidecarService, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    await make_ready(service, engine)
    engine.auto_release = True
    assert await service.stop(sigterm()) == 0
    assert engine.calls[-1] == (FINALIZE, False)
    assert "final push done" in caplog.text
    with pytest.raises(Refused, match="shutting down"):
        service.coordinator.submit(FINALIZE)


async def test_stop_cancels_a_running_pull_and_keeps_a_queued_finalize_as_the_push(
    service: SidecarService, engine: FakeEngine
) -> None:
    """A preStop hook's `sidecar finalize` queued behind a pull: the pull goes, that
    finalize is the final push (one run, its requester gets the push's result)."""
    await make_ready(service, engine)
    pull = service.coordinator.submit(PULL)
    await engine.wait_calls(2)
    pre_stop = service.coordinator.submit(FINALIZE)
    stopping = asyncio.ensure_future(service.stop(sigterm()))
    assert (await pull.result()).fatal == "cancelled: cancelled before it finished"
    await engine.wait_calls(3)
    engine.release()
    assert await stopping == 0
    assert engine.calls == [(PULL, False), (PULL, False), (FINALIZE, False)]
    assert (await pre_stop.result()).ok


async def test_stop_lets_a_running_push_end_then_pushes_again(
    service: SidecarService, engine: FakeEngine
) -> None:
    """The running push scanned before the stop: the final push runs after it."""
    await make_ready(service, engine)
    running = service.coordinator.submit(FINALIZE)
    await engine.wait_calls(2)
    stopping = asyncio.ensure_future(service.stop(sigterm()))
    engine.release()
    assert (await running.result()).ok
    await engine.wait_calls(3)
    engine.release()
    assert await stopping == 0
    assert engine.calls[1:] == [(FINALIZE, False), (FINALIZE, False)]


async def test_a_failed_final_push_exits_1(
    service: SidecarService, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    await make_ready(service, engine)
    engine.auto_release = True
    engine.results = [SyncResult(FINALIZE, errors=[FileError("out.bin", "permission denied")])]
    assert await service.stop(sigterm()) == 1
    assert "final push failed" in caplog.text


async def test_a_push_failing_only_on_known_bad_keys_exits_0(
    service: SidecarService, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    bad = FileError("a//b", "skipped: key would escape the folder or has an empty segment")
    engine.auto_release = True
    engine.results = [SyncResult(PULL, errors=[bad])]
    await service.coordinator.submit(PULL, origin="initial").result()
    assert service.readiness().text.startswith("ready, degraded: 1 path(s) skipped")
    engine.results = [SyncResult(FINALIZE, errors=[bad])]
    assert await service.stop(sigterm()) == 0
    assert "the bucket still has keys that were skipped" in caplog.text


@pytest.mark.parametrize("third_signal", [False, True])
async def test_a_second_signal_cuts_the_push_short_and_names_what_was_not_pushed(
    service: SidecarService,
    engine: FakeEngine,
    caplog: pytest.LogCaptureFixture,
    third_signal: bool,
) -> None:
    await make_ready(service, engine)
    signals = sigterm()
    stopping = asyncio.ensure_future(service.stop(signals))
    await engine.wait_calls(2)  # the final push runs (and waits on the fake engine)
    signals.fire(signal.SIGTERM)
    if third_signal:
        signals.fire(signal.SIGTERM)
        assert await stopping == 1
        assert engine.calls[-1] == (FINALIZE, False), "a third signal: no listing"
    else:
        await engine.wait_calls(3)
        assert engine.calls[-1] == (FINALIZE, True), "the dry run that names what stayed"
        engine.release()
        assert await stopping == 1
    assert "final push cancelled by a second signal" in caplog.text


async def test_the_deadline_cuts_the_push_short(
    engine: FakeEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with SidecarService(serve_config(tmp_path, shutdown_timeout=0.01), engine) as service:
        await make_ready(service, engine)
        stopping = asyncio.ensure_future(service.stop(sigterm()))
        await engine.wait_calls(3)  # the push was cancelled; the dry run lists
        engine.release()
        assert await stopping == 1
    assert "final push cancelled by the --shutdown-timeout of 0.01s" in caplog.text


async def test_read_only_pushes_nothing(engine: FakeEngine, tmp_path: Path) -> None:
    async with SidecarService(serve_config(tmp_path, read_only=True), engine) as service:
        await make_ready(service, engine)
        assert await service.stop(sigterm()) == 0
        assert engine.calls == [(PULL, False)]


async def test_readiness_and_status_are_the_services_answers(
    service: SidecarService, engine: FakeEngine
) -> None:
    engine.auto_release = True
    engine.results = [failed(fatal="connection refused")]
    await service.coordinator.submit(PULL, origin="initial").result()
    service.initial.next_retry_at = service.initial.clock() + 30
    answer = service.readiness()
    assert answer.status == 503
    assert answer.text.startswith("not ready: initial pull failed: connection refused; retry in")
    status = service.status()
    assert status["ready"] is False and status["volume"] == "vol"
    assert status["initial_pull"]["next_retry_in_seconds"] is not None
    assert status["auto_sync"] == {"enabled": False}
    assert status["background_pull"] == {"enabled": False}
