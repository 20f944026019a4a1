"""What BASE records, decided as values: the entry a carried-out action leaves, what a
listing teaches about an object that did not change, and when the hash cache's snapshot is
stale. The engine only stores what these return (sidecar/engine/walk.py, where the planner's
walk asks `learned` of each listed object, and sidecar/engine/execute.py).
"""

from __future__ import annotations

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


# How much older than the hashing a file's mtime must be for its cache row to be trusted
# ("racy clean", as git calls it): a write in the same timestamp tick as the hash leaves size,
# mtime and inode as they were, and the stale hash would hide the edit for good. A tick is a
# jiffy (1-10 ms) before Linux 6.13, 1 s on ext3/HFS+, 2 s on FAT/exFAT, the coarsest we meet;
# the margin also absorbs the kernel's coarse clock lagging the one we read. A file changed
# within it is hashed again by the next scan, once it has aged: a no-op sync of an old tree
# still hashes nothing. Not covered: a network filesystem whose server clock is >2 s behind.
RACY_MARGIN_NS = 2_000_000_000


def racy(mtime_ns: int, hashed_at_ns: int) -> bool:
    """Whether a file with this mtime, hashed from `hashed_at_ns` on (a clock read before its
    bytes were read), could still be rewritten with the same mtime: its hash is not cached."""
    return mtime_ns >= hashed_at_ns - RACY_MARGIN_NS


def cache_entry(local: LocalFile) -> HashCacheEntry:
    """The hash cache's row of a hashed file: its identity and the hash it had then."""
    return (local.size, local.mtime_ns, local.inode, local.hash)


def cacheable(local: LocalFile, hashed_at_ns: int) -> bool:
    """Whether a scanned file's hash belongs in the cache: hashed, and not racy."""
    return local.hash != UNHASHED and not racy(local.mtime_ns, hashed_at_ns)
