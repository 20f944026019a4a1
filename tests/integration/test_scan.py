"""The local scan's promises (sidecar/engine/scan.py, run as a sync runs it:
tests/support/scanning.py) beside its order (test_scan_order.py):
symlinks are never followed nor synced, special files are skipped, counted and never opened, a path
that cannot be listed, read or named is reported by path and cause while the scan goes on, a
cached hash serves only a file whose size, mtime and inode all match, and a folder the filter
prunes is never listed, a file it excludes never stat'ed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.core.filters import PathFilter
from sidecar.core.model import UNHASHED, Direction
from sidecar.engine.hashing import content_hash_file
from tests.conftest import S3Server
from tests.support.cli_support import drop_file_permission_override
from tests.support.engine_support import config, spy_on_hashing, sync
from tests.support.scanning import Scanned, scan_as_a_sync

EVERYTHING = PathFilter((), (), "")


def tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def write_raw(path: bytes) -> None:
    """A file at a name given as bytes (which may be no valid UTF-8)."""
    with open(path, "wb") as handle:
        handle.write(b"x")


def relative(paths: list[str], root: Path) -> list[str]:
    return sorted(os.path.relpath(path, root) for path in paths)


async def scanned(
    root: Path,
    path_filter: PathFilter = EVERYTHING,
    cache: Any = None,
    hash_all: bool = True,
) -> Scanned:
    """The sync's scan, then every file it found unhashed hashed (as a first sync does)."""
    return await scan_as_a_sync(root, path_filter, cache, hash_all)


# ---- symlinks ------------------------------------------------------------------------------
async def test_symlinks_of_every_kind_are_counted_and_never_followed(tmp_path: Path) -> None:
    """A link to a file, to a folder (inside or outside the volume), a dangling one and a
    loop: each is one skipped symlink, none is a file or an error, and nothing behind a link
    to a folder is walked."""
    root, outside = tmp_path / "vol", tmp_path / "outside"
    tree(root, {"real.txt": b"real", "dir/inner.txt": b"inner"})
    tree(outside, {"secret.txt": b"outside"})
    os.symlink("real.txt", root / "to-file")
    os.symlink("dir", root / "to-dir")
    os.symlink(outside, root / "dir" / "to-outside")
    os.symlink("no-such-file", root / "dangling")
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")
    os.symlink(".", root / "dir" / "self")

    out = await scanned(root)
    assert sorted(out.files) == ["dir/inner.txt", "real.txt"]
    assert out.symlinks_skipped == 7
    assert out.errors == []
    assert out.files["real.txt"].hash == content_hash_file(root / "real.txt")


# ---- special files -------------------------------------------------------------------------
async def test_fifo_and_socket_are_skipped_counted_and_never_opened(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes: the scan and the hashing must
    pass it by. The scan runs in a thread; should it hang there, a writer is let in so the
    test fails instead of hanging."""
    tree(tmp_path, {"a.txt": b"a", "sub/b.txt": b"b"})
    fifo = tmp_path / "sub" / "pipe"
    os.mkfifo(fifo)
    os.mkfifo(tmp_path / "excluded.fifo")  # the filter does not want it: not even counted
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    result: list[Scanned] = []
    only = PathFilter((), ("*.fifo",), "")
    worker = threading.Thread(target=lambda: result.append(asyncio.run(scanned(tmp_path, only))))
    try:
        worker.start()
        worker.join(timeout=60)
        if worker.is_alive():
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # releases a blocked reader
            os.close(fd)
            worker.join()
            pytest.fail("the scan opened the FIFO and blocked on it")
    finally:
        server.close()
    (out,) = result
    assert sorted(out.files) == ["a.txt", "sub/b.txt"]
    assert out.errors == [], "a FIFO or socket is no content, and no failure either"
    assert out.specials_skipped == 2, "each skipped, counted for the sync's log line"
    with pytest.raises(OSError):  # ENXIO: no reader holds the FIFO open
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)


async def test_a_sync_beside_special_files_says_so_and_succeeds(
    moto: S3Server, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A finalize of a folder holding a FIFO, a socket and a symlink uploads the regular
    file only, with no error, and its log names why the others were left out."""
    local = workdir / "local"
    tree(local, {"data.txt": b"data"})
    os.mkfifo(local / "pipe")
    os.symlink("data.txt", local / "link")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(local / "sock"))
    bucket = moto.new_bucket()
    caplog.set_level(logging.INFO, logger="sidecar")
    try:
        result = await asyncio.wait_for(
            sync(config(bucket, local, workdir / "state"), Direction.FINALIZE), timeout=60
        )
    finally:
        server.close()
    assert result.ok and result.errors == [], result.as_dict()
    listed = moto.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [item["Key"] for item in listed] == ["vol/data.txt"]
    assert "skipped 2 special file(s) (FIFO, socket, device)" in caplog.text
    assert "skipped 1 symlink(s)" in caplog.text


# ---- what cannot be read or named ----------------------------------------------------------
_UNREADABLE_CHILD = """
import asyncio, json, sys
from pathlib import Path
from tests.integration.test_scan import scanned
out = asyncio.run(scanned(Path(sys.argv[1])))
print(json.dumps({"files": sorted(out.files), "errors": [e.as_dict() for e in out.errors]}))
"""


def test_unreadable_file_and_folder_are_reported_and_the_scan_goes_on(tmp_path: Path) -> None:
    """chmod 000 on a file and on a folder: each is one error naming its path and the cause,
    the unreadable file leaves the scan's files (never synced with no hash), every other file
    is found and hashed. Run in a child whose root, if it is root, is bound by file modes."""
    root = tmp_path / "vol"
    tree(
        root,
        {"a.txt": b"a", "secret.txt": b"s", "locked/inner.txt": b"i", "z/after.txt": b"z"},
    )
    for name in ("secret.txt", "locked"):
        (root / name).chmod(0)
    try:
        child = subprocess.run(
            [sys.executable, "-c", _UNREADABLE_CHILD, str(root)],
            preexec_fn=drop_file_permission_override if os.geteuid() == 0 else None,
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[2],
            timeout=60,
        )
    finally:
        for name in ("secret.txt", "locked"):
            (root / name).chmod(0o755)
    if child.returncode != 0 and "prctl" in child.stderr:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE: chmod 000 cannot bind")
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout)
    assert seen["files"] == ["a.txt", "z/after.txt"]
    reasons = {error["path"]: error["reason"] for error in seen["errors"]}
    assert reasons == {
        "locked": "cannot list folder: Permission denied",
        "secret.txt": "cannot read: Permission denied",
    }


async def test_names_that_are_not_utf8_are_reported_and_the_rest_scanned(
    tmp_path: Path,
) -> None:
    """A file name and a folder name that are not UTF-8 cannot be S3 keys: each file they
    name is an error saying so, and the valid files beside them are scanned."""
    tree(tmp_path, {"ok.txt": b"ok", "sub/fine.txt": b"fine"})
    raw = os.fsencode(tmp_path)
    os.mkdir(raw + b"/dir-\xfe")
    write_raw(raw + b"/bad-\xff.txt")
    write_raw(raw + b"/dir-\xfe/inner.txt")
    out = await scanned(tmp_path)
    assert sorted(out.files) == ["ok.txt", "sub/fine.txt"]
    assert sorted(os.fsencode(error.path) for error in out.errors) == [
        b"bad-\xff.txt",
        b"dir-\xfe/inner.txt",
    ]
    assert all("not valid UTF-8" in error.reason for error in out.errors), out.errors


# ---- the hash cache ------------------------------------------------------------------------
async def test_a_cached_hash_serves_only_when_size_mtime_and_inode_all_match(
    tmp_path: Path,
) -> None:
    """The cache's hash is taken for a file whose (size, mtime_ns, inode) is the cached one;
    a change of any one of the three (content kept the same size and mtime put back, a file
    replaced by a copy with its mtime) makes the file UNHASHED, to be hashed again."""
    names = ("same", "size", "mtime", "inode")
    tree(tmp_path, {name: b"0123456789" for name in names})
    cache = {}
    for name in names:
        st = os.stat(tmp_path / name)
        cache[name] = (st.st_size, st.st_mtime_ns, st.st_ino, f"cached-{name}")

    def restore_mtime(name: str) -> None:
        mtime = cache[name][1]
        os.utime(tmp_path / name, ns=(mtime, mtime))

    (tmp_path / "size").write_bytes(b"0123456789+")
    restore_mtime("size")
    os.utime(tmp_path / "mtime", ns=(cache["mtime"][1] + 1, cache["mtime"][1] + 1))
    holder = tmp_path / "holder"  # keeps the old inode in use: the copy gets another
    os.link(tmp_path / "inode", holder)
    (tmp_path / "inode.new").write_bytes(b"0123456789")
    os.replace(tmp_path / "inode.new", tmp_path / "inode")
    restore_mtime("inode")
    holder.unlink()

    out = await scanned(tmp_path, cache=cache, hash_all=False)
    hashes = {name: out.files[name].hash for name in names}
    assert hashes == {"same": "cached-same", "size": UNHASHED, "mtime": UNHASHED, "inode": UNHASHED}
    for name in names:  # each cause changed one thing only
        changed = [
            part
            for part, before, now in zip(
                ("size", "mtime", "inode"), cache[name][:3], out.files[name].identity, strict=True
            )
            if before != now
        ]
        assert changed == ([] if name == "same" else [name]), name


# ---- the filter prunes before any stat -----------------------------------------------------
class _CountingEntry:
    """An os.DirEntry that counts its stat() calls (the scan's one stat per file)."""

    def __init__(self, entry: os.DirEntry[str], stats: list[str]) -> None:
        self._entry, self._stats = entry, stats
        self.name, self.path = entry.name, entry.path

    def is_symlink(self) -> bool:
        return self._entry.is_symlink()

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_dir(follow_symlinks=follow_symlinks)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_file(follow_symlinks=follow_symlinks)

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        self._stats.append(self.path)
        return self._entry.stat(follow_symlinks=follow_symlinks)


class _CountingListing:
    def __init__(self, path: str, listed: list[str], stats: list[str]) -> None:
        listed.append(path)
        self._listing = _real_scandir(path)
        self._stats = stats

    def __enter__(self) -> Iterator[_CountingEntry]:
        return (_CountingEntry(entry, self._stats) for entry in self._listing)

    def __exit__(self, *exc: object) -> None:
        self._listing.close()


_real_scandir = os.scandir


async def test_filtered_paths_are_never_listed_statted_nor_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An excluded or default-excluded folder is never listed; an excluded file is never
    stat'ed, so never hashed: a filter exists to spare the work
    (node_modules, a checkpoints folder of thousands of files)."""
    tree(
        tmp_path,
        {
            "keep.txt": b"k",
            "skip.log": b"l",
            "node_modules/pkg/index.js": b"j",
            ".ipynb_checkpoints/nb-checkpoint.ipynb": b"{}",
            "src/main.py": b"m",
            "src/debug.log": b"d",
        },
    )
    listed: list[str] = []
    stats: list[str] = []

    def counting_scandir(path: Any) -> Any:
        # Only the scanned folder's listings: the state store and its temp folder list too.
        if isinstance(path, str) and path.startswith(str(tmp_path)):
            return _CountingListing(path, listed, stats)
        return _real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    hashed = spy_on_hashing(monkeypatch)
    path_filter = PathFilter((), ("*.log", "node_modules/"), "")
    out = await scanned(tmp_path, path_filter)
    assert relative(listed, tmp_path) == [".", "src"]
    assert relative(stats, tmp_path) == ["keep.txt", "src/main.py"]
    assert sorted(hashed) == ["keep.txt", "src/main.py"]
    assert sorted(out.files) == ["keep.txt", "src/main.py"]
    assert all(found.hash not in (UNHASHED, "") for found in out.files.values())
    assert out.errors == []
