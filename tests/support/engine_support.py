"""The in-process engine's test helpers: a config, one sync, files and trees on disk, and a
volume (a bucket, a client of its server, a local folder and the config syncing the two)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.core.backup import BackupMode
from sidecar.core.model import Direction
from sidecar.core.options import SyncConfig
from sidecar.core.result import SyncResult
from sidecar.engine import scan as scan_module
from sidecar.engine.sync import SyncEngine
from sidecar.engine.transfer import Transfers
from tests.conftest import S3Server

MiB = 1024 * 1024
# An mtime long past: the file's hash is cached (a fresh one is racy, hashed again once).
OLD_NS = 1_600_000_000 * 10**9
PULL, FIN = Direction.PULL, Direction.FINALIZE


def config(bucket: str, local: Path, state: Path, **extra: Any) -> SyncConfig:
    values: dict[str, Any] = {
        "bucket": bucket,
        "prefix": "vol/",
        "local_dir": local,
        "state_dir": state,
        "concurrency": 8,
        "part_size": 5 * MiB,
        "multipart_threshold": 5 * MiB,
        "backup": BackupMode.OFF,  # as the whole suite (tests/conftest.py); test_backup.py: on
    }
    values.update(extra)
    return SyncConfig(**values)


async def sync(cfg: SyncConfig, direction: Direction, **kwargs: Any) -> SyncResult:
    async with SyncEngine(cfg) as engine:
        return await engine.run(direction, **kwargs)


def write(path: Path, data: bytes, mtime_ns: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@dataclass
class Volume:
    """A bucket and a local folder synced under the prefix "vol/" by `cfg`."""

    bucket: str
    s3: Any  # a boto3 client of the bucket's server: what other writers do
    local: Path
    cfg: SyncConfig

    def put(self, path: str, body: bytes) -> None:
        """Another writer puts `path`'s object."""
        self.s3.put_object(Bucket=self.bucket, Key=f"vol/{path}", Body=body)

    def get(self, path: str) -> bytes:
        return bytes(self.s3.get_object(Bucket=self.bucket, Key=f"vol/{path}")["Body"].read())

    def bodies(self) -> dict[str, bytes]:
        """Every object of the bucket, by key."""
        listed = self.s3.list_objects_v2(Bucket=self.bucket).get("Contents", [])
        return {
            o["Key"]: self.s3.get_object(Bucket=self.bucket, Key=o["Key"])["Body"].read()
            for o in listed
        }


def volume(server: S3Server, workdir: Path, **extra: Any) -> Volume:
    """A new bucket of `server`, the folder workdir/l and its state in workdir/s."""
    bucket = server.new_bucket()
    local = workdir / "l"
    return Volume(bucket, server.client(), local, config(bucket, local, workdir / "s", **extra))


def race_before(
    monkeypatch: pytest.MonkeyPatch, vol: Volume, method: str, body: bytes = b"racer"
) -> None:
    """Another writer puts `body` at an action's key right before each `Transfers.<method>`
    (upload, delete_remote): after our listing, before our request."""
    original = getattr(Transfers, method)

    async def racing(self: Transfers, action: Any) -> Any:
        vol.put(action.path, body)
        return await original(self, action)

    monkeypatch.setattr(Transfers, method, racing)


def first_arguments(monkeypatch: pytest.MonkeyPatch, cls: type, method: str) -> list[Any]:
    """The first argument (after self) of every call of the async `cls.method` from now on,
    in order; the calls go through unchanged."""
    seen: list[Any] = []
    original = getattr(cls, method)

    async def spy(self: Any, first: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(first)
        return await original(self, first, *args, **kwargs)

    monkeypatch.setattr(cls, method, spy)
    return seen


def spy_on_hashing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the scan hashes from now on, in order."""
    hashed: list[str] = []
    original = scan_module._hash_one

    def spy(root: Path, rel: str) -> Any:
        hashed.append(rel)
        return original(root, rel)

    monkeypatch.setattr(scan_module, "_hash_one", spy)
    return hashed


async def edited_on_both_sides(
    server: S3Server,
    workdir: Path,
    path: str = "nb.ipynb",
    *,
    mine: bytes = b"mine",
    theirs: bytes = b"theirs",
    **extra: Any,
) -> Volume:
    """`path` synced once ("base"), then changed in the bucket (`theirs`) and in the folder
    (`mine`): the next sync of either direction meets a conflict."""
    vol = volume(server, workdir, **extra)
    write(vol.local / path, b"base")
    assert (await sync(vol.cfg, FIN)).ok
    vol.put(path, theirs)
    write(vol.local / path, mine)
    return vol
