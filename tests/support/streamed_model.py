"""The sync's decisions as they were made before the inputs streamed (issue 12): the scan, the
listing and BASE each as a map, the files a decision needs hashed, the HEADs asked, what the
listing teaches learnt, then core.planner.plan over the three maps. The streamed engine must
decide the same (tests/integration/test_streamed_inputs.py). This is the reference only: the
map scan (_map_scan, scanning.hash_into) is test code, the product's scan streams."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar.core.agreement import learned
from sidecar.core.backup import is_bookkeeping
from sidecar.core.model import (
    UNHASHED,
    Action,
    BaseEntry,
    Direction,
    FileError,
    HashCacheEntry,
    LocalFile,
    RemoteObject,
)
from sidecar.core.options import SyncConfig
from sidecar.core.paths import BadKey, folder_markers, key_to_relpath
from sidecar.core.planner import DeletePolicy, needs_remote_hash, plan
from sidecar.core.shard import ShardFilter
from sidecar.engine.hashing import md5_file
from sidecar.engine.scan import ScanResult, walk_in_key_order
from sidecar.engine.sync import SyncEngine
from sidecar.engine.walk import _PLAIN_MD5, _hash_by_download
from sidecar.s3 import Store, read_labels
from tests.support.scanning import hash_into

OLD_NS = 1_600_000_000 * 10**9
POOL = ["a", "a-b", "a.b", "a/b", "a/c/d", "a0", "b/x", "b-/y", "b.z", "c", "c/d", "e/f/g"]
CONTENTS = [b"", b"x", b"y", b"xy", b"other", b"longer content"]


@dataclass
class Expected:
    actions: list[tuple[Any, str, bool]]
    conflicts: list[str]
    deletes_blocked: str | None
    errors: list[str]


def _write(root: Any, path: str, data: bytes, executable: bool, mtime_ns: int) -> None:
    target = root / path
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            return
        target.write_bytes(data)
    except (NotADirectoryError, FileExistsError, IsADirectoryError):
        return  # a file where a folder is wanted, or the other way: left as it is
    os.chmod(target, 0o755 if executable else 0o644)
    os.utime(target, ns=(mtime_ns, mtime_ns))


async def random_world(rng: random.Random, client: Any, bucket: str, cfg: SyncConfig) -> None:
    """A folder and a bucket that agreed once (a finalize), then both changed."""
    root = cfg.local_dir
    root.mkdir(parents=True, exist_ok=True)
    for path in rng.sample(POOL, rng.randrange(4, len(POOL))):
        _write(root, path, rng.choice(CONTENTS), rng.random() < 0.2, OLD_NS)
    async with SyncEngine(cfg) as engine:
        result = await engine.run(Direction.FINALIZE)
    assert result.ok or result.errors, result
    for step in range(rng.randrange(3, 12)):
        path = rng.choice(POOL)
        roll = rng.random()
        if roll < 0.25:
            _write(root, path, rng.choice(CONTENTS), rng.random() < 0.3, OLD_NS + step * 10**9)
        elif roll < 0.4:
            if (root / path).is_file():
                (root / path).unlink()
        elif roll < 0.7:
            client.put_object(Bucket=bucket, Key=cfg.prefix + path, Body=rng.choice(CONTENTS))
        elif roll < 0.85:
            client.delete_object(Bucket=bucket, Key=cfg.prefix + path)
        else:
            folder = path.rpartition("/")[0] or path
            client.put_object(Bucket=bucket, Key=cfg.prefix + folder + "/", Body=b"")


def _map_scan(
    root: Path, path_filter: ShardFilter, hash_cache: Mapping[str, HashCacheEntry]
) -> tuple[dict[str, LocalFile], list[FileError]]:
    """The reference scan: the whole folder as one map, a file's cached hash looked up and
    taken where its size, mtime and inode match (what the scan did before it streamed)."""
    out = ScanResult()
    files: dict[str, LocalFile] = {}
    for rel, local in walk_in_key_order(root, path_filter, out):
        row = hash_cache.get(rel)
        files[rel] = replace(local, hash=row[3]) if row and row[:3] == local.identity else local
    return files, out.errors


async def _resolve(
    store: Store,
    cfg: SyncConfig,
    executor: ThreadPoolExecutor,
    lf: LocalFile | None,
    obj: RemoteObject,
    path: str,
    direction: Direction,
) -> RemoteObject:
    """What StreamedWalk._ask_bucket made of a listed object before the streaming."""
    info = await store.head(obj.key)
    labels = read_labels(info.metadata)
    if labels.hash:
        return replace(obj, hash=labels.hash, executable=labels.executable)
    if lf is None:
        return obj
    if _PLAIN_MD5.match(obj.etag) and not info.etag_is_opaque:
        md5 = await asyncio.get_running_loop().run_in_executor(
            executor, md5_file, cfg.local_dir / path
        )
        return replace(obj, md5_matches_local=(md5 == obj.etag))
    if direction is Direction.FINALIZE:
        return await _hash_by_download(store, obj)
    return obj


async def map_plan(cfg: SyncConfig, direction: Direction) -> Expected:
    path_filter = ShardFilter(cfg.include, cfg.exclude, "", cfg.shard)
    async with SyncEngine(cfg) as engine:
        engine.state.load()
        store = await engine.store()
        with ThreadPoolExecutor(2) as executor:
            local, scan_errors = _map_scan(cfg.local_dir, path_filter, engine.state.hash_cache)
            remote: dict[str, RemoteObject] = {}
            errors = [e.path for e in scan_errors]
            async for page in store.list(cfg.prefix):
                for item in page:
                    try:
                        relpath = key_to_relpath(cfg.prefix, item.key)
                    except BadKey:
                        errors.append(item.key)
                        continue
                    if relpath is None or is_bookkeeping(relpath) or not path_filter.wants(relpath):
                        continue
                    remote[relpath] = RemoteObject(
                        item.key, item.size, item.etag, item.last_modified
                    )
            for marker in folder_markers(remote):
                del remote[marker]
            base: dict[str, BaseEntry] = {
                p: e for p, e in engine.state.base.items() if path_filter.wants(p)
            }
            unreadable = await hash_into(
                cfg.local_dir,
                local,
                [p for p, f in local.items() if f.hash == UNHASHED and (p in base or p in remote)],
                executor,
            )
            errors += [e.path for e in unreadable if e.path not in errors]
            for path in sorted(set(local) | set(remote) | set(base)):
                lf, ro, be = local.get(path), remote.get(path), base.get(path)
                if needs_remote_hash(lf, ro, be):
                    assert ro is not None
                    remote[path] = ro = await _resolve(
                        store, cfg, executor, lf, ro, path, direction
                    )
                if ro is not None and (entry := learned(be, ro)) is not None:
                    base[path] = entry
        policy = DeletePolicy(
            allowed=not errors,
            why_not="the scan, listing or .syncignore had errors (see errors)",
            max_fraction=cfg.max_delete_fraction,
            force=cfg.force_delete,
        )
        decided = plan(direction, local, remote, base, datetime.now(UTC), policy)
    actions: list[Action] = decided.actions
    return Expected(
        [(a.kind, a.path, a.keep_conflict_copy) for a in actions],
        sorted(c.path for c in decided.conflicts),
        decided.deletes_blocked,
        sorted(errors + [e.path for e in decided.errors]),
    )
