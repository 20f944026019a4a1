"""One sync, start to end: scan + list + load BASE, plan, check space, transfer, commit BASE.

The only module that knows the order of the steps. Entered by `sidecar pull|finalize --once`
directly and by the daemon for every /pull and /finalize.
"""

from __future__ import annotations

from sidecar.core.model import Direction
from sidecar.core.options import SyncConfig
from sidecar.core.progress import Progress
from sidecar.core.result import SyncResult


class SyncEngine:
    """Holds the S3 client and BASE for one (remote, local folder) pair.

    Usage:
        async with SyncEngine(config) as engine:
            result = await engine.run(Direction.PULL, progress=progress, dry_run=False)

    `run` never raises for sync failures: they are in SyncResult.fatal / .errors. One run at a
    time per engine (the daemon serialises). `in_flight` is the number of S3 requests now in
    flight; `retries_total` counts retried requests since the engine was created.
    """

    def __init__(self, config: SyncConfig) -> None:
        self.config = config
        self.in_flight = 0
        self.retries_total = 0

    async def __aenter__(self) -> SyncEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def run(
        self,
        direction: Direction,
        *,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> SyncResult:
        raise NotImplementedError("the sync engine is being built (issue 2)")
