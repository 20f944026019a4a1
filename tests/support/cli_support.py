"""The CLI end-to-end tiers' helpers: `sidecar pull|finalize --once` as a real subprocess
(`Run`, its exit code and JSON summary), a `Volume` (a bucket + prefix on one server, the CLI
pointed at it, the bucket read straight from the server), trees of files by sha256, and
kill -9 at a chosen moment. The fixtures `rvol` (rclone) and `mvol` (moto) are in
tests/e2e/conftest.py."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import sidecar_args

if TYPE_CHECKING:
    from tests.conftest import S3Server

REPO = Path(__file__).resolve().parents[2]
AWS = Path(sys.executable).parent / "aws"
MiB = 1024**2
PART = 5 * MiB
SIZING = ("--part-size", "5MiB", "--multipart-threshold", "5MiB")
TEMP_PREFIX = ".netvol-tmp."


# ---- running the CLI -----------------------------------------------------------------------
@dataclass(repr=False)
class Run:
    args: list[str]
    code: int
    out: str
    err: str
    seconds: float

    @property
    def summary(self) -> dict[str, Any]:
        lines = [line for line in self.out.splitlines() if line.startswith("{")]
        assert lines, f"no JSON summary on stdout:\n{self}"
        data: dict[str, Any] = json.loads(lines[-1])
        return data

    def assert_moved(self, files: int) -> Run:
        """The run succeeded and transferred exactly `files` files (returns itself)."""
        assert self.code == 0, self
        assert self.summary["files_transferred"] == files, self
        return self

    @property
    def error_paths(self) -> list[str]:
        return [e["path"] for e in self.summary["errors"]]

    def error_for(self, needle: str) -> dict[str, str]:
        """The JSON error whose path contains needle (fails if there is none)."""
        for error in self.summary["errors"]:
            if needle in error["path"]:
                return error  # type: ignore[no-any-return]
        raise AssertionError(f"no error naming {needle!r}:\n{self}")

    def sidecar_lines(self) -> list[str]:
        """The human lines of stderr (not the log records)."""
        return [line for line in self.err.splitlines() if line.startswith(("sidecar:", "error\t"))]

    def __repr__(self) -> str:
        return (
            f"$ {' '.join(self.args)}\nexit {self.code} after {self.seconds:.1f}s\n"
            f"--- stdout\n{self.out}\n--- stderr\n{self.err}"
        )


def base_env(server_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SIDECAR_"))}
    env.update(server_env)
    env.update(
        {
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_EC2_METADATA_DISABLED": "true",
            "SIDECAR_SUMMARY_JSON": "1",
            "SIDECAR_BACKUP": "off",  # as the whole suite (tests/conftest.py)
        }
    )
    env.update(extra)
    return env


def run_cli(
    args: list[str],
    env: dict[str, str],
    timeout: float = 120,
    preexec_fn: Callable[[], None] | None = None,
) -> Run:
    started = time.monotonic()
    proc = subprocess.run(
        args,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        errors="backslashreplace",
        timeout=timeout,
        preexec_fn=preexec_fn,
        stdin=subprocess.DEVNULL,
    )
    return Run(args, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


@dataclass
class Volume:
    """A bucket + prefix on one server, and the CLI pointed at it."""

    server: S3Server
    bucket: str
    work: Path
    prefix: str = "pre"

    @property
    def remote(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def env(self, **extra: str) -> dict[str, str]:
        return base_env(self.server.env(), **extra)

    def run(
        self,
        verb: str,
        local: Path,
        state: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        timeout: float = 120,
        preexec_fn: Callable[[], None] | None = None,
    ) -> Run:
        args = sidecar_args(verb, self.remote, local, state, *extra)
        return run_cli(args, env or self.env(), timeout, preexec_fn)

    def pull(self, local: Path, state: Path, *extra: str, **kw: Any) -> Run:
        return self.run("pull", local, state, *extra, **kw)

    def finalize(self, local: Path, state: Path, *extra: str, **kw: Any) -> Run:
        return self.run("finalize", local, state, *extra, **kw)

    # ---- the bucket side ----
    def objects(self, prefix: str | None = None) -> dict[str, str]:
        """key -> sha256 of the bytes, for every object under prefix (default: ours)."""
        client = self.server.client()
        wanted = self.prefix + "/" if prefix is None else prefix
        out: dict[str, str] = {}
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=wanted
        ):
            for item in page.get("Contents", []):
                body = client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
                out[item["Key"]] = sha(body)
        return out

    def keys(self) -> set[str]:
        """Every key under our prefix, without reading the objects."""
        client = self.server.client()
        out: set[str] = set()
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + "/"
        ):
            out.update(item["Key"] for item in page.get("Contents", []))
        return out

    def listing(self) -> dict[str, tuple[str, Any]]:
        """key -> (ETag, LastModified) under our prefix."""
        client = self.server.client()
        page = client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix + "/")
        return {i["Key"]: (i["ETag"], i["LastModified"]) for i in page.get("Contents", [])}

    def open_uploads(self) -> dict[str, str]:
        """upload id -> key of the multipart uploads open in the bucket."""
        client = self.server.client()
        try:
            listed = client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        except client.exceptions.NoSuchUpload:
            return {}  # rclone's answer for a bucket that never had an upload
        return {u["UploadId"]: u["Key"] for u in listed}

    def put(self, key: str, body: bytes) -> None:
        self.server.client().put_object(Bucket=self.bucket, Key=key, Body=body)

    @property
    def data_dir(self) -> Path:
        """rclone only: the folder holding our prefix's objects as files."""
        assert self.server.local is not None, "only rclone has a data folder"
        return self.server.local.root / self.bucket / self.prefix

    def aws(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """aws cli against this server. rclone sometimes stalls an aws-cli UploadPart sent
        with `Expect: 100-continue`; a short read timeout makes aws retry it quickly."""
        env = self.env(
            AWS_REQUEST_CHECKSUM_CALCULATION="when_required",
            AWS_RESPONSE_CHECKSUM_VALIDATION="when_required",
        )
        env.pop("SIDECAR_SUMMARY_JSON")
        command = [
            str(AWS),
            "--endpoint-url",
            self.server.endpoint,
            "--cli-read-timeout",
            "2",
            *args,
        ]
        proc = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout, cwd=self.work
        )
        assert proc.returncode == 0, f"{command} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc


# ---- files ---------------------------------------------------------------------------------
def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_of(size: int, seed: int | str) -> bytes:
    return random.Random(seed).randbytes(size)


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, body in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)


def tree(root: Path) -> dict[str, str]:
    """relpath -> sha256 of every regular file under root (symlinks not followed)."""
    out: dict[str, str] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            out[path.relative_to(root).as_posix()] = sha(path.read_bytes())
    return out


def everything(root: Path) -> set[str]:
    """Every entry (files, folders, links, temps) under root, as relative paths."""
    out: set[str] = set()
    for dirpath, dirs, names in os.walk(root):
        for name in dirs + names:
            out.add((Path(dirpath) / name).relative_to(root).as_posix())
    return out


def temps(root: Path) -> list[str]:
    return sorted(p for p in everything(root) if p.rsplit("/", 1)[-1].startswith(TEMP_PREFIX))


def keyed(files: dict[str, bytes], prefix: str = "pre/") -> dict[str, str]:
    return {prefix + rel: sha(body) for rel, body in files.items()}


def hashed(files: dict[str, bytes]) -> dict[str, str]:
    return {rel: sha(body) for rel, body in files.items()}


# ---- kill -9 at a chosen moment -----------------------------------------------------------
def start_cli(args: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    """`args` as a child process, its stdout and stderr in logs/."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
        return subprocess.Popen(
            args, env=env, cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL
        )


def wait_until(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str, logs: Path
) -> None:
    """Until `ready()`; fails the test if `proc` ends first (its stderr shown) or after 60 s."""
    deadline = time.monotonic() + 60
    while not ready():
        if proc.poll() is not None:
            pytest.fail(
                f"the sync ended (exit {proc.returncode}) before {what}; make it slower:\n"
                + (logs / "stderr").read_text()
            )
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.003)


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL


def kill9_when(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str, logs: Path
) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (wait_until's failures if it never does)."""
    wait_until(proc, ready, what, logs)
    sigkill(proc)


@contextmanager
def running(args: list[str], env: dict[str, str], logs: Path) -> Iterator[subprocess.Popen[bytes]]:
    """start_cli, and the child killed when the block ends if it still runs (a failed wait
    leaves no process behind)."""
    proc = start_cli(args, env, logs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- a child bound by file modes even as root ---------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def drop_file_permission_override() -> None:
    """preexec_fn for a root child: without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH in the
    bounding set, the exec'd program has them in no set, so file modes bind it like any user
    (everything it needs is owned by root, so owner bits still let it run)."""
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
