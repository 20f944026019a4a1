from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sidecar.core.paths import (
    BadKey,
    NamesInUse,
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
    when = datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC)
    assert conflict_name("a/model.pt", when) == "a/model.conflict-20260102T030405.678Z.pt"
    assert conflict_name("Makefile", when) == "Makefile.conflict-20260102T030405.678Z"
    assert conflict_name(".bashrc", when) == ".bashrc.conflict-20260102T030405.678Z"
    assert conflict_name("x.tar.gz", when) == "x.tar.conflict-20260102T030405.678Z.gz"


def test_two_conflicts_in_one_second_get_two_names() -> None:
    """Regression (issue 9, item 1): second resolution gave both copies one name."""
    first = conflict_name("d/nb.ipynb", datetime(2026, 1, 2, 3, 4, 5, 100_000, tzinfo=UTC))
    second = conflict_name("d/nb.ipynb", datetime(2026, 1, 2, 3, 4, 5, 900_000, tzinfo=UTC))
    assert first != second


def test_a_conflict_name_never_takes_a_name_in_use() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    taken = NamesInUse({"d/m.conflict-20260102T030405.000Z.pt": 1}, set())
    chosen = []
    for _ in range(30):
        name = conflict_name("d/m.pt", when, taken)
        assert name not in taken
        taken.claim(name)
        chosen.append(name)
    assert chosen[:2] == [
        "d/m.conflict-20260102T030405.000Z-2.pt",
        "d/m.conflict-20260102T030405.000Z-3.pt",
    ]
    assert len(set(chosen)) == 30


# Characters of every UTF-8 width, for names cut at every possible byte position.
_WIDE = {1: "a", 2: "\u00e9", 3: "\u6f22", 4: "\U0001f600"}


def _names_of_every_length() -> list[str]:
    names = []
    for width, char in _WIDE.items():
        for ext in ("", ".pt", ".\u00e9\u00e9", ".ipynb-checkpoint-x", "." + "e" * 40):
            ext_bytes = len(ext.encode())
            for total in range(1, 256):
                stem_bytes = total - ext_bytes
                if stem_bytes < 1:
                    continue
                # Pad with ASCII so every byte length is reached with wide characters in it.
                stem = char * (stem_bytes // width) + "s" * (stem_bytes % width)
                names.append(stem + ext)
    return names


@pytest.mark.parametrize(
    "folder", ["", "d/", "\u00e9" * 100 + "/", "/".join(["f" * 200] * 19) + "/"]
)
def test_conflict_names_always_fit_and_keep_what_they_can(folder: str) -> None:
    """Regression (issue 9, item 2): names of 230-255 bytes gave copies over 255 bytes.
    Every name length 1-255, characters of each UTF-8 width, with and without extension,
    with counters: the copy's name fits 255 bytes, its path 4095, never cuts a character,
    keeps a short extension, and only shortens what does not fit."""
    when = datetime(2026, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    for base in _names_of_every_length():
        relpath = folder + base
        if len(relpath.encode()) > 4095:
            continue
        for counter in (1, 2, 12):
            name = conflict_name(relpath, when, _CountersBelow(counter))
            _check_copy_name(folder, base, name)
            if counter > 1:
                assert name.endswith(f"Z-{counter}" + _ext(name))


def test_conflict_names_fit_with_large_counters() -> None:
    when = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
    for base in ("\U0001f600" * 63 + "abc", "x" * 250 + ".pt", "\u00e9" * 127 + ".p"):
        for counter in (99, 100, 10_000):
            name = conflict_name(base, when, _CountersBelow(counter))
            _check_copy_name("", base, name)
            assert name.endswith(f"Z-{counter}" + _ext(name))


class _CountersBelow:
    """Every conflict name whose counter is below n is taken (no counter counts as 1)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __contains__(self, name: object) -> bool:
        assert isinstance(name, str)
        tail = _tail(name)
        counter = int(tail.split("-")[1]) if "-" in tail else 1
        return counter < self.n


def _tail(name: str) -> str:
    """'20261231T235959.999Z-3' of a conflict name, extension removed."""
    after = name.rpartition("/")[2].split(".conflict-")[1]
    return after[: len(after) - len(_ext(name))]


def _check_copy_name(folder: str, base: str, name: str) -> None:
    check_relpath_fully(name)  # valid UTF-8, names within 255 bytes, path within 4095
    head, _, copy = name.rpartition("/")
    assert (head + "/" if head else "") == folder
    assert ".conflict-20261231T235959." in copy
    stem = copy.split(".conflict-")[0]
    original_stem = base[: base.rfind(".")] if _short_ext(base) else base
    assert original_stem.startswith(stem)  # a prefix: cut between characters, never inside
    if _short_ext(base):
        assert copy.endswith(base[base.rfind(".") :])  # a short extension is kept whole
    marker = len(f".conflict-{_tail(name)}{_ext(name)}".encode())
    full = len(original_stem.encode()) + marker
    if full <= 255 and len(folder.encode()) + full <= 4095:
        assert stem == original_stem  # nothing cut where it fits
    else:
        assert len(stem.encode()) > min(255, 4095 - len(folder.encode())) - marker - 4


def _short_ext(base: str) -> bool:
    dot = base.rfind(".")
    return dot > 0 and len(base[dot:].encode()) <= 32


def _ext(name: str) -> str:
    after = name.rpartition("/")[2].split(".conflict-")[1]  # '20261231T235959.999Z-3.pt'
    dot = after.find(".", after.find("Z"))
    return after[dot:] if dot >= 0 else ""


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
