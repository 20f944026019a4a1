"""The one retry policy of the S3 wire (sidecar/s3/retry.py): full-jitter backoff, the attempt
cap and the per-request deadline as pure values; the in-flight budget's AIMD; the store retrying
a body cut mid-way under the same policy; and a pull through a burst of 503 SlowDown whose
budget falls and grows back."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.core.model import Direction
from sidecar.core.options import SyncConfig
from sidecar.engine.sync import SyncEngine
from sidecar.s3 import ClientSettings, ObjectStore, S3Error
from sidecar.s3.retry import BETA, Attempts, InflightBudget, RetryPolicy
from tests.conftest import S3Server
from tests.integration.test_http11 import (
    BUCKET,
    OBJECTS,
    answer,
    answering_always,
    endpoint_env,
    read_request,
    serving,
)
from tests.support.faultproxy import Fault, FaultProxy, Request

__all__ = ["endpoint_env"]  # a fixture, used by name

SLOWDOWN = S3Error(
    "k", "SlowDown", "SlowDown (HTTP 503): Please reduce your request rate.", status=503
)
INTERNAL = S3Error("k", "InternalError", "InternalError (HTTP 500): oops", status=500)
RESET = S3Error("k", "ConnectionResetError", "reset by peer", transient=True)
MISSING = S3Error("k", "NoSuchKey", "NoSuchKey (HTTP 404)", status=404)


# ---- the policy, pure ----------------------------------------------------------------------
def test_full_jitter_stays_within_zero_and_the_capped_exponential() -> None:
    policy = RetryPolicy(error_scale=0.05, throttle_scale=1.0, max_backoff=20.0)
    draw = random.Random(7).random
    for failed in range(10):
        for throttled, scale in ((False, 0.05), (True, 1.0)):
            ceiling = min(20.0, scale * 2**failed)
            delays = [policy.delay(failed, throttled, draw) for _ in range(200)]
            assert all(0 <= d < ceiling for d in delays)
            assert max(delays) > 0.8 * ceiling, "full jitter reaches up to the ceiling"
            assert min(delays) < 0.2 * ceiling, "full jitter reaches down to zero"
    assert policy.delay(3, False, lambda: 1.0) == pytest.approx(0.4)
    assert policy.delay(30, True, lambda: 1.0) == 20.0


def test_what_is_retried_comes_from_the_error_classification() -> None:
    assert SLOWDOWN.retryable and SLOWDOWN.throttled
    assert S3Error("k", "429", "Too many", status=429).throttled
    assert S3Error("k", "503", "a HEAD's bare 503", status=503).throttled
    assert S3Error("k", "Throttling", "throttled").throttled
    assert INTERNAL.retryable and not INTERNAL.throttled
    assert RESET.retryable and not RESET.throttled
    assert not MISSING.retryable
    assert not S3Error("k", "PreconditionFailed", "412", status=412).retryable


def test_the_attempt_cap_and_the_deadline_end_the_retries() -> None:
    policy = RetryPolicy(max_attempts=3, attempt_base=10.0, attempt_rate=1000.0)
    half = lambda: 0.5  # noqa: E731
    assert policy.next_delay(INTERNAL, 0, 0.0, 100.0, half) == pytest.approx(0.025)
    assert policy.next_delay(INTERNAL, 1, 0.0, 100.0, half) == pytest.approx(0.05)
    assert policy.next_delay(INTERNAL, 2, 0.0, 100.0, half) is None, "3 attempts made"
    assert policy.next_delay(MISSING, 0, 0.0, 100.0, half) is None, "not retryable"
    # A wait that would end past the deadline is not taken.
    assert policy.next_delay(SLOWDOWN, 1, 99.5, 100.0, half) is None
    assert policy.next_delay(SLOWDOWN, 1, 98.0, 100.0, half) == pytest.approx(1.0)
    # The deadline is sized from the request's bytes, as one attempt's is (http11).
    assert policy.deadline(0) == pytest.approx(3 * 10.0)
    assert policy.deadline(5000) == pytest.approx(3 * (10.0 + 5.0))


async def test_attempts_give_up_at_the_deadline_naming_the_key_and_why() -> None:
    policy = RetryPolicy(max_attempts=100, attempt_base=0.1)  # deadline 0.3 s
    tries = Attempts(policy, "vol/a.bin", 0, time.monotonic() - 0.29, draw=lambda: 1.0)
    error = S3Error("vol/a.bin", "SlowDown", "SlowDown (HTTP 503): slow down", status=503)
    tries.failed = 2
    with pytest.raises(S3Error) as failed:
        await tries.again(error)
    assert failed.value is error and error.retried
    assert str(error).startswith("vol/a.bin: SlowDown (HTTP 503)")
    assert "gave up at its deadline (0.3s), after 3 attempts in 0." in str(error)


# ---- the budget (AIMD) -----------------------------------------------------------------------
def test_throttling_cuts_the_budget_once_per_round_never_below_one() -> None:
    budget = InflightBudget(16)
    first_round = budget.round
    for _ in range(16):  # a burst: 16 requests of one round all throttled
        budget.throttled(first_round)
    assert budget.current == int(16 * BETA) == 11, "one cut for the whole round"
    assert budget.throttles == 16
    for _ in range(20):  # each later round throttled again
        budget.throttled(budget.round)
    assert budget.current == 1 and budget.lowest == 1


def test_successes_grow_the_budget_back_by_one_per_budget_and_no_further() -> None:
    budget = InflightBudget(8)
    budget.throttled(budget.round)
    budget.throttled(budget.round)
    assert budget.current == 3  # 8 -> 5 -> 3
    grown = [budget.current]
    for _ in range(200):
        budget.succeeded()
        grown.append(budget.current)
    assert grown[-1] == 8, "back to the configured concurrency, not above"
    assert all(b - a in (0, 1) for a, b in itertools.pairwise(grown))
    assert grown.index(4) <= 4 and grown.index(5) <= 3 + 4 + 1, "about one slot per window"


async def test_the_budget_bounds_requests_in_flight_and_wakes_waiters_as_it_grows() -> None:
    budget = InflightBudget(4)
    budget.throttled(budget.round)  # 4 -> 2
    in_flight, most = 0, 0
    release = asyncio.Event()

    async def request() -> None:
        nonlocal in_flight, most
        await budget.acquire()
        in_flight += 1
        most = max(most, in_flight)
        await release.wait()
        in_flight -= 1
        budget.succeeded()
        budget.release()

    tasks = [asyncio.ensure_future(request()) for _ in range(10)]
    await asyncio.sleep(0.01)
    assert in_flight == 2 and budget.in_use == 2
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert most <= 4 and budget.in_use == 0 and budget.current == 4


async def test_a_waiter_cancelled_after_its_grant_gives_the_slot_back() -> None:
    budget = InflightBudget(1)
    await budget.acquire()
    waiter = asyncio.ensure_future(budget.acquire())
    await asyncio.sleep(0)
    budget.release()  # handed to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget.in_use == 0
    await asyncio.wait_for(budget.acquire(), 1)


async def test_a_waiter_cancelled_and_then_passed_over_leaves_the_budget_sound() -> None:
    budget = InflightBudget(1)
    await budget.acquire()
    waiter = asyncio.ensure_future(budget.acquire())
    behind = asyncio.ensure_future(budget.acquire())
    await asyncio.sleep(0)
    waiter.cancel()  # its future is cancelled at once; the task learns it later...
    budget.release()  # ...so a release meanwhile passes it over and grants the next one
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(behind, 1)
    assert budget.in_use == 1 and not budget._waiters
    budget.release()
    assert budget.in_use == 0


# ---- the store, against scripted servers -----------------------------------------------------
async def test_a_request_past_its_deadline_fails_naming_the_key_not_retrying_forever(
    endpoint_env: Callable[[int], None],
) -> None:
    error = b"<Error><Code>InternalError</Code><Message>oops</Message></Error>"
    settings = ClientSettings(concurrency=2, read_timeout=1, max_attempts=1000, deadline_base=0.5)
    async with serving(answering_always(answer(500, error))) as (server, port):
        endpoint_env(port)
        async with ObjectStore(BUCKET, settings) as store:
            with pytest.raises(S3Error) as failed:
                await store.get_object("vol/never.bin", None, lambda data: None)
    message = str(failed.value)
    assert message.startswith("vol/never.bin: InternalError (HTTP 500)"), message
    assert "gave up at its deadline (1.5s), after" in message, message
    assert failed.value.key == "vol/never.bin"
    assert 2 <= len(server.requests) < 100, "retried, but not a thousand times"
    assert store.retries == len(server.requests) - 1, "every retry counted once"


def cut_once_then_whole(body: bytes) -> Callable[..., object]:
    """The first GET's body is cut in the middle (the connection closes); later GETs whole."""

    async def handler(reader, writer, server):  # type: ignore[no-untyped-def]
        while await read_request(reader, server) is not None:
            raw = answer(200, body, 'ETag: "e"\r\n')
            if len(server.requests) == 1:
                writer.write(raw[: len(raw) - len(body) // 2])
                await writer.drain()
                return
            writer.write(raw)
            await writer.drain()

    return handler


@pytest.mark.parametrize("ranged", [False, True])
async def test_a_body_cut_mid_way_is_fetched_again_under_the_same_policy(
    endpoint_env: Callable[[int], None], ranged: bool
) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: streamed, not read with the head
    settings = ClientSettings(concurrency=2, read_timeout=2)
    async with serving(cut_once_then_whole(body)) as (server, port):
        endpoint_env(port)
        async with ObjectStore(BUCKET, settings) as store:
            got = bytearray()
            restarts: list[int] = []
            counted = 0

            def received(n: int) -> None:
                nonlocal counted
                counted += n

            if ranged:
                view = memoryview(bytearray(len(body)))
                await store.get_range_into("vol/big.bin", 0, view, "e", received)
                got[:] = view
                assert counted == len(body), "the cut attempt's bytes were taken back"
            else:

                def restart() -> None:
                    restarts.append(len(got))
                    got.clear()

                await store.get_object("vol/big.bin", "e", got.extend, restart, len(body))
                assert len(restarts) == 1 and 0 < restarts[0] < len(body)
            assert bytes(got) == body
            assert store.retries == 1 and len(server.requests) == 2


async def test_a_body_cut_after_bytes_reached_a_sink_that_cannot_restart_is_not_retried(
    endpoint_env: Callable[[int], None],
) -> None:
    body = bytes(range(256)) * 4096
    async with serving(cut_once_then_whole(body)) as (server, port):
        endpoint_env(port)
        async with ObjectStore(BUCKET, ClientSettings(concurrency=2, read_timeout=2)) as store:
            with pytest.raises(S3Error) as failed:
                await store.get_object("vol/big.bin", "e", lambda data: None)
    assert failed.value.key == "vol/big.bin" and len(server.requests) == 1


def silent_on(silent_key: str) -> Callable[..., object]:
    """Just enough S3 for a pull of OBJECTS; GETs of `silent_key` are never answered."""
    entries = "".join(
        f'<Contents><Key>{key}</Key><Size>{len(body)}</Size><ETag>"e{len(body)}"</ETag>'
        "<LastModified>2026-01-01T00:00:00.000Z</LastModified></Contents>"
        for key, body in OBJECTS.items()
    )
    listing = (
        '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>bkt</Name>'
        f"<IsTruncated>false</IsTruncated>{entries}</ListBucketResult>"
    ).encode()

    async def handler(reader, writer, server):  # type: ignore[no-untyped-def]
        while (head := await read_request(reader, server)) is not None:
            key = head.split(b" ", 2)[1].decode().split("?")[0].removeprefix(f"/{BUCKET}/")
            if key == silent_key:
                await reader.read()  # until the client gives up and closes
                return
            body = listing if key == f"/{BUCKET}" or not key else OBJECTS[key]
            writer.write(answer(200, body, f'ETag: "e{len(body)}"\r\n'))
            await writer.drain()

    return handler


async def test_a_get_is_tried_max_attempts_times_not_stacked_loops_times(
    endpoint_env: Callable[[int], None], tmp_path: Path
) -> None:
    """Before: the store's 5 attempts ran inside transfer.py's 4 stream attempts, so a GET
    whose answer never came was sent 20 times. Now the store's policy alone decides."""
    settings = ClientSettings(concurrency=2, read_timeout=0.4, max_attempts=5, deadline_base=20)
    config = SyncConfig(
        bucket=BUCKET,
        prefix="vol/",
        local_dir=tmp_path / "local",
        state_dir=tmp_path / "state",
        concurrency=2,
    )
    async with serving(silent_on("vol/slow.bin")) as (server, port):
        endpoint_env(port)
        async with SyncEngine(config, settings) as engine:
            result = await asyncio.wait_for(engine.run(Direction.PULL), 120)
    sent = [head for head, _body in server.requests if b"/slow.bin" in head.split(b"\r\n")[0]]
    assert [e.path for e in result.errors] == ["slow.bin"], result.as_dict()
    assert "gave up at 5 attempts" in result.errors[0].reason
    assert len(sent) == 5
    assert (tmp_path / "local" / "ok.txt").read_bytes() == OBJECTS["vol/ok.txt"]


# ---- end to end: a burst of 503 SlowDown -----------------------------------------------------
async def test_a_burst_of_slowdowns_cuts_the_budget_which_grows_back_and_the_pull_finishes(
    moto: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = moto.new_bucket()
    client = moto.client()
    files = {f"d{i % 7}/f{i:03}.txt": f"file {i}\n".encode() * (i % 5 + 1) for i in range(300)}
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"vol/{name}", Body=data)
    burst = 40
    faulted: dict[str, int] = {}

    def slowdown_burst(request: Request) -> Fault:
        """The first `burst` GETs of objects answer 503 SlowDown (each key at most twice)."""
        if request.operation != "GetObject" or sum(faulted.values()) >= burst:
            return Fault.NONE
        if faulted.get(request.target, 0) >= 2:
            return Fault.NONE
        faulted[request.target] = faulted.get(request.target, 0) + 1
        return Fault.SLOWDOWN_503

    host, port = moto.endpoint.removeprefix("http://").split(":")
    with FaultProxy(host, int(port), slowdown_burst) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        config = SyncConfig(
            bucket=bucket,
            prefix="vol/",
            local_dir=tmp_path / "local",
            state_dir=tmp_path / "state",
            concurrency=16,
        )
        async with SyncEngine(config) as engine:
            assert engine.inflight_budget["current"] == 16
            result = await engine.run(Direction.PULL)
            budget = engine.inflight_budget
            retries = engine.retries_total
        assert proxy.faults()[Fault.SLOWDOWN_503] == burst
    assert result.ok, result
    assert result.files_transferred == len(files)
    assert all((tmp_path / "local" / name).read_bytes() == data for name, data in files.items())
    assert budget["throttled_total"] == burst
    assert budget["lowest"] < 16, "the burst cut the budget"
    assert budget["current"] == budget["max"] == 16, "260 successes grew it back"
    assert retries == burst, "each throttled GET retried once, counted once"
