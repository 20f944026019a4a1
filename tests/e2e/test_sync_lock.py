"""One sync at a time per state and per folder (issue 9, item 17, the lock half).

Real `sidecar pull --once` subprocesses against moto: three at once on one folder and state
make exactly the objects (no conflict copies); with --lock-timeout 0 a second one fails at
once naming the holder, through the state lock (same state) and the folder lock (another
state folder on the same folder). The holder is pinned at a known point by the counting
proxy's gate (its GetObject held). In-process: an engine that keeps BASE in memory (the
daemon) re-reads it when another process synced in between.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from sidecar.core.model import Direction
from sidecar.engine.sync import SyncEngine
from tests.bench.countproxy import CountingProxy
from tests.conftest import S3Server, sidecar_args
from tests.support.cli_support import (
    REPO,
    Run,
    Volume,
    hashed,
    sigkill,
    start_cli,
    tree,
    wait_until,
)
from tests.support.engine_support import config, sync, write

FILES = {f"d{i % 3}/f{i:02d}.txt": f"object {i}\n".encode() * 50 for i in range(20)}


@pytest.fixture
def mvol(moto_s3: S3Server, workdir: Path) -> Volume:
    vol = Volume(moto_s3, moto_s3.new_bucket(), workdir)
    for rel, body in FILES.items():
        vol.put(f"{vol.prefix}/{rel}", body)
    return vol


def test_three_concurrent_one_shot_pulls_make_exactly_the_objects(mvol: Volume) -> None:
    local, state = mvol.work / "local", mvol.work / "state"
    args = sidecar_args("pull", mvol.remote, local, state)
    procs = [
        subprocess.Popen(
            args,
            env=mvol.env(),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"{out}\n{err}"
    assert tree(local) == hashed(FILES), "conflict copies or missing files"
    moved = sorted(Run(args, 0, out, err, 0).summary["files_transferred"] for out, err in outputs)
    assert moved == [0, 0, 20], "exactly one of the three pulled; the others found it done"


def test_a_second_sync_fails_at_once_naming_the_holder(mvol: Volume) -> None:
    local, logs = mvol.work / "local", mvol.work / "logs"
    upstream = urlsplit(mvol.server.endpoint)
    assert upstream.hostname and upstream.port
    proxy = CountingProxy(upstream.hostname, upstream.port, hold={"GetObject"}).start()
    try:
        env = mvol.env(AWS_ENDPOINT_URL=proxy.endpoint)
        holder = start_cli(sidecar_args("pull", mvol.remote, local, mvol.work / "state"), env, logs)
        try:
            wait_until(
                holder, lambda: proxy.counts()["GetObject"] >= 1, "the pull is downloading", logs
            )
            same_state = mvol.pull(local, mvol.work / "state", "--lock-timeout", "0")
            other_state = mvol.pull(
                local, mvol.work / "other-state", env=mvol.env(SIDECAR_LOCK_TIMEOUT="0")
            )
        finally:
            sigkill(holder)
    finally:
        proxy.stop()

    for run, what in ((same_state, "the state"), (other_state, "the local folder")):
        assert run.code == 1, run
        line = run.summary["fatal"]
        assert line.startswith("another sync is running:") and what in line, run
        assert f"pid {holder.pid}" in line and "not waiting (--lock-timeout 0)" in line, run
        assert "Traceback" not in run.err, run
    assert "sidecar pull --once" in same_state.summary["fatal"], same_state

    # The holder died (kill -9): its locks went with it; nothing waits for a dead process.
    after = mvol.pull(local, mvol.work / "state", "--lock-timeout", "0")
    assert after.code == 0, after
    assert tree(local) == hashed(FILES)


async def test_an_engine_rereads_base_another_process_changed_between_its_syncs(
    mvol: Volume, s3_env, workdir: Path
) -> None:  # type: ignore[no-untyped-def]
    """The daemon's engine keeps BASE in memory; a `--once` pull on the same folder and state
    in between must not leave it deciding from a stale BASE (a false conflict here)."""
    s3_env(mvol.server)
    cfg = config(mvol.bucket, workdir / "local", workdir / "state", prefix="pre/")
    async with SyncEngine(cfg) as daemon_engine:
        assert (await daemon_engine.run(Direction.PULL)).ok
        mvol.put("pre/d0/f00.txt", b"changed in the bucket\n")
        assert (await sync(cfg, Direction.PULL)).files_transferred == 1  # the other process
        write(workdir / "local/d0/f00.txt", b"then edited locally\n")
        result = await daemon_engine.run(Direction.FINALIZE)
    assert result.ok and result.conflicts == [], result.as_dict()
    assert result.files_transferred == 1


async def test_a_cancelled_sync_keeps_its_locks_until_its_state_commit_thread_ends(
    mvol: Volume, s3_env, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A commit runs in a thread that a cancel cannot stop; with the locks let go at the
    cancel, the next sync started beside it and the old commit unlinked its journal."""
    import asyncio
    import threading

    from sidecar.engine.lock import LockBusy, SyncLock
    from sidecar.engine.state import StateStore

    s3_env(mvol.server)
    local, state = workdir / "local", workdir / "state"
    loop = asyncio.get_running_loop()
    entered, release = asyncio.Event(), threading.Event()
    real_commit = StateStore.commit

    def held_commit(self: StateStore) -> bool:
        loop.call_soon_threadsafe(entered.set)
        release.wait(60)
        return real_commit(self)

    monkeypatch.setattr(StateStore, "commit", held_commit)
    async with SyncEngine(config(mvol.bucket, local, state, prefix="pre/")) as engine:
        running = asyncio.create_task(engine.run(Direction.PULL))
        await entered.wait()
        running.cancel()
        await asyncio.wait({running}, timeout=1.0)
        try:
            assert not running.done(), "the sync ended while its commit thread still ran"
            with pytest.raises(LockBusy):
                await SyncLock(engine.state.directory, local, 0).acquire_state("test")
        finally:
            release.set()
        with pytest.raises(asyncio.CancelledError):
            await running
        other = SyncLock(engine.state.directory, local, 0)
        await other.acquire_state("test")  # free once the thread has ended
        await other.acquire_folder()
        other.release()


async def test_a_sync_that_times_out_on_the_lock_leaves_the_holders_journal_alone(
    mvol: Volume, s3_env, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Two engines on one state folder (two syncs in one process, as a CronJob run and a
    manual Job on one PVC are in two): the one that never got the lock must not close,
    truncate or unlink the journal the holder is writing, and says the lock was busy."""
    import asyncio
    import os
    from dataclasses import replace

    from sidecar.engine.state import StateStore
    from sidecar.engine.transfer import Transfers

    s3_env(mvol.server)
    local, state = workdir / "local", workdir / "state"
    held = {rel for rel in FILES if rel.startswith("d2/")}
    release = asyncio.Event()
    real_download = Transfers.download

    async def gated_download(self: Transfers, action):  # type: ignore[no-untyped-def]
        if action.path in held:
            await release.wait()
        return await real_download(self, action)

    monkeypatch.setattr(Transfers, "download", gated_download)
    cfg = config(mvol.bucket, local, state, prefix="pre/")
    async with SyncEngine(cfg) as holder, SyncEngine(replace(cfg, lock_timeout=0.3)) as waiter:
        running = asyncio.create_task(holder.run(Direction.PULL))
        journal = holder.state.journal_path
        try:
            for _ in range(600):  # the finished downloads' records reach the journal
                if journal.exists() and journal.read_bytes().count(b"\n") >= 5:
                    break
                assert not running.done(), running.result().as_dict()
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the holder never journaled its first downloads")
            fd = holder.state._journal
            assert fd is not None
            before = (journal.read_bytes(), os.stat(journal).st_ino)

            refused = await waiter.run(Direction.PULL)

            assert refused.fatal is not None and refused.fatal.startswith(
                "another sync is running:"
            ), refused.as_dict()
            assert "(--lock-timeout)" in refused.fatal, refused.fatal
            assert (journal.read_bytes(), os.stat(journal).st_ino) == before
            assert holder.state._journal == fd and os.fstat(fd).st_ino == before[1]
            # Killed now, the holder's next run replays the same records.
            replayed = StateStore(state.parent / "replay", cfg.remote_url, local)
            replayed.directory.mkdir()
            (replayed.directory / journal.name).write_bytes(before[0])
            replayed.load()
            assert len(replayed.base) == before[0].count(b'["set"')
        finally:
            release.set()
        result = await running
    assert result.ok and result.files_transferred == len(FILES), result.as_dict()
    assert tree(local) == hashed(FILES)
    assert not journal.exists(), "committed and emptied at the end"
    async with SyncEngine(cfg) as after:
        again = await after.run(Direction.PULL)
    assert again.ok and again.files_transferred == 0 and again.conflicts == [], again.as_dict()
    assert len(after.state.base) == len(FILES)
