"""The control and probe apps, driven through aiohttp's test client with a fake engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from sidecar.cli.client import describe_status
from sidecar.core.model import Direction, FileError
from sidecar.core.options import ServeConfig, SyncConfig
from sidecar.core.result import SyncResult
from sidecar.daemon import web as sidecar_web
from sidecar.daemon.coordinator import Coordinator
from sidecar.daemon.service import SidecarService
from tests.support.daemon_support import FakeEngine, failed, non_loopback_ipv4


def serve_config(tmp_path: Path, *, read_only: bool = False) -> ServeConfig:
    sync = SyncConfig("vol", "", tmp_path / "local", tmp_path / "state", volume="vol")
    return ServeConfig(sync, read_only=read_only)


@pytest.fixture
async def service(engine: FakeEngine, tmp_path: Path) -> AsyncIterator[SidecarService]:
    """The daemon's service object around the fake engine, not started: the tests drive the
    coordinator themselves."""
    async with SidecarService(serve_config(tmp_path), engine) as service:
        yield service


@pytest.fixture
def coordinator(service: SidecarService) -> Coordinator:
    return service.coordinator


async def make_ready(coordinator: Coordinator, engine: FakeEngine) -> None:
    ticket = coordinator.submit(Direction.PULL, origin="initial")
    await engine.wait_calls(len(engine.calls) + 1)
    engine.release()
    await ticket.result()


@pytest.fixture
async def control(service: SidecarService) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(sidecar_web.control_app(service))) as client:
        yield client


@pytest.fixture
async def probe(service: SidecarService) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(sidecar_web.probe_app(service))) as client:
        yield client


async def test_post_pull_answers_the_summary(control: TestClient, engine: FakeEngine) -> None:
    engine.auto_release = True
    response = await control.post("/pull")
    assert response.status == 200
    body = await response.json()
    assert body["operation"] == "pull" and body["ok"] is True
    assert body["files_transferred"] == 1 and body["joined"] is False
    assert body["summary"].startswith("pull: transferred 1 files")


async def test_failed_sync_is_500_with_each_error_named(
    control: TestClient, coordinator: Coordinator, engine: FakeEngine
) -> None:
    engine.auto_release = True
    await make_ready(coordinator, engine)
    engine.results = [
        SyncResult(Direction.FINALIZE, errors=[FileError("big.bin", "changed during upload")])
    ]
    response = await control.post("/finalize")
    assert response.status == 500
    body = await response.json()
    assert body["ok"] is False
    assert body["errors"] == [{"path": "big.bin", "reason": "changed during upload"}]


async def test_fatal_failure_is_500_with_the_cause(control: TestClient, engine: FakeEngine) -> None:
    engine.auto_release = True
    engine.results = [failed(fatal="bucket 'vol' does not exist")]
    response = await control.post("/pull")
    assert response.status == 500
    assert (await response.json())["fatal"] == "bucket 'vol' does not exist"


async def test_concurrent_requests_join_and_queue(
    control: TestClient, coordinator: Coordinator, engine: FakeEngine
) -> None:
    engine.auto_release = True
    await make_ready(coordinator, engine)
    engine.auto_release = False
    engine.before_scan = asyncio.Event()  # the second pull arrives before the first scans
    first = asyncio.ensure_future(control.post("/pull"))
    await engine.wait_calls(2)
    second = asyncio.ensure_future(control.post("/pull"))
    third = asyncio.ensure_future(control.post("/finalize"))
    fourth = asyncio.ensure_future(control.post("/finalize"))

    def all_in() -> bool:  # the second pull joined the first, the finalizes share one run
        current = coordinator.current
        queued = [run.requesters for run in coordinator.pending]
        return current is not None and current.requesters == 2 and queued == [2]

    # Waits for the three requests to reach the coordinator; a 0.1 s sleep here was outrun on
    # a loaded machine (the first pull scanned before the second arrived: a hang).
    async with asyncio.timeout(30):
        while not all_in():  # noqa: ASYNC110 (the coordinator has no event for this)
            await asyncio.sleep(0.01)
    assert len(engine.calls) == 2, "one sync at a time"
    engine.before_scan.set()
    engine.release()
    await engine.wait_calls(3)
    engine.release()
    bodies = [await (await task).json() for task in (first, second, third, fourth)]
    assert [b["operation"] for b in bodies] == ["pull", "pull", "finalize", "finalize"]
    assert [b["joined"] for b in bodies[:2]] == [False, True]
    assert [call[0] for call in engine.calls] == [Direction.PULL] * 2 + [Direction.FINALIZE]


async def test_undo_and_restore_take_their_turn_behind_the_running_sync(
    control: TestClient, coordinator: Coordinator, engine: FakeEngine
) -> None:
    """They take the engine's sync locks: called beside a running sync they waited on the
    lock held by the daemon itself, then failed after --lock-timeout naming it."""
    engine.auto_release = True
    await make_ready(coordinator, engine)
    engine.auto_release = False
    push = asyncio.ensure_future(control.post("/finalize"))
    await engine.wait_calls(2)
    undo = asyncio.ensure_future(control.post("/undo?sync=S1"))
    restore = asyncio.ensure_future(control.post("/restore?path=a.txt&at=2026-12-03T12:00:00Z"))
    async with asyncio.timeout(30):
        while len((await (await control.get("/status")).json())["queued"]) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    status = await (await control.get("/status")).json()
    assert [q["operation"] for q in status["queued"]] == ["undo", "restore"]
    assert engine.undone == [], "nothing runs beside the finalize"
    engine.release()
    assert (await push).status == 200
    answers = [await (await task).json() for task in (undo, restore)]
    assert [a["operation"] for a in answers] == ["undo", "restore"], answers
    assert answers[0]["sync_id"] == "undo-of-S1"
    assert engine.undone == ["S1", "a.txt"]
    assert (await (await control.post("/pull?wait=false")).json())["state"] == "started"
    await engine.wait_calls(3)
    engine.release()


async def test_undo_while_shutting_down_is_503(
    control: TestClient, coordinator: Coordinator
) -> None:
    coordinator.close("test")
    response = await control.post("/undo?sync=S1")
    assert response.status == 503
    assert (await response.json())["refused"] == "the daemon is shutting down"


async def test_wait_false_answers_202_with_where_to_watch(
    control: TestClient, engine: FakeEngine
) -> None:
    response = await control.post("/pull?wait=false")
    assert response.status == 202
    body = await response.json()
    assert body == {
        "accepted": True,
        "operation": "pull",
        "dry_run": False,
        "state": "started",
        "watch": "GET /status",
    }
    await engine.wait_calls(1)
    engine.release()


async def test_progress_streams_lines_then_the_summary(
    control: TestClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sidecar_web, "PROGRESS_INTERVAL", 0.05)
    response = await control.post("/pull?progress=1")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    line = await response.content.readline()
    assert line == b"pull: starting\n"
    line = await response.content.readline()
    assert b"pull transferring: 1/2 files" in line
    assert line.startswith(b"[############------------]")
    engine.release()
    rest = (await response.content.read()).decode().splitlines()
    summary = json.loads(rest[-1])
    assert summary["ok"] is True and summary["operation"] == "pull"


async def test_progress_line_says_what_a_queued_request_waits_for(
    control: TestClient,
    coordinator: Coordinator,
    engine: FakeEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sidecar_web, "PROGRESS_INTERVAL", 0.05)
    coordinator.submit(Direction.PULL)
    await engine.wait_calls(1)
    response = await control.post("/pull?progress=1&dry_run=1")
    assert await response.content.readline() == b"pull (dry run): waiting for pull to finish\n"
    engine.auto_release = True
    engine.release()
    assert json.loads((await response.content.read()).decode().splitlines()[-1])["dry_run"]


async def test_dry_run_reaches_the_engine(control: TestClient, engine: FakeEngine) -> None:
    engine.auto_release = True
    response = await control.post("/pull?dry_run=1")
    assert response.status == 200
    assert (await response.json())["dry_run"] is True
    assert engine.calls == [(Direction.PULL, True)]


async def test_read_only_finalize_is_409(engine: FakeEngine, tmp_path: Path) -> None:
    async with (
        SidecarService(serve_config(tmp_path, read_only=True), engine) as service,
        TestClient(TestServer(sidecar_web.control_app(service))) as client,
    ):
        response = await client.post("/finalize")
        assert response.status == 409
        assert "read-only" in (await response.json())["refused"]


async def test_finalize_before_ready_is_503(control: TestClient) -> None:
    response = await control.post("/finalize")
    assert response.status == 503
    assert "initial pull has not succeeded" in (await response.json())["refused"]


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/pull?force=1", "unknown query parameter(s): force"),
        ("/pull?dryrun=1&x=2", "unknown query parameter(s): dryrun, x"),
        ("/pull?wait=maybe", "wait='maybe' is not a boolean"),
    ],
)
async def test_bad_parameters_are_400_naming_them(
    control: TestClient, engine: FakeEngine, path: str, fragment: str
) -> None:
    response = await control.post(path)
    assert response.status == 400
    assert fragment in await response.text()
    assert engine.calls == []


async def test_huge_bodies_are_413(control: TestClient, engine: FakeEngine) -> None:
    response = await control.post("/pull", data=b"x" * 100_000)
    assert response.status == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 1000

    response = await control.post("/pull", data=chunks())
    assert response.status == 413
    assert engine.calls == []


async def test_small_body_is_tolerated(control: TestClient, engine: FakeEngine) -> None:
    engine.auto_release = True
    assert (await control.post("/pull", data=b"")).status == 200


async def test_wrong_method_and_unknown_route(control: TestClient) -> None:
    assert (await control.get("/pull")).status == 405
    assert (await control.post("/nothing")).status == 404


async def test_control_status_is_read_only_json(control: TestClient, engine: FakeEngine) -> None:
    response = await control.get("/status")
    assert response.status == 200
    body = await response.json()
    assert body["ready"] is False and body["current"] is None
    assert engine.calls == []


def test_loopback_addresses() -> None:
    for remote in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert sidecar_web.is_loopback(remote), remote
    for remote in ("192.0.2.2", "10.0.0.1", "::ffff:10.0.0.1", "fd00::2", None, "", "junk"):
        assert not sidecar_web.is_loopback(remote), remote


async def test_non_loopback_peer_is_refused(service: SidecarService) -> None:
    app = sidecar_web.control_app(service)
    transport = mock.Mock()
    transport.get_extra_info.return_value = ("10.1.2.3", 40000)
    request = make_mocked_request("POST", "/pull", app=app, transport=transport)

    async def handler(request: web.Request) -> web.StreamResponse:
        raise AssertionError("must not be reached")

    response = await sidecar_web.loopback_only(request, handler)
    assert response.status == 403
    assert "10.1.2.3" in response.text  # type: ignore[attr-defined]


async def test_control_bound_to_all_interfaces_still_refuses_remote_peers(
    service: SidecarService, engine: FakeEngine
) -> None:
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    server = TestServer(sidecar_web.control_app(service), host="0.0.0.0")
    async with TestClient(server) as client:
        url = f"http://{address}:{server.port}/pull"
        async with client.session.post(url) as response:
            assert response.status == 403
            assert address in (await response.json())["error"]
    assert engine.calls == []


async def test_probe_app_has_no_mutating_routes(probe: TestClient, engine: FakeEngine) -> None:
    for path in ("/pull", "/finalize", "/status", "/healthz"):
        assert (await probe.post(path)).status in (404, 405), path
    assert engine.calls == []


async def test_readyz_follows_the_initial_pull(
    probe: TestClient, coordinator: Coordinator, engine: FakeEngine
) -> None:
    assert (await probe.get("/healthz")).status == 200
    response = await probe.get("/readyz")
    assert response.status == 503
    assert "initial pull not finished" in await response.text()
    engine.auto_release = True
    engine.results = [failed(fatal="connection refused")]
    await coordinator.submit(Direction.PULL).result()
    response = await probe.get("/readyz")
    assert response.status == 503
    assert "initial pull failed: connection refused" in await response.text()
    await coordinator.submit(Direction.PULL).result()
    assert (await probe.get("/readyz")).status == 200


async def test_metrics_exposition(
    probe: TestClient, coordinator: Coordinator, engine: FakeEngine
) -> None:
    engine.auto_release = True
    engine.retries_total = 7
    await coordinator.submit(Direction.PULL).result()
    engine.results = [SyncResult(Direction.PULL)]  # nothing moved: a no-op
    await coordinator.submit(Direction.PULL).result()
    response = await probe.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await response.text()
    for line in (
        'sidecar_syncs_total{volume="vol",operation="pull",outcome="success"} 1',
        'sidecar_syncs_total{volume="vol",operation="pull",outcome="noop"} 1',
        'sidecar_objects_transferred_total{volume="vol",operation="pull"} 1',
        'sidecar_sync_duration_seconds_count{volume="vol",operation="pull"} 2',
        'sidecar_retries_total{volume="vol"} 7',
        'sidecar_in_flight_requests{volume="vol"} 0',
        'sidecar_ready{volume="vol"} 1',
        'sidecar_sync_running{volume="vol",operation="pull"} 0',
        "# TYPE sidecar_sync_duration_seconds histogram",
    ):
        assert line in text, line


async def test_status_and_metrics_show_the_s3_inflight_budget(
    probe: TestClient, engine: FakeEngine
) -> None:
    budget = {"current": 5, "max": 16, "in_use": 2, "lowest": 3, "throttled_total": 9}
    engine.inflight_budget = budget  # type: ignore[attr-defined]
    status = await (await probe.get("/status")).json()
    assert status["inflight_budget"] == budget
    text = await (await probe.get("/metrics")).text()
    for line in (
        'sidecar_s3_inflight_budget{volume="vol"} 5',
        'sidecar_s3_inflight_budget_max{volume="vol"} 16',
        'sidecar_s3_throttled_total{volume="vol"} 9',
        "# TYPE sidecar_s3_inflight_budget gauge",
    ):
        assert line in text, line


async def test_probe_status_matches_control_status(probe: TestClient, control: TestClient) -> None:
    assert await (await probe.get("/status")).json() == await (await control.get("/status")).json()


async def test_a_body_that_does_not_arrive_in_time_gets_408(
    control: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sidecar_web, "BODY_TIMEOUT", 0.2)
    assert control.port is not None
    reader, writer = await asyncio.open_connection(control.host, control.port)
    writer.write(b"POST /pull HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly a little")
    async with asyncio.timeout(5):
        assert await reader.readline() == b"HTTP/1.1 408 Request Timeout\r\n"
    writer.close()


def test_sidecar_status_shows_degraded_and_a_watcher_that_is_not_watching() -> None:
    text = describe_status(
        {
            "ready": True,
            "degraded": True,
            "degraded_by": {"message": "1 path(s) skipped (first: a//b: skipped)"},
            "auto_sync": {
                "enabled": True,
                "state": "idle",
                "watching": False,
                "watcher_state": "waiting for the folder",
                "pending_changes": 0,
                "pushes": 0,
            },
        },
        now=0.0,
    )
    assert "degraded: 1 path(s) skipped (first: a//b: skipped)" in text
    assert "auto-sync: idle (NOT watching: waiting for the folder)" in text
