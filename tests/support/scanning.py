"""The local scan as a sync runs it (sidecar/engine/walk.py): the walk on its own thread
(ScanPump), the hash cache applied as the files stream by (CachedHashes over a real
StateStore), then hash_paths() for the files still unhashed. The files are collected into a
map here only so that a test can look at them."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from sidecar.core.filters import PathFilter
from sidecar.core.model import UNHASHED, FileError, HashCacheEntry, LocalFile
from sidecar.engine.inputs import CachedHashes, Chunk, ScanPump, cached_chunks
from sidecar.engine.scan import ScanResult, hash_paths
from sidecar.engine.state import StateStore


@dataclass
class Scanned:
    files: dict[str, LocalFile] = field(default_factory=dict)
    errors: list[FileError] = field(default_factory=list)
    temps_removed: int = 0
    symlinks_skipped: int = 0
    specials_skipped: int = 0


def state_with_cache(directory: Path, cache: Mapping[str, HashCacheEntry]) -> StateStore:
    """A StateStore in `directory` whose hash cache holds `cache`, committed to state.db."""
    state = StateStore(directory, "s3://bucket/vol/", directory)
    state.load()
    for path, entry in sorted(cache.items()):
        state.note_hash(path, entry)
    state.commit()
    state.load()
    return state


async def scan_as_a_sync(
    root: Path,
    path_filter: PathFilter,
    cache: Mapping[str, HashCacheEntry] | None = None,
    hash_all: bool = True,
) -> Scanned:
    """Every file the sync's scan hands on, with the cached hash where size, mtime and inode
    match; with hash_all, every other file hashed (as a first sync does), an unreadable one
    an error that leaves the files."""
    out = ScanResult()
    files: dict[str, LocalFile] = {}
    with tempfile.TemporaryDirectory() as state_dir:
        state = state_with_cache(Path(state_dir), cache or {})
        # A PathFilter where the sync passes its ShardFilter: the walk asks the same of both.
        async with ScanPump(root, path_filter, out) as pump:  # type: ignore[arg-type]
            chunks: AsyncIterator[Chunk[LocalFile]] = cached_chunks(
                pump.chunks(), CachedHashes(state)
            )
            async for chunk in chunks:
                files.update(chunk)
    errors = list(out.errors)
    if hash_all:
        unhashed = [rel for rel, found in files.items() if found.hash == UNHASHED]
        with ThreadPoolExecutor(2) as executor:
            errors += await hash_into(root, files, unhashed, executor)
    return Scanned(files, errors, out.temps_removed, out.symlinks_skipped, out.specials_skipped)


async def hash_into(
    root: Path, files: dict[str, LocalFile], rels: list[str], executor: ThreadPoolExecutor
) -> list[FileError]:
    """Each of rels hashed in the map; one that cannot be read is
    an error and leaves the map."""
    digests = await hash_paths(root, [(rel, files[rel].size) for rel in rels], executor)
    errors = []
    for rel, digest in digests.items():
        if isinstance(digest, FileError):
            errors.append(digest)
            del files[rel]
        else:
            files[rel] = replace(files[rel], hash=digest)
    return errors
