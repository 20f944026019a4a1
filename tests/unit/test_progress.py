from __future__ import annotations

from sidecar.core.progress import Progress


def test_rate_and_eta_from_recent_samples() -> None:
    progress = Progress("pull", started=0.0, bytes_total=1000)
    progress.sample(0.0)
    progress.add_bytes(100)
    progress.sample(1.0)
    assert progress.rate(1.0) == 100.0
    assert progress.eta(1.0) == 9.0
    data = progress.as_dict(1.0)
    assert data["bytes_done"] == 100 and data["eta_seconds"] == 9.0
    assert "10%" in progress.line(1.0)


def test_progress_may_rewind_on_retry_without_negative_rate() -> None:
    progress = Progress("pull", started=0.0, bytes_total=10)
    progress.sample(0.0)
    progress.add_bytes(5)
    progress.add_bytes(-5)
    progress.sample(1.0)
    assert progress.rate(1.0) == 0.0
    assert progress.eta(1.0) is None
