"""The in-flight budget's growth and back-off (sidecar/s3/retry.py) as a pure state machine:
a simulated link answers `rate(level)` requests per second at each budget level, the clock is
the simulation's, and each case is the sequence of levels the budget goes through."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sidecar.s3 import ClientSettings
from sidecar.s3.retry import START_BUDGET, InflightBudget

Rate = Callable[[int], float]
Event = Callable[[InflightBudget], None]

RTT = 0.08


def rtt_bound(level: int) -> float:
    """Small requests on a long link: every slot moves one request per round trip."""
    return level / RTT


def cpu_bound(level: int) -> float:
    """Loopback: the client's CPU is the limit, more in flight moves nothing more."""
    return 1000.0


def server_caps_at_150(level: int) -> float:
    return min(level, 150) / RTT


def levels(
    budget: InflightBudget,
    rate: Rate,
    successes: int = 4000,
    waiting: bool = True,
    events: dict[int, Event] | None = None,
) -> list[int]:
    """The budget levels one after another (repeats dropped) over `successes` requests;
    events[level] happens once, when the budget first reaches that level."""
    now = 0.0
    seen = [budget.current]
    pending = dict(events or {})
    for _ in range(successes):
        if budget.current in pending:
            pending.pop(budget.current)(budget)
        if waiting:
            budget.note_waiting()
        now += 1 / rate(budget.current)
        budget.succeeded(now)
        if budget.current != seen[-1]:
            seen.append(budget.current)
    return seen


def throttle(budget: InflightBudget) -> None:
    budget.throttled(budget.round)


def fail(budget: InflightBudget) -> None:
    budget.failed()


@pytest.mark.parametrize(
    ("case", "maximum", "rate", "waiting", "events", "expected"),
    [
        # Grows by half per epoch while the rate grows with it, up to --concurrency.
        ("long round trip", 256, rtt_bound, True, None, [64, 96, 144, 216, 256]),
        # A probe that does not pay is put back, and tried again only after HOLD_EPOCHS
        # (4,000 successes at 64-96 a epoch: a probe every ~10 epochs).
        ("loopback", 256, cpu_bound, True, None, [64, 96, 64, 96, 64, 96, 64, ...]),
        # Settles just under the server's own limit.
        (
            "server limit",
            256,
            server_caps_at_150,
            True,
            None,
            [64, 96, 144, 216, 144, 216, 144, ...],
        ),
        # Requests never waited for a slot: the budget was not the bottleneck, no growth.
        ("no demand", 256, rtt_bound, False, None, [64]),
        # --concurrency at or below the start: a fixed budget, as before.
        ("concurrency 64", 64, rtt_bound, True, None, [64]),
        ("concurrency 16", 16, rtt_bound, True, None, [16]),
        # Throttled mid-probe (at 144, from 96): cut to BETA of the level before the probe,
        # one slot back per budget's worth of successes, then probing again.
        (
            "throttled",
            256,
            rtt_bound,
            True,
            {144: throttle},
            [64, 96, 144, 67, *range(68, 97), 144, 216, 256],
        ),
        # An error mid-probe (216 -> 256): the probe is dropped and one step of growth taken
        # back (216 / 1.5); after HOLD_EPOCHS it grows again.
        ("error", 256, rtt_bound, True, {256: fail}, [64, 96, 144, 216, 256, 144, 216, 256]),
        # Errors never take it below the start.
        ("error at the start", 256, rtt_bound, True, {64: fail, 96: fail}, [64, 96, 64, 96, ...]),
    ],
)
def test_budget_levels(
    case: str,
    maximum: int,
    rate: Rate,
    waiting: bool,
    events: dict[int, Event] | None,
    expected: list[object],
) -> None:
    """`expected` is every level the budget goes through, or the first ones then `...`."""
    budget = InflightBudget(maximum, 64)
    seen: list[object] = list(levels(budget, rate, waiting=waiting, events=events))
    if expected[-1] is ...:
        seen = [*seen[: len(expected) - 1], ...]
    assert seen == expected, case
    assert budget.highest <= maximum


def test_the_budget_starts_at_the_start_and_reports_it() -> None:
    status = ClientSettings(concurrency=256).fresh_budget().status()
    assert status["current"] == START_BUDGET == 64 == status["start"] == status["highest"]
    assert status["max"] == 256
    low = ClientSettings(concurrency=8).fresh_budget().status()
    assert low["current"] == low["max"] == 8
