"""The engine's worker threads, which a cancelled sync waits for before it lets go of its locks.

A thread cannot be cancelled: when the task awaiting `run_in_executor` is cancelled, the job
(a state commit, a rename into the folder) runs on. If the sync's locks were released at
that moment, the next sync would start beside it: the old commit would unlink the new
sync's journal (its records lost) or two commits would write one temp file at once.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

MAX_IO_THREADS = 32
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota
    (a pod's CPU limit, which os.cpu_count() does not see)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        with open(CGROUP_CPU_MAX) as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def default_io_threads() -> int:
    """--hash-threads auto: a thread per core hashes, two more keep renames, commits and
    reads going meanwhile (4 on 2 cores, what was fixed before)."""
    return min(usable_cores() + 2, MAX_IO_THREADS)


class SettlingExecutor(ThreadPoolExecutor):
    """A thread pool that knows its unfinished jobs and can wait for all of them."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._unfinished: set[Future[Any]] = set()
        self._guard = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future = super().submit(fn, *args, **kwargs)
        with self._guard:
            self._unfinished.add(future)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, future: Future[Any]) -> None:
        with self._guard:
            self._unfinished.discard(future)

    async def settle(self, drop_queued: bool = False) -> None:
        """Until every job submitted so far has ended (with drop_queued, the jobs no thread
        has started yet are dropped: a failed sync's hashing queue is not worked off). A
        cancellation meanwhile is held until then and raised after: the caller's locks must
        outlive the threads."""
        with self._guard:
            pending = list(self._unfinished)
        if not pending:
            return
        if drop_queued:
            for future in pending:
                future.cancel()  # succeeds only for a job not started
        waiting = asyncio.ensure_future(asyncio.wait([asyncio.wrap_future(f) for f in pending]))
        cancelled = False
        while not waiting.done():
            try:
                await asyncio.shield(waiting)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
