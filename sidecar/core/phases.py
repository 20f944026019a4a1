"""In which order a plan is carried out, decided as values: the engine runs the phases one
after the other and only dispatches each action to its handler (sidecar/engine/execute.py).

1. In place: ADOPT, FORGET, SET_MODE_LOCAL; no request, BASE and a chmod only.
2. Deletes: a folder the bucket replaced by a file (or back) must be gone before the new
   version can land.
3. Transfers: downloads, uploads, metadata rewrites; big files first, their parts spread
   over all slots while small files fill gaps. A write below a file whose delete failed is
   dropped (`drop_below`): never a file and a folder at once.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from sidecar.core.model import Action, ActionKind, FileError
from sidecar.core.paths import parent_dirs


class Phase(enum.IntEnum):
    IN_PLACE = 1
    DELETE = 2
    TRANSFER = 3


PHASE_OF: dict[ActionKind, Phase] = {
    ActionKind.ADOPT: Phase.IN_PLACE,
    ActionKind.FORGET: Phase.IN_PLACE,
    ActionKind.SET_MODE_LOCAL: Phase.IN_PLACE,
    ActionKind.DELETE_LOCAL: Phase.DELETE,
    ActionKind.DELETE_REMOTE: Phase.DELETE,
    ActionKind.DOWNLOAD: Phase.TRANSFER,
    ActionKind.UPLOAD: Phase.TRANSFER,
    ActionKind.SET_MODE_REMOTE: Phase.TRANSFER,
}

# Actions that carry a change across (files_transferred), and those that send requests.
TRANSFER_KINDS = frozenset(
    {
        ActionKind.DOWNLOAD,
        ActionKind.UPLOAD,
        ActionKind.SET_MODE_LOCAL,
        ActionKind.SET_MODE_REMOTE,
    }
)
REQUEST_KINDS = frozenset(kind for kind, phase in PHASE_OF.items() if phase is Phase.TRANSFER)


@dataclass(frozen=True, slots=True)
class Phases:
    """A plan's actions by phase, each in plan order."""

    in_place: list[Action] = field(default_factory=list)
    deletes: list[Action] = field(default_factory=list)
    transfers: list[Action] = field(default_factory=list)


def phases(actions: Iterable[Action]) -> Phases:
    out = Phases()
    lists = {Phase.IN_PLACE: out.in_place, Phase.DELETE: out.deletes, Phase.TRANSFER: out.transfers}
    for action in actions:
        lists[PHASE_OF[action.kind]].append(action)
    return out


def action_bytes(action: Action) -> int:
    """The bytes an action moves: a download's object, an upload's file; 0 otherwise."""
    if action.kind is ActionKind.DOWNLOAD and action.remote is not None:
        return action.remote.size
    if action.kind is ActionKind.UPLOAD and action.local is not None:
        return action.local.size
    return 0


def biggest_first(actions: Iterable[Action]) -> list[Action]:
    """Transfers by size, biggest first; equal sizes keep plan order."""
    return sorted(actions, key=lambda a: -action_bytes(a))


def drop_below(actions: Iterable[Action], files: set[str]) -> tuple[list[Action], list[FileError]]:
    """The actions not below one of `files` (files whose planned delete failed, which stay
    files), and an error for each one dropped, in plan order."""
    if not files:
        return list(actions), []
    kept: list[Action] = []
    errors: list[FileError] = []
    for action in actions:
        error = below_kept_file(action, files)
        if error is None:
            kept.append(action)
        else:
            errors.append(error)
    return kept, errors


def below_kept_file(action: Action, files: set[str]) -> FileError | None:
    """Why the action cannot go ahead when it lies below one of `files` (drop_below)."""
    clash = next((d for d in parent_dirs(action.path) if d in files), None)
    if clash is None:
        return None
    return FileError(action.path, f"not sent: {clash!r} is still a file (its delete failed)")
