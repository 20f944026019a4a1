"""Shared fixtures: real S3-compatible servers on loopback, started as child processes on
free ports and stopped by their own handles.

- `rclone_s3`: `rclone serve s3` (the end-to-end server, with its quirks).
- `moto_s3`: moto's server (fast, honours conditional writes, 206 ranged GETs).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from sidecar.locals3 import LocalS3, aws_env, free_port, wait_for_http

_bucket_numbers = itertools.count()


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    kind: str  # "rclone" or "moto"
    local: LocalS3 | None = None

    def env(self) -> dict[str, str]:
        return aws_env(self.endpoint, self.access_key, self.secret_key)

    def client(self):  # type: ignore[no-untyped-def]
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def new_bucket(self) -> str:
        # Through the API even for rclone: its directory cache would not see a folder made
        # behind its back for minutes.
        name = f"bkt{os.getpid()}x{next(_bucket_numbers)}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def rclone_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    root = tmp_path_factory.mktemp("rclone-s3")
    server = LocalS3(root / "data", log_path=root / "rclone.log").start()
    try:
        yield S3Server(server.endpoint, server.access_key, server.secret_key, "rclone", server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", 30, process)
        yield S3Server(f"http://127.0.0.1:{port}", "testing-key", "testing-secret", "moto")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(params=["moto", "rclone"])
def any_s3(request: pytest.FixtureRequest) -> S3Server:
    """Both servers: moto for AWS-like behaviour, rclone for the quirks."""
    return request.getfixturevalue(f"{request.param}_s3")  # type: ignore[no-any-return]


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Point in-process engines at a server: s3_env(server)."""

    def apply(server: S3Server) -> None:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")

    return apply


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Scratch on tmpfs when there is one: file creation on this disk is noisy and slow."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        import shutil
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="sidecar-test-", dir=shm))
        yield path  # type: ignore[misc]
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path  # type: ignore[misc]


def sidecar_args(verb: str, remote: str, local: Path, state: Path, *extra: str) -> list[str]:
    """argv of a one-shot `sidecar VERB --once` run by this interpreter."""
    return [
        sys.executable,
        "-m",
        "sidecar",
        verb,
        "--once",
        "--remote",
        remote,
        "--local-dir",
        str(local),
        "--state-dir",
        str(state),
        *extra,
    ]
