"""The one error that ends a sync before it starts changing anything (sidecar/engine/sync.py
catches it into SyncResult.fatal); raised by its steps too (sidecar/engine/walk.py)."""


class FatalSync(Exception):
    """The sync cannot run at all; nothing was changed."""
