from __future__ import annotations

import pathspec

from sidecar.core.filters import PathFilter, _matcher, parse_syncignore, pattern_problem
from sidecar.core.paths import temp_name


def test_defaults_exclude_checkpoints_pycache_and_temp_files() -> None:
    f = PathFilter()
    assert f.wants("notebook.ipynb")
    assert not f.wants(".ipynb_checkpoints/notebook-checkpoint.ipynb")
    assert not f.wants("a/b/.ipynb_checkpoints/x.ipynb")
    assert not f.wants("pkg/__pycache__/m.cpython-311.pyc")
    assert not f.wants(f"d/{temp_name()}")
    assert not f.wants_dir("a/__pycache__")
    assert f.wants_dir("a/b")


def test_user_excludes_and_syncignore_use_gitignore_rules() -> None:
    f = PathFilter(
        exclude=["*.tmp"], syncignore_text="# comment\n/scratch/\nlogs/\n!logs/keep.log\n"
    )
    assert not f.wants("a/b/x.tmp")
    assert not f.wants("scratch/big.bin")
    assert f.wants("data/scratch/ok.bin")  # anchored to the root only
    assert not f.wants("deep/logs/run.log")
    assert f.wants("model.pt")


def test_segment_containment_not_string_prefix() -> None:
    f = PathFilter(exclude=[".cache/"])
    assert not f.wants(".cache/x")
    assert f.wants(".cache2/x")


def test_includes_restrict_to_matching_paths() -> None:
    f = PathFilter(include=["models/", "*.json"])
    assert f.wants("models/a/b.bin")
    assert f.wants("conf/x.json")
    assert not f.wants("data/x.csv")
    f2 = PathFilter(include=["models/"], exclude=["*.tmp"])
    assert not f2.wants("models/x.tmp")


PATTERNS = [
    ".ipynb_checkpoints/",
    "__pycache__/",
    "*.tmp",
    "/top.txt",
    "dir/",
    "a/**/b",
    "**/logs",
    "data/*.csv",
    "*.py[cod]",
    "# comment",
    "",
    "build",
    "x?z",
    "/root-only/",
    "\\#literal",
    "trailing\\ ",
]
PATHS = [
    "top.txt",
    "sub/top.txt",
    "a.tmp",
    "d/e/f.tmp",
    "dir/x",
    "x/dir/y",
    "dirx/y",
    "a/b",
    "a/q/r/b",
    "a/b/c",
    "logs",
    "p/logs/q",
    "data/x.csv",
    "data/sub/x.csv",
    "m.pyc",
    "m.py",
    "build",
    "build/out",
    "xbuild",
    "xyz",
    "x/z",
    "root-only/f",
    "n/root-only/f",
    "#literal",
    "trailing ",
    ".ipynb_checkpoints/n.ipynb",
    "deep/__pycache__/m.pyc",
    "dir/",
    "q/dir/",
    "build/",
]


def test_negation_free_matcher_agrees_with_pathspec_on_every_pattern_and_path() -> None:
    for size in (1, 2, 3):
        for start in range(len(PATTERNS) - size + 1):
            spec = pathspec.GitIgnoreSpec.from_lines(PATTERNS[start : start + size])
            fast = _matcher(spec)
            for path in PATHS:
                assert fast(path) == spec.match_file(path), (PATTERNS[start : start + size], path)
    spec = pathspec.GitIgnoreSpec.from_lines(PATTERNS)
    fast = _matcher(spec)
    assert fast is not spec.match_file
    assert [fast(p) for p in PATHS] == [spec.match_file(p) for p in PATHS]


def test_negations_keep_pathspec_rules() -> None:
    spec = pathspec.GitIgnoreSpec.from_lines(["*.tmp", "!keep.tmp"])
    assert _matcher(spec) == spec.match_file
    assert PathFilter(exclude=["*.tmp", "!keep.tmp"]).wants("keep.tmp")
    assert not PathFilter(exclude=["*.tmp", "!keep.tmp"]).wants("drop.tmp")


def test_default_exclusions_need_no_pattern_library() -> None:
    """Without user patterns the defaults are decided by folder names alone."""
    plain = PathFilter()
    assert plain._exclude is None and plain._include is None
    assert not plain.wants("a/__pycache__/m.pyc")
    assert not plain.wants(".ipynb_checkpoints/n-checkpoint.ipynb")
    assert plain.wants("__pycache__")  # a file of that name is data
    assert plain.wants("notes/__pycache__x/y")
    assert not plain.wants_dir("deep/er/__pycache__")
    assert plain.wants_dir("deep/er")
    assert PathFilter(exclude=["# only a comment", ""])._exclude is None
    # Defaults hold whatever the user's patterns say (git cannot re-include from inside
    # an excluded folder either).
    assert not PathFilter(exclude=["!__pycache__/keep.pyc"]).wants("__pycache__/keep.pyc")


def test_syncignore_lines_git_refuses_or_not_utf8_are_skipped_by_number() -> None:
    data = b"\xef\xbb\xbfscratch/\r\n\\\n# comment\n\xff\xfe.bin\nlogs/\n"
    text, problems = parse_syncignore(data)
    assert len(problems) == 2
    assert problems[0].startswith("line 2: not a valid pattern") and "skipped" in problems[0]
    assert problems[1] == "line 4: not valid UTF-8; skipped"
    f = PathFilter(syncignore_text=text)
    assert not f.wants("scratch/x")  # the byte-order mark is not part of the first pattern
    assert not f.wants("a/logs/run.log")
    assert f.wants("keep.bin")


def test_a_filter_never_raises_on_a_pattern_git_refuses() -> None:
    assert pattern_problem("\\") is not None
    assert pattern_problem("*.tmp") is None and pattern_problem("# \\") is None
    f = PathFilter(exclude=["\\", "*.tmp"], syncignore_text="\\\nscratch/")
    assert not f.wants("a.tmp") and not f.wants("scratch/x") and f.wants("b.txt")


# (path a watcher reports, relative) -> whether a change there can matter to a sync
CHANGES = [
    ("a.txt", True),
    ("nb/analysis.ipynb", True),
    (".git/index", True),  # users' repositories are synced
    (".netvol-tmp.notours", True),  # not our pattern: a user file
    ("nb", True),  # a folder (or a file) of the user's
    ("__pycache__", False),  # the excluded folder itself...
    ("__pycache__/a.cpython-311.pyc", False),  # ...and all in it, at any depth
    ("pkg/__pycache__/a.cpython-311.pyc", False),
    ("nb/.ipynb_checkpoints", False),
    ("nb/.ipynb_checkpoints/x-checkpoint.ipynb", False),
    (f"models/{temp_name()}", False),  # our temp files
    (temp_name(), False),
    (".netvol", False),  # the sidecar's bookkeeping: never synced, so no change to push
    (".netvol/history/x", False),
    ("sub/.netvol", True),  # bookkeeping only at the top
]


def test_sees_change_is_the_sync_rules_for_a_file_or_a_folder() -> None:
    rules = PathFilter()
    for relpath, seen in CHANGES:
        assert rules.sees_change(relpath) is seen, relpath
        # A change the filter sees is at a path the sync sees, as a file and as a folder.
        assert seen == (rules.wants(relpath) and rules.wants_dir(relpath)), relpath


def test_sees_change_keeps_no_verdict() -> None:
    rules = PathFilter()
    for n in range(100):
        rules.sees_change(f"d/{n}.txt")
    assert rules._verdicts == {}
