"""The token bucket behind --bwlimit and --max-requests-per-second, on a fake clock."""

from __future__ import annotations

import pytest

from sidecar.core.options import OptionError, collect, sync_config
from sidecar.core.tokenbucket import BURST_SECONDS, TokenBucket

MiB = 1024**2


def test_a_fresh_bucket_lets_its_burst_through_then_keeps_the_rate() -> None:
    bucket = TokenBucket(100.0, now=0.0)
    assert bucket.burst == 100.0 * BURST_SECONDS
    assert bucket.reserve(10, now=0.0) == 0.0  # the head start
    assert bucket.reserve(50, now=0.0) == pytest.approx(0.5)
    assert bucket.reserve(50, now=0.0) == pytest.approx(1.0)  # queued behind the first
    assert bucket.reserve(0, now=1.0) == 0.0


def test_the_long_run_rate_is_exact_whatever_the_sizes() -> None:
    """Many small reservations cost what one big one costs: 512 MiB at 64 MiB/s ~ 8 s,
    whether as one file, 16 MiB parts or 4 KiB files."""
    for size in (512 * MiB, 16 * MiB, 4096):
        bucket = TokenBucket(64 * MiB, now=0.0)
        now = 0.0
        for _ in range(512 * MiB // size):
            now += bucket.reserve(size, now)  # the caller sleeps, then sends
        assert now == pytest.approx(8.0 - BURST_SECONDS, abs=1e-6), size


def test_concurrent_callers_wait_in_the_order_they_asked() -> None:
    bucket = TokenBucket(10.0, now=0.0, burst=0.0)
    waits = [bucket.reserve(1, now=0.0) for _ in range(5)]
    assert waits == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_an_idle_bucket_refills_only_up_to_its_burst() -> None:
    bucket = TokenBucket(10.0, now=0.0, burst=2.0)
    assert bucket.reserve(2, now=0.0) == 0.0
    # An hour idle buys no more than the burst: no minute-long spike after a quiet spell.
    assert bucket.reserve(2, now=3600.0) == 0.0
    assert bucket.reserve(1, now=3600.0) == pytest.approx(0.1)


def test_charge_after_the_fact_delays_the_next_caller() -> None:
    bucket = TokenBucket(100.0, now=0.0, burst=0.0)
    assert bucket.until_clear(now=0.0) == 0.0
    bucket.charge(50, now=0.0)  # a GET whose size was known only once it had streamed
    assert bucket.until_clear(now=0.0) == pytest.approx(0.5)
    assert bucket.until_clear(now=0.25) == pytest.approx(0.25)
    assert bucket.until_clear(now=1.0) == 0.0


def test_a_rate_must_be_positive() -> None:
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="rate must be positive"):
            TokenBucket(bad, now=0.0)


def _limits(flags: dict[str, str], env: dict[str, str] | None = None) -> tuple[object, ...]:
    flags = {"remote": "s3://b/p", "local_dir": "/tmp/x-data", **flags}
    env = {"HOME": "/tmp/x-home", **(env or {})}
    config = sync_config(collect(flags, env, "sync"), env)
    return config.bwlimit_down, config.bwlimit_up, config.max_requests_per_second


def test_limit_options() -> None:
    assert _limits({}) == (None, None, None)
    assert _limits({"bwlimit": "64MiB"}) == (64 * MiB, 64 * MiB, None)
    assert _limits({"bwlimit": "200MiB/s:50MB"}) == (200 * MiB, 50_000_000, None)
    assert _limits({"bwlimit": ":1MiB"}) == (None, MiB, None)
    assert _limits({"bwlimit": "1MiB:0"}) == (MiB, None, None)
    assert _limits({}, {"SIDECAR_BWLIMIT": "1GiB", "SIDECAR_MAX_REQUESTS_PER_SECOND": "50"}) == (
        1024**3,
        1024**3,
        50.0,
    )
    assert _limits({"max_requests_per_second": "2.5"})[2] == 2.5
    for flags, why in [
        ({"bwlimit": "fast"}, r"--bwlimit \(SIDECAR_BWLIMIT\) from --bwlimit: not a size"),
        ({"bwlimit": "1MiB:lots"}, "not a size: 'lots'"),
        ({"max_requests_per_second": "0"}, "SIDECAR_MAX_REQUESTS_PER_SECOND.*positive"),
        ({"max_requests_per_second": "-3"}, "positive"),
        ({"max_requests_per_second": "many"}, "MAX_REQUESTS"),
    ]:
        with pytest.raises(OptionError, match=why):
            _limits(flags)
