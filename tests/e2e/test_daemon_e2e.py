"""`sidecar serve` as a real subprocess against a real loopback `rclone serve s3`.

The bucket's objects are plain files under the rclone root, so tests seed and check the
bucket through the file system and the daemon only through HTTP, signals and its logs.
"""

from __future__ import annotations

import json
import os
import pty
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest

from sidecar.locals3 import LocalS3, free_port
from tests.conftest import FRESH_LISTINGS
from tests.support.daemon_support import (
    StartDaemon,
    client_argv,
    http,
    http_json,
    non_loopback_ipv4,
    run_client,
)


def seed(bucket_dir: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        path = bucket_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def write(folder: Path, name: str, content: bytes) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def big_file(path: Path, size: int) -> None:
    """Incompressible-ish data without paying for os.urandom on every byte."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as out:
        for index in range(size >> 20):
            out.write(index.to_bytes(8, "little") + block[8:])


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line {line_start!r} in:\n{text}")


def test_pull_finalize_status_and_metrics(s3: LocalS3, start_daemon: StartDaemon) -> None:
    seed(s3.root / "vol", {"models/m.bin": b"m" * 5000, "data/train/a.csv": b"x,y\n1,2\n"})
    daemon = start_daemon(s3, "--volume", "team-data")
    daemon.wait_ready()
    assert (daemon.local_dir / "models" / "m.bin").read_bytes() == b"m" * 5000

    write(daemon.local_dir, "notes/today.md", b"hello")
    status, body = http_json("POST", daemon.control + "/finalize")
    assert status == 200, body
    assert body["ok"] and body["files_transferred"] == 1 and body["errors"] == []
    assert (daemon.bucket_dir / "notes" / "today.md").read_bytes() == b"hello"

    seed(daemon.bucket_dir, {"data/train/b.csv": b"x,y\n3,4\n"})
    status, body = http_json("POST", daemon.control + "/pull?dry_run=1")
    assert status == 200 and body["dry_run"] is True
    assert body["plan"] == [
        {"action": "download", "path": "data/train/b.csv", "conflict_copy": None}
    ]
    assert not (daemon.local_dir / "data" / "train" / "b.csv").exists()

    status, body = http_json("POST", daemon.control + "/pull?wait=false")
    assert status == 202 and body["accepted"] is True
    assert "/status" in body["watch"]
    daemon.wait_until(
        lambda: (daemon.local_dir / "data" / "train" / "b.csv").exists(), 20, "async pull"
    )

    state = daemon.status()
    assert state["ready"] is True and state["volume"] == "team-data"
    assert state["initial_pull"]["state"] == "done"
    assert state["last_results"]["finalize"]["files_transferred"] == 1
    assert state["auto_sync"] == {"enabled": False}
    assert http_json("GET", daemon.control + "/status")[0] == 200

    status, text = http("GET", daemon.probe + "/metrics")
    assert status == 200
    labels = 'volume="team-data",operation="finalize"'
    assert metric(text, f'sidecar_syncs_total{{{labels},outcome="success"}}') == 1
    assert metric(text, f"sidecar_bytes_transferred_total{{{labels}}}") == 5
    assert metric(text, 'sidecar_ready{volume="team-data"}') == 1
    assert http("GET", daemon.probe + "/healthz") == (200, "ok\n")

    summaries = [r for r in daemon.records() if "summary" in r]
    assert {r["summary"]["operation"] for r in summaries} == {"pull", "finalize"}


def test_client_verbs(s3: LocalS3, start_daemon: StartDaemon) -> None:
    daemon = start_daemon(s3)
    daemon.wait_ready()
    write(daemon.local_dir, "x.txt", b"x")
    sidecar = daemon.client

    done = sidecar("finalize")
    assert done.returncode == 0, done.stderr
    assert "finalize: transferred 1 files" in done.stdout
    assert (daemon.bucket_dir / "x.txt").read_bytes() == b"x"
    shown = sidecar("status")
    assert shown.returncode == 0
    assert "ready: yes" in shown.stdout and "last finalize" in shown.stdout
    raw = sidecar("status", "--json")
    assert json.loads(raw.stdout)["ready"] is True
    dry = sidecar("pull", "--dry-run")
    assert dry.returncode == 0 and "would transfer 0 files" in dry.stdout

    unreachable = run_client(f"http://127.0.0.1:{free_port()}", "pull")
    assert unreachable.returncode == 3
    assert "cannot reach the daemon" in unreachable.stderr


def test_malformed_requests_get_4xx(s3: LocalS3, start_daemon: StartDaemon) -> None:
    daemon = start_daemon(s3)
    daemon.wait_ready()
    status, body = http_json("POST", daemon.control + "/pull?force=1&dryrun=1")
    assert status == 400 and "dryrun, force" in body["error"]
    assert http("POST", daemon.control + "/pull?progress=often")[0] == 400
    assert http("POST", daemon.control + "/pull", body=b"x" * 1_000_000)[0] == 413
    assert http("GET", daemon.control + "/finalize")[0] == 405
    assert http("POST", daemon.probe + "/finalize")[0] == 404  # no such route on probes
    assert http("POST", daemon.probe + "/status")[0] == 405
    assert http("GET", daemon.probe + "/pull")[0] == 404

    # A chunked body has no Content-Length to refuse up front.
    host, port = daemon.control.removeprefix("http://").split(":")
    connection = HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/finalize", body=iter([b"y" * 10_000] * 10), encode_chunked=True)
    assert connection.getresponse().status == 413
    assert "finalize" not in daemon.status()["last_results"]


def test_control_api_refuses_non_loopback_peers(s3: LocalS3, start_daemon: StartDaemon) -> None:
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    daemon = start_daemon(s3, control_host="0.0.0.0")  # a misconfiguration, on purpose
    daemon.wait_ready()
    port = daemon.control.rsplit(":", 1)[1]
    status, body = http_json("POST", f"http://{address}:{port}/finalize")
    assert status == 403 and address in body["error"]
    assert http("GET", f"http://{address}:{port}/status")[0] == 403
    assert http_json("POST", daemon.control + "/finalize")[0] == 200


def test_concurrent_requests_queue_behind_a_run_that_already_scanned(
    s3: LocalS3, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = start_daemon(s3, "--concurrency", "2")  # a slower push: time to pile up requests
    daemon.wait_ready()
    for index in range(3):
        big_file(daemon.local_dir / f"big{index}.bin", 32 << 20)
    answers: dict[str, tuple[int, dict[str, Any]]] = {}

    def post(name: str, path: str) -> None:
        answers[name] = http_json("POST", daemon.control + path, timeout=120)

    def transferring() -> bool:
        current = daemon.status()["current"]
        return current is not None and current["phase"] == "transferring"

    first = threading.Thread(target=post, args=("first", "/finalize"))
    first.start()
    daemon.wait_until(transferring, 30, "the finalize to start transferring")
    # Saved before the second request: that request's 200 must mean this file is pushed,
    # which the running finalize (it scanned before the file existed) cannot promise.
    write(daemon.local_dir, "saved-late.txt", b"saved after the first finalize scanned")
    second = threading.Thread(target=post, args=("second", "/finalize"))
    second.start()
    daemon.wait_until(lambda: "second" in answers or daemon.status()["queued"], 20, "queue")
    pull = threading.Thread(target=post, args=("pull", "/pull"))  # waits its turn (FIFO)
    pull.start()
    for thread in [first, second, pull]:
        thread.join(120)

    assert {name: status for name, (status, _) in answers.items()} == dict.fromkeys(answers, 200)
    assert answers["first"][1]["files_transferred"] == 3
    assert answers["second"][1]["joined"] is False
    assert answers["second"][1]["files_transferred"] == 1
    assert (daemon.bucket_dir / "saved-late.txt").read_bytes().startswith(b"saved after")
    assert answers["pull"][1]["joined"] is False
    results = daemon.status()["last_results"]
    assert results["pull"]["finished_at"] > results["finalize"]["finished_at"]
    _, text = http("GET", daemon.probe + "/metrics")
    assert metric(text, 'sidecar_syncs_total{operation="finalize",outcome="success"}') == 2
    # the initial pull and the queued one
    assert metric(text, 'sidecar_syncs_total{operation="pull",outcome="noop"}') == 2


def test_never_ready_with_wrong_credentials(s3: LocalS3, start_daemon: StartDaemon) -> None:
    daemon = start_daemon(s3, env={"AWS_SECRET_ACCESS_KEY": "wrong" + s3.secret_key})
    daemon.wait_until(lambda: daemon.status()["last_error"] is not None, 30, "the first failure")
    status, text = http("GET", daemon.probe + "/readyz")
    assert status == 503 and "initial pull failed" in text
    state = daemon.status()
    assert state["ready"] is False
    assert state["initial_pull"]["state"] in ("retrying", "running")
    assert state["last_error"]["operation"] == "pull"
    refused = http_json("POST", daemon.control + "/finalize")
    assert refused[0] == 503 and "initial pull has not succeeded" in refused[1]["refused"]
    # A retry later (it ran and failed, not just a sleep): still not ready.
    tried = state["initial_pull"]["attempts"]

    def failed_again() -> bool:
        pull = daemon.status()["initial_pull"]
        return pull["attempts"] > tried and pull["state"] == "retrying"

    daemon.wait_until(failed_again, 30, "a retry of the initial pull to fail")
    assert http("GET", daemon.probe + "/readyz")[0] == 503
    assert any("initial pull failed" in r["message"] for r in daemon.records())
    assert daemon.stop() == 0
    assert list(daemon.bucket_dir.iterdir()) == []


def test_becomes_ready_when_the_server_comes_up(tmp_path: Path, start_daemon: StartDaemon) -> None:
    late = LocalS3(tmp_path / "late-s3", port=free_port())  # known port, not started yet
    try:
        daemon = start_daemon(late)
        daemon.wait_until(lambda: daemon.status()["initial_pull"]["attempts"] >= 1, 20, "attempt")
        daemon.wait_until(lambda: daemon.status()["last_error"] is not None, 30, "the failure")
        assert http("GET", daemon.probe + "/readyz")[0] == 503
        # The bucket appears with its object: a retry that listed it between the two would
        # find it empty, and be ready without the file (seen once in a full run).
        seed(late.root / "vol", {"f.txt": b"late"})
        late.start(extra_args=FRESH_LISTINGS)
        late.make_bucket("vol")
        daemon.wait_ready(timeout=30)
        assert (daemon.local_dir / "f.txt").read_bytes() == b"late"
        assert daemon.status()["initial_pull"]["attempts"] >= 2
    finally:
        late.stop()


def test_bad_keys_make_the_daemon_ready_degraded_and_it_still_pushes_at_sigterm(
    moto_s3: Any, start_daemon: StartDaemon
) -> None:
    """Keys no folder can hold (moto stores them; no file system could) are reported, never a
    reason to keep the notebook from starting, refuse /finalize or skip the final push."""
    bucket = moto_s3.new_bucket()
    client = moto_s3.client()
    bad = {"a//b", "d", "n" * 300}
    for key in [*bad, "ok.txt", "d/x"]:
        client.put_object(Bucket=bucket, Key=key, Body=b"content of " + key.encode())
    daemon = start_daemon(moto_s3, bucket=bucket)
    daemon.wait_ready()
    status, text = http("GET", daemon.probe + "/readyz")
    assert status == 200 and text.startswith("ready, degraded: 3 path(s) skipped"), text
    assert (daemon.local_dir / "ok.txt").read_bytes() == b"content of ok.txt"
    assert (daemon.local_dir / "d" / "x").read_bytes() == b"content of d/x"
    state = daemon.status()
    assert state["ready"] is True and state["degraded"] is True
    assert state["initial_pull"]["state"] == "done, degraded"
    assert {e["path"] for e in state["degraded_by"]["skipped"]} == bad
    _, metrics_text = http("GET", daemon.probe + "/metrics")
    assert metric(metrics_text, "sidecar_ready") == 1
    assert metric(metrics_text, "sidecar_degraded") == 1
    assert metric(metrics_text, "sidecar_degraded_skipped_paths") == 3
    assert any(r["message"].startswith("ready, degraded") for r in daemon.records())
    answer = http_json("POST", daemon.control + "/pull")[1]
    assert answer["degraded"] is True and {e["path"] for e in answer["errors"]} == bad
    write(daemon.local_dir, "results/new.txt", b"work done in the notebook")
    status, body = http_json("POST", daemon.control + "/finalize")
    assert "refused" not in body and body["files_transferred"] == 1, body
    write(daemon.local_dir, "results/last.txt", b"saved just before the pod stops")
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log()
    pushed = client.get_object(Bucket=bucket, Key="results/last.txt")["Body"].read()
    assert pushed == b"saved just before the pod stops"


def test_withheld_initial_deletes_make_the_daemon_ready_degraded(
    s3: LocalS3, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    seed(s3.root / "vol", {f"f{index}.txt": b"x" for index in range(10)})
    first = start_daemon(s3)
    first.wait_ready()
    assert first.stop() == 0
    for index in range(8):
        (s3.root / "vol" / f"f{index}.txt").unlink()
    # The same folder and BASE again: 8 of 10 files look deleted in the bucket, more than the
    # guard lets a pull delete without --force-delete.
    again = start_daemon(
        s3, "--local-dir", str(first.local_dir), "--state-dir", str(tmp_path / "state0")
    )
    again.wait_ready()
    state = again.status()
    assert state["degraded"] is True
    assert "would delete 8 of 10" in state["degraded_by"]["deletes_withheld"]
    assert len(list(first.local_dir.iterdir())) == 10, "nothing deleted"
    _, metrics_text = http("GET", again.probe + "/metrics")
    assert metric(metrics_text, "sidecar_degraded_deletes_withheld") == 1
    write(first.local_dir, "new.txt", b"pushed at shutdown")
    assert again.stop() == 0, again.log()
    assert (s3.root / "vol" / "new.txt").read_bytes() == b"pushed at shutdown"
    # The push does not undo the bucket's deletes it was told about but did not apply.
    assert not any((s3.root / "vol" / f"f{index}.txt").exists() for index in range(8))


def test_sigterm_pushes_local_changes_then_exits_0(s3: LocalS3, start_daemon: StartDaemon) -> None:
    seed(s3.root / "vol", {"keep.txt": b"keep"})
    daemon = start_daemon(s3)
    daemon.wait_ready()
    write(daemon.local_dir, "results/run1/metrics.json", b'{"acc": 0.9}')
    big_file(daemon.local_dir / "results" / "model.bin", 8 << 20)
    (daemon.local_dir / "keep.txt").write_bytes(b"changed locally")
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log()
    assert (daemon.bucket_dir / "results/run1/metrics.json").read_bytes() == b'{"acc": 0.9}'
    assert (daemon.bucket_dir / "results/model.bin").read_bytes() == (
        daemon.local_dir / "results/model.bin"
    ).read_bytes()
    assert (daemon.bucket_dir / "keep.txt").read_bytes() == b"changed locally"
    assert any(r["message"].startswith("final push done") for r in daemon.records())


def test_read_only_refuses_finalize_and_pushes_nothing_at_exit(
    s3: LocalS3, start_daemon: StartDaemon
) -> None:
    seed(s3.root / "vol", {"model/weights.bin": b"w" * 100})
    daemon = start_daemon(s3, "--read-only")
    daemon.wait_ready()
    write(daemon.local_dir, "scratch.txt", b"not for the bucket")
    status, body = http_json("POST", daemon.control + "/finalize")
    assert status == 409 and "--read-only" in body["refused"]
    assert http_json("POST", daemon.control + "/pull")[0] == 200
    assert daemon.stop() == 0
    assert not (daemon.bucket_dir / "scratch.txt").exists()


def test_auto_sync_watches_a_folder_the_initial_pull_creates(
    s3: LocalS3, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    seed(s3.root / "vol", {"data/in.csv": b"a,b\n"})
    folder = tmp_path / "created-by-the-pull" / "vol"
    daemon = start_daemon(
        s3, "--auto-sync", "--auto-sync-debounce", "0.3", "--local-dir", str(folder)
    )
    daemon.wait_ready()
    write(folder, "work/notebook.ipynb", b'{"cells": []}')
    pushed = s3.root / "vol" / "work" / "notebook.ipynb"
    daemon.wait_until(pushed.exists, 30, "the auto-sync push")
    assert pushed.read_bytes() == b'{"cells": []}'
    assert daemon.status()["auto_sync"]["watching"] is True
    _, text = http("GET", daemon.probe + "/metrics")
    assert metric(text, "sidecar_auto_sync_watching") == 1
    daemon.stop(signal.SIGKILL)


def test_sigkill_with_auto_sync_loses_nothing_older_than_the_window(
    s3: LocalS3, start_daemon: StartDaemon
) -> None:
    debounce = 0.5
    daemon = start_daemon(
        s3, "--auto-sync", "--auto-sync-debounce", str(debounce), "--auto-sync-max-delay", "3"
    )
    daemon.wait_ready()
    write(daemon.local_dir, "work/notebook.ipynb", b'{"cells": []}')
    write(daemon.local_dir, "work/__pycache__/x.pyc", b"compiled")
    (daemon.local_dir / ".ipynb_checkpoints").mkdir()
    write(daemon.local_dir, ".ipynb_checkpoints/nb-checkpoint.ipynb", b"{}")
    # The window has passed once a push took every change in and nothing is pending (an
    # ignored file counted as a change would leave auto-sync settling or pushing again).
    notebook = daemon.bucket_dir / "work/notebook.ipynb"
    daemon.wait_until(
        lambda: notebook.exists() and daemon.status()["auto_sync"]["state"] == "idle",
        60,
        "the push of the window",
    )
    daemon.process.kill()
    daemon.process.wait()
    assert (daemon.bucket_dir / "work/notebook.ipynb").read_bytes() == b'{"cells": []}'
    assert not (daemon.bucket_dir / "work/__pycache__").exists()
    assert not (daemon.bucket_dir / ".ipynb_checkpoints").exists()


def test_auto_sync_pushes_under_constant_writes_within_max_delay(
    s3: LocalS3, start_daemon: StartDaemon
) -> None:
    daemon = start_daemon(
        s3, "--auto-sync", "--auto-sync-debounce", "1", "--auto-sync-max-delay", "2"
    )
    daemon.wait_ready()
    write(daemon.local_dir, "first.txt", b"1")
    log = daemon.local_dir / "train.log"
    # Writes every 0.2 s never leave the folder quiet for the 1 s debounce, so only the max
    # delay can start the push. The deadline is generous: a loaded machine is slow, and
    # the proof is that the push happens while writes go on, not how fast.
    deadline = time.monotonic() + 60
    with open(log, "ab") as out:
        while time.monotonic() < deadline:
            out.write(b"step\n")
            out.flush()
            time.sleep(0.2)
            if (daemon.bucket_dir / "first.txt").exists():
                break
    assert (daemon.bucket_dir / "first.txt").read_bytes() == b"1", "no push under constant writes"
    # The object lands before the push's result is counted.
    daemon.wait_until(
        lambda: daemon.status()["auto_sync"]["pushes"] >= 1, 60, "the push counted in /status"
    )
    assert daemon.status()["auto_sync"]["enabled"] is True


def hold_connections(port: int, count: int) -> list[socket.socket]:
    """`count` connections that never finish a request: half a request line or nothing."""
    held: list[socket.socket] = []
    for index in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError:
            break  # the server stopped accepting: what the probes below must survive
        held.append(sock)
        if index % 2 == 0:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n")
    return held


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True  # reset


def test_held_open_connections_never_starve_probes_nor_the_final_push(
    s3: LocalS3, start_daemon: StartDaemon
) -> None:
    fd_limit = 256  # a small limit makes exhausting it cheap; more connections than fds
    daemon = start_daemon(
        s3,
        "--concurrency",
        "4",
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit)),
    )
    daemon.wait_ready()
    port = int(daemon.probe.rsplit(":", 1)[1])

    def probe_connections(what: str) -> float:
        _, text = http("GET", daemon.probe + "/metrics", timeout=5)
        if what == "open":
            return metric(text, 'sidecar_http_connections{listener="probes"}')
        closed = "sidecar_http_connections_closed_total"
        return metric(text, f'{closed}{{listener="probes",reason="{what}"}}')

    held = hold_connections(port, fd_limit + 100)
    try:
        assert len(held) == fd_limit + 100, "the daemon stopped accepting connections"
        # A fresh probe gets in at once: the oldest connection that sent no whole request
        # makes room for it.
        assert http("GET", daemon.probe + "/healthz", timeout=5)[0] == 200
        assert probe_connections("open") < fd_limit / 2
        assert probe_connections("evicted") > 0
        # The connections that never sent a whole request are closed by the read deadline.
        # This waits on that condition, which comes true READ_TIMEOUT (10 s, a constant of
        # sidecar/daemon/listeners.py) after they connected: no flag shortens it (every
        # option is a user's flag), and tests/integration/test_listeners.py checks the
        # deadline itself at 0.3 s; here it is checked wired into a real daemon.
        daemon.wait_until(lambda: all(closed_by_server(s) for s in held[-20:]), 60, "deadline")
        assert probe_connections("timeout") > 0
    finally:
        for sock in held:
            sock.close()
    # Again, then SIGTERM: the final push has the fds it needs.
    held = hold_connections(port, fd_limit + 100)
    try:
        for index in range(40):
            write(daemon.local_dir, f"out/{index}.txt", b"result %d" % index)
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log()
    finally:
        for sock in held:
            sock.close()
    assert all(
        (daemon.bucket_dir / f"out/{i}.txt").read_bytes() == b"result %d" % i for i in range(40)
    )


@pytest.mark.parametrize("how", ["deadline", "second-sigterm"])
def test_cut_short_final_push_leaves_no_partial_object(
    s3: LocalS3, start_daemon: StartDaemon, how: str
) -> None:
    timeout = "0.3" if how == "deadline" else "300"
    daemon = start_daemon(s3, "--shutdown-timeout", timeout, "--part-size", "5MiB")
    daemon.wait_ready()
    big_file(daemon.local_dir / "huge.bin", 400 << 20)
    write(daemon.local_dir, "small.txt", b"small")
    daemon.process.send_signal(signal.SIGTERM)
    if how == "second-sigterm":
        daemon.wait_until(
            lambda: (
                any("final push" in r["message"] for r in daemon.records())
                or "SIGTERM received" in daemon.log()
            ),
            20,
            "the shutdown to start",
        )
        time.sleep(0.3)
        daemon.process.send_signal(signal.SIGTERM)
    # Wait without a third signal: a third one means "exit now, skip listing what was not
    # pushed", and whether it coalesces with the second depends on timing.
    code = daemon.stop(sig=0, timeout=60)
    text = daemon.log()
    huge = daemon.bucket_dir / "huge.bin"
    if code == 0:
        pytest.skip("the final push finished before it could be cut short")
    assert code == 1, text
    assert "final push cancelled" in text or "final push never started" in text
    assert "not pushed" in text
    assert not huge.exists() or huge.stat().st_size == 400 << 20


def test_client_draws_a_progress_bar_on_a_terminal(s3: LocalS3, start_daemon: StartDaemon) -> None:
    daemon = start_daemon(s3)
    daemon.wait_ready()
    big_file(daemon.local_dir / "weights.bin", 16 << 20)
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            client_argv(daemon.control, "finalize"),
            stdout=follower,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        os.close(follower)
        follower = -1
        shown = _read_all(leader)
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert done.returncode == 0, done.stderr
    assert "\rfinalize: starting" in shown
    assert "finalize: transferred 1 files" in shown.splitlines()[-1]


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def test_demo_quickstart(tmp_path: Path) -> None:
    control = free_port()
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar",
            "demo",
            "--workdir",
            str(tmp_path),
            "--port",
            str(control),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        seen: list[str] = []
        assert demo.stdout is not None
        for line in demo.stdout:
            seen.append(line)
            if "demo is ready" in line:
                break
        text = "".join(seen)
        assert "demo is ready" in text, text
        endpoint = re.search(r"on (http://127\.0\.0\.1:\d+), seeding", text)
        assert endpoint is not None, text
        volume = tmp_path / "volume"
        assert (volume / "models" / "tiny-classifier" / "weights.bin").stat().st_size == 2 << 20
        assert sorted(p.name for p in (volume / "datasets" / "iris-mini" / "train").iterdir()) == [
            "part-000.csv",
            "part-001.csv",
        ]
        status, body = http_json("POST", f"http://127.0.0.1:{control}/pull")
        assert status == 200 and body["ok"], body
        (volume / "notes.txt").write_text("my notes")
        demo.send_signal(signal.SIGINT)  # what Ctrl-C does to the foreground process
        rest = demo.communicate(timeout=60)[0]
        assert demo.returncode == 0, text + rest
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert (tmp_path / "s3" / "demo" / "notes.txt").read_text() == "my notes"
    with pytest.raises(OSError):
        http("GET", endpoint.group(1) + "/", timeout=2)  # the S3 server is gone too


def test_taken_port_is_a_clear_startup_error(s3: LocalS3, tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable, "-m", "sidecar", "serve",
                "--remote", "s3://vol/",
                "--local-dir", str(tmp_path / "local"),
                "--state-dir", str(tmp_path / "state"),
                "--control-addr", f"127.0.0.1:{port}",
                "--probe-addr", f"127.0.0.1:{free_port()}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **s3.env()},
        )  # fmt: skip
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port} for the control API" in done.stderr
