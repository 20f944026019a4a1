"""Value types shared by the planner and the edges. Hashes are xxh3-128 hex strings."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


class Direction(enum.StrEnum):
    PULL = "pull"  # bucket -> local folder
    FINALIZE = "finalize"  # local folder -> bucket


# LocalFile.hash of a file seen but not hashed: not needed for a decision (see walk.py).
UNHASHED = ""


# A file's identity: (size, mtime_ns, inode). Equal identities: the file was not written
# since (the hash cache, and every "changed since the scan?" check before a write).
Identity = tuple[int, int, int]
# The hash cache's row of a path: the file's identity, then its content hash at that identity.
HashCacheEntry = tuple[int, int, int, str]
_OWNER_EXECUTES = 0o100  # stat.S_IXUSR: the mode bit the sync carries as "executable"


class Stat(Protocol):
    """What the sync reads of an os.stat_result."""

    @property
    def st_size(self) -> int: ...
    @property
    def st_mtime_ns(self) -> int: ...
    @property
    def st_ino(self) -> int: ...
    @property
    def st_mode(self) -> int: ...


def identity_of(st: Stat) -> Identity:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True, slots=True)
class LocalFile:
    size: int
    mtime_ns: int
    inode: int
    executable: bool
    hash: str

    @property
    def identity(self) -> Identity:
        return (self.size, self.mtime_ns, self.inode)

    @classmethod
    def of(cls, st: Stat, digest: str) -> LocalFile:
        """The file as stat saw it, with this content hash (UNHASHED: not read)."""
        return cls(
            st.st_size, st.st_mtime_ns, st.st_ino, bool(st.st_mode & _OWNER_EXECUTES), digest
        )


@dataclass(frozen=True, slots=True)
class RemoteObject:
    key: str
    size: int
    etag: str  # unquoted
    last_modified: str = ""  # as the listing shows it (compared as text, never parsed)
    hash: str | None = None  # from our metadata, when a HEAD/GET told us
    executable: bool | None = None  # from our metadata, when a HEAD/GET told us
    md5_matches_local: bool | None = None  # set by the resolver for foreign single-part objects


@dataclass(frozen=True, slots=True)
class BaseEntry:
    """What both sides agreed on at the last successful sync of one path."""

    size: int
    hash: str
    etags: tuple[str, ...]  # every ETag the server has shown for this content
    executable: bool = False
    # The listing's LastModified when known: rewriting the same bytes with another mode keeps
    # the ETag (the MD5) but not this, so a mode-only change is still seen.
    last_modified: str = ""
    # After our own write, until a listing shows its LastModified: the server's clock when it
    # answered the write (seconds since the epoch; 0 if unknown). A listed LastModified in a
    # later second is another writer's, even one that kept the ETag.
    written_at: int = 0


class ActionKind(enum.StrEnum):
    DOWNLOAD = "download"
    UPLOAD = "upload"
    DELETE_LOCAL = "delete-local"
    DELETE_REMOTE = "delete-remote"
    ADOPT = "adopt"  # both sides already equal: record it in BASE, move nothing
    FORGET = "forget"  # both sides gone: drop the BASE entry
    # Only the executable bit changed, the content is BASE's: never re-send equal bytes.
    SET_MODE_LOCAL = "set-mode-local"  # pull: chmod the local file
    SET_MODE_REMOTE = "set-mode-remote"  # finalize: rewrite the object's metadata in place


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    path: str
    local: LocalFile | None = None
    remote: RemoteObject | None = None
    # DOWNLOAD: the local file in the way is kept as a conflict copy (unless equal after all).
    # UPLOAD: the remote object in the way is copied to a conflict key first.
    keep_conflict_copy: bool = False
    conflict_copy: str | None = None  # relative path of the conflict copy


@dataclass(frozen=True, slots=True)
class Conflict:
    path: str
    kind: str  # "both-modified", "both-added", "modified-deleted"
    resolution: str  # what the sync did, in words
    copy: str | None = None  # where the losing version was kept

    def as_dict(self) -> dict[str, str | None]:
        return {
            "path": self.path,
            "kind": self.kind,
            "resolution": self.resolution,
            "copy": self.copy,
        }


@dataclass(frozen=True, slots=True)
class FileError:
    path: str  # relative path or object key
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(slots=True)
class Plan:
    direction: Direction
    actions: list[Action] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    errors: list[FileError] = field(default_factory=list)
    skipped: int = 0  # paths in sync already, or whose change belongs to the other direction
    deletes_blocked: str | None = None  # why deletions were withheld, if they were

    def of_kind(self, kind: ActionKind) -> list[Action]:
        return [action for action in self.actions if action.kind is kind]
