"""The local scan hands files on in S3 key order (issue 12 item 3), the order a listing
comes in, so the two can be merged as they stream; what it finds is unchanged."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.core.filters import PathFilter
from sidecar.engine.scan import ScanResult, walk_in_key_order
from sidecar.s3.fanout import key_order

NAME = st.text(alphabet=["a", "b", "-", ".", "0", " ", "\u00e9", "~"], min_size=1, max_size=4)
# Paths as lists of segments; a path whose folder is another path's file is dropped.
PATHS = st.lists(st.lists(NAME, min_size=1, max_size=4), max_size=40)


def _build(root: Path, paths: list[list[str]]) -> set[str]:
    made: set[str] = set()
    for segments in paths:
        if any(s in (".", "..") for s in segments):
            continue
        rel = "/".join(segments)
        target = root.joinpath(*segments)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_dir():
                continue
            target.write_bytes(rel.encode())
        except (FileExistsError, NotADirectoryError):
            continue
        made.add(rel)
    return made


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(paths=PATHS)
def test_scan_comes_in_key_order(tmp_path_factory, paths: list[list[str]]) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("tree")
    made = _build(root, paths)
    out = ScanResult()
    walked = [rel for rel, _ in walk_in_key_order(root, PathFilter((), (), ""), out)]
    assert walked == sorted(made, key=key_order)
    assert out.errors == []


def test_folder_sorts_as_its_name_and_a_slash(tmp_path: Path) -> None:
    for rel in ["d/x", "d-x", "d.x", "d0", "d/e/f", "d/e-", "c", "é/x", "~"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"1")
    os.symlink("d0", tmp_path / "d1")
    out = ScanResult()
    walked = [rel for rel, _ in walk_in_key_order(tmp_path, PathFilter((), (), ""), out)]
    assert walked == ["c", "d-x", "d.x", "d/e-", "d/e/f", "d/x", "d0", "~", "é/x"]
    assert out.symlinks_skipped == 1
