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

InflightBudget is the store's bound on requests in flight (`--concurrency` at most), made
adaptive on throttling the way botocore's `adaptive` mode and TCP's AIMD are: a throttled
answer (503 SlowDown, 429, a throttling code) cuts the budget to BETA of itself (0.7,
botocore's CUBIC beta), at most once per round of requests (a burst of 16 SlowDowns from one
round cuts once, not 16 times: those requests were sent before the first cut); every
success grows it by 1/budget, i.e. by one slot per budget's worth of successes. Never below
1 nor above the configured concurrency. botocore limits a request *rate* (a token bucket);
a budget of requests in flight is the same lever for a client whose requests vary from a
HEAD to a 64 MiB part, and costs nothing while nothing is throttled.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.s3.errors import S3Error
from sidecar.s3.http11 import DEADLINE_RATE

BETA = 0.7  # multiplicative decrease on throttling (botocore's CubicCalculator._BETA)
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
    """A semaphore whose size adapts (AIMD, module docstring). acquire() returns the round
    it was granted in; pass it back to throttled() so that one round cuts once."""

    __slots__ = (
        "_waiters",
        "current",
        "in_use",
        "limit",
        "lowest",
        "maximum",
        "round",
        "throttles",
    )

    def __init__(self, maximum: int) -> None:
        self.maximum = max(1, maximum)
        self.limit = float(self.maximum)  # grows by fractions of a slot
        self.current = self.maximum  # int(limit): the slots granted
        self.lowest = self.maximum  # the smallest `current` so far
        self.in_use = 0
        self.round = 0  # bumped by each cut
        self.throttles = 0  # throttled answers seen
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> int:
        if self.in_use < self.current and not self._waiters:
            self.in_use += 1
            return self.round
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

    def succeeded(self) -> None:
        if self.limit < self.maximum:
            self.limit = min(float(self.maximum), self.limit + 1 / self.limit)
            self.current = int(self.limit)
            if self._waiters:
                self._wake()

    def throttled(self, granted_round: int) -> None:
        """A throttled answer to a request granted in `granted_round`."""
        self.throttles += 1
        if granted_round != self.round:
            return  # sent before the last cut: that cut already answered this round
        self.round += 1
        self.current = max(1, int(self.limit * BETA))
        self.limit = float(self.current)
        self.lowest = min(self.lowest, self.current)

    def status(self) -> dict[str, int]:
        return {
            "current": self.current,
            "max": self.maximum,
            "in_use": self.in_use,
            "lowest": self.lowest,
            "throttled_total": self.throttles,
        }
