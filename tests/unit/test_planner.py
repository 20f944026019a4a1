"""The three-way planner as a table: every combination of LOCAL and REMOTE against BASE."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sidecar.core.model import ActionKind, BaseEntry, Direction, LocalFile, RemoteObject
from sidecar.core.planner import Change, DeletePolicy, local_change, plan, remote_change

NOW = datetime(2026, 11, 23, 9, 15, 0, tzinfo=UTC)
PULL, FIN = Direction.PULL, Direction.FINALIZE
DL, UP = ActionKind.DOWNLOAD, ActionKind.UPLOAD
DEL_L, DEL_R = ActionKind.DELETE_LOCAL, ActionKind.DELETE_REMOTE
ADOPT, FORGET = ActionKind.ADOPT, ActionKind.FORGET
SET_MODE_L, SET_MODE_R = ActionKind.SET_MODE_LOCAL, ActionKind.SET_MODE_REMOTE

BASE = BaseEntry(size=3, hash="h-base", etags=("e-base",))


def lf(digest: str = "h-base", size: int = 3, executable: bool = False) -> LocalFile:
    return LocalFile(size=size, mtime_ns=1, inode=1, executable=executable, hash=digest)


def ro(etag: str = "e-base", size: int = 3, digest: str | None = None) -> RemoteObject:
    return RemoteObject(key="p/f", size=size, etag=etag, hash=digest)


def ro_x(etag: str) -> RemoteObject:
    """BASE's content (its hash, from a HEAD), now executable."""
    return RemoteObject(key="p/f", size=3, etag=etag, hash="h-base", executable=True)


# Sides relative to BASE (None = absent on that side).
L_SAME, L_MOD, L_GONE = lf(), lf("h-local", 4), None
R_SAME, R_MOD, R_GONE = ro(), ro("e-remote", 5), None

# (base, local, remote, direction) -> (action or None, conflict kind or None)
TABLE = [
    # both unchanged
    (BASE, L_SAME, R_SAME, PULL, None, None),
    (BASE, L_SAME, R_SAME, FIN, None, None),
    # one side modified
    (BASE, L_SAME, R_MOD, PULL, DL, None),
    (BASE, L_SAME, R_MOD, FIN, None, None),  # remote change is pull's business
    (BASE, L_MOD, R_SAME, PULL, None, None),  # local-only changes are kept
    (BASE, L_MOD, R_SAME, FIN, UP, None),
    # one side deleted
    (BASE, L_SAME, R_GONE, PULL, DEL_L, None),
    (BASE, L_SAME, R_GONE, FIN, None, None),
    (BASE, L_GONE, R_SAME, PULL, None, None),
    (BASE, L_GONE, R_SAME, FIN, DEL_R, None),
    # both deleted: forget
    (BASE, L_GONE, R_GONE, PULL, FORGET, None),
    (BASE, L_GONE, R_GONE, FIN, FORGET, None),
    # both modified, different content: conflict, direction's source wins, loser kept
    (BASE, L_MOD, R_MOD, PULL, DL, "both-modified"),
    (BASE, L_MOD, R_MOD, FIN, UP, "both-modified"),
    # modified vs deleted: the modification wins
    (BASE, L_MOD, R_GONE, PULL, FORGET, "modified-deleted"),
    (BASE, L_MOD, R_GONE, FIN, UP, "modified-deleted"),
    (BASE, L_GONE, R_MOD, PULL, DL, "modified-deleted"),
    (BASE, L_GONE, R_MOD, FIN, FORGET, "modified-deleted"),
    # no BASE: added on one side
    (None, lf("h1"), None, PULL, None, None),
    (None, lf("h1"), None, FIN, UP, None),
    (None, None, ro("e1"), PULL, DL, None),
    (None, None, ro("e1"), FIN, None, None),
    # no BASE, both added, different sizes: conflict, nothing deleted
    (None, lf("h1", 4), ro("e1", 5), PULL, DL, "both-added"),
    (None, lf("h1", 4), ro("e1", 5), FIN, UP, "both-added"),
    # no BASE, both added, equal content (hash known): adopt, move nothing
    (None, lf("h1"), ro("e1", digest="h1"), PULL, ADOPT, None),
    (None, lf("h1"), ro("e1", digest="h1"), FIN, ADOPT, None),
    # both modified to the same content: agreement
    (BASE, lf("h2", 4), ro("e2", 4, "h2"), PULL, ADOPT, None),
    (BASE, lf("h2", 4), ro("e2", 4, "h2"), FIN, ADOPT, None),
    # a mode-only change (chmod +x) is a change on that side, carried without the bytes
    (BASE, lf(executable=True), R_SAME, FIN, SET_MODE_R, None),
    (BASE, lf(executable=True), R_SAME, PULL, None, None),
    (BASE, L_SAME, ro_x("e-base"), PULL, SET_MODE_L, None),
    (BASE, L_SAME, ro_x("e-base"), FIN, None, None),
    # ...also when the rewrite gave the object a new ETag (a copy in place)
    (BASE, L_SAME, ro_x("e-new"), PULL, SET_MODE_L, None),
    # mode and content changed: the content goes
    (BASE, lf("h-local", 4, executable=True), R_SAME, FIN, UP, None),
    (BASE, L_SAME, RemoteObject("p/f", 5, "e-new", hash="h-new", executable=True), PULL, DL, None),
    # the new mode on both sides: agreement
    (BASE, lf(executable=True), ro_x("e-new"), PULL, ADOPT, None),
    (BASE, lf(executable=True), ro_x("e-new"), FIN, ADOPT, None),
    # remote shows a new ETag but its hash proves the content unchanged (rclone multipart)
    (BASE, L_SAME, ro("e-other", 3, "h-base"), PULL, None, None),
    (BASE, L_MOD, ro("e-other", 3, "h-base"), FIN, UP, None),
]


@pytest.mark.parametrize(("base", "local", "remote", "direction", "action", "conflict"), TABLE)
def test_table(
    base: BaseEntry | None,
    local: LocalFile | None,
    remote: RemoteObject | None,
    direction: Direction,
    action: ActionKind | None,
    conflict: str | None,
) -> None:
    result = plan(
        direction,
        {"f": local} if local else {},
        {"f": remote} if remote else {},
        {"f": base} if base else {},
        NOW,
        DeletePolicy(force=True),  # the delete guard has its own tests below
    )
    assert [a.kind for a in result.actions] == ([action] if action else [])
    assert [c.kind for c in result.conflicts] == ([conflict] if conflict else [])
    assert result.skipped == (0 if action else 1)
    assert not result.errors


def test_conflict_keeps_a_copy_named_with_utc_timestamp() -> None:
    result = plan(PULL, {"d/model.pt": L_MOD}, {"d/model.pt": R_MOD}, {"d/model.pt": BASE}, NOW)
    (action,) = result.actions
    assert action.keep_conflict_copy
    assert action.conflict_copy == "d/model.conflict-20261123T091500.000Z.pt"
    assert result.conflicts[0].copy == action.conflict_copy


def test_unknown_equality_downloads_to_compare_without_reporting_conflict_yet() -> None:
    # A foreign multipart object of the same size: only the bytes can tell.
    result = plan(PULL, {"f": lf("h1")}, {"f": ro("abc-2")}, {}, NOW)
    (action,) = result.actions
    assert action.kind is DL and action.keep_conflict_copy
    assert result.conflicts == []


def test_foreign_single_part_md5_match_is_adoption() -> None:
    remote = RemoteObject("p/f", 3, "0" * 32, md5_matches_local=True)
    result = plan(FIN, {"f": lf("h1")}, {"f": remote}, {}, NOW)
    assert [a.kind for a in result.actions] == [ADOPT]


def test_same_etag_rewritten_later_is_a_change_to_look_at() -> None:
    """Same bytes re-uploaded (e.g. with another mode) keep the ETag, not LastModified."""
    known = BaseEntry(3, "h-base", ("e-base",), last_modified="2026-01-01T00:00:00.000Z")
    same = RemoteObject("p/f", 3, "e-base", "2026-01-01T00:00:00.000Z")
    later = RemoteObject("p/f", 3, "e-base", "2026-02-01T00:00:00.000Z")
    assert remote_change(same, known) is Change.UNCHANGED
    assert remote_change(later, known) is Change.MODIFIED
    assert remote_change(later, BASE) is Change.UNCHANGED  # BASE without a LastModified yet


def test_remote_unchanged_needs_same_size_and_known_etag() -> None:
    assert remote_change(ro("e-base", 3), BASE) is Change.UNCHANGED
    assert remote_change(ro("e-base", 4), BASE) is Change.MODIFIED
    assert remote_change(ro("e-new", 3), BASE) is Change.MODIFIED
    assert remote_change(None, BASE) is Change.DELETED
    assert remote_change(None, None) is Change.ABSENT
    assert local_change(lf(), None) is Change.ADDED


def test_without_base_nothing_is_ever_deleted() -> None:
    local = {f"f{i}": lf(f"h{i}") for i in range(10)}
    for direction in (PULL, FIN):
        result = plan(direction, local, {}, {}, NOW)
        assert not result.of_kind(DEL_L) and not result.of_kind(DEL_R)
        result = plan(direction, {}, {f"f{i}": ro(f"e{i}") for i in range(10)}, {}, NOW)
        assert not result.of_kind(DEL_L) and not result.of_kind(DEL_R)


def _many(n: int) -> tuple[dict[str, LocalFile], dict[str, RemoteObject], dict[str, BaseEntry]]:
    names = [f"f{i}" for i in range(n)]
    return ({p: lf() for p in names}, {p: ro() for p in names}, {p: BASE for p in names})


def test_emptied_folder_does_not_wipe_the_bucket() -> None:
    _local, remote, base = _many(10)
    result = plan(FIN, {}, remote, base, NOW)
    assert not result.of_kind(DEL_R)
    assert result.deletes_blocked and "--force-delete" in result.deletes_blocked
    assert "10 of 10" in result.deletes_blocked


def test_wrong_prefix_does_not_wipe_the_folder() -> None:
    local, _remote, base = _many(10)
    result = plan(PULL, local, {}, base, NOW)
    assert not result.of_kind(DEL_L) and result.deletes_blocked


def test_delete_guard_threshold_and_force() -> None:
    local, remote, base = _many(10)
    for name in ("f0", "f1", "f2", "f3", "f4"):
        del local[name]
    assert len(plan(FIN, local, remote, base, NOW).of_kind(DEL_R)) == 5  # exactly half: allowed
    del local["f5"]
    assert plan(FIN, local, remote, base, NOW).deletes_blocked
    forced = plan(FIN, local, remote, base, NOW, DeletePolicy(force=True))
    assert len(forced.of_kind(DEL_R)) == 6
    loose = plan(FIN, local, remote, base, NOW, DeletePolicy(max_fraction=0.9))
    assert len(loose.of_kind(DEL_R)) == 6


def test_errors_in_listing_block_every_delete_but_not_transfers() -> None:
    local, remote, base = _many(4)
    del remote["f0"]
    remote["f1"] = ro("e-new", 9)
    result = plan(PULL, local, remote, base, NOW, DeletePolicy(allowed=False, why_not="listing"))
    assert [a.kind for a in result.actions] == [DL]
    assert result.deletes_blocked and "listing" in result.deletes_blocked


def test_type_clash_remote_file_where_local_has_folder() -> None:
    result = plan(PULL, {"a/b": lf("h1")}, {"a": ro("e1")}, {}, NOW)
    assert not result.actions
    assert result.errors[0].path == "a" and "folder" in result.errors[0].reason


def test_type_clash_remote_folder_where_local_has_file() -> None:
    result = plan(PULL, {"a": lf("h1")}, {"a/b": ro("e1")}, {}, NOW)
    assert not result.actions
    assert result.errors[0].path == "a/b" and "'a'" in result.errors[0].reason


def test_type_clash_resolved_when_the_blocking_file_is_deleted_first() -> None:
    # The bucket replaced file 'a' by folder 'a/': local 'a' is deleted, then 'a/b' lands.
    result = plan(
        PULL, {"a": L_SAME}, {"a/b": ro("e1")}, {"a": BASE}, NOW, DeletePolicy(force=True)
    )
    assert sorted(a.kind for a in result.actions) == sorted([DL, DEL_L])
    assert not result.errors


def test_type_clash_on_finalize() -> None:
    result = plan(FIN, {"a/b": lf("h1")}, {"a": ro("e1")}, {}, NOW)
    assert not result.actions and "bucket" in result.errors[0].reason


def test_all_four_local_states_times_four_remote_states_are_decided() -> None:
    """No combination falls through: every (local, remote) pair yields a decision or a skip."""
    locals_ = {"same": L_SAME, "mod": L_MOD, "gone": None}
    remotes = {"same": R_SAME, "mod": R_MOD, "gone": None}
    for direction in (PULL, FIN):
        for lname, lval in locals_.items():
            for rname, rval in remotes.items():
                result = plan(
                    direction,
                    {"f": lval} if lval else {},
                    {"f": rval} if rval else {},
                    {"f": BASE},
                    NOW,
                    DeletePolicy(force=True),
                )
                decided = len(result.actions) + result.skipped
                assert decided == 1, (direction, lname, rname, result)


# ---- a file replaced by a folder of the same name (and back), and clashes in the bucket ----
FORCED = DeletePolicy(force=True)
SCAN_ERRORS = DeletePolicy(allowed=False, why_not="the scan had errors")
GUARD = DeletePolicy(max_fraction=0.0)  # the fraction guard, tripped by any delete
L_NEW = lf("h-new", 7)


def _side(paths: str, value: LocalFile | BaseEntry | str) -> dict[str, object]:
    """'d d/x' -> {'d': value, 'd/x': value}; for REMOTE a str is the key prefix."""
    if isinstance(value, str):
        return {p: RemoteObject(value + p, 3, "e-base") for p in paths.split()}
    return {p: value for p in paths.split()}


# (direction, local, remote, base, policy) -> (actions as "kind path", error paths)
TYPE_TABLE = [
    # finalize: local file d became folder d/: the delete of d goes first, or nothing goes
    (FIN, "d/x", "d", "d", FORCED, {"delete-remote d", "upload d/x"}, set()),
    (FIN, "d/x", "d", "d", SCAN_ERRORS, set(), {"d/x"}),
    (FIN, "d/x", "d", "d", GUARD, set(), {"d/x"}),
    # finalize: local folder d/ became file d
    (FIN, "d", "d/x", "d/x", FORCED, {"delete-remote d/x", "upload d"}, set()),
    (FIN, "d", "d/x", "d/x", SCAN_ERRORS, set(), {"d"}),
    (FIN, "d", "d/x", "d/x", GUARD, set(), {"d"}),
    # pull: the bucket's file d became folder d/
    (PULL, "d", "d/x", "d", FORCED, {"delete-local d", "download d/x"}, set()),
    (PULL, "d", "d/x", "d", SCAN_ERRORS, set(), {"d/x"}),
    (PULL, "d", "d/x", "d", GUARD, set(), {"d/x"}),
    # pull: the bucket's folder d/ became file d
    (PULL, "d/x", "d", "d/x", FORCED, {"delete-local d/x", "download d"}, set()),
    (PULL, "d/x", "d", "d/x", SCAN_ERRORS, set(), {"d"}),
    (PULL, "d/x", "d", "d/x", GUARD, set(), {"d"}),
    # deeper: a file two levels up stays
    (FIN, "d/e/x", "d", "d", SCAN_ERRORS, set(), {"d/e/x"}),
    (PULL, "d", "d/e/x", "d", SCAN_ERRORS, set(), {"d/e/x"}),
    # a clash already in the bucket: the replica whose folder replaced d deletes the file
    (FIN, "d/x", "d d/x", "d d/x", FORCED, {"delete-remote d"}, set()),
    (FIN, "d/x", "d d/x", "d d/x", GUARD, set(), {"vol/d"}),
    (FIN, "d/x", "d d/x", "d d/x", SCAN_ERRORS, set(), {"vol/d"}),
    (FIN, "d/x d/y", "d d/x", "d d/x", FORCED, {"delete-remote d", "upload d/y"}, set()),
    (FIN, "d/x d/y", "d d/x", "d d/x", SCAN_ERRORS, set(), {"vol/d", "d/y"}),
    # ...a replica that still has the file keeps it and names the clash
    (FIN, "d", "d d/x", "d", FORCED, set(), {"vol/d"}),
    (FIN, "d", "d d/x", "", FORCED, set(), {"vol/d", "d"}),  # equality unknown: an upload
    (PULL, "d", "d d/x", "d", FORCED, set(), {"vol/d", "d/x"}),
    (PULL, "d/x", "d d/x", "d d/x", FORCED, set(), {"vol/d"}),
    # ...a fresh replica takes the folder (many files) and names the file
    (PULL, "", "d d/x", "", FORCED, {"download d/x"}, {"vol/d"}),
    (PULL, "", "d d/x d/y/z", "", FORCED, {"download d/x", "download d/y/z"}, {"vol/d"}),
    (FIN, "", "d d/x", "", FORCED, set(), {"vol/d"}),
]


@pytest.mark.parametrize(
    ("direction", "local", "remote", "base", "policy", "actions", "errors"), TYPE_TABLE
)
def test_file_folder_table(
    direction: Direction,
    local: str,
    remote: str,
    base: str,
    policy: DeletePolicy,
    actions: set[str],
    errors: set[str],
) -> None:
    result = plan(
        direction,
        _side(local, L_SAME),  # type: ignore[arg-type]
        _side(remote, "vol/"),  # type: ignore[arg-type]
        _side(base, BASE),  # type: ignore[arg-type]
        NOW,
        policy,
    )
    assert {f"{a.kind} {a.path}" for a in result.actions} == actions
    assert {e.path for e in result.errors} == errors, result.errors


def test_the_error_names_the_file_that_stays_and_why() -> None:
    result = plan(FIN, {"d/x": L_SAME}, _side("d", "vol/"), {"d": BASE}, NOW, SCAN_ERRORS)  # type: ignore[arg-type]
    (error,) = result.errors
    assert error.reason == (
        "not uploaded: 'd' stays a file in the bucket (its delete was withheld, see "
        "deletes_blocked)"
    )
    assert result.deletes_blocked and "the scan had errors" in result.deletes_blocked


def test_a_modified_file_meeting_a_bucket_folder_is_not_uploaded() -> None:
    result = plan(FIN, {"d": L_NEW}, _side("d d/x", "vol/"), {"d": BASE}, NOW, FORCED)  # type: ignore[arg-type]
    assert not result.actions
    assert {(e.path, e.reason[:40]) for e in result.errors} == {
        ("d", "not uploaded: this name is a folder in t"),
        ("vol/d", "the bucket holds both a file and a folde"),
    }


def test_a_clash_withholds_no_other_delete() -> None:
    remote = _side("d d/x k1 k2 k3", "vol/")
    result = plan(FIN, _side("d k2 k3", L_SAME), remote, _side("d k1 k2 k3", BASE), NOW)  # type: ignore[arg-type]
    assert [f"{a.kind} {a.path}" for a in result.actions] == ["delete-remote k1"]
    assert result.deletes_blocked is None
    assert [e.path for e in result.errors] == ["vol/d"]


def test_conflict_copies_never_take_a_name_either_side_has() -> None:
    """Regression (issue 9, item 1): a second conflict within the same second named its copy
    like the first one's, which the pull then renamed over (or finalize copied onto)."""
    earlier = "d/model.conflict-20261123T091500.000Z.pt"
    for local_extra, remote_extra in (({earlier: L_MOD}, {}), ({}, {earlier: R_MOD})):
        for direction in (PULL, FIN):
            result = plan(
                direction,
                {"d/model.pt": L_MOD, **local_extra},
                {"d/model.pt": R_MOD, **remote_extra},
                {"d/model.pt": BASE},
                NOW,
            )
            (action,) = [a for a in result.actions if a.path == "d/model.pt"]
            assert action.conflict_copy == "d/model.conflict-20261123T091500.000Z-2.pt"


def test_conflict_copies_of_one_plan_get_distinct_names() -> None:
    # 'a.x.pt' and 'a.pt' name their copies from different stems, but a file named like
    # another's copy must still not collide with the copy chosen for it.
    paths = ["m.pt", "m.conflict-20261123T091500.000Z.pt"]
    result = plan(
        FIN, {p: L_MOD for p in paths}, {p: R_MOD for p in paths}, {p: BASE for p in paths}, NOW
    )
    copies = [a.conflict_copy for a in result.actions]
    assert len(set(copies)) == 2 and not set(copies) & set(paths)


@pytest.mark.parametrize("direction", [PULL, FIN])
def test_a_conflict_a_clash_leaves_unresolved_reports_no_copy(direction: Direction) -> None:
    """Both sides changed 'd', and the bucket also holds 'd/x': the clash stops the write, so
    no copy is made and none may be reported (found by tests/integration/test_model_based.py)."""
    remote = {"d": ro("e-remote", 5), "d/x": ro("e1")}
    result = plan(direction, {"d": lf("h-local", 4)}, remote, {}, NOW)
    assert not [a for a in result.actions if a.path == "d"]
    assert [c for c in result.conflicts if c.copy] == []
    assert result.errors


def test_equal_bytes_with_another_mode_are_not_adopted_as_the_local_mode() -> None:
    """Both sides added the same bytes, the local copy executable, the object not (found by
    tests/integration/test_model_based.py: BASE took the local mode and no sync ever pushed it)."""
    remote = {"a": RemoteObject(key="vol/a", size=3, etag="e1", hash="h1", executable=False)}
    local = {"a": lf("h1", executable=True)}
    pushed = plan(FIN, local, remote, {}, NOW)
    assert [a.kind for a in pushed.actions] == [SET_MODE_R]
    pulled = plan(PULL, local, remote, {}, NOW)
    # A pull keeps the local mode as a local change: BASE gets the bucket's (see sync.py).
    assert [a.kind for a in pulled.actions] == [ADOPT]
