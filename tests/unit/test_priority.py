"""The priority split and order of a priority-ready pull (sidecar/core/priority.py), as tables."""

from __future__ import annotations

import pytest

from sidecar.core.priority import Phase, PriorityRules, covers, normalize_wait_path

MiB = 1024**2
P, B, D = Phase.PRIORITY, Phase.BACKGROUND, Phase.DEFERRED


@pytest.mark.parametrize(
    ("patterns", "path", "size", "phase"),
    [
        ((), "notes.ipynb", 1000, P),  # small: in the priority set
        ((), "exact.bin", 8 * MiB, P),  # the limit is inclusive
        ((), "big.bin", 8 * MiB + 1, B),
        (("*.ckpt",), "models/a.ckpt", 5 * 1024 * MiB, P),  # a pattern names it: any size
        (("data/",), "data/x/huge.bin", 900 * MiB, P),  # a folder pattern: all below it
        (("data/",), "other/huge.bin", 900 * MiB, B),
        (("/top.bin",), "top.bin", 100 * MiB, P),  # anchored at the root
        (("/top.bin",), "sub/top.bin", 100 * MiB, B),
        (("!*.parquet",), "shards/a.parquet", 10, D),  # `!`: never before ready, fetched last
        (("data/", "!data/huge.bin"), "data/huge.bin", 900 * MiB, D),
        (("data/", "!data/huge.bin"), "data/small.bin", 900 * MiB, P),
        (("!data/",), "data/a.txt", 10, D),
    ],
)
def test_phase(patterns: tuple[str, ...], path: str, size: int, phase: Phase) -> None:
    assert PriorityRules(8 * MiB, patterns).phase(path, size) is phase


def test_order_is_phase_then_smallest_first() -> None:
    rules = PriorityRules(1 * MiB, ("*.ckpt", "!logs/"))
    files = {
        "big.bin": 50 * MiB,
        "mid.bin": 5 * MiB,
        "a.ckpt": 100 * MiB,
        "b.txt": 10,
        "c.txt": 10,
        "logs/x.log": 1,
        "huge.bin": 500 * MiB,
    }
    order = sorted(files, key=lambda p: rules.key(p, files[p]))
    assert order == ["b.txt", "c.txt", "a.ckpt", "mid.bin", "big.bin", "huge.bin", "logs/x.log"]


def test_with_patterns_adds_syncpriority_lines() -> None:
    rules = PriorityRules(1, ("a/",)).with_patterns(["# comment", "", "b/"])
    assert rules.phase("a/x", 100) is P and rules.phase("b/x", 100) is P
    assert rules.phase("c/x", 100) is B


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a/b.txt", "a/b.txt"),
        ("./a/b.txt", "a/b.txt"),
        ("/a//b.txt", "a/b.txt"),
        ("data/", "data"),
        ("/work/vol/data/x", "data/x"),  # absolute, inside the folder
        ("/work/vol", ""),
        (".", ""),
        ("/work/volume2/x", "work/volume2/x"),  # not inside: taken from the folder's root
    ],
)
def test_normalize_wait_path(text: str, expected: str) -> None:
    assert normalize_wait_path(text, "/work/vol") == expected


def test_normalize_wait_path_refuses_leaving_the_folder() -> None:
    with pytest.raises(ValueError, match=r"\.\."):
        normalize_wait_path("a/../../etc/passwd", "/work/vol")


@pytest.mark.parametrize(
    ("spec", "path", "expected"),
    [
        ("", "anything/at/all", True),
        ("data", "data", True),
        ("data", "data/x", True),
        ("data", "database", False),
        ("data/x", "data", False),
    ],
)
def test_covers(spec: str, path: str, expected: bool) -> None:
    assert covers(spec, path) is expected
