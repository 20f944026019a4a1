from __future__ import annotations

from sidecar.core.progress import Progress


def test_rate_and_eta_from_recent_samples() -> None:
    progress = Progress("pull", started=0.0, phase="transferring", bytes_total=1000)
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


def test_the_walk_has_its_own_line_and_starts_its_counts_over() -> None:
    progress = Progress("pull", started=0.0)
    progress.files_scanned, progress.objects_listed, progress.paths_compared = 7, 9, 5
    progress.files_hashed, progress.objects_checked = 2, 1
    assert progress.line(1.0) == (
        "pull scanning: 7 files in the folder, 9 objects listed, 5 paths compared "
        "(2 files hashed, 1 objects checked)"
    )
    progress.walk_restarted()  # a listing out of key order: the walk is done again
    counts = ("files_scanned", "objects_listed", "paths_compared", "files_hashed")
    assert [progress.as_dict(1.0)[name] for name in (*counts, "objects_checked")] == [0] * 5
    progress.phase = "transferring"
    assert progress.line(1.0).startswith("pull transferring: 0/0 files")
