"""The one retry policy of the S3 wire, and the in-flight budget that throttling shrinks.

RetryPolicy (values only) answers the two questions of a failed attempt: try again, and
after how long. Which failures are worth another try is errors.py's classification
(S3Error.retryable, .throttled), not a second list here. The backoff is AWS's "full
jitter", as botocore's standard mode: uniform in [0, min(cap, scale x 2^n)) after the n-th
failed attempt (0-based), the scale 50 ms for errors and 1 s for throttling (botocore's
non_throttling_base_scale / throttling_base_scale). A request gives up at the attempt cap or
at its deadline, whichever comes first: no retry starts, and no backoff sleeps, past it.
The deadline is three times one attempt's own (http11: a base plus the request's bytes at a
floor rate), so a big part gets the time its size needs and a stuck server costs three
attempts' worth, never max_attempts of them. An attempt under way is bounded by its own
deadline in http11.

Attempts is one request's tries against the policy; ObjectStore._exchange is its only user,
and the only place retries are counted.

InflightBudget is the store's bound on requests in flight, `--concurrency` at most. It starts
lower (START_BUDGET) and adapts both ways:
- Throttling cuts it, the way botocore's `adaptive` mode and TCP's AIMD do: a throttled
  answer (503 SlowDown, 429, a throttling code) cuts the budget to BETA of itself (0.7,
  botocore's CUBIC beta), at most once per round of requests (a burst of 16 SlowDowns from
  one round cuts once, not 16 times: those requests were sent before the first cut); every
  success then grows it back by 1/budget, i.e. one slot per budget's worth of successes, up
  to the level it had proven. Never below 1.
- Throughput raises it, the way BBR probes for bandwidth: requests move at about
  budget / round trip, so at 80 ms 64 in flight cap a small-file pull at ~800 files/s
  whatever the link. While requests wait for a slot (the budget, not the work, is the
  bottleneck), an epoch is one budget's worth of successes; after an epoch at the proven
  level the budget is raised by GROWTH, and kept if the next epoch's completion rate grew by
  at least GAIN, else put back (more in flight only adds memory and queueing) and left
  alone for HOLD_EPOCHS epochs. On loopback, where a sync is CPU-bound, the probes fail and
  the budget stays near its start; at a long round trip it climbs to `--concurrency`.
- Errors other than throttling (5xx, timeouts, resets) end a probe and take back one step
  of growth (never below the start): a struggling server gets no more requests than it was
  handling.
botocore limits a request *rate* (a token bucket); a budget of requests in flight is the
same lever for a client whose requests vary from a HEAD to a 64 MiB part. Memory: the
requests that hold large bodies (parts, ranges, whole PUTs) are bounded by the transfer
engine's BufferPool, not by this count; a small request holds a connection's staging buffer.
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.s3.errors import S3Error
from sidecar.s3.http11 import DEADLINE_RATE

BETA = 0.7  # multiplicative decrease on throttling (botocore's CubicCalculator._BETA)
START_BUDGET = 64  # requests in flight at first (or --concurrency, when that is lower)
GROWTH = 1.5  # a probe raises the budget by half
GAIN = 1.15  # ...and keeps the raise when the completion rate grew by this much
HOLD_EPOCHS = 8  # epochs without a probe after one that did not pay
DEADLINE_ATTEMPTS = 3  # a request's deadline, in attempt deadlines


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    error_scale: float = 0.05  # seconds: backoff base for 5xx, timeouts, resets
    throttle_scale: float = 1.0  # seconds: backoff base for throttling
    max_backoff: float = 20.0
    # One attempt's deadline (http11): attempt_base + its bytes at attempt_rate.
    attempt_base: float = 60.0
    attempt_rate: float = DEADLINE_RATE

    def delay(
        self, failed: int, throttled: bool, draw: Callable[[], float] = random.random
    ) -> float:
        """Seconds to wait after the `failed`-th attempt (0-based) failed: full jitter."""
        scale = self.throttle_scale if throttled else self.error_scale
        return draw() * min(self.max_backoff, scale * 2.0**failed)

    def deadline(self, expected_bytes: int) -> float:
        """Seconds one request (all its attempts and backoffs) may take."""
        return DEADLINE_ATTEMPTS * (self.attempt_base + expected_bytes / self.attempt_rate)

    def next_delay(
        self, error: S3Error, failed: int, elapsed: float, limit: float, draw: Callable[[], float]
    ) -> float | None:
        """The wait before another attempt, or None: give up (not retryable, attempts
        used up, or the deadline `limit` would pass first). `failed` counts from 0."""
        if not error.retryable or failed + 1 >= self.max_attempts:
            return None
        wait = self.delay(failed, error.throttled, draw)
        if elapsed + wait >= limit:
            return None
        return wait


class Attempts:
    """One request's tries: the policy, its deadline, how many failed."""

    __slots__ = ("_draw", "failed", "limit", "name", "policy", "started")

    def __init__(
        self,
        policy: RetryPolicy,
        name: str,
        expected_bytes: int,
        started: float,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.name = name
        self.started = started
        self.limit = policy.deadline(expected_bytes)
        self.failed = 0
        self._draw = draw

    async def again(self, error: S3Error) -> None:
        """Wait before the next attempt, or raise `error` saying why no more came."""
        elapsed = time.monotonic() - self.started
        wait = self.policy.next_delay(error, self.failed, elapsed, self.limit, self._draw)
        self.failed += 1
        if wait is None:
            raise self.gave_up(error, elapsed)
        await asyncio.sleep(wait)

    def gave_up(self, error: S3Error, elapsed: float) -> S3Error:
        error.retried = self.failed > 1
        if not error.retryable or self.failed == 1:
            return error
        why = (
            f"{self.failed} attempts"
            if self.failed >= self.policy.max_attempts
            else f"its deadline ({self.limit:.3g}s), after {self.failed} attempts"
        )
        error.message = f"{error.message}; gave up at {why} in {elapsed:.1f}s"
        error.args = (f"{error.key}: {error.message}",)
        return error


class InflightBudget:
    """A semaphore whose size adapts (module docstring). acquire() returns the round it was
    granted in; pass it back to throttled() so that one round cuts once. A pure state
    machine apart from the waiters: succeeded() takes the clock as an argument."""

    __slots__ = (
        "_base_rate",
        "_epoch_done",
        "_epoch_start",
        "_hold",
        "_probe_from",
        "_settling",
        "_waited",
        "_waiters",
        "current",
        "highest",
        "in_use",
        "limit",
        "lowest",
        "maximum",
        "proven",
        "round",
        "start",
        "throttles",
    )

    def __init__(self, maximum: int, start: int | None = None) -> None:
        self.maximum = max(1, maximum)
        self.start = self.maximum if start is None else max(1, min(start, self.maximum))
        self.proven = self.start  # the level throughput has shown worth holding
        self.limit = float(self.start)  # grows by fractions of a slot after a cut
        self.current = self.start  # int(limit): the slots granted
        self.lowest = self.start  # the smallest `current` so far
        self.highest = self.start  # the largest `current` so far
        self.in_use = 0
        self.round = 0  # bumped by each cut
        self.throttles = 0  # throttled answers seen
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        # The throughput epoch: when it started, successes in it, whether any request had
        # to wait for a slot in it, the completion rate at the proven level, and the level
        # a probe raised the budget from (None: not probing).
        self._epoch_start: float | None = None
        self._epoch_done = 0
        self._waited = False
        self._base_rate = 0.0
        self._probe_from: int | None = None
        self._settling = False  # the first epoch after a raise: new connections, not judged
        self._hold = 0

    async def acquire(self) -> int:
        if self.in_use < self.current and not self._waiters:
            self.in_use += 1
            return self.round
        self.note_waiting()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted, then cancelled before it was used
            elif waiter in self._waiters:  # _wake may have dropped it already
                self._waiters.remove(waiter)
            raise
        return self.round

    def note_waiting(self) -> None:
        """A request had to wait for a slot: the budget, not the work, held it back."""
        self._waited = True

    def release(self) -> None:
        self.in_use -= 1
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.current:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_use += 1  # handed over: the waiter holds it when it wakes
                waiter.set_result(None)

    def _set(self, level: int) -> None:
        self.current = level
        self.limit = float(level)
        self.highest = max(self.highest, level)
        if self._waiters:
            self._wake()

    def succeeded(self, now: float | None = None) -> None:
        """A request went through; `now` is the monotonic clock (time.monotonic())."""
        if self.current < self.proven:  # recovering from a cut: one slot per budget
            self.limit = min(float(self.proven), self.limit + 1 / self.limit)
            self.current = int(self.limit)
            if self._waiters:
                self._wake()
            self._epoch_start = None  # rates while recovering say nothing about a probe
            return
        if self.proven >= self.maximum and self._probe_from is None:
            return  # nothing to probe
        now = time.monotonic() if now is None else now
        if self._epoch_start is None:
            self._new_epoch(now)
            return
        self._epoch_done += 1
        if self._epoch_done >= self.current:
            self._end_epoch(now)

    def _new_epoch(self, now: float) -> None:
        self._epoch_start = now
        self._epoch_done = 0
        self._waited = bool(self._waiters)

    def _end_epoch(self, now: float) -> None:
        assert self._epoch_start is not None
        elapsed = now - self._epoch_start
        saturated = self._waited
        rate = self._epoch_done / elapsed if elapsed > 0 else 0.0
        self._new_epoch(now)
        if not saturated or rate <= 0:
            return  # the budget was not what held requests back: nothing learnt
        if self._settling:
            # The raise's extra requests open connections (a handshake's round trip more):
            # the first epoch after it would judge the handshakes, not the level.
            self._settling = False
            return
        if self._probe_from is not None:  # a probe's verdict
            if rate >= self._base_rate * GAIN:
                self.proven = self.current
                self._base_rate = rate
            else:
                self._set(self._probe_from)
                self._hold = HOLD_EPOCHS
            self._probe_from = None
        else:
            self._base_rate = rate
            if self._hold:
                self._hold -= 1
                return
        if self._probe_from is None and self._hold == 0 and self.proven < self.maximum:
            self._probe_from = self.current
            self._settling = True
            self._set(min(self.maximum, math.ceil(self.current * GROWTH)))

    def throttled(self, granted_round: int) -> None:
        """A throttled answer to a request granted in `granted_round`."""
        self.throttles += 1
        if granted_round != self.round:
            return  # sent before the last cut: that cut already answered this round
        self.round += 1
        if self._probe_from is not None:
            self.limit = float(self._probe_from)  # the probe found the server's limit
            self._probe_from = None
        self.current = max(1, int(self.limit * BETA))
        self.limit = float(self.current)
        self.lowest = min(self.lowest, self.current)
        self._epoch_start = None

    def failed(self) -> None:
        """A failed request that was not throttled (5xx, timeout, reset): end a probe and
        take back one step of growth, never below the start."""
        if self._probe_from is not None:
            self._set(self._probe_from)
            self._probe_from = None
        stepped_back = max(self.start, int(self.proven / GROWTH))
        if stepped_back < self.proven:
            self.proven = stepped_back
            if self.current > stepped_back:
                self.current = stepped_back
                self.limit = float(stepped_back)
        self._hold = HOLD_EPOCHS
        self._epoch_start = None

    def status(self) -> dict[str, int]:
        return {
            "current": self.current,
            "max": self.maximum,
            "start": self.start,
            "highest": self.highest,
            "in_use": self.in_use,
            "lowest": self.lowest,
            "throttled_total": self.throttles,
        }
