"""The daemon's lifecycle policy as tables: readiness, the initial pull's backoff, stopping."""

from __future__ import annotations

import itertools

import pytest

from sidecar.daemon.policy import (
    EXIT_OK,
    EXIT_PUSH_INCOMPLETE,
    AtStop,
    Fate,
    OnSignal,
    PushEnd,
    Running,
    cut_short_reason,
    exit_code,
    initial_retry,
    lists_unpushed,
    on_signal,
    plan_stop,
    push_end,
    readiness,
    running_fate,
)

NEVER_FILLED = (
    "the initial pull never succeeded: no final push, since a folder that was never filled "
    "must not overwrite the bucket"
)

# -- readiness --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("closing", "ready", "degraded", "last_error", "retry_in", "status", "text"),
    [
        (False, False, None, None, None, 503, "not ready: initial pull not finished"),
        (False, False, None, "boom", None, 503, "not ready: initial pull failed: boom"),
        (
            False, False, None, "boom", 3.2,
            503, "not ready: initial pull failed: boom; retry in 3.2s",
        ),
        (False, False, None, None, 0.0, 503, "not ready: initial pull not finished; retry in 0.0s"),
        (False, True, None, None, None, 200, "ready"),
        (False, True, None, "a later push failed", None, 200, "ready"),
        (False, True, "3 path(s) skipped", None, None, 200, "ready, degraded: 3 path(s) skipped"),
        (True, True, None, None, None, 503, "not ready: shutting down"),
        (True, True, "3 path(s) skipped", None, None, 503, "not ready: shutting down"),
        (True, False, None, "boom", None, 503, "not ready: shutting down"),
        (True, False, None, "boom", 2.0, 503, "not ready: shutting down; retry in 2.0s"),
    ],
)  # fmt: skip
def test_readiness(
    closing: bool,
    ready: bool,
    degraded: str | None,
    last_error: str | None,
    retry_in: float | None,
    status: int,
    text: str,
) -> None:
    answer = readiness(
        closing=closing, ready=ready, degraded=degraded, last_error=last_error, retry_in=retry_in
    )
    assert (answer.status, answer.text) == (status, text)
    assert answer.ready is (status == 200)


# -- the initial pull -------------------------------------------------------------------------


def test_initial_pull_backs_off_doubling_to_a_minute_while_it_cannot_run() -> None:
    delay, waits = 1.0, []
    for _ in range(9):
        wait, delay = initial_retry(delay, fatal=True)
        waits.append(wait)
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_a_pull_that_ran_through_goes_again_soon_and_resets_the_backoff() -> None:
    assert initial_retry(32.0, fatal=False) == (1.0, 1.0)
    assert initial_retry(1.0, fatal=False) == (1.0, 1.0)


# -- stopping ---------------------------------------------------------------------------------


def test_signals_stop_then_hurry_then_exit_now() -> None:
    assert [on_signal(n) for n in (1, 2, 3, 4)] == [
        OnSignal.STOP,
        OnSignal.HURRY,
        OnSignal.EXIT_NOW,
        OnSignal.EXIT_NOW,
    ]
    assert [lists_unpushed(n) for n in (1, 2, 3, 4)] == [True, True, False, False]


# What becomes of the running sync: while stopping, and when the push is cut short.
FATES = {
    Running.NOTHING: (Fate.NONE, Fate.NONE),
    Running.PULL: (Fate.CANCELLED, Fate.CANCELLED),
    Running.BACKGROUND_PULL: (Fate.STOPS_AT_FILE_BOUNDARY, Fate.CANCELLED),
    Running.FINALIZE: (Fate.RUNS_ON, Fate.CANCELLED),
}


@pytest.mark.parametrize("running", list(Running))
def test_running_fate(running: Running) -> None:
    assert (
        running_fate(running, cut_short=False),
        running_fate(running, cut_short=True),
    ) == FATES[running]


@pytest.mark.parametrize(
    ("read_only", "ready", "running", "unpushed"),
    list(itertools.product([False, True], [False, True], list(Running), [0, 3])),
)
def test_stop_plan_for_every_state(
    read_only: bool, ready: bool, running: Running, unpushed: int
) -> None:
    """Every state the first signal can find: the push runs only on a read-write daemon that
    became ready, whatever runs and whatever auto-sync has pending (the push takes it)."""
    plan = plan_stop(AtStop(read_only, ready, running, unpushed))
    assert plan.running is FATES[running][0]
    if read_only:
        assert (plan.final_push, plan.exit_code) == (False, EXIT_OK)
        assert plan.why_no_push == "read-only: nothing is pushed"
        assert plan.close_reason == "shutting down"
    elif not ready:
        assert (plan.final_push, plan.exit_code) == (False, EXIT_OK)
        assert plan.why_no_push == NEVER_FILLED
        assert plan.close_reason == "shutting down"
    else:
        assert (plan.final_push, plan.exit_code, plan.why_no_push) == (True, None, None)
        assert plan.close_reason == "shutting down: the final push goes first"


@pytest.mark.parametrize(
    ("finished", "ok", "only_known", "end", "code"),
    [
        (True, True, False, PushEnd.DONE, EXIT_OK),
        (True, False, True, PushEnd.KNOWN_PROBLEMS_ONLY, EXIT_OK),
        (True, False, False, PushEnd.FAILED, EXIT_PUSH_INCOMPLETE),
        (False, False, False, PushEnd.CUT_SHORT, EXIT_PUSH_INCOMPLETE),
        (False, True, False, PushEnd.CUT_SHORT, EXIT_PUSH_INCOMPLETE),
        (False, False, True, PushEnd.CUT_SHORT, EXIT_PUSH_INCOMPLETE),
    ],
)
def test_how_the_final_push_ended_and_the_exit_code(
    finished: bool, ok: bool, only_known: bool, end: PushEnd, code: int
) -> None:
    assert push_end(finished=finished, ok=ok, only_known_problems=only_known) is end
    assert exit_code(end) == code


def test_every_push_end_has_an_exit_code() -> None:
    assert {end: exit_code(end) for end in PushEnd} == {
        PushEnd.DONE: 0,
        PushEnd.KNOWN_PROBLEMS_ONLY: 0,
        PushEnd.FAILED: 1,
        PushEnd.CUT_SHORT: 1,
    }


def test_cut_short_names_its_reason() -> None:
    assert cut_short_reason(second_signal=True, shutdown_timeout=300) == "a second signal"
    assert (
        cut_short_reason(second_signal=False, shutdown_timeout=0.3)
        == "the --shutdown-timeout of 0.3s"
    )
