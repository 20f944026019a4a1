"""Memory per file at scale (issue 12): the state file is written and read a line per path
(never its whole text beside what was parsed, never a second copy of BASE to dump), the scan
makes one object per file, and the scan, BASE and the hash cache share one string per path.

Budgets are measured with tracemalloc on 20,000 paths: bytes, never wall time.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sidecar.core.filters import PathFilter
from sidecar.core.model import UNHASHED, BaseEntry, LocalFile
from sidecar.scan import scan
from sidecar.state import StateStore
from sidecar.sync import _cache_entry, _cache_holds

PATHS = 20_000
REMOTE = "s3://b/p/"


def _store(directory: Path) -> StateStore:
    state = StateStore(directory, REMOTE, Path("/data"))
    state.load()
    return state


def _filled(directory: Path, count: int = PATHS) -> StateStore:
    """BASE and hash cache as a real volume has them: most paths in both, some in one."""
    state = _store(directory)
    for index in range(count):
        path = f"d{index // 1000:03d}/e{index % 10}/f{index:07d}.bin"
        digest = f"{index:032x}"
        if index % 50 != 1:
            state.base[path] = BaseEntry(
                index,
                digest,
                (f"{index:032d}",),
                index % 7 == 0,
                "2026-12-03T10:00:00.000Z",
                written_at=index if index % 13 == 0 else 0,
            )
        if index % 50 != 2:
            state.hash_cache[path] = (
                index,
                1_796_000_000_000_000_000 + index,
                10**6 + index,
                digest,
            )
    state._dirty = True
    return state


def _peak_above_retained(work: Callable[[], Any]) -> tuple[int, int, Any]:
    """(bytes still held after work, peak bytes above that while it ran, its result)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = work()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return after - before, peak - after, result


def test_state_round_trip_a_line_per_path(tmp_path: Path) -> None:
    state = _filled(tmp_path, 500)
    assert state.commit()
    lines = state.snapshot_path.read_text().splitlines()
    paths = set(state.base) | set(state.hash_cache)
    assert len(lines) == len(paths) + 2  # header, a line per path, the end line
    assert json.loads(lines[-1]) == {"end": len(paths)}
    again = _store(tmp_path)
    assert again.base == state.base
    assert again.hash_cache == state.hash_cache


def test_version_1_state_still_loads(tmp_path: Path) -> None:
    """A state written before the line format (one JSON object) is read as it was."""
    tmp_path.mkdir(exist_ok=True)
    v1 = {
        "version": 1,
        "remote": REMOTE,
        "local_dir": "/data",
        "written": 1.0,
        "base": {
            "a.txt": [3, "h" * 32, ["e" * 32], True, "2026-01-01T00:00:00Z", 1700000000],
            "b/c": [0, "0" * 32, [], False, ""],
        },
        "hashes": {"a.txt": [3, 5, 7, "h" * 32], "only-cached": [1, 2, 3, "f" * 32]},
        "open_uploads": {"upload-1": "p/big"},
    }
    (tmp_path / "state.json").write_text(json.dumps(v1, separators=(",", ":")))
    state = _store(tmp_path)
    assert state.base == {
        "a.txt": BaseEntry(3, "h" * 32, ("e" * 32,), True, "2026-01-01T00:00:00Z", 1700000000),
        "b/c": BaseEntry(0, "0" * 32, (), False, ""),
    }
    assert state.hash_cache == {"a.txt": (3, 5, 7, "h" * 32), "only-cached": (1, 2, 3, "f" * 32)}
    assert state.open_uploads == {"upload-1": "p/big"}


def test_a_state_cut_short_is_set_aside_not_half_used(tmp_path: Path) -> None:
    """Half a BASE would read as 'the rest was deleted': a file without its end line (or with
    a torn line) is damaged, set aside whole, and the sync starts as if new."""
    for cut in ("end line", "mid-line"):
        directory = tmp_path / cut.replace(" ", "-")
        state = _filled(directory, 300)
        state.commit()
        text = state.snapshot_path.read_text()
        lines = text.splitlines(keepends=True)
        kept = lines[:-1] if cut == "end line" else [*lines[:100], lines[100][:20]]
        state.snapshot_path.write_text("".join(kept))
        again = _store(directory)
        assert again.base == {} and again.hash_cache == {}, cut
        assert len(list(directory.glob("state.damaged-*.json"))) == 1, cut


def test_commit_and_load_hold_no_second_copy(tmp_path: Path) -> None:
    """Writing BASE builds no copy of it to dump; reading it never holds the file's text (at
    1 M paths ~200 MiB) beside the objects parsed from it. Measured on 20,000 paths: before
    the line format the load peaked 556 bytes a path above what it kept and the commit 192;
    now ~1 each (up to ~70 when dicts and the intern table resize mid-load)."""
    state = _filled(tmp_path)
    _kept, commit_extra, _ = _peak_above_retained(state.commit)
    del state
    kept, load_extra, loaded = _peak_above_retained(lambda: _store(tmp_path))
    assert len(loaded.base) > 0.9 * PATHS
    assert commit_extra < 60 * PATHS, f"commit peaked {commit_extra / PATHS:.0f} B/path above"
    assert load_extra < 250 * PATHS, f"load peaked {load_extra / PATHS:.0f} B/path above"
    # What is kept: BASE and hash cache with one string per path and per hash (655-750
    # B/path here, depending on what earlier tests left in the intern table).
    assert kept < 1000 * PATHS, f"BASE + hash cache keep {kept / PATHS:.0f} B/path"
    path = next(iter(loaded.base))
    if path in loaded.hash_cache:
        assert next(p for p in loaded.hash_cache if p == path) is path


def test_scan_makes_one_object_per_file_and_shares_the_path(tmp_path: Path) -> None:
    root = tmp_path / "vol"
    count = 5000
    paths = [f"d{i // 500:02d}/f{i:05d}.bin" for i in range(count)]
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"x")
    state = _store(tmp_path / "state")
    for path in paths[::2]:
        st = os.stat(root / path)
        state.hash_cache[sys.intern(path)] = (st.st_size, st.st_mtime_ns, st.st_ino, "h" * 32)

    def run() -> Any:
        with ThreadPoolExecutor(1) as executor:
            return asyncio.run(scan(root, PathFilter((), (), ""), state.hash_cache, executor))

    kept, _extra, scanned = _peak_above_retained(run)
    assert len(scanned.files) == count
    assert sum(f.hash != UNHASHED for f in scanned.files.values()) == count // 2
    # One LocalFile (slots, two big ints) per file, and the path string shared with the
    # cache where it has one (~195 B/file kept here; 225 before the paths were shared).
    assert kept < 260 * count, f"the scan keeps {kept / count:.0f} B/file"
    cached = {p for p in state.hash_cache}
    shared = [p for p in scanned.files if p in cached]
    assert all(sys.intern(p) is p for p in shared)


def test_cache_holds_is_dict_equality() -> None:
    """The no-op check that spares building a second hash cache decides as `==` did."""
    rng = random.Random(12)
    for _ in range(300):
        files: dict[str, LocalFile] = {}
        for index in range(rng.randrange(6)):
            digest = rng.choice([UNHASHED, "a" * 32, "b" * 32])
            files[f"p{index}"] = LocalFile(rng.randrange(2), 5, 7, False, digest)
        cache = {p: _cache_entry(f) for p, f in files.items() if f.hash != UNHASHED}
        for _ in range(rng.randrange(3)):
            cache[f"p{rng.randrange(7)}"] = (rng.randrange(2), 5, 7, rng.choice(["a" * 32, "c"]))
        wanted = {p: _cache_entry(f) for p, f in files.items() if f.hash != UNHASHED}
        assert _cache_holds(cache, files) == (cache == wanted)


async def test_first_sync_over_existing_data_asks_with_a_bounded_pool(
    moto: Any, workdir: Path, monkeypatch: Any
) -> None:
    """A first pull into a folder that holds the bucket's files already HEADs every object
    (equal or not is unknown): through `--concurrency` workers, never a task per object
    (~2 KiB each: 186 -> 107 MiB peak RSS for 50,000 files)."""
    from sidecar.s3 import ObjectStore
    from sidecar.sync import SyncEngine
    from tests.engine.test_engine import PULL, config, write

    bucket = moto.new_bucket()
    client = moto.client()
    local = workdir / "local"
    for n in range(150):
        client.put_object(Bucket=bucket, Key=f"vol/d{n % 3}/f{n:03d}", Body=b"%d" % n)
        write(local / f"d{n % 3}" / f"f{n:03d}", b"%d" % n)
    most_tasks = 0
    original_head = ObjectStore.head

    async def counting_head(self: ObjectStore, key: str) -> Any:
        nonlocal most_tasks
        most_tasks = max(most_tasks, len(asyncio.all_tasks()))
        return await original_head(self, key)

    monkeypatch.setattr(ObjectStore, "head", counting_head)
    async with SyncEngine(config(bucket, local, workdir / "state", concurrency=4)) as engine:
        result = await engine.run(PULL)
    assert result.ok and result.files_adopted == 150, result
    assert 0 < most_tasks <= 4 + 4, most_tasks  # the workers, and the test's own few
