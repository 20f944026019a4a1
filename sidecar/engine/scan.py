"""Local scan: walk the folder in S3 key order, stat every file (the hash cache is applied
as the files stream by: sidecar/engine/inputs.py), and hash_paths() for the files whose
decision needs a hash.

Symlinks are never followed and never synced (documented in README); special files (FIFO,
socket, device) are skipped unopened and counted, for the sync's log line; stale temp files
of an interrupted run are removed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.core.filters import PathFilter
from sidecar.core.model import UNHASHED, FileError, LocalFile
from sidecar.core.paths import BadKey, check_relpath, is_temp_name
from sidecar.engine.hashing import content_hash_file

log = logging.getLogger("sidecar.scan")  # logger name kept from before the move


@dataclass(slots=True)
class ScanResult:
    """What the walk leaves beside the files it hands on."""

    errors: list[FileError] = field(default_factory=list)
    temps_removed: int = 0
    symlinks_skipped: int = 0
    specials_skipped: int = 0  # FIFOs, sockets, devices the filter wants: never opened


def _key_order(entry: os.DirEntry[str]) -> bytes:
    """Where an entry's paths sort among S3 keys: a folder 'd' as 'd/', so that 'd-x' and
    'd.x' come before everything in it and 'd0' after (bytes: as S3 orders keys)."""
    name = os.fsencode(entry.name)
    try:
        return name + b"/" if entry.is_dir(follow_symlinks=False) else name
    except OSError:
        return name


def walk_in_key_order(
    root: Path, path_filter: PathFilter, out: ScanResult
) -> Iterator[tuple[str, LocalFile]]:
    """Every wanted file under root as (relative path, LocalFile with no hash yet), in S3 key order
    order a listing comes in); errors, removed temp files and skipped symlinks go to `out`.

    Holds the sorted entries of the folders on the way down to the current one, never the
    files already handed on: a tree of a million files costs what its largest folders hold.
    """
    levels: list[tuple[str, Iterator[os.DirEntry[str]]]] = []

    def enter(reldir: str) -> None:
        absdir = os.path.join(root, reldir) if reldir else str(root)
        try:
            with os.scandir(absdir) as listing:
                entries = sorted(listing, key=_key_order)
        except OSError as exc:
            out.errors.append(FileError(reldir or ".", f"cannot list folder: {exc.strerror}"))
            return
        levels.append((reldir, iter(entries)))

    enter("")
    while levels:
        reldir, entries = levels[-1]
        entry = next(entries, None)
        if entry is None:
            levels.pop()
            continue
        rel = f"{reldir}/{entry.name}" if reldir else entry.name
        if is_temp_name(entry.name):
            _remove_temp(entry, rel, path_filter, out)
            continue
        found = _wanted_file(entry, rel, path_filter, out, enter)
        if found is not None:
            yield found


def _remove_temp(
    entry: os.DirEntry[str], rel: str, path_filter: PathFilter, out: ScanResult
) -> None:
    """A temp file of ours is never synced; a stale one is removed when the filter says so."""
    if not path_filter.removes_temp(entry.name):
        return
    try:
        os.unlink(entry.path)
        out.temps_removed += 1
    except OSError as exc:
        log.warning("cannot remove stale temp file %s: %s", rel, exc)


def _wanted_file(
    entry: os.DirEntry[str],
    rel: str,
    path_filter: PathFilter,
    out: ScanResult,
    enter: Callable[[str], None],
) -> tuple[str, LocalFile] | None:
    """A regular file the filter wants, else None: a wanted folder is entered, a symlink or
    a wanted special file counted as skipped, a bad name or a failed stat reported in `out`.
    One call per entry: this is the scan's inner loop."""
    try:
        if entry.is_symlink():
            out.symlinks_skipped += 1
            return None
        if entry.is_dir(follow_symlinks=False):
            if path_filter.wants_dir(rel):
                enter(rel)
            return None
        if not entry.is_file(follow_symlinks=False):
            # A FIFO, socket or device: no content to sync (opening a FIFO would block).
            out.specials_skipped += path_filter.wants(rel)
            return None
        if not path_filter.wants(rel):
            return None
        check_relpath(rel, what="local file")
        st = entry.stat(follow_symlinks=False)
    except BadKey as exc:
        out.errors.append(FileError(rel, str(exc)))
        return None
    except OSError as exc:
        out.errors.append(FileError(rel, f"cannot stat: {exc.strerror}"))
        return None
    return rel, LocalFile.of(st, UNHASHED)


def _hash_one(root: Path, rel: str) -> str | FileError:
    try:
        return content_hash_file(root / rel)
    except OSError as exc:
        return FileError(rel, f"cannot read: {exc.strerror or exc}")


def _hash_batch(root: Path, rels: list[str]) -> list[str | FileError]:
    return [_hash_one(root, rel) for rel in rels]


def _batches(
    rels: list[str], sizes: list[int], max_files: int = 64, max_bytes: int = 8 << 20
) -> list[list[str]]:
    batches: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for rel, size in zip(rels, sizes, strict=True):
        if current and (len(current) >= max_files or current_bytes + size > max_bytes):
            batches.append(current)
            current, current_bytes = [], 0
        current.append(rel)
        current_bytes += size
    if current:
        batches.append(current)
    return batches


async def hash_paths(
    root: Path,
    files: list[tuple[str, int]],
    executor: ThreadPoolExecutor,
    hashed: Callable[[int], None] | None = None,
) -> dict[str, str | FileError]:
    """The content hash of each (relative path, size), or why it could not be read; big
    files first so a pool of workers finishes together, small ones in batches. `hashed`
    is told how many files each batch read, as it ends (progress)."""
    loop = asyncio.get_running_loop()
    ordered = sorted(files, key=lambda item: -item[1])
    rels = [rel for rel, _ in ordered]
    batches = _batches(rels, [size for _, size in ordered])

    async def one(batch: list[str]) -> list[str | FileError]:
        digests = await loop.run_in_executor(executor, _hash_batch, root, batch)
        if hashed is not None:
            hashed(len(batch))
        return digests

    results = await asyncio.gather(*(one(batch) for batch in batches))
    return dict(zip(rels, [digest for batch in results for digest in batch], strict=True))
