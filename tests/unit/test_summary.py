"""A sync's summary as the CLI prints it (sidecar/cli/summary.py): one writer for a `--once`
run and for the daemon's answer, so both print the same lines."""

from __future__ import annotations

import io

import pytest

from sidecar.cli.client import _print_summary
from sidecar.cli.summary import write_summary
from sidecar.core.model import Action, ActionKind, Conflict, Direction, FileError
from sidecar.core.result import SyncResult


def a_result() -> SyncResult:
    result = SyncResult(Direction.PULL, dry_run=True, files_transferred=2, seconds=1.5)
    result.planned = [
        Action(ActionKind.DOWNLOAD, "a.txt"),
        Action(ActionKind.DOWNLOAD, "b.txt", conflict_copy="b.conflict-x.txt"),
    ]
    result.notes = ["shard 0/2 holds 90% of the bytes"]
    result.conflicts = [Conflict("b.txt", "both-modified", "downloaded", "b.conflict-x.txt")]
    result.errors = [FileError("c.txt", "cannot read")]
    result.fatal = "the bucket does not exist"
    result.deletes_blocked = "2 deletion(s) withheld"
    return result


OUT = [
    "download\ta.txt",
    "download\tb.txt (conflict copy: b.conflict-x.txt)",
    "note\tshard 0/2 holds 90% of the bytes",
    "conflict\tb.txt: both-modified, downloaded",
]
ERR = [
    "error\tc.txt: cannot read",
    "sidecar: pull failed: the bucket does not exist",
    "sidecar: 2 deletion(s) withheld",
]


def test_write_summary_lines() -> None:
    result = a_result()
    out, err = io.StringIO(), io.StringIO()
    write_summary({**result.as_dict(), "summary": result.one_line()}, out, err)
    assert out.getvalue().splitlines() == [*OUT, result.one_line()]
    assert err.getvalue().splitlines() == ERR


def test_the_daemons_answer_prints_as_a_once_run(capsys: pytest.CaptureFixture[str]) -> None:
    """The client printed its own subset (no notes, no failure, no withheld deletes)."""
    result = a_result()
    out = io.StringIO()
    code = _print_summary({**result.as_dict(), "summary": result.one_line()}, out)
    assert code == 1
    assert out.getvalue().splitlines() == [*OUT, result.one_line()]
    assert capsys.readouterr().err.splitlines() == ERR


def test_a_summary_without_its_line_prints_as_json() -> None:
    out, err = io.StringIO(), io.StringIO()
    write_summary({"ok": True}, out, err)
    assert out.getvalue() == '{"ok": true}\n'
    assert err.getvalue() == ""
