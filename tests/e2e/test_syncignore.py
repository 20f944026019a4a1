"""A hostile or broken `.syncignore` (issue 9, item 9), through the real CLI against moto:
it is read off the event loop, only as a regular file of at most 1 MiB that is no symlink,
and a bad line is skipped and named by number; the sync always goes on.

An unusable file (FIFO, symlink, too big) is an input error: the sync runs without its
patterns, names `.syncignore` and the cause, and deletes nothing.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.cli_support import Run, Volume, keyed, write_tree

FILES = {"keep.txt": b"keep\n", "scratch/x.bin": b"scratch\n", "logs/run.log": b"log\n"}
# Generous: a run is ~1 s. Before the fix a FIFO blocked the sync forever.
TIMEOUT = 90


def limit_memory() -> None:
    """2 GiB of address space: a runaway read fails fast instead of eating the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))


def finalize(vol: Volume, local: Path) -> Run:
    return vol.finalize(local, vol.work / "state", timeout=TIMEOUT, preexec_fn=limit_memory)


@pytest.mark.parametrize(
    ("line", "problem"),
    [(b"\\", "line 2: not a valid pattern"), (b"\xff\xfe", "line 2: not valid UTF-8")],
    ids=["backslash", "invalid-utf8"],
)
def test_a_bad_line_is_named_by_number_and_the_other_lines_apply(
    mvol: Volume, line: bytes, problem: str
) -> None:
    local = mvol.work / "local"
    write_tree(local, {**FILES, ".syncignore": b"scratch/\n" + line + b"\nlogs/\n"})
    run = finalize(mvol, local)
    assert run.code == 1, run  # an error to fix, but the sync ran
    assert run.error_for(".syncignore")["reason"].startswith(problem), run
    assert "Traceback" not in run.err, run
    assert set(mvol.objects()) == {"pre/keep.txt", "pre/.syncignore"}, run


def make_fifo(local: Path, _outside: Path) -> None:
    os.mkfifo(local / ".syncignore")


def link_to_dev_zero(local: Path, _outside: Path) -> None:
    (local / ".syncignore").symlink_to("/dev/zero")


def link_outside(local: Path, outside: Path) -> None:
    outside.mkdir()
    # If it were followed, keep.txt would be excluded and its content could end up quoted
    # in an error message.
    (outside / "ignore").write_bytes(b"keep.txt\n\\ SECRET-TOKEN-42\n")
    (local / ".syncignore").symlink_to(outside / "ignore")


def too_big(local: Path, _outside: Path) -> None:
    (local / ".syncignore").write_bytes(b"keep.txt\n" + b"#" * (1024**2))


@pytest.mark.parametrize(
    ("make", "cause"),
    [
        (make_fifo, "FIFO"),
        (link_to_dev_zero, "symbolic link"),
        (link_outside, "symbolic link"),
        (too_big, "larger than 1.0 MiB"),
    ],
    ids=["fifo", "symlink-to-dev-zero", "symlink-outside", "over-1MiB"],
)
def test_an_unusable_syncignore_is_named_and_the_sync_goes_on_deleting_nothing(
    mvol: Volume, make: Callable[[Path, Path], None], cause: str
) -> None:
    local = mvol.work / "local"
    write_tree(local, {**FILES, "gone.txt": b"deleted locally later\n"})
    first = finalize(mvol, local)
    assert first.code == 0, first
    (local / "gone.txt").unlink()
    (local / "keep.txt").write_bytes(b"keep v2\n")  # sent only if no pattern hides it
    make(local, mvol.work / "outside")

    run = finalize(mvol, local)
    assert run.code == 1, run
    reason = run.error_for(".syncignore")["reason"]
    assert cause in reason and "nothing deleted" in reason, run
    assert "SECRET-TOKEN" not in run.out + run.err, run
    assert "Traceback" not in run.err, run
    assert "pre/gone.txt" in mvol.objects(), "deleted on a view without the .syncignore"
    uploaded = {k: v for k, v in mvol.objects().items() if k != "pre/.syncignore"}
    expected = {**FILES, "keep.txt": b"keep v2\n", "gone.txt": b"deleted locally later\n"}
    assert uploaded == keyed(expected), run
