"""The three-way planner: LOCAL and REMOTE each compared with BASE, then combined.

Pure: decides one path at a time in key order (Walk), then the rules over the whole plan
(sidecar/core/planrules.py); plan() does both over maps of path -> state. Every rule of
README "How a sync decides" that decides *what* happens lives here; the edges only carry the
plan out.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from sidecar.core.merge import OutOfOrder, Triple, merge
from sidecar.core.model import (
    Action,
    ActionKind,
    BaseEntry,
    Conflict,
    Direction,
    LocalFile,
    Plan,
    RemoteObject,
)
from sidecar.core.paths import NamesInUse, conflict_name
from sidecar.core.planrules import ClashWatch, PlanRules
from sidecar.core.planrules import DeletePolicy as DeletePolicy

V = TypeVar("V")


class Change(enum.Enum):
    ABSENT = "absent"  # not on this side, not in BASE
    UNCHANGED = "unchanged"
    MODIFIED = "modified"
    ADDED = "added"  # on this side, not in BASE
    DELETED = "deleted"  # in BASE, no longer on this side


def local_change(local: LocalFile | None, base: BaseEntry | None) -> Change:
    if local is None:
        return Change.ABSENT if base is None else Change.DELETED
    if base is None:
        return Change.ADDED
    same = local.hash == base.hash and local.executable == base.executable
    return Change.UNCHANGED if same else Change.MODIFIED


def remote_change(remote: RemoteObject | None, base: BaseEntry | None) -> Change:
    if remote is None:
        return Change.ABSENT if base is None else Change.DELETED
    if base is None:
        return Change.ADDED
    if remote.hash is not None:
        same_mode = remote.executable is None or remote.executable == base.executable
        return Change.UNCHANGED if remote.hash == base.hash and same_mode else Change.MODIFIED
    if remote.size == base.size and remote.etag in base.etags and not _rewritten(remote, base):
        return Change.UNCHANGED
    return Change.MODIFIED


def _rewritten(remote: RemoteObject, base: BaseEntry) -> bool:
    """Whether the object was written again since BASE, though its ETag is the same (the
    same bytes with other metadata: a mode change)."""
    if base.last_modified:
        return remote.last_modified not in ("", base.last_modified)
    if base.written_at and remote.last_modified:
        # BASE came from our own write; its LastModified is not known yet. Ours is at or
        # before the server's answer to it (AWS dates a multipart object by its start):
        # a later second is someone else's write. Same-second rewrites cannot be told
        # apart (listings show LastModified to the second).
        listed = listing_seconds(remote.last_modified)
        return listed is not None and listed > base.written_at
    return False


def listing_seconds(last_modified: str) -> int | None:
    """A listing's LastModified (ISO 8601, "2026-12-03T09:22:07.900Z") in whole seconds
    since the epoch; None if unreadable."""
    try:
        moment = datetime.fromisoformat(last_modified)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def same_content(local: LocalFile, remote: RemoteObject) -> bool | None:
    """True/False when known without transferring; None when only the bytes can tell."""
    if local.size != remote.size:
        return False
    if remote.hash is not None:
        return remote.hash == local.hash
    return remote.md5_matches_local


def needs_remote_hash(
    local: LocalFile | None, remote: RemoteObject | None, base: BaseEntry | None
) -> bool:
    """Whether a HEAD (for our hash metadata) could change the decision for this path.

    Only paths where both sides changed (or there is no BASE) and sizes agree: a differing
    size already proves different content, and an unchanged ETag proves an unchanged object.
    """
    if remote is None or remote.hash is not None:
        return False
    if local is None:
        # Same bytes as BASE by size and ETag, only written again: a mode change by another
        # replica, or (after our own write, decided by the clock) a skewed server clock. Ask
        # before a file deleted here is brought back as "modified in the bucket".
        return (
            base is not None
            and remote.size == base.size
            and remote.etag in base.etags
            and remote_change(remote, base) is Change.MODIFIED
        )
    if local.size != remote.size:
        return False
    if base is None:
        return True
    # A new ETag on a same-size object may be our own multipart upload shown with another
    # ETag (rclone), so ask before downloading or flagging a conflict.
    return remote_change(remote, base) is not Change.UNCHANGED


def plan(
    direction: Direction,
    local: Mapping[str, LocalFile],
    remote: Mapping[str, RemoteObject],
    base: Mapping[str, BaseEntry],
    now: datetime,
    deletes: DeletePolicy | None = None,
) -> Plan:
    try:
        # The three sides in key order, merged: no set or sorted list of every path, and
        # BASE (on disk) read in one pass. The scan, the listing and BASE all come in key
        # order; when a side does not, the walk starts again with every side sorted.
        walk = _walk(direction, local, remote, base, now, in_order=True)
    except OutOfOrder:
        walk = _walk(direction, local, remote, base, now, in_order=False)
    return finish(walk, deletes)


def finish(walk: Walk, deletes: DeletePolicy | None = None) -> Plan:
    """The rules over the whole plan, once every path is decided (Walk.decide): the delete
    guard, then the writes a file/folder clash forbids, then the bucket's own clashes."""
    rules = walk.judge(deletes or DeletePolicy())
    plan_ = walk.plan
    plan_.actions = [action for action in plan_.actions if rules.keeps(action)]
    return plan_


def triples(
    local: Mapping[str, LocalFile],
    remote: Mapping[str, RemoteObject],
    base: Mapping[str, BaseEntry],
    in_order: bool = True,
) -> Iterator[Triple[LocalFile, RemoteObject, BaseEntry]]:
    """The three sides merged, one triple per path in key order; in_order=False sorts each
    side first (after an OutOfOrder)."""
    if in_order:
        return merge(local.items(), remote.items(), base.items())
    return merge(_sorted_items(local), _sorted_items(remote), _sorted_items(base))


class _Taken:
    """A name-taken callable as the Container conflict_name reads."""

    def __init__(self, taken: Callable[[str], bool]) -> None:
        self._taken = taken

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._taken(name)


class Walk:
    """Every path's decision, made one path at a time in key order: by plan(), and by the
    engine's one pass over BASE (sidecar/engine/walk.py), which asks the bucket about a few
    paths between the merge and their decision.

    Holds no map of either side: `taken` tells whether a conflict copy's name is in use
    (a file or an object), and what the rules over the whole plan need (finish) is counted
    or kept per file/folder clash as the paths go by (sidecar/core/planrules.py)."""

    def __init__(
        self,
        direction: Direction,
        now: datetime,
        taken: Callable[[str], bool],
        sink: Callable[[Action], None] | None = None,
    ) -> None:
        self.plan = Plan(direction)
        self._now = now
        # A conflict copy takes no name in use, nor one already chosen in this run.
        self.taken = NamesInUse(_Taken(taken))
        self.clashes = ClashWatch(direction)
        # Where each action goes as it is decided (a spool on disk); None: plan.actions.
        self._sink = sink
        self.rules: PlanRules | None = None

    def decide(
        self, path: str, lf: LocalFile | None, ro: RemoteObject | None, be: BaseEntry | None
    ) -> None:
        plan_ = self.plan
        before = len(plan_.actions)
        _plan_path(plan_, plan_.direction, path, lf, ro, be, self._now, self.taken)
        action = plan_.actions[-1] if len(plan_.actions) > before else None
        self.clashes.saw(path, lf, ro, action)
        if action is not None and self._sink is not None:
            self._sink(plan_.actions.pop())

    def judge(self, deletes: DeletePolicy) -> PlanRules:
        """The rules over the whole plan, from what the walk saw (once every path is
        decided): its outcome is in `plan`, and `rules` tells which actions go ahead (of a
        plan spooled by `sink`: sidecar/engine/spool.py)."""
        self.rules = PlanRules(self.plan, self.clashes.done(), deletes)
        return self.rules


def _walk(
    direction: Direction,
    local: Mapping[str, LocalFile],
    remote: Mapping[str, RemoteObject],
    base: Mapping[str, BaseEntry],
    now: datetime,
    in_order: bool,
) -> Walk:
    """Every path's decision, in key order."""
    walk = Walk(direction, now, lambda name: name in local or name in remote)
    for t in triples(local, remote, base, in_order):
        walk.decide(t.path, t.local, t.remote, t.base)
    return walk


def _sorted_items(side: Mapping[str, V]) -> Iterator[tuple[str, V]]:
    return ((path, side[path]) for path in sorted(side))


def _plan_path(
    out: Plan,
    direction: Direction,
    path: str,
    lf: LocalFile | None,
    ro: RemoteObject | None,
    be: BaseEntry | None,
    now: datetime,
    taken: NamesInUse,
) -> None:
    lc = local_change(lf, be)
    rc = remote_change(ro, be)
    pull = direction is Direction.PULL

    def act(
        kind: ActionKind, keep_conflict_copy: bool = False, conflict_copy: str | None = None
    ) -> None:
        out.actions.append(Action(kind, path, lf, ro, keep_conflict_copy, conflict_copy))

    # Neither side moved away from BASE.
    if lc is Change.UNCHANGED and rc is Change.UNCHANGED:
        out.skipped += 1
        return
    if lc in _GONE and rc in _GONE:
        if be is not None:
            act(ActionKind.FORGET)
        return

    # Exactly one side changed.
    if lc in _STILL or rc in _STILL:
        kind = _remote_moved(pull, rc, ro, be) if lc in _STILL else _local_moved(pull, lc, lf, be)
        if kind is None:
            out.skipped += 1  # the other direction's business
        else:
            act(kind)
        return

    # Both sides changed.
    if lf is not None and ro is not None:
        _both_changed(out, act, pull, path, lf, ro, be, now, taken)
    else:
        _modified_deleted(out, act, pull, path, lf)


class _Act(Protocol):
    """Adds this path's action to the plan."""

    def __call__(
        self, kind: ActionKind, keep_conflict_copy: bool = ..., conflict_copy: str | None = ...
    ) -> None: ...


_GONE = (Change.DELETED, Change.ABSENT)
# A side as BASE has it, or never there (ABSENT: no BASE, so the other side was ADDED).
_STILL = (Change.UNCHANGED, Change.ABSENT)


def _remote_moved(
    pull: bool, rc: Change, ro: RemoteObject | None, be: BaseEntry | None
) -> ActionKind | None:
    """Only the bucket's side changed (None: skipped, a remote change is pull's business)."""
    if not pull:
        return None
    if rc is Change.DELETED:
        return ActionKind.DELETE_LOCAL
    if ro is not None and be is not None and ro.hash == be.hash:
        return ActionKind.SET_MODE_LOCAL  # same bytes, new mode: chmod, no download
    return ActionKind.DOWNLOAD


def _local_moved(
    pull: bool, lc: Change, lf: LocalFile | None, be: BaseEntry | None
) -> ActionKind | None:
    """Only the local side changed (None: skipped, a local change is finalize's business)."""
    if pull:
        return None
    if lc is Change.DELETED:
        return ActionKind.DELETE_REMOTE
    if lf is not None and be is not None and lf.hash == be.hash:
        return ActionKind.SET_MODE_REMOTE  # same bytes, new mode: metadata, no upload
    return ActionKind.UPLOAD


def _both_changed(
    out: Plan,
    act: _Act,
    pull: bool,
    path: str,
    lf: LocalFile,
    ro: RemoteObject,
    be: BaseEntry | None,
    now: datetime,
    taken: NamesInUse,
) -> None:
    """Both sides hold a changed file. Equal content is agreement, not conflict."""
    equal = same_content(lf, ro)
    if equal:
        # Same bytes, another mode (an object without our metadata counts as 644, as a
        # download makes it): a finalize pushes the local mode; a pull records the
        # bucket's mode in BASE (sync.py), so the local one stays a local change.
        if pull or lf.executable == bool(ro.executable):
            act(ActionKind.ADOPT)
        else:
            act(ActionKind.SET_MODE_REMOTE)
        return
    kind = "both-added" if be is None else "both-modified"
    copy = conflict_name(path, now, taken)
    taken.claim(copy)
    if pull:
        # Remote takes the name; the local version is kept beside it. When equality is
        # unknown (foreign multipart object) the download itself decides.
        act(ActionKind.DOWNLOAD, keep_conflict_copy=True, conflict_copy=copy)
        resolution = "downloaded the bucket's version; kept the local one as the copy"
    else:
        act(ActionKind.UPLOAD, keep_conflict_copy=True, conflict_copy=copy)
        resolution = "uploaded the local version; kept the bucket's one as the copy"
    if equal is False:
        out.conflicts.append(Conflict(path, kind, resolution, copy))


def _modified_deleted(out: Plan, act: _Act, pull: bool, path: str, lf: LocalFile | None) -> None:
    """One side modified, the other deleted: the modification wins, nothing is lost."""
    if lf is not None:  # remote deleted, local modified
        if pull:
            act(ActionKind.FORGET)  # keep the local file, now local-only
            resolution = "kept the modified local file; the bucket had deleted it"
        else:
            act(ActionKind.UPLOAD)
            resolution = "uploaded the modified local file; the bucket had deleted it"
    else:  # local deleted, remote modified
        if pull:
            act(ActionKind.DOWNLOAD)
            resolution = "downloaded the modified object; the local file had been deleted"
        else:
            act(ActionKind.FORGET)  # keep the remote object, now remote-only
            resolution = "kept the modified object; the local file had been deleted"
    out.conflicts.append(Conflict(path, "modified-deleted", resolution))
