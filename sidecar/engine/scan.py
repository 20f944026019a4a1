"""Local scan: walk the folder, stat every file; hashes come from the cache of the last scan,
and hash_files() computes the rest, only for the paths whose decision needs one.

Symlinks are never followed and never synced (documented in README); special files (FIFO,
socket, device) are skipped unopened and counted, for the sync's log line; stale temp files
of an interrupted run are removed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat as stat_mod
import sys
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from sidecar.core.filters import PathFilter
from sidecar.core.model import UNHASHED, FileError, LocalFile, identity_of
from sidecar.core.paths import BadKey, check_relpath, is_temp_name
from sidecar.engine.hashing import content_hash_file

log = logging.getLogger("sidecar.scan")  # logger name kept from before the move


@dataclass(slots=True)
class ScanResult:
    files: dict[str, LocalFile] = field(default_factory=dict)  # hash may be UNHASHED
    errors: list[FileError] = field(default_factory=list)
    temps_removed: int = 0
    symlinks_skipped: int = 0
    specials_skipped: int = 0  # FIFOs, sockets, devices the filter wants: never opened


def _walk(
    root: Path,
    path_filter: PathFilter,
    hash_cache: Mapping[str, tuple[int, int, int, str]],
    out: ScanResult,
) -> None:
    """Fill out.files: one LocalFile per file, made as it is seen (no second map of stats:
    at 1 M files every per-file object counts). Paths are interned: the same path is a key
    in the listing, BASE and the hash cache, and one string serves them all."""
    found = out.files
    for rel, local in walk_in_key_order(root, path_filter, hash_cache, out):
        found[rel] = local


def _key_order(entry: os.DirEntry[str]) -> bytes:
    """Where an entry's paths sort among S3 keys: a folder 'd' as 'd/', so that 'd-x' and
    'd.x' come before everything in it and 'd0' after (bytes: as S3 orders keys)."""
    name = os.fsencode(entry.name)
    try:
        return name + b"/" if entry.is_dir(follow_symlinks=False) else name
    except OSError:
        return name


def walk_in_key_order(
    root: Path,
    path_filter: PathFilter,
    hash_cache: Mapping[str, tuple[int, int, int, str]],
    out: ScanResult,
) -> Iterator[tuple[str, LocalFile]]:
    """Every wanted file under root as (relative path, LocalFile), in S3 key order (the
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
        found = _wanted_file(entry, rel, path_filter, hash_cache, out, enter)
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
    hash_cache: Mapping[str, tuple[int, int, int, str]],
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
    rel = sys.intern(rel)
    cached = hash_cache.get(rel)
    if cached is not None and cached[:3] == identity_of(st):
        # The cache's own int objects: mtime_ns and inode are 32 bytes each.
        executable = bool(st.st_mode & stat_mod.S_IXUSR)
        return rel, LocalFile(cached[0], cached[1], cached[2], executable, cached[3])
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


async def scan(
    root: Path,
    path_filter: PathFilter,
    hash_cache: Mapping[str, tuple[int, int, int, str]],
    executor: ThreadPoolExecutor,
) -> ScanResult:
    """Scan root; hash_cache maps path -> (size, mtime_ns, inode, hash) from the last scan.

    A file whose stat matches its cache entry gets the cached hash, any other UNHASHED.
    """
    out = ScanResult()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(executor, _walk, root, path_filter, hash_cache, out)
    return out


async def hash_files(
    root: Path, scanned: ScanResult, rels: list[str], executor: ThreadPoolExecutor
) -> None:
    """Fill in the hashes of scanned.files[rel] for rels; unreadable files become errors
    (and leave scanned.files)."""
    loop = asyncio.get_running_loop()
    files = scanned.files
    # Big files first so a pool of workers finishes together; small ones go in batches, as
    # one executor hand-off per 16 KiB file cost more than hashing it (0.58 s for 5,000).
    to_hash = sorted(rels, key=lambda rel: -files[rel].size)
    batches = _batches(to_hash, [files[rel].size for rel in to_hash])
    results = await asyncio.gather(
        *(loop.run_in_executor(executor, _hash_batch, root, batch) for batch in batches)
    )
    digests = [digest for batch in results for digest in batch]
    for rel, digest in zip(to_hash, digests, strict=True):
        if isinstance(digest, FileError):
            scanned.errors.append(digest)
            del files[rel]
            continue
        files[rel] = replace(files[rel], hash=digest)


async def hash_paths(
    root: Path, files: list[tuple[str, int]], executor: ThreadPoolExecutor
) -> dict[str, str | FileError]:
    """The content hash of each (relative path, size), or why it could not be read; big
    files first so a pool of workers finishes together, small ones in batches."""
    loop = asyncio.get_running_loop()
    ordered = sorted(files, key=lambda item: -item[1])
    rels = [rel for rel, _ in ordered]
    batches = _batches(rels, [size for _, size in ordered])
    results = await asyncio.gather(
        *(loop.run_in_executor(executor, _hash_batch, root, batch) for batch in batches)
    )
    return dict(zip(rels, [digest for batch in results for digest in batch], strict=True))
