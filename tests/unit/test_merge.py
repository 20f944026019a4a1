"""The streaming merge (sidecar/core/merge.py): the triples a dict-based union gives, in key
order, from three sorted iterators; the folder hold that puts "W" after "W/..."; and the
planner walking the merge decides exactly as it did over the union of every path.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Set
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core import planner
from sidecar.core.merge import OutOfOrder, Triple, hold_for_folders, merge
from sidecar.core.model import (
    Action,
    ActionKind,
    BaseEntry,
    Direction,
    FileError,
    LocalFile,
    Plan,
    RemoteObject,
)
from sidecar.core.paths import NamesInUse, folders_of, parent_dirs
from sidecar.core.planner import DeletePolicy, plan

# Names that sort around "/" in every way that matters: "-" and "." before it, "0" after it,
# and characters of 2, 3 and 4 UTF-8 bytes (string order must be byte order).
_segment = st.text(alphabet="ab-.0~é\u20ac\U0001f600", min_size=1, max_size=3)
_path = st.lists(_segment, min_size=1, max_size=3).map("/".join)
_side = st.dictionaries(_path, st.integers(0, 9), max_size=25)


def _union(
    local: dict[str, int], remote: dict[str, int], base: dict[str, int]
) -> list[tuple[str, int | None, int | None, int | None]]:
    """Today's planner's walk: the sorted union, each side looked up."""
    paths = sorted(set(local) | set(remote) | set(base))
    return [(p, local.get(p), remote.get(p), base.get(p)) for p in paths]


def _merged(local: dict[str, int], remote: dict[str, int], base: dict[str, int]) -> list[Triple]:
    return list(merge(sorted(local.items()), sorted(remote.items()), sorted(base.items())))


@given(_side, _side, _side)
def test_merge_gives_the_union_in_key_order(
    local: dict[str, int], remote: dict[str, int], base: dict[str, int]
) -> None:
    triples = _merged(local, remote, base)
    assert [(t.path, t.local, t.remote, t.base) for t in triples] == _union(local, remote, base)
    paths = [t.path for t in triples]
    assert paths == sorted(paths, key=lambda p: p.encode())  # S3's order: UTF-8 bytes


def test_merge_table() -> None:
    local = {"a": 1, "a-b": 2, "a/x": 3}
    remote = {"a.b": 4, "a/x": 5, "a0": 6}
    base = {"a": 7, "a0": 8, "z": 9}
    assert [(t.path, t.local, t.remote, t.base) for t in _merged(local, remote, base)] == [
        ("a", 1, None, 7),
        ("a-b", 2, None, None),
        ("a.b", None, 4, None),
        ("a/x", 3, 5, None),
        ("a0", None, 6, 8),
        ("z", None, None, 9),
    ]


@pytest.mark.parametrize(
    "bad", [[("b", 1), ("a", 2)], [("a", 1), ("a", 2)]], ids=["backwards", "twice"]
)
def test_an_input_out_of_order_stops_the_merge(bad: list[tuple[str, int]]) -> None:
    """Never decide on a side that is not sorted: a path missed reads as deleted."""
    with pytest.raises(OutOfOrder, match="listing is not in key order"):
        list(merge([], bad, []))


@given(_side, _side, _side)
def test_hold_puts_each_path_after_everything_below_it(
    local: dict[str, int], remote: dict[str, int], base: dict[str, int]
) -> None:
    merged = _merged(local, remote, base)
    order = [t.path for t in merged]
    held = list(hold_for_folders(_merged(local, remote, base)))
    out = [t.path for t in held]
    assert sorted(out) == order  # every path, once
    # Each path just before the first key that cannot lie below it (path + "0", as '0'
    # follows '/'): after "W/...", and after "W-x" and "W.x", which sort before "W/".
    assert out == sorted(order, key=lambda p: (p + "0").encode())
    position = {path: index for index, path in enumerate(out)}
    for path in order:
        for other in order:
            if other.startswith(path + "/"):
                assert position[other] < position[path], (path, other)
    for triple in held:
        below = [p for p in order if p.startswith(triple.path + "/")]
        assert triple.below_local == any(p in local for p in below)
        assert triple.below_remote == any(p in remote for p in below)
        assert triple.below_base == any(p in base for p in below)


def test_hold_table() -> None:
    local = {"W": 1, "W-x": 2, "W.x": 3, "W/a": 4, "W/a/b": 5, "W0": 6}
    held = list(hold_for_folders(_merged(local, {"W/c": 7}, {})))
    assert [t.path for t in held] == ["W-x", "W.x", "W/a/b", "W/a", "W/c", "W", "W0"]
    by_path = {t.path: t for t in held}
    assert by_path["W"].below_local and by_path["W"].below_remote
    assert by_path["W/a"].below_local and not by_path["W/a"].below_remote
    assert not by_path["W-x"].below_local and not by_path["W0"].below_local


def test_a_flat_folder_is_held_one_path_at_a_time() -> None:
    """A path is let go as soon as the next key shows nothing can lie below it: the merge and
    the hold each read one item ahead, whatever the size of the folder."""
    read = 0

    def files() -> Iterator[tuple[str, int]]:
        nonlocal read
        for index in range(100_000):
            read += 1
            yield f"d/f{index:06d}", index

    stream = hold_for_folders(merge(files(), [], []))
    for index, triple in zip(range(1000), stream, strict=False):
        assert triple.path == f"d/f{index:06d}"
        assert read <= index + 3  # the merge reads one ahead, the hold one more


# ---- the planner walks the merge: the decisions of today's union of dicts ------------------
_LOCALS = [None, LocalFile(3, 1, 1, False, "h-base"), LocalFile(4, 1, 1, False, "h-local")]
_LOCALS.append(LocalFile(3, 1, 1, True, "h-base"))
_REMOTES = [
    None,
    RemoteObject("k", 3, "e-base"),
    RemoteObject("k", 5, "e-remote"),
    RemoteObject("k", 4, "e-other", hash="h-local"),
    RemoteObject("k", 0, "e-empty"),
]
_BASES = [None, BaseEntry(3, "h-base", ("e-base",))]
_tree = st.dictionaries(
    _path,
    st.tuples(st.sampled_from(_LOCALS), st.sampled_from(_REMOTES), st.sampled_from(_BASES)),
    max_size=30,
)
_NOW = datetime(2026, 12, 3, 15, 0, tzinfo=UTC)


def _plan_by_union(
    direction: Direction,
    local: dict[str, LocalFile],
    remote: dict[str, RemoteObject],
    base: dict[str, BaseEntry],
    deletes: DeletePolicy,
) -> Plan:
    """The planner before the merge: one set of every path, sorted, each side looked up."""
    result = Plan(direction)
    taken = NamesInUse(local, remote)
    for path in sorted(set(local) | set(remote) | set(base)):
        planner._plan_path(
            result, direction, path, local.get(path), remote.get(path), base.get(path), _NOW, taken
        )
    withheld = _apply_delete_policy(result, direction, local, remote, deletes)
    _drop_type_clashes(result, direction, local, remote, withheld)
    _report_bucket_clashes(result, direction, remote)
    return result


# The rules over the whole plan as they were before they streamed (sidecar/core/planrules.py
# judges each action from counts and per-clash records instead): the oracle, kept verbatim.
_BUCKET_CLASH = (
    "the bucket holds both a file and a folder with this name ('a' and 'a/...'); the file is "
    "left as it is and nothing is written below it (README: File and folder clash)"
)


def _drop_type_clashes(
    out: Plan,
    direction: Direction,
    local: Mapping[str, LocalFile],
    remote: Mapping[str, RemoteObject],
    withheld: set[str],
) -> None:
    """A file cannot be written where a folder stays, nor below a file that stays."""
    pull = direction is Direction.PULL
    target: Mapping[str, LocalFile | RemoteObject]  # the side this plan writes to
    if pull:
        writes, deletes = ActionKind.DOWNLOAD, ActionKind.DELETE_LOCAL
        target, side, verb = local, "in the local folder", "downloaded"
    else:
        writes, deletes = ActionKind.UPLOAD, ActionKind.DELETE_REMOTE
        target, side, verb = remote, "in the bucket", "uploaded"
    written = {a.path for a in out.actions if a.kind is writes}
    if not written:
        return  # nothing new is written: no new clash can arise
    # Only a bucket holding 'd' and 'd/x' at once asks a pull to write both: the folder wins
    # (the file stays in the bucket and is reported with the bucket's clashes).
    source_clashes = written & folders_of(written)
    written -= source_clashes
    deleted = {a.path for a in out.actions if a.kind is deletes}
    final_files = (set(target) - deleted) | written
    final_dirs = folders_of(final_files)
    kept: list[Action] = []
    for action in out.actions:
        if action.kind is writes:
            if action.path in source_clashes:
                continue
            if action.path in final_dirs:
                out.errors.append(
                    FileError(action.path, f"not {verb}: this name is a folder {side}")
                )
                continue
            clash = next((d for d in parent_dirs(action.path) if d in final_files), None)
            if clash is not None:
                why = " (its delete was withheld, see deletes_blocked)" if clash in withheld else ""
                out.errors.append(
                    FileError(action.path, f"not {verb}: {clash!r} stays a file {side}{why}")
                )
                continue
        kept.append(action)
    # A conflict whose write was dropped was not resolved: no copy was made, so none may be
    # reported (the errors say why nothing moved).
    dropped = {a.path for a in out.actions} - {a.path for a in kept}
    out.conflicts = [c for c in out.conflicts if c.path not in dropped]
    out.actions = kept


def _report_bucket_clashes(
    out: Plan, direction: Direction, remote: Mapping[str, RemoteObject]
) -> None:
    """Every key that is both a file and a folder once this plan is carried out, by name.

    Such a clash hides nothing from the plan (both keys are in REMOTE), so it withholds no
    delete: a finalize whose BASE knows the file and whose folder replaced it deletes the
    file like any other, and that is the way out of a clash an older version left behind.
    """
    files: Set[str] = remote.keys()  # not copied unless the plan changes it
    if direction is Direction.FINALIZE:
        deleted = {a.path for a in out.of_kind(ActionKind.DELETE_REMOTE)}
        uploaded = {a.path for a in out.of_kind(ActionKind.UPLOAD)}
        if deleted or uploaded:
            files = (set(files) - deleted) | uploaded
    for path in sorted(d for d in folders_of(files) if d in files):
        obj = remote.get(path)
        out.errors.append(FileError(obj.key if obj else path, _BUCKET_CLASH))


def _apply_delete_policy(
    out: Plan,
    direction: Direction,
    local: Mapping[str, LocalFile],
    remote: Mapping[str, RemoteObject],
    policy: DeletePolicy,
) -> set[str]:
    """Withhold every delete when the policy says so; the paths withheld."""
    kind = ActionKind.DELETE_LOCAL if direction is Direction.PULL else ActionKind.DELETE_REMOTE
    doomed = [a for a in out.actions if a.kind is kind]
    if not doomed:
        return set()
    if not policy.allowed:
        out.deletes_blocked = f"{len(doomed)} deletion(s) withheld: {policy.why_not}"
    elif not policy.force:
        other_side = len(local) if direction is Direction.PULL else len(remote)
        if len(doomed) > policy.max_fraction * other_side:
            where = "local files" if direction is Direction.PULL else "objects in the bucket"
            out.deletes_blocked = (
                f"would delete {len(doomed)} of {other_side} {where} "
                f"(more than {policy.max_fraction:.0%}); nothing was deleted. If that is "
                "intended, rerun with --force-delete (SIDECAR_FORCE_DELETE=1) or raise "
                "--max-delete-percent"
            )
    if not out.deletes_blocked:
        return set()
    out.actions = [a for a in out.actions if a.kind is not kind]
    return {a.path for a in doomed}


@given(_tree, st.sampled_from(list(Direction)), st.booleans(), st.randoms())
def test_plan_over_the_merge_decides_as_the_union_did(
    tree: dict[str, tuple[LocalFile | None, RemoteObject | None, BaseEntry | None]],
    direction: Direction,
    force: bool,
    rng: random.Random,
) -> None:
    """Random trees with files and folders of one name, conflicts, deletes over the guard's
    limit: the same Plan (actions, conflicts and their copies' names, errors, skipped,
    deletes withheld) from sides in key order (the merge), from sides in any order (sorted
    again), and from today's union of every path."""
    sides: list[dict[str, object]] = [{}, {}, {}]
    for path in sorted(tree):
        for side, value in zip(sides, tree[path], strict=True):
            if value is not None:
                side[path] = value
    local, remote, base = sides
    deletes = DeletePolicy(max_fraction=0.3, force=force)
    expected = _plan_by_union(direction, local, remote, base, deletes)  # type: ignore[arg-type]
    assert plan(direction, local, remote, base, _NOW, deletes) == expected  # type: ignore[arg-type]
    shuffled = []
    for side in sides:
        items = list(side.items())
        rng.shuffle(items)
        shuffled.append(dict(items))
    assert plan(direction, *shuffled, _NOW, deletes) == expected  # type: ignore[arg-type]
