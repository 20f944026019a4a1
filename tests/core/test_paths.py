from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sidecar.core.paths import (
    BadKey,
    check_mount_folder,
    check_relpath,
    check_relpath_fully,
    check_volume_name,
    conflict_name,
    folders_of,
    is_temp_name,
    key_to_relpath,
    normalize_prefix,
    parent_dirs,
    temp_name,
)


@pytest.mark.parametrize(
    "key",
    [
        "p/../x",
        "p/a/../../b",
        "p//abs",
        "p/./a",
        "p/a/..",
        "p/a\x00b",
        "p/bad\ufffdutf8",
        "p/" + "n" * 256,
        "p/" + "/".join(["d" * 200] * 21),
    ],
)
def test_keys_that_cannot_be_files_in_the_folder_are_rejected_by_name(key: str) -> None:
    with pytest.raises(BadKey) as info:
        key_to_relpath("p/", key)
    assert repr(key[2:])[1:6] in str(info.value)  # the error names the key


def test_plain_keys_map_to_relative_paths() -> None:
    assert key_to_relpath("p/", "p/a/b.txt") == "a/b.txt"
    assert key_to_relpath("", "top.bin") == "top.bin"
    assert key_to_relpath("p/", "p/ünïcode/名前.txt") == "ünïcode/名前.txt"
    assert key_to_relpath("p/", "p/" + "n" * 255) == "n" * 255


def test_folder_markers_and_our_temp_files_are_not_files() -> None:
    assert key_to_relpath("p/", "p/dir/") is None
    assert key_to_relpath("p/", "p/") is None
    assert key_to_relpath("p/", "p/d/" + temp_name()) is None


def test_key_outside_prefix_is_rejected() -> None:
    with pytest.raises(BadKey):
        key_to_relpath("p/", "q/x")


def test_prefix_normalization() -> None:
    assert normalize_prefix("") == ""
    assert normalize_prefix("/") == ""
    assert normalize_prefix("a/b") == "a/b/"
    assert normalize_prefix("/a/b/") == "a/b/"
    with pytest.raises(BadKey):
        normalize_prefix("a/../b")


def test_temp_names_have_one_recognisable_pattern() -> None:
    name = temp_name()
    assert is_temp_name(name) and name.startswith(".netvol-tmp.")
    assert not is_temp_name(".netvol-tmp.xyz")
    assert not is_temp_name("notes.netvol-tmp.0123456789abcdef")


def test_conflict_names() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert conflict_name("a/model.pt", when) == "a/model.conflict-20260102T030405Z.pt"
    assert conflict_name("Makefile", when) == "Makefile.conflict-20260102T030405Z"
    assert conflict_name(".bashrc", when) == ".bashrc.conflict-20260102T030405Z"
    assert conflict_name("x.tar.gz", when) == "x.tar.conflict-20260102T030405Z.gz"


def test_parent_dirs() -> None:
    assert parent_dirs("a/b/c") == ["a", "a/b"]
    assert parent_dirs("c") == []


@pytest.mark.parametrize("name", ["ai-storage", "a", "A_b.c-9", "x" * 50])
def test_valid_volume_names(name: str) -> None:
    check_volume_name(name)


@pytest.mark.parametrize("name", ["", "x" * 51, "has space", "slash/no", "ü"])
def test_invalid_volume_names(name: str) -> None:
    with pytest.raises(ValueError, match="volume name"):
        check_volume_name(name)


@pytest.mark.parametrize(
    "path", ["/workspace/notebook-data", "data", "/a+b/c.d_e-f", "/x/" + "y" * 250]
)
def test_valid_mount_folders(path: str) -> None:
    check_mount_folder(path)


@pytest.mark.parametrize("path", ["", "/a b", "/a/../b", "/x/" + "y" * 253, "/ü", "/a:b"])
def test_invalid_mount_folders(path: str) -> None:
    with pytest.raises(ValueError, match="folder"):
        check_mount_folder(path)


def _verdict(check: object, relpath: str) -> str | None:
    try:
        check(relpath)  # type: ignore[operator]
    except BadKey as exc:
        return str(exc)
    return None


def test_check_relpath_shortcut_agrees_with_every_rule_on_all_short_paths() -> None:
    """Every path of up to 6 characters over the characters that matter, plus long ones."""
    alphabet = ["a", ".", "/", "\x00", "é"]
    paths = [""]
    frontier = [""]
    for _ in range(6):
        frontier = [p + c for p in frontier for c in alphabet]
        paths.extend(frontier)
    paths += ["a" * 255, "a" * 256, "d/" + "a" * 255, "/".join(["a" * 200] * 21), "a/" * 127 + "b"]
    for relpath in paths:
        assert _verdict(check_relpath, relpath) == _verdict(check_relpath_fully, relpath), relpath


def test_folders_of_is_every_parent_of_every_path() -> None:
    paths = ["a/b/c.txt", "a/b/d.txt", "a/e.txt", "top.txt", "x/y/z/w.bin", "x/q.bin", "a/b"]
    assert folders_of(paths) == {d for p in paths for d in parent_dirs(p)}
    assert folders_of(paths) == {"a", "a/b", "x", "x/y", "x/y/z"}
    assert folders_of([]) == set()
    assert folders_of(["only.txt"]) == set()
