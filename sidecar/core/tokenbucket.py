"""Token bucket with reservations: the pure arithmetic of --bwlimit and
--max-requests-per-second. The caller passes the clock (seconds, monotonic) and sleeps.

A reservation may take the bucket into debt: the caller waits until the debt is paid
(debt / rate seconds). So callers are served in the order they asked, a request bigger
than the burst still goes (it just waits longer), and the long-run rate is exactly `rate`
whatever the sizes: N small files cost what one big file of their total costs.
"""

from __future__ import annotations

# Head start of a fresh (or idle) bucket: a tenth of a second of the rate. Big enough that
# a steady stream of requests does not wait on rounding, small enough not to show in the
# rate of any transfer worth limiting.
BURST_SECONDS = 0.1


class TokenBucket:
    def __init__(self, rate: float, now: float, burst: float | None = None) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else self.rate * BURST_SECONDS
        self.tokens = self.burst
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def reserve(self, amount: float, now: float) -> float:
        """Take `amount` now; returns the seconds to wait before using it (0: at once)."""
        self._refill(now)
        self.tokens -= amount
        return max(0.0, -self.tokens / self.rate)

    def until_clear(self, now: float) -> float:
        """Seconds until earlier reservations are paid (for an amount only known after the
        fact: wait for this, move the bytes, then charge() them)."""
        self._refill(now)
        return max(0.0, -self.tokens / self.rate)

    def charge(self, amount: float, now: float) -> None:
        """Take `amount` that has already moved; the next caller pays for it."""
        self._refill(now)
        self.tokens -= amount
