"""What BASE records, decided as values: the entry a carried-out action leaves, what a
listing teaches about an object that did not change, and when the hash cache's snapshot is
stale. The engine only stores what these return (sidecar/engine/sync.py, where the planner's
walk asks `learned` of each listed object, and sidecar/engine/execute.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from sidecar.core.model import (
    UNHASHED,
    Action,
    ActionKind,
    BaseEntry,
    HashCacheEntry,
    LocalFile,
    RemoteObject,
)
from sidecar.core.planner import Change, remote_change

# The last ETags the server showed for one content (a multipart upload's own, then rclone's
# MD5, ...): bounded, so a server that keeps renaming one object never grows its entry.
ETAGS_KEPT = 4


def agreed(size: int, digest: str, executable: bool, obj: RemoteObject) -> BaseEntry:
    """Both sides hold these bytes with this mode, and the bucket shows them as `obj`."""
    return BaseEntry(size, digest, (obj.etag,), executable, obj.last_modified)


def written(local: LocalFile, etags: tuple[str, ...], written_at: int) -> BaseEntry:
    """After our own write to the bucket. The new object's LastModified is learnt from the
    next listing; until then the server's clock at the write tells a later rewrite from ours."""
    return BaseEntry(local.size, local.hash, etags, local.executable, written_at=written_at)


def base_after(
    action: Action,
    local: LocalFile | None = None,
    etags: tuple[str, ...] = (),
    written_at: int = 0,
) -> BaseEntry:
    """The BASE entry once `action` is carried out. `local` is the file as it now is (the
    planned one when omitted) and `etags` how the server answered a write (the listed ETag
    when omitted). Deletes and FORGET leave no entry: asking for one is a bug."""
    kind, remote = action.kind, action.remote
    if local is None:
        local = action.local
    if local is None or kind in (ActionKind.DELETE_LOCAL, ActionKind.DELETE_REMOTE):
        raise ValueError(f"{action.path}: a {kind} leaves no BASE entry")
    if kind in (ActionKind.UPLOAD, ActionKind.SET_MODE_REMOTE):
        return written(local, etags, written_at)
    if remote is None or kind is ActionKind.FORGET:
        raise ValueError(f"{action.path}: a {kind} leaves no BASE entry")
    listed = replace(remote, etag=etags[0]) if etags else remote
    if kind is ActionKind.DOWNLOAD:
        return agreed(local.size, local.hash, local.executable, listed)
    # ADOPT, SET_MODE_LOCAL: the bucket's mode. A local mode that differs is then a local
    # change, which the next finalize pushes (BASE with the local mode would hide it for good).
    return agreed(local.size, local.hash, bool(remote.executable), listed)


def learned(entry: BaseEntry | None, obj: RemoteObject) -> BaseEntry | None:
    """How the server now shows an object that is unchanged by every test we can make (hash
    proven by a HEAD, or ETag known): its ETag and LastModified go into BASE, so the next
    sync decides from the listing alone, with no HEAD. None: nothing new to learn."""
    if entry is None or remote_change(obj, entry) is not Change.UNCHANGED:
        return None
    etags = entry.etags if obj.etag in entry.etags else (*entry.etags, obj.etag)[-ETAGS_KEPT:]
    if etags == entry.etags and obj.last_modified in ("", entry.last_modified):
        return None
    return replace(
        entry,
        etags=etags,
        last_modified=obj.last_modified,
        # A listed LastModified replaces our write's clock; without one, the clock stays.
        written_at=entry.written_at if not obj.last_modified else 0,
    )


def cache_entry(local: LocalFile) -> HashCacheEntry:
    """The hash cache's row of a hashed file: its identity and the hash it had then."""
    return (local.size, local.mtime_ns, local.inode, local.hash)


def cache_holds(cache: Mapping[str, HashCacheEntry], files: Mapping[str, LocalFile]) -> bool:
    """Whether the hash cache is exactly what the scan saw (the no-op case: its snapshot need
    not be rewritten), checked without building a second map of a million entries."""
    hashed = 0
    for path, local in files.items():
        if local.hash == UNHASHED:
            continue
        hashed += 1
        if cache.get(path) != cache_entry(local):
            return False
    return hashed == len(cache)
