"""The daemon's lifecycle decisions as values: readiness, the initial pull's retries, stopping.

Pure (no I/O, no asyncio, no clock): `service.py` and `coordinator.py` gather the facts,
call these and carry out the answer. The tables here are the policy; tests/unit pins them.

Stopping (SIGTERM or SIGINT, e.g. the kubelet ending the pod):
- the first signal starts the stop (`on_signal`): queued syncs are dropped, the running one
  meets its `running_fate`, and `plan_stop` says whether a final push runs. It runs only on a
  read-write daemon whose initial pull succeeded: a folder that was never filled must not
  overwrite the bucket. A queued finalize (a preStop hook's `sidecar finalize`) is kept: it
  becomes that final push. Changes auto-sync saw but did not push yet are in the folder, so
  the final push takes them (or, with no push, they stay local as every other change).
- the final push is bounded by --shutdown-timeout; a second signal cuts it short at once, a
  third also skips naming what was not pushed (`lists_unpushed`).
- the exit code (`exit_code`): 0 after a clean stop (the push done, or nothing to push), 1 when
  the push failed or was cut short, so the pod's last state shows it; 2 when a listener could
  not bind at start.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

EXIT_OK = 0
EXIT_PUSH_INCOMPLETE = 1
EXIT_CANNOT_LISTEN = 2

# -- readiness ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Readiness:
    """The answer of GET /readyz: 200 with `text` when ready, else 503."""

    ready: bool
    text: str  # "ready", "ready, degraded: WHY" or "not ready: WHY"

    @property
    def status(self) -> int:
        return 200 if self.ready else 503


def readiness(
    *,
    closing: bool,
    ready: bool,
    degraded: str | None,
    last_error: str | None,
    retry_in: float | None,
) -> Readiness:
    """Ready once the initial pull applied all it safely could, until the stop begins.

    Degraded (some paths left out) is still ready: the notebook may start; what was left
    out is on /status and the metrics. `retry_in`: seconds until the initial pull's next
    attempt, while it waits for one.
    """
    if closing:
        reason = "shutting down"
    elif ready:
        return Readiness(True, "ready" if degraded is None else f"ready, degraded: {degraded}")
    elif last_error is not None:
        reason = f"initial pull failed: {last_error}"
    else:
        reason = "initial pull not finished"
    if retry_in is not None:
        reason += f"; retry in {retry_in}s"
    return Readiness(False, f"not ready: {reason}")


# -- the initial pull -------------------------------------------------------------------------

INITIAL_RETRY_FIRST = 1.0
INITIAL_RETRY_MAX = 60.0


def initial_retry(delay: float, *, fatal: bool) -> tuple[float, float]:
    """(seconds to wait before the next attempt, before jitter; the delay after that).

    A pull that could not run (`fatal`: server down, credentials, ...) backs off, doubling up
    to INITIAL_RETRY_MAX. One that ran through but hit problems not seen before (files still
    arriving) goes again soon, to see whether they last (then: ready, degraded) or passed.
    """
    if not fatal:
        return INITIAL_RETRY_FIRST, INITIAL_RETRY_FIRST
    return delay, min(delay * 2, INITIAL_RETRY_MAX)


# -- stopping -------------------------------------------------------------------------------


class OnSignal(StrEnum):
    STOP = "stop"  # the first: final push (when there is one), then exit
    HURRY = "hurry"  # the second: cut the final push short, name what was not pushed
    EXIT_NOW = "exit now"  # a third or later: cut short, do not even name it


def on_signal(count: int) -> OnSignal:
    """What the `count`-th SIGTERM/SIGINT asks for."""
    if count <= 1:
        return OnSignal.STOP
    return OnSignal.HURRY if count == 2 else OnSignal.EXIT_NOW


def lists_unpushed(signals: int) -> bool:
    """After a cut-short push, name what stayed local: unless a third signal said not to."""
    return on_signal(signals) is not OnSignal.EXIT_NOW


class Running(StrEnum):
    """The sync running when the stop begins, as the stop sees it."""

    NOTHING = "nothing"
    PULL = "pull"  # the initial pull, a requested one (dry runs too)
    # A pull of --ready-when priority going on in the background after ready: it can stop
    # at a file boundary (what arrived is committed; the rest resumes at the next start).
    BACKGROUND_PULL = "background pull"
    FINALIZE = "finalize"  # a push (API, preStop, auto-sync) or a dry run of one


class Fate(StrEnum):
    NONE = "none"
    CANCELLED = "cancelled"  # the engine leaves no half-written object or file
    STOPS_AT_FILE_BOUNDARY = "stops at a file boundary"  # files in flight land first
    RUNS_ON = "runs on"  # to its end; the final push queues behind it (it scanned too early)


def running_fate(running: Running, *, cut_short: bool) -> Fate:
    """What becomes of the running sync when the daemon closes.

    `cut_short`: the final push's deadline passed, a second signal came, or the daemon
    stops for good: everything running is cancelled.
    """
    if running is Running.NOTHING:
        return Fate.NONE
    if cut_short or running is Running.PULL:
        # A pull nobody needs any more must not hold up the final push.
        return Fate.CANCELLED
    if running is Running.BACKGROUND_PULL:
        return Fate.STOPS_AT_FILE_BOUNDARY
    return Fate.RUNS_ON


@dataclass(frozen=True, slots=True)
class AtStop:
    """The facts when the first signal arrives."""

    read_only: bool
    ready: bool  # the initial pull succeeded
    running: Running = Running.NOTHING
    unpushed_changes: int = 0  # auto-sync's changes not pushed yet (0 without auto-sync)


@dataclass(frozen=True, slots=True)
class StopPlan:
    final_push: bool  # a finalize runs (queued finalizes are kept for it)
    close_reason: str  # what dropped requests are told
    running: Fate
    exit_code: int | None  # known now when nothing is pushed; else `exit_code(PushEnd)`
    why_no_push: str | None = None  # for the "exiting; ..." log line


def plan_stop(at: AtStop) -> StopPlan:
    running = running_fate(at.running, cut_short=False)
    if at.read_only or not at.ready:
        why = (
            "read-only: nothing is pushed"
            if at.read_only
            else "the initial pull never succeeded: no final push, since a folder that was "
            "never filled must not overwrite the bucket"
        )
        return StopPlan(False, "shutting down", running, EXIT_OK, why)
    return StopPlan(True, "shutting down: the final push goes first", running, None)


class PushEnd(StrEnum):
    DONE = "done"
    # Failed only on bad keys in the bucket the daemon was already degraded by: nothing of
    # its own failed.
    KNOWN_PROBLEMS_ONLY = "done, known bad keys skipped"
    FAILED = "failed"
    CUT_SHORT = "cut short"  # the deadline or a second signal


def push_end(*, finished: bool, ok: bool, only_known_problems: bool) -> PushEnd:
    if not finished:
        return PushEnd.CUT_SHORT
    if ok:
        return PushEnd.DONE
    return PushEnd.KNOWN_PROBLEMS_ONLY if only_known_problems else PushEnd.FAILED


def exit_code(end: PushEnd) -> int:
    return EXIT_OK if end in (PushEnd.DONE, PushEnd.KNOWN_PROBLEMS_ONLY) else EXIT_PUSH_INCOMPLETE


def cut_short_reason(*, second_signal: bool, shutdown_timeout: float) -> str:
    if second_signal:
        return "a second signal"
    return f"the --shutdown-timeout of {shutdown_timeout:g}s"
