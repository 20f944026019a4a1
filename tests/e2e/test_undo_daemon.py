"""History and undo through a running daemon (GET /history, POST /undo) and its CLI verbs,
against rclone serve s3 (no versioning: copy backups)."""

from __future__ import annotations

import json

from sidecar.locals3 import LocalS3
from tests.support.daemon_support import StartDaemon, http_json


def test_history_and_undo_through_the_daemon(s3: LocalS3, start_daemon: StartDaemon) -> None:
    daemon = start_daemon(s3, env={"SIDECAR_BACKUP": "auto"})  # the product's default
    daemon.wait_ready()
    (daemon.local_dir / "a.txt").write_bytes(b"a one")
    (daemon.local_dir / "b.txt").write_bytes(b"b one")
    assert http_json("POST", daemon.control + "/finalize")[0] == 200
    (daemon.local_dir / "a.txt").write_bytes(b"a two")
    (daemon.local_dir / "b.txt").unlink()
    status, pushed = http_json("POST", daemon.control + "/finalize")
    assert status == 200, pushed
    sync_id = pushed["sync_id"]

    status, history = http_json("GET", daemon.control + "/history")
    assert status == 200, history
    newest = history["syncs"][0]
    assert newest["sync_id"] == sync_id
    assert (newest["operation"], newest["replaced"], newest["deleted"]) == ("finalize", 1, 1)
    sidecar = daemon.client

    listed = sidecar("history")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].startswith(sync_id)
    assert json.loads(sidecar("history", "--json").stdout)["syncs"][0]["sync_id"] == sync_id

    dry = sidecar("undo", sync_id, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "put-back\ta.txt" in dry.stdout and "put-back\tb.txt" in dry.stdout
    assert (daemon.bucket_dir / "a.txt").read_bytes() == b"a two"

    try:
        status, report = http_json("POST", daemon.control + f"/undo?sync={sync_id}")
    except TimeoutError:
        raise AssertionError(daemon.log()[-6000:]) from None
    assert status == 200, report
    assert (daemon.bucket_dir / "a.txt").read_bytes() == b"a one"
    assert (daemon.bucket_dir / "b.txt").read_bytes() == b"b one"
    # The restored bytes come home with the next pull; nothing is pushed back.
    status, pulled = http_json("POST", daemon.control + "/pull")
    assert status == 200 and pulled["files_transferred"] == 2, pulled
    assert (daemon.local_dir / "a.txt").read_bytes() == b"a one"
    assert not (daemon.local_dir / ".netvol").exists()

    redo = sidecar("undo", report["sync_id"])
    assert redo.returncode == 0, redo.stderr
    assert (daemon.bucket_dir / "a.txt").read_bytes() == b"a two"
    assert not (daemon.bucket_dir / "b.txt").exists()

    missing = sidecar("undo", "20260101T000000000Z-abcdef")
    assert missing.returncode == 1 and "no sync" in missing.stderr
