"""The journal after kill -9: every record reaches the OS as it is made (no buffer waiting for
a later record), and a multipart upload's record is on disk before its first part is sent, so
the next run aborts what a killed run left open and never mistakes our own uploads for
someone else's (issue 9, item 3).

The crash test pins a real `sidecar finalize --once` at a known point with the counting
proxy's gate (every UploadPart held, never answered), kills it with SIGKILL and reads the
journal as the next run will: from the disk.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from sidecar.core.model import BaseEntry
from sidecar.engine.state import StateStore
from tests.bench.countproxy import CountingProxy
from tests.conftest import sidecar_args
from tests.support.cli_support import (
    SIZING,
    Volume,
    data_of,
    keyed,
    kill9_when,
    running,
    wait_until,
    write_tree,
)

MiB = 1024**2
ENTRY = BaseEntry(3, "0" * 32, ("e" * 32,), False, "")


def journal_records(state_dir: Path) -> list[list[Any]]:
    """Every whole record in the journal(s) under state_dir, read from the file."""
    records = []
    for journal in state_dir.glob("*/journal.jsonl"):
        for line in journal.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a torn last line
                records.append(json.loads(line))
    return records


def store(tmp_path: Path) -> StateStore:
    state = StateStore(tmp_path / "state", "s3://b/p/", Path("/data"))
    state.load()
    return state


def test_each_record_is_in_the_file_as_soon_as_it_is_made(tmp_path: Path) -> None:
    state = store(tmp_path)
    for number in range(5):  # back to back: no later record, no timer, pushes them out
        state.set_base(f"f{number}", ENTRY)
        on_disk = [r[1] for r in journal_records(tmp_path)]
        assert on_disk == [f"f{n}" for n in range(number + 1)]
    state.close_journal()


async def test_a_multipart_record_is_fsynced_before_upload_started_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = store(tmp_path)
    state.set_base("before", ENTRY)
    synced: list[bytes] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        if os.path.isfile(f"/proc/self/fd/{fd}"):
            synced.append(Path(f"/proc/self/fd/{fd}").read_bytes())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    await state.upload_started("upload-1", "pre/big.bin")
    assert any(b'"mpu","upload-1"' in content for content in synced), synced
    state.close_journal()


def test_a_torn_last_line_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    state = store(tmp_path)
    state.set_base("kept", ENTRY)
    state.close_journal()
    with open(state.journal_path, "a") as journal:
        journal.write('["set","torn",3,"00')  # a node crash mid-write
    again = store(tmp_path)
    again.set_base("after", ENTRY)
    again.close_journal()
    assert set(store(tmp_path).base) == {"kept", "after"}


def test_kill_during_multipart_uploads_loses_no_record_and_leaves_no_orphan(
    mvol: Volume,
) -> None:
    """60 small uploads done and two multipart uploads whose parts are held by the proxy:
    kill -9, and the journal on disk holds all 62 records; the next run aborts both uploads,
    finishes, and makes no conflict copy of this replica's own uploads."""
    files = {f"small/f{i:02d}.txt": f"small {i}\n".encode() for i in range(60)}
    files["big1.bin"] = data_of(12 * MiB, "big1")
    files["big2.bin"] = data_of(12 * MiB, "big2")
    local, state, logs = mvol.work / "local", mvol.work / "state", mvol.work / "logs"
    write_tree(local, files)
    client = mvol.server.client()
    upstream = urlsplit(mvol.server.endpoint)
    assert upstream.hostname and upstream.port
    open_uploads = mvol.open_uploads

    def small_objects() -> int:
        listed = client.list_objects_v2(Bucket=mvol.bucket, Prefix="pre/small/")
        return int(listed.get("KeyCount", 0))

    proxy = CountingProxy(upstream.hostname, upstream.port, hold={"UploadPart"}).start()
    try:
        env = mvol.env(AWS_ENDPOINT_URL=proxy.endpoint)
        args = sidecar_args("finalize", mvol.remote, local, state, *SIZING)
        with running(args, env, logs) as proc:
            wait_until(
                proc,
                lambda: (
                    proxy.counts()["UploadPart"] >= 2
                    and len(open_uploads()) == 2
                    and small_objects() == 60
                ),
                "both multipart uploads sent a part and the 60 small files are in the bucket",
                logs,
            )
            uploads = open_uploads()

            def all_recorded() -> bool:
                records = journal_records(state)
                started = {r[1] for r in records if r[0] == "mpu"}
                done = {r[1] for r in records if r[0] == "set"}
                return started >= set(uploads) and done >= {p for p in files if "small" in p}

            # The bound is 100 ms; the wait is generous so a loaded machine cannot fail it.
            kill9_when(proc, all_recorded, "all 62 records reached the journal file", logs)
    finally:
        proxy.stop()

    records = journal_records(state)
    assert {r[1]: r[2] for r in records if r[0] == "mpu"} == uploads
    assert open_uploads() == uploads, "the kill left the two uploads open"

    second = mvol.finalize(local, state, *SIZING)
    assert second.code == 0, second
    assert open_uploads() == {}, "an upload of the killed run was left behind (orphan)"
    assert second.summary["conflicts"] == [], second
    assert mvol.objects() == keyed(files), "conflict copies or missing objects"
