"""The rules over a whole plan: the delete guard, the writes a file/folder clash forbids, and
the clashes the bucket holds (README "How a sync decides", "File and folder clash").

Pure, and without a map of either side: `ClashWatch` sees each path once, in key order, as the
planner's walk decides it, and keeps counts plus a record of each name that is a file and a
folder at once (rare: user error or a foreign writer). `PlanRules` then judges each action
(as it is read back from a list or a spool) from those counts and records alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.core.model import (
    Action,
    ActionKind,
    Direction,
    FileError,
    LocalFile,
    Plan,
    RemoteObject,
)
from sidecar.core.phases import action_bytes

BUCKET_CLASH = (
    "the bucket holds both a file and a folder with this name ('a' and 'a/...'); the file is "
    "left as it is and nothing is written below it (README: File and folder clash)"
)


@dataclass(frozen=True, slots=True)
class DeletePolicy:
    allowed: bool = True  # False after listing/scan errors
    why_not: str = ""
    max_fraction: float = 0.5  # of the other side's files
    force: bool = False


@dataclass(frozen=True, slots=True)
class WriteClash:
    """A planned write whose path is a folder on some side, or lies below a file: its fate
    waits on the delete guard (a withheld delete leaves a file that forbids it)."""

    size: int  # the bytes it moves
    source: bool  # a write below it too (a bucket with 'd' and 'd/x'): the folder wins
    kept_below: bool  # a file below it on the written side that no planned delete removes
    deleted_below: bool  # a file below it on the written side whose delete is planned
    kept_above: str | None  # the shallowest such file above it, kept...
    deleted_above: str | None  # ...and deleted by the plan


@dataclass(frozen=True, slots=True)
class BucketClash:
    """A bucket object that has objects below it ('d' and 'd/x')."""

    path: str
    key: str
    deleted: bool  # finalize: the plan deletes the object (unless the guard withholds it)
    kept_below: bool  # objects below it the plan keeps...
    deleted_below: bool  # ...and deletes


@dataclass(slots=True)
class _Open:
    """A decided path that later ones may lie below (the walk's current branch)."""

    path: str
    target: bool  # a file on the side this plan writes to
    deleted: bool  # the plan deletes it there
    written: bool  # the plan writes a file here...
    size: int  # ...of this many bytes
    key: str | None  # the bucket's object here
    kept_above: str | None
    deleted_above: str | None
    written_below: bool = False
    kept_below: bool = False
    deleted_below: bool = False
    remote_below: bool = False


@dataclass(slots=True)
class Seen:
    """What the rules over the whole plan need, counted or recorded as the walk went."""

    local_files: int = 0
    remote_files: int = 0
    deletes: int = 0  # deletes planned on the written side
    writes: dict[str, WriteClash] = field(default_factory=dict)
    bucket: list[BucketClash] = field(default_factory=list)


class ClashWatch:
    """Fed every decided path in key order (Walk.decide). Holds the open paths of the current
    branch only, as merge.hold_for_folders does: a path is closed as soon as a key at or after
    path + "0" comes ('0' follows '/'), when every path below it has been seen."""

    def __init__(self, direction: Direction) -> None:
        self._pull = direction is Direction.PULL
        self._writes = ActionKind.DOWNLOAD if self._pull else ActionKind.UPLOAD
        self._deletes = ActionKind.DELETE_LOCAL if self._pull else ActionKind.DELETE_REMOTE
        self._open: list[_Open] = []
        self.seen = Seen()

    def saw(
        self, path: str, lf: LocalFile | None, ro: RemoteObject | None, action: Action | None
    ) -> None:
        seen, stack = self.seen, self._open
        seen.local_files += lf is not None
        seen.remote_files += ro is not None
        target = (lf if self._pull else ro) is not None
        kind = action.kind if action is not None else None
        written, deleted = kind is self._writes, kind is self._deletes
        seen.deletes += deleted
        while stack and path >= stack[-1].path + "0":
            self._close(stack.pop())
        kept_above: str | None = None
        deleted_above: str | None = None
        for held in stack:
            if not path.startswith(held.path + "/"):
                continue  # sorts between ("W-x" is held while "W/..." may still come)
            held.written_below |= written
            held.kept_below |= target and not deleted
            held.deleted_below |= target and deleted
            held.remote_below |= ro is not None
            if held.target and held.deleted:
                deleted_above = deleted_above or held.path
            elif held.target:
                kept_above = kept_above or held.path
        if target or written or ro is not None:
            key = ro.key if ro is not None else None
            size = action_bytes(action) if action is not None else 0
            stack.append(
                _Open(path, target, deleted, written, size, key, kept_above, deleted_above)
            )

    def done(self) -> Seen:
        """Every path seen: close the ones still open."""
        while self._open:
            self._close(self._open.pop())
        return self.seen

    def _close(self, held: _Open) -> None:
        below = held.kept_below or held.deleted_below
        if held.written and (held.written_below or below or held.kept_above or held.deleted_above):
            self.seen.writes[held.path] = WriteClash(
                held.size,
                held.written_below,
                held.kept_below,
                held.deleted_below,
                held.kept_above,
                held.deleted_above,
            )
        # A pull changes nothing in the bucket: every object with objects below is a clash.
        # A finalize: one its deletes (if they happen) do not resolve; a write below an
        # object that stays is refused, so only objects count below it.
        clash = held.remote_below if self._pull else below
        if held.key is not None and clash:
            self.seen.bucket.append(
                BucketClash(held.path, held.key, held.deleted, held.kept_below, held.deleted_below)
            )


class PlanRules:
    """The rules over the whole plan, judged once every path is decided, from what the walk
    saw: the delete guard first (a file whose delete it withholds stays, and nothing may
    then be written below it: pushing 'd/x' while the delete of 'd' was withheld left both
    in the bucket for good), then the writes a clash forbids, then the bucket's own clashes.
    The outcome goes to `plan` (deletes_blocked, errors, conflicts); `keeps` then tells,
    action by action, which ones are carried out (read back from a list or a spool)."""

    def __init__(self, plan: Plan, seen: Seen, policy: DeletePolicy) -> None:
        pull = plan.direction is Direction.PULL
        self._writes = ActionKind.DOWNLOAD if pull else ActionKind.UPLOAD
        self._deletes = ActionKind.DELETE_LOCAL if pull else ActionKind.DELETE_REMOTE
        self._side, self._verb = ("in the local folder", "downloaded")
        if not pull:
            self._side, self._verb = ("in the bucket", "uploaded")
        plan.deletes_blocked = _deletes_blocked(
            seen.deletes, seen.local_files if pull else seen.remote_files, pull, policy
        )
        self.withheld = plan.deletes_blocked is not None
        # The writes refused, path -> the bytes they would have moved.
        self.dropped: dict[str, int] = {}
        for path in sorted(seen.writes):  # plan order: one action per path, in key order
            clash = seen.writes[path]
            reason = self._refused(clash)
            if reason is None:
                continue
            self.dropped[path] = clash.size
            if reason:
                plan.errors.append(FileError(path, reason))
        # A conflict whose write was dropped was not resolved: no copy was made, so none may
        # be reported (the errors say why nothing moved).
        if self.dropped:
            plan.conflicts = [c for c in plan.conflicts if c.path not in self.dropped]
        # Every key that is both a file and a folder once the plan is carried out, by name.
        # Such a clash withholds no delete: a finalize whose BASE knows the file and whose
        # folder replaced it deletes the file like any other, the way out of a clash an
        # older version left behind.
        for bucket in sorted(seen.bucket, key=lambda c: c.path):
            if pull or self._stays_a_clash(bucket):
                plan.errors.append(FileError(bucket.key, BUCKET_CLASH))

    def keeps(self, action: Action) -> bool:
        """Whether the action is carried out."""
        if action.kind is self._deletes:
            return not self.withheld
        return action.kind is not self._writes or action.path not in self.dropped

    def _refused(self, clash: WriteClash) -> str | None:
        """Why the write is refused ("": dropped without a word), None if it is not."""
        if clash.source:
            # Only a bucket holding 'd' and 'd/x' asks a pull to write both: the folder
            # wins (the file stays in the bucket, reported with the bucket's clashes).
            return ""
        if clash.kept_below or (self.withheld and clash.deleted_below):
            return f"not {self._verb}: this name is a folder {self._side}"
        above, why = clash.kept_above, ""
        withheld_above = clash.deleted_above if self.withheld else None
        if withheld_above is not None and (above is None or len(withheld_above) < len(above)):
            above, why = withheld_above, " (its delete was withheld, see deletes_blocked)"
        if above is None:
            return None
        return f"not {self._verb}: {above!r} stays a file {self._side}{why}"

    def _stays_a_clash(self, clash: BucketClash) -> bool:
        """Finalize: the object stays (its delete withheld or none planned) with objects
        below it that stay."""
        stays = not clash.deleted or self.withheld
        return stays and (clash.kept_below or (self.withheld and clash.deleted_below))


def _deletes_blocked(doomed: int, other_side: int, pull: bool, policy: DeletePolicy) -> str | None:
    """Why every delete is withheld (None: they go ahead)."""
    if not doomed:
        return None
    if not policy.allowed:
        return f"{doomed} deletion(s) withheld: {policy.why_not}"
    if policy.force or doomed <= policy.max_fraction * other_side:
        return None
    where = "local files" if pull else "objects in the bucket"
    return (
        f"would delete {doomed} of {other_side} {where} "
        f"(more than {policy.max_fraction:.0%}); nothing was deleted. If that is "
        "intended, rerun with --force-delete (SIDECAR_FORCE_DELETE=1) or raise "
        "--max-delete-percent"
    )
