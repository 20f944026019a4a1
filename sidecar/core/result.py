"""The summary of one sync: what the CLI prints, /pull answers and /status remembers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sidecar.core.model import Action, Conflict, Direction, FileError


@dataclass(slots=True)
class SyncResult:
    operation: Direction
    dry_run: bool = False
    files_transferred: int = 0
    bytes_transferred: int = 0
    files_deleted: int = 0
    files_skipped: int = 0  # already in sync, or changed only on the side this op does not write
    files_adopted: int = 0  # equal on both sides already; recorded, nothing moved
    conflicts: list[Conflict] = field(default_factory=list)
    errors: list[FileError] = field(default_factory=list)
    deletes_blocked: str | None = None
    fatal: str | None = None  # the sync could not run at all (credentials, bucket, disk...)
    retries: int = 0
    seconds: float = 0.0
    planned: list[Action] = field(default_factory=list)  # filled for dry runs
    shard: str | None = None  # "I/N" of a sharded sync (--shard)
    notes: list[str] = field(default_factory=list)  # worth knowing, not a failure
    sync_id: str | None = None  # of a sync that changed something (history, undo)

    @property
    def ok(self) -> bool:
        return self.fatal is None and not self.errors and self.deletes_blocked is None

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "operation": str(self.operation),
            "ok": self.ok,
            "dry_run": self.dry_run,
            "files_transferred": self.files_transferred,
            "bytes_transferred": self.bytes_transferred,
            "files_deleted": self.files_deleted,
            "files_skipped": self.files_skipped,
            "files_adopted": self.files_adopted,
            "conflicts": [c.as_dict() for c in self.conflicts],
            "errors": [e.as_dict() for e in self.errors],
            "deletes_blocked": self.deletes_blocked,
            "fatal": self.fatal,
            "retries": self.retries,
            "seconds": round(self.seconds, 3),
        }
        if self.shard is not None:
            data["shard"] = self.shard
        if self.notes:
            data["notes"] = list(self.notes)
        if self.sync_id is not None:
            data["sync_id"] = self.sync_id
        if self.dry_run:
            data["plan"] = [
                {"action": str(a.kind), "path": a.path, "conflict_copy": a.conflict_copy}
                for a in self.planned
            ]
        return data

    def one_line(self) -> str:
        verb = "would transfer" if self.dry_run else "transferred"
        text = (
            (f"shard {self.shard} " if self.shard else "")
            + f"{self.operation}: {verb} {self.files_transferred} files "
            f"({self.bytes_transferred} bytes), deleted {self.files_deleted}, "
            f"skipped {self.files_skipped}, conflicts {len(self.conflicts)}, "
            f"errors {len(self.errors)} in {self.seconds:.2f}s"
        )
        if self.sync_id:
            text += f" (sync {self.sync_id})"
        if self.fatal:
            text += f"; FAILED: {self.fatal}"
        if self.deletes_blocked:
            text += f"; {self.deletes_blocked}"
        return text
