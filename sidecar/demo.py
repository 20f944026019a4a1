"""`sidecar demo`: the quickstart, on this machine only.

Starts a real S3-compatible server on loopback (`rclone serve s3`), seeds a `demo` bucket with
a small model and a small dataset (pushed by the sync engine itself), runs `sidecar serve`
against it with a local folder under the work dir, waits until it is ready and prints the
commands to try. Ctrl-C stops it: the sidecar pushes local changes first, then the S3 server
stops.

Why two processes: the terminal's Ctrl-C goes to the whole foreground process group, and
rclone exits on SIGINT at once, before the sidecar's final push could reach it. So the demo
runs its children from a helper in a session of its own and turns Ctrl-C into an orderly
SIGTERM, daemon first, S3 server last.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from sidecar.locals3 import LocalS3, LocalS3Error, environ_with, free_port

BUCKET = "demo"
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0


def run_demo(workdir: str | None = None, control_port: int = 8080) -> int:
    root = Path(workdir) if workdir else _fresh_workdir()
    helper = subprocess.Popen(
        [sys.executable, "-m", "sidecar.demo", str(root), str(control_port)],
        start_new_session=True,
    )
    while True:
        try:
            return helper.wait()
        except KeyboardInterrupt:
            # First Ctrl-C: orderly stop. Another one is passed on and hurries the sidecar.
            helper.send_signal(signal.SIGTERM)


def _fresh_workdir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(tempfile.mkdtemp(prefix="netvol-sidecar-demo-", dir=base))


def seed_files(folder: Path) -> list[Path]:
    """A small model (weights + config) and a small dataset in nested folders."""
    model = folder / "models" / "tiny-classifier"
    data = folder / "datasets" / "iris-mini"
    files = {
        model / "config.json": b'{"architecture": "mlp", "layers": [4, 16, 3]}\n',
        model / "weights.bin": secrets.token_bytes(2 * 1024 * 1024),
        data / "README.md": b"# iris-mini\nA tiny sample dataset for the sidecar demo.\n",
        data / "train" / "part-000.csv": _csv(0, 40),
        data / "train" / "part-001.csv": _csv(40, 80),
        data / "test" / "part-000.csv": _csv(80, 100),
    }
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return list(files)


def _csv(start: int, stop: int) -> bytes:
    rows = ["sepal_length,sepal_width,petal_length,petal_width,species"]
    for i in range(start, stop):
        rows.append(
            f"{4.3 + i % 36 / 10:.1f},{2.0 + i % 24 / 10:.1f},{1.0 + i % 59 / 10:.1f},"
            f"{0.1 + i % 25 / 10:.1f},{('setosa', 'versicolor', 'virginica')[i % 3]}"
        )
    return ("\n".join(rows) + "\n").encode()


async def _seed_bucket(staging: Path, state: Path) -> str | None:
    """Push the staging folder into the bucket with the engine; None or the failure."""
    from sidecar.core.model import Direction
    from sidecar.core.options import SyncConfig
    from sidecar.engine.sync import SyncEngine

    config = SyncConfig(bucket=BUCKET, prefix="", local_dir=staging, state_dir=state)
    async with SyncEngine(config) as engine:
        result = await engine.run(Direction.FINALIZE)
    return None if result.ok else result.one_line()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_ready(url: str, daemon: subprocess.Popen[bytes], timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            return f"sidecar serve exited with code {daemon.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return None
        except urllib.error.HTTPError as exc:
            last = exc.read().decode(errors="replace").strip()
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    return f"not ready after {timeout:.0f}s: {last}"


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop


def helper_main(root: Path, control_port: int) -> int:
    """Runs in its own session: owns the S3 server and the daemon, stops them in order."""
    signal.signal(signal.SIGTERM, _raise_stop)
    parent = os.getppid()
    if not _port_is_free(control_port):
        print(
            f"sidecar demo: port {control_port} is taken; try `sidecar demo --port 18080`",
            file=sys.stderr,
        )
        return 2
    probe_port = control_port + 1 if _port_is_free(control_port + 1) else free_port()
    root.mkdir(parents=True, exist_ok=True)
    volume = root / "volume"
    volume.mkdir(exist_ok=True)
    s3 = LocalS3(root / "s3", log_path=root / "rclone.log")
    daemon: subprocess.Popen[bytes] | None = None
    try:
        try:
            s3.start()
        except LocalS3Error as exc:
            print(f"sidecar demo: cannot start the S3 server: {exc}", file=sys.stderr)
            return 1
        s3.make_bucket(BUCKET)
        os.environ.update(s3.env())
        print(f"sidecar demo: S3 server (rclone serve s3) on {s3.endpoint}, seeding s3://{BUCKET}/")
        staging = root / "seed"
        seed_files(staging)
        failure = asyncio.run(_seed_bucket(staging, root / "seed-state"))
        if failure:
            print(f"sidecar demo: seeding the bucket failed: {failure}", file=sys.stderr)
            return 1
        daemon = subprocess.Popen(
            [
                sys.executable, "-m", "sidecar", "serve",
                "--remote", f"s3://{BUCKET}/",
                "--local-dir", str(volume),
                "--state-dir", str(root / "state"),
                "--volume", BUCKET,
                "--control-addr", f"127.0.0.1:{control_port}",
                "--probe-addr", f"127.0.0.1:{probe_port}",
                "--shutdown-timeout", "30",
            ],
            env=environ_with(s3.env()),
        )  # fmt: skip
        problem = _wait_ready(f"http://127.0.0.1:{probe_port}/readyz", daemon, READY_TIMEOUT)
        if problem:
            print(f"sidecar demo: {problem}", file=sys.stderr)
            return 1
        print(_instructions(root, volume, s3, control_port, probe_port), flush=True)
        while daemon.poll() is None and os.getppid() == parent:
            time.sleep(0.5)
        return 0 if daemon.returncode in (None, 0) else 1
    except (_Stop, KeyboardInterrupt):
        return 0 if daemon is None else _stop_daemon(daemon)
    finally:
        if daemon is not None and daemon.poll() is None:
            _stop_daemon(daemon)
        s3.stop()
        print(f"sidecar demo: stopped; files kept in {root}", file=sys.stderr)


def _stop_daemon(daemon: subprocess.Popen[bytes]) -> int:
    signal.signal(signal.SIGTERM, lambda signum, frame: daemon.send_signal(signal.SIGTERM))
    daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        daemon.kill()
        return daemon.wait()


def _instructions(root: Path, volume: Path, s3: LocalS3, control: int, probe: int) -> str:
    return f"""
netvol-sidecar demo is ready.
  S3 server     {s3.endpoint} (rclone serve s3), bucket s3://{BUCKET}/, stored in {s3.root}
  local folder  {volume}  (the notebook's fast copy)
  control API   http://localhost:{control}   probes: http://localhost:{probe}

Try, from another terminal:
  ls -R {volume}
  curl -X POST localhost:{control}/pull
  echo "my notes" > {volume}/notes.txt
  curl -X POST localhost:{control}/finalize
  curl -X POST 'localhost:{control}/finalize?dry_run=1'
  curl localhost:{probe}/status
  curl localhost:{probe}/metrics
  sidecar status --control-url http://127.0.0.1:{control}

Ctrl-C stops the demo: the sidecar pushes local changes first. Files stay in {root}.
"""


if __name__ == "__main__":
    raise SystemExit(helper_main(Path(sys.argv[1]), int(sys.argv[2])))
