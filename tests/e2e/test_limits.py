"""--bwlimit and --max-requests-per-second hold for real `sidecar pull|finalize --once`
processes against moto. Only lower bounds on time are asserted (a limit that holds can only
make a run slower; a loaded machine only adds to it), never an upper bound. Each bound is
over twice what the same run takes here without the limit (~1.2-1.5 s)."""

from __future__ import annotations

from tests.support.cli_support import (
    SIZING,
    MiB,
    Volume,
    data_of,
    hashed,
    tree,
    write_tree,
)


def _seed(vol: Volume, files: dict[str, bytes]) -> None:
    src = vol.work / "src"
    write_tree(src, files)
    assert vol.finalize(src, vol.work / "state-src", *SIZING).code == 0


def test_bwlimit_holds_for_a_big_file(mvol: Volume) -> None:
    files = {"big.bin": data_of(8 * MiB, 1)}  # ranged GETs of 5 MiB parts
    _seed(mvol, files)
    run = mvol.pull(mvol.work / "local", mvol.work / "state", *SIZING, "--bwlimit", "2MiB")
    assert run.code == 0, run
    assert tree(mvol.work / "local") == hashed(files)
    assert run.seconds >= 8 / 2 - 0.3, run


def test_bwlimit_holds_under_many_small_files(mvol: Volume) -> None:
    files = {f"d{i % 5}/f{i:03d}.bin": data_of(20 * 1024, i) for i in range(200)}
    _seed(mvol, files)
    total = sum(map(len, files.values())) / MiB  # ~3.9 MiB
    run = mvol.pull(mvol.work / "local", mvol.work / "state", "--bwlimit", "1MiB")
    assert run.code == 0, run
    assert tree(mvol.work / "local") == hashed(files)
    assert run.seconds >= total / 1 - 0.3, run


def test_bwlimit_down_up_limits_uploads(mvol: Volume) -> None:
    local = mvol.work / "local"
    write_tree(local, {"up.bin": data_of(6 * MiB, 2), "small.txt": b"x" * 100_000})
    run = mvol.finalize(local, mvol.work / "state", *SIZING, "--bwlimit", "0:1.5MiB")
    assert run.code == 0, run
    assert run.seconds >= 6.1 / 1.5 - 0.3, run


def test_max_requests_per_second_holds(mvol: Volume) -> None:
    files = {f"f{i:02d}.txt": f"{i}\n".encode() for i in range(40)}
    _seed(mvol, files)
    run = mvol.pull(mvol.work / "local", mvol.work / "state", "--max-requests-per-second", "10")
    assert run.code == 0, run
    assert tree(mvol.work / "local") == hashed(files)
    # 40 GETs and one listing page at 10 per second, after a burst of one.
    assert run.seconds >= 40 / 10 - 0.2, run
