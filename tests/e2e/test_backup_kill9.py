"""kill -9 in the middle of a finalize that replaces and deletes (issue 14 item 7): every
object it replaced or deleted is still recoverable, from `.netvol/backup/` (copy mode), and
a rerun and an undo of it lose nothing either."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime

from sidecar.core.backup import BACKUP_DIR
from tests.conftest import sidecar_args
from tests.support.cli_support import (
    Volume,
    data_of,
    kill9_when,
    sha,
    start_cli,
    write_tree,
)

FILES = 120


def recoverable(vol: Volume, originals: dict[str, str]) -> list[str]:
    """The paths whose original version is neither current nor in a backup."""
    objects = vol.objects()
    prefix = vol.prefix + "/"
    kept: dict[str, set[str]] = {}
    for key, digest in objects.items():
        rel = key[len(prefix) :]
        if rel.startswith(BACKUP_DIR):
            path = rel[len(BACKUP_DIR) :].split("/", 1)[1]
            kept.setdefault(path, set()).add(digest)
    return [
        path
        for path, digest in originals.items()
        if objects.get(prefix + path) != digest and digest not in kept.get(path, set())
    ]


def settled(vol: Volume) -> dict[str, str]:
    """The bucket once the server is done with what a killed run sent (a request it had
    fully received is still applied after the kill)."""
    last = vol.objects()
    while True:
        time.sleep(0.5)
        now = vol.objects()
        if now == last:
            return now
        last = now


def test_kill9_mid_finalize_leaves_every_replaced_object_recoverable(mvol: Volume) -> None:
    local, state = mvol.work / "local", mvol.work / "state"
    files = {f"f{i:03d}.bin": data_of(2000 + i, i) for i in range(FILES)}
    write_tree(local, files)
    env = mvol.env(SIDECAR_BACKUP="copy")
    assert mvol.finalize(local, state, env=env).code == 0
    originals = {path: sha(body) for path, body in files.items()}
    time.sleep(1.1)  # history times are to the second
    before_kill = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    time.sleep(1.1)

    # Every file replaced, every fifth one deleted: one backup copy each.
    write_tree(local, {p: data_of(2000 + i, f"v2-{i}") for i, p in enumerate(files) if i % 5})
    for i, path in enumerate(files):
        if not i % 5:
            (local / path).unlink()
    logs = mvol.work / "logs"
    args = sidecar_args(
        "finalize", mvol.remote, local, state, "--concurrency", "1", "--force-delete"
    )
    proc = start_cli(args, env, logs)

    def some_backups() -> bool:
        return any(BACKUP_DIR in key for key in mvol.keys())  # noqa: SIM118 (a Volume)

    kill9_when(proc, some_backups, "the first backup copy", logs)
    assert recoverable(mvol, originals) == []
    # How many objects the killed run replaced before the kill landed depends on the
    # machine's load (a loaded one lets it replace several): the rerun replaces the rest.
    objects = settled(mvol)
    left = sum(
        objects.get(f"{mvol.prefix}/{path}") == originals[path]
        for i, path in enumerate(files)
        if i % 5
    )

    rerun = mvol.finalize(local, state, "--force-delete", env=env)
    assert rerun.code == 0, rerun.err
    assert recoverable(mvol, originals) == []
    history = subprocess.run(
        [*sidecar_args("history", mvol.remote, local, state), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert history.returncode == 0, history.stderr
    newest = json.loads(history.stdout)["syncs"][0]
    assert (newest["operation"], newest["replaced"]) == ("finalize", left)

    # The rerun is undone in one go; then nothing of the first push is missing.
    undo = sidecar_args("undo", mvol.remote, local, state)
    undone = subprocess.run(
        [*undo[:4], newest["sync_id"], *undo[4:]], env=env, capture_output=True, text=True
    )
    assert undone.returncode in (0, 1), undone.stderr  # 1: paths the killed run had changed
    assert "put-back\t" in undone.stdout

    # restore --at a time before the killed run: the killed run wrote no record, its backups
    # count all the same; every file is back as it was.
    restore = sidecar_args("restore", mvol.remote, local, state)
    restored = subprocess.run(
        [*restore[:4], "", "--at", before_kill, *restore[4:]],
        env=env,
        capture_output=True,
        text=True,
    )
    assert restored.returncode == 0, restored.stderr
    objects = mvol.objects()
    data = {k[len(mvol.prefix) + 1 :]: v for k, v in objects.items() if "/.netvol/" not in k}
    assert data == originals
