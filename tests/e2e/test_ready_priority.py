"""--ready-when priority and /wait (issue 13) through a real `sidecar serve` against a real
`rclone serve s3` on loopback. A KeyGate proxy holds the GETs of the big files, so "the
background pull is still going" is a state the test holds, not a race it hopes to win."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sidecar.locals3 import LocalS3, free_port
from tests.support.daemon_support import (
    Daemon,
    StartDaemon,
    client_argv,
    http,
    http_json,
    run_client,
)
from tests.support.gateproxy import KeyGate
from tests.support.s3client import s3_client

MiB = 1024 * 1024
PRIORITY = ("--ready-when", "priority", "--priority-max-size", "1MiB")


def put(bucket: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = bucket / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def volume() -> dict[str, bytes]:
    """Small files (the priority set), a big checkpoint a pattern names, big files after."""
    return {
        "notes.ipynb": b'{"cells": []}',
        "src/train.py": b"print('hi')\n",
        "models/m.ckpt": b"c" * (2 * MiB),  # --priority '*.ckpt': before ready, whatever size
        "data/big0.bin": b"0" * (2 * MiB),
        "data/big1.bin": b"1" * (3 * MiB),
    }


def gate(s3: LocalS3, *held: str) -> KeyGate:
    return KeyGate(s3.endpoint, held)  # started by `with`


def metric(daemon: Daemon, name: str) -> float | None:
    text = http("GET", daemon.probe + "/metrics")[1]
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def last(daemon: Daemon, operation: str) -> dict | None:
    return daemon.status()["last_results"].get(operation)


def background_complete(daemon: Daemon) -> None:
    daemon.wait_until(
        lambda: daemon.status()["background_pull"]["state"] == "complete", 30, "the rest"
    )


def one_waiting(daemon: Daemon) -> None:
    """Until one /wait request (or `sidecar wait`) waits on the background pull."""
    daemon.wait_until(
        lambda: daemon.status()["background_pull"]["waiting_requests"] == 1, 10, "the wait"
    )


def held_background(
    s3: LocalS3, start_daemon: StartDaemon, proxy: KeyGate, *flags: str, pending: int = 4
) -> Daemon:
    """A ready daemon whose background pull is pinned: bg/0 in flight (held at the proxy),
    the other `pending` - 1 bg/ files not started (one file at a time)."""
    daemon = start_daemon(
        s3, *PRIORITY, "--concurrency", "1", *flags, env={"AWS_ENDPOINT_URL": proxy.endpoint}
    )
    daemon.wait_ready()
    daemon.wait_until(lambda: proxy.got("bg/0.bin") == 1, 10, "the first background GET")
    assert daemon.status()["background_pull"]["files_pending"] == pending
    return daemon


def test_ready_once_the_priority_set_is_local_then_the_rest_arrives(
    s3: LocalS3, start_daemon: StartDaemon
) -> None:
    files = volume()
    put(s3.root / "vol", files)
    with gate(s3, "data/big0.bin") as proxy:
        daemon = start_daemon(
            s3,
            *PRIORITY,
            "--priority",
            "*.ckpt",
            "--concurrency",
            "1",  # one file at a time: the order is the queue's
            env={"AWS_ENDPOINT_URL": proxy.endpoint},
        )
        daemon.wait_ready()
        local = daemon.local_dir
        # Ready with the priority set local (the checkpoint too), while big0 is held.
        for name in ("notes.ipynb", "src/train.py", "models/m.ckpt"):
            assert (local / name).read_bytes() == files[name]
        assert not (local / "data/big0.bin").exists()
        background = daemon.status()["background_pull"]
        assert background["state"] == "pulling"
        assert background["files_pending"] == 2
        assert background["bytes_pending"] == 5 * MiB
        assert background["time_to_ready_seconds"] is not None
        assert metric(daemon, "sidecar_time_to_ready_seconds") is not None
        assert metric(daemon, "sidecar_time_to_complete_seconds") is None
        assert metric(daemon, "sidecar_background_pull_files_pending") == 2
        # Smallest first: big0 (2 MiB) was asked for before big1 (3 MiB).
        assert "data/big1.bin" not in proxy.gets
        proxy.release()
        background_complete(daemon)
        for name, data in files.items():
            assert (local / name).read_bytes() == data
        assert metric(daemon, "sidecar_time_to_complete_seconds") is not None
        assert metric(daemon, "sidecar_background_pull_files_pending") == 0
        assert daemon.stop() == 0


def test_wait_answers_for_local_unknown_pending_and_failed_paths(
    s3: LocalS3, start_daemon: StartDaemon
) -> None:
    files = volume()
    put(s3.root / "vol", files)
    with gate(s3, "data/big0.bin", "data/big1.bin") as proxy:
        daemon = start_daemon(s3, *PRIORITY, env={"AWS_ENDPOINT_URL": proxy.endpoint})
        daemon.wait_ready()
        wait = daemon.control + "/wait?"
        assert http_json("GET", wait + "path=notes.ipynb")[0] == 200
        assert http_json("GET", wait + "path=src&path=/notes.ipynb")[0] == 200
        status, body = http_json("GET", wait + "path=nope.txt&path=notes.ipynb")
        assert status == 404 and body["unknown"] == ["nope.txt"] and "nope.txt" in body["error"]
        status, body = http_json("GET", wait + "path=data/&timeout=0.1")
        assert status == 504
        assert body["pending"] == ["data/big0.bin", "data/big1.bin"]
        assert http_json("GET", wait + "path=../x")[0] == 400
        assert http_json("GET", wait + "timeout=1")[0] == 400

        # From a terminal: `sidecar wait` shows progress and exits 0 once all is local.
        waiter = subprocess.Popen(
            client_argv(daemon.control, "wait", "data"), stdout=subprocess.PIPE, text=True
        )
        one_waiting(daemon)
        proxy.release()
        out, _ = waiter.communicate(timeout=60)
        assert waiter.returncode == 0, out
        assert "waiting for 2 file(s)" in out and out.endswith("local: data\n")
        missing = run_client(daemon.control, "wait", "nope")
        assert missing.returncode == 1 and "not in the volume: nope" in missing.stderr
        assert (daemon.local_dir / "data/big1.bin").read_bytes() == files["data/big1.bin"]
        # Nothing in the background any more: answered at once, from the folder.
        assert http_json("GET", wait + "path=data/big0.bin&timeout=0")[0] == 200
        assert http_json("GET", wait + "path=gone&timeout=0")[0] == 404
        assert daemon.stop() == 0


def test_a_waited_path_jumps_the_queue(s3: LocalS3, start_daemon: StartDaemon) -> None:
    files = {
        "small.txt": b"s",
        **{f"bg/{i}.bin": bytes([65 + i]) * (MiB + 1 + i) for i in range(5)},
    }
    put(s3.root / "vol", files)
    with gate(s3, "bg/0.bin") as proxy:
        daemon = held_background(s3, start_daemon, proxy, pending=5)
        answers: list[tuple[int, dict]] = []
        waiter = threading.Thread(
            target=lambda: answers.append(http_json("GET", daemon.control + "/wait?path=bg/4.bin"))
        )
        waiter.start()
        one_waiting(daemon)
        proxy.release()
        waiter.join(30)
        assert answers[0][0] == 200
        gets = [key for key in proxy.gets if key.startswith("bg/")]
        assert gets[:2] == ["bg/0.bin", "bg/4.bin"], gets  # 4 jumped over 1, 2 and 3
        background_complete(daemon)
        assert daemon.stop() == 0


def test_wait_names_a_download_that_failed(
    s3: LocalS3, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    put(s3.root / "vol", {"a.txt": b"a"})
    client = s3_client(s3.endpoint, s3.access_key, s3.secret_key)
    # Our hash label says other bytes than the object holds: every download of it fails.
    from sidecar.s3.metadata import META_HASH

    client.put_object(
        Bucket="vol", Key="big/bad.bin", Body=b"x" * (2 * MiB), Metadata={META_HASH: "0" * 32}
    )
    daemon = start_daemon(s3, *PRIORITY)
    daemon.wait_ready()
    daemon.wait_until(
        lambda: daemon.status()["background_pull"]["state"].startswith("complete"), 30, "the end"
    )
    status, body = http_json("GET", daemon.control + "/wait?path=big")
    assert status == 500, body
    assert body["failed"][0]["path"] == "big/bad.bin"
    assert "hash mismatch" in body["error"]
    assert daemon.stop() == 0


def test_sidecar_wait_without_a_daemon_exits_3() -> None:
    run = run_client(f"http://127.0.0.1:{free_port()}", "wait", "x")
    assert run.returncode == 3 and "cannot reach the daemon" in run.stderr


# -- safety while files still arrive (issue 13 item 4) -------------------------------------


def arriving_volume() -> dict[str, bytes]:
    small = {f"s{i}.txt": f"small {i}\n".encode() for i in range(4)}
    # Each above --priority-max-size (1 MiB): the background, smallest (bg/0) first.
    big = {f"bg/{i}.bin": bytes([65 + i]) * (MiB + 1 + i) for i in range(4)}
    return {**small, **big}


@contextmanager
def arriving(
    s3: LocalS3, start_daemon: StartDaemon, *flags: str
) -> Iterator[tuple[dict[str, bytes], Path, KeyGate, Daemon]]:
    """arriving_volume() in the bucket and a daemon whose background pull is held at bg/0
    (held_background): the files, the bucket's folder, the gate and the daemon."""
    files, bucket = arriving_volume(), s3.root / "vol"
    put(bucket, files)
    with gate(s3, "bg/0.bin") as proxy:
        yield files, bucket, proxy, held_background(s3, start_daemon, proxy, *flags)


def bucket_files(bucket: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(bucket)): path.read_bytes()
        for path in bucket.rglob("*")
        if path.is_file()
    }


def test_finalize_during_the_background_pull_pushes_only_real_local_changes(
    s3: LocalS3, start_daemon: StartDaemon
) -> None:
    with arriving(s3, start_daemon) as (files, bucket, proxy, daemon):
        local = daemon.local_dir
        (local / "new.txt").write_bytes(b"new work")
        (local / "s0.txt").write_bytes(b"edited")
        status, body = http_json("POST", daemon.control + "/finalize?wait=false")
        assert status == 202, body
        proxy.release()  # bg/0 lands; the pull takes no new file and lets the finalize run
        daemon.wait_until(lambda: last(daemon, "finalize") is not None, 30, "the finalize")
        pushed = last(daemon, "finalize")
        assert pushed["ok"], pushed
        assert pushed["files_transferred"] == 2 and pushed["files_deleted"] == 0, pushed
        # Nothing of what was still arriving was deleted or overwritten in the bucket.
        in_bucket = bucket_files(bucket)
        for name in ("bg/0.bin", "bg/1.bin", "bg/2.bin", "bg/3.bin", "s1.txt"):
            assert in_bucket[name] == files[name]
        assert in_bucket["new.txt"] == b"new work" and in_bucket["s0.txt"] == b"edited"
        # The rest resumed after the finalize and arrived.
        background_complete(daemon)
        for name in ("bg/1.bin", "bg/2.bin", "bg/3.bin"):
            assert (local / name).read_bytes() == files[name]
        # POST /pull during the background pull is served too (nothing left to fetch now).
        assert http_json("POST", daemon.control + "/pull")[0] == 200
        assert daemon.stop() == 0


def test_a_file_written_at_a_pending_path_stays_and_the_buckets_version_is_kept_beside(
    s3: LocalS3, start_daemon: StartDaemon
) -> None:
    with arriving(s3, start_daemon) as (files, bucket, proxy, daemon):
        local = daemon.local_dir
        (local / "bg").mkdir(exist_ok=True)
        (local / "bg/2.bin").write_bytes(b"mine")  # before the bucket's bg/2.bin arrived
        proxy.release()
        background_complete(daemon)
        assert (local / "bg/2.bin").read_bytes() == b"mine"
        assert daemon.status()["background_pull"]["user_files_kept"] == ["bg/2.bin"]
        assert http_json("GET", daemon.control + "/wait?path=bg/2.bin")[0] == 200
        assert not [p for p in local.rglob("*conflict*")]  # nothing moved aside locally
        assert daemon.stop() == 0  # the final push: the conflict rule keeps both
    in_bucket = bucket_files(bucket)
    assert in_bucket["bg/2.bin"] == b"mine"
    copies = [name for name in in_bucket if name.startswith("bg/2.conflict-")]
    assert len(copies) == 1 and in_bucket[copies[0]] == files["bg/2.bin"], sorted(in_bucket)


def test_a_pod_stopped_mid_background_pushes_nothing_wrong_and_resumes_without_resending(
    s3: LocalS3, start_daemon: StartDaemon
) -> None:
    with arriving(s3, start_daemon) as (files, bucket, proxy, first):
        first.process.send_signal(signal.SIGTERM)
        # The background pull stops taking files (not cut mid-step), the one in flight lands.
        first.wait_until(lambda: "takes no new file" in first.log(), 30, "the stop")
        proxy.release()
        assert first.stop(0) == 0  # the final push ran, with bg/1..3 still pending
    assert bucket_files(bucket) == files  # nothing deleted, nothing overwritten
    assert (first.local_dir / "bg/0.bin").read_bytes() == files["bg/0.bin"]
    with gate(s3) as counter:
        state = first.local_dir.parent / "state0"
        second = start_daemon(
            s3,
            *PRIORITY,
            "--local-dir",
            str(first.local_dir),
            "--state-dir",
            str(state),
            env={"AWS_ENDPOINT_URL": counter.endpoint},
        )
        background_complete(second)
        # Only what had not arrived was asked for again.
        assert sorted(key for key in counter.gets) == [f"bg/{i}.bin" for i in range(1, 4)]
        for name, data in files.items():
            assert (first.local_dir / name).read_bytes() == data
        assert second.stop() == 0
    # A start with everything local downloads nothing: /wait and /status still know.
    third = start_daemon(
        s3, *PRIORITY, "--local-dir", str(first.local_dir), "--state-dir", str(state)
    )
    assert http_json("GET", third.control + "/wait?path=bg&timeout=30")[0] == 200
    assert third.status()["background_pull"]["state"] == "complete"
    assert third.stop() == 0


def test_auto_sync_during_the_background_pull_pushes_the_edit_only(
    s3: LocalS3, start_daemon: StartDaemon
) -> None:
    auto = ("--auto-sync", "--auto-sync-debounce", "0.1")
    with arriving(s3, start_daemon, *auto) as (files, bucket, proxy, daemon):
        (daemon.local_dir / "notes.txt").write_bytes(b"typed in the notebook")
        daemon.wait_until(
            lambda: daemon.status()["auto_sync"]["state"] == "pushing", 30, "the auto push"
        )
        proxy.release()  # bg/0 lands, the pull stops taking files, the push runs
        daemon.wait_until(lambda: last(daemon, "finalize") is not None, 30, "the auto push")
        assert bucket_files(bucket)["notes.txt"] == b"typed in the notebook"
        pushed = last(daemon, "finalize")
        assert pushed["origin"] == "auto-sync" and pushed["files_deleted"] == 0, pushed
        background_complete(daemon)
        assert daemon.stop() == 0
    assert {k: v for k, v in bucket_files(bucket).items() if k != "notes.txt"} == files


def test_wait_with_ready_when_all_answers_from_the_folder(
    s3: LocalS3, start_daemon: StartDaemon
) -> None:
    put(s3.root / "vol", {"a/b.txt": b"b"})
    daemon = start_daemon(s3)
    daemon.wait_ready()
    wait = daemon.control + "/wait?timeout=5&path="
    assert http_json("GET", wait + "a")[0] == 200
    assert http_json("GET", wait + str(daemon.local_dir / "a/b.txt"))[0] == 200
    assert http_json("GET", wait + "a/c.txt")[0] == 404
    assert daemon.status()["background_pull"] == {"enabled": False}
    assert daemon.stop() == 0
