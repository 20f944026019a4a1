"""The order a plan is carried out in (sidecar/core/phases.py), and a listing's folder
markers (sidecar/core/paths.folder_markers), as tables."""

from __future__ import annotations

import pytest

from sidecar.core.model import Action, ActionKind, FileError, LocalFile, RemoteObject
from sidecar.core.paths import folder_markers
from sidecar.core.phases import (
    PHASE_OF,
    REQUEST_KINDS,
    TRANSFER_KINDS,
    Phase,
    action_bytes,
    biggest_first,
    drop_below,
    phases,
)

K = ActionKind


def lf(size: int) -> LocalFile:
    return LocalFile(size, 1, 1, False, "h")


def ro(size: int) -> RemoteObject:
    return RemoteObject("p/k", size, "e")


def act(kind: ActionKind, path: str = "f", local: int = 10, remote: int = 20) -> Action:
    return Action(kind, path, lf(local), ro(remote))


PHASE_TABLE = [
    (K.ADOPT, Phase.IN_PLACE, False, False),
    (K.FORGET, Phase.IN_PLACE, False, False),
    (K.SET_MODE_LOCAL, Phase.IN_PLACE, False, True),
    (K.DELETE_LOCAL, Phase.DELETE, False, False),
    (K.DELETE_REMOTE, Phase.DELETE, False, False),
    (K.DOWNLOAD, Phase.TRANSFER, True, True),
    (K.UPLOAD, Phase.TRANSFER, True, True),
    (K.SET_MODE_REMOTE, Phase.TRANSFER, True, True),
]


@pytest.mark.parametrize(("kind", "phase", "requests", "transfers"), PHASE_TABLE)
def test_phase_of_every_kind(
    kind: ActionKind, phase: Phase, requests: bool, transfers: bool
) -> None:
    assert PHASE_OF[kind] is phase
    assert (kind in REQUEST_KINDS) is requests
    assert (kind in TRANSFER_KINDS) is transfers


def test_the_table_covers_every_kind() -> None:
    assert {row[0] for row in PHASE_TABLE} == set(ActionKind) == set(PHASE_OF)


def test_phases_split_in_plan_order() -> None:
    plan = [
        act(K.DOWNLOAD, "a"),
        act(K.DELETE_LOCAL, "b"),
        act(K.ADOPT, "c"),
        act(K.UPLOAD, "d"),
        act(K.FORGET, "e"),
        act(K.DELETE_REMOTE, "f"),
        act(K.SET_MODE_LOCAL, "g"),
        act(K.SET_MODE_REMOTE, "h"),
    ]
    split = phases(plan)
    assert [a.path for a in split.in_place] == ["c", "e", "g"]
    assert [a.path for a in split.deletes] == ["b", "f"]
    assert [a.path for a in split.transfers] == ["a", "d", "h"]
    assert phases([]) == phases(())


BYTES = [
    (K.DOWNLOAD, 20),  # the object's size
    (K.UPLOAD, 10),  # the file's size
    (K.SET_MODE_REMOTE, 0),
    (K.SET_MODE_LOCAL, 0),
    (K.ADOPT, 0),
    (K.FORGET, 0),
    (K.DELETE_LOCAL, 0),
    (K.DELETE_REMOTE, 0),
]


@pytest.mark.parametrize(("kind", "size"), BYTES)
def test_action_bytes(kind: ActionKind, size: int) -> None:
    assert action_bytes(act(kind)) == size


def test_action_bytes_without_the_side() -> None:
    assert action_bytes(Action(K.DOWNLOAD, "f", lf(5), None)) == 0
    assert action_bytes(Action(K.UPLOAD, "f", None, ro(5))) == 0


def test_biggest_first_keeps_plan_order_among_equals() -> None:
    plan = [
        act(K.UPLOAD, "a", local=1),
        act(K.DOWNLOAD, "b", remote=9),
        act(K.SET_MODE_REMOTE, "c"),
        act(K.UPLOAD, "d", local=9),
        act(K.UPLOAD, "e", local=1),
    ]
    assert [a.path for a in biggest_first(plan)] == ["b", "d", "a", "e", "c"]


# (kept files, paths) -> paths kept, errors
DROP = [
    (set(), ["a", "a/b"], ["a", "a/b"], []),
    ({"d"}, ["d", "d/x", "d/e/y", "dd/x", "e/d/x"], ["d", "dd/x", "e/d/x"], ["d/x", "d/e/y"]),
    ({"d/e"}, ["d/x", "d/e/y", "d/e"], ["d/x", "d/e"], ["d/e/y"]),
    ({"a", "b"}, ["b/1", "a/2", "c/3"], ["c/3"], ["b/1", "a/2"]),
]


@pytest.mark.parametrize(("files", "paths", "kept", "dropped"), DROP)
def test_drop_below(files: set[str], paths: list[str], kept: list[str], dropped: list[str]) -> None:
    actions = [act(K.UPLOAD, p) for p in paths]
    left, errors = drop_below(actions, files)
    assert [a.path for a in left] == kept
    assert [e.path for e in errors] == dropped
    for error in errors:
        clash = next(f for f in files if error.path.startswith(f + "/"))
        assert error == FileError(
            error.path, f"not sent: {clash!r} is still a file (its delete failed)"
        )


# (listed path -> size) -> the folder markers
MARKERS = [
    ({}, []),
    ({"a": 0}, []),  # an empty file, no folder of that name
    ({"d": 0, "d/x": 5}, ["d"]),  # rclone's marker of 'd/'
    ({"d": 3, "d/x": 5}, []),  # a real file and a folder of one name: both stay
    ({"d": 0, "d/e": 0, "d/e/x": 1}, ["d", "d/e"]),  # nested markers
    ({"d/e": 0, "d/e/x": 1}, ["d/e"]),  # the parent 'd' is not listed
    ({"d": 0, "dd/x": 1, "d.txt": 0}, []),  # containment by segment, not string prefix
    ({"a/b": 0, "a": 0}, ["a"]),  # 'a/b' is an empty file in the marker 'a'
]


@pytest.mark.parametrize(("sizes", "markers"), MARKERS)
def test_folder_markers(sizes: dict[str, int], markers: list[str]) -> None:
    listed = {path: RemoteObject("p/" + path, size, "e") for path, size in sizes.items()}
    assert folder_markers(listed) == markers
