from __future__ import annotations

from sidecar.core.filters import PathFilter
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
