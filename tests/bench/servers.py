"""The S3 server a benchmark run talks to, and how the harness fills and checks its buckets.

- `rclone` (default): `rclone serve s3` over a folder. Buckets are folders, so a data set is
  seeded by copying files (no tool is favoured by having written it) and checked by walking
  the folder. But it lists slowly at scale: 200,000 keys take ~26 s whoever asks, a floor
  under every no-op row of that size.
- `seaweed`: SeaweedFS `weed mini` (tests/support/seaweed.py), for the scale rows (issue 12):
  its filer answers a page of a listing in time independent of the bucket's size. Its buckets
  are not folders, so a data set is seeded through S3 with `s5cmd cp` (~1,100 objects/s here
  idle, ~600/s at load 13-20; `weed filer.copy` is twice as fast but leaves objects with an
  empty ETag, which no real S3 does and which makes `rclone sync --checksum` re-send
  everything), and checked with an `s5cmd ls`. Objects get the upload time as LastModified,
  so after seeding the source tree takes each object's LastModified as its mtime (a copy with
  the same mtimes, as the rclone server gives): the peers' sync verbs compare the two and
  would otherwise re-send all.

Why SeaweedFS for the 1,000,000-file rows, though seeding it takes many minutes: on `rclone
serve s3` the listing's pages slow as the bucket grows (1,002 pages summed 48 s at 1 M against
3.5 s for 202 at 200,000), a floor under every tool's no-op that breaks the linearity the
issue measures; and its rows need the source tree, the bucket's folder and a warm copy per
tool (4 copies of ~4.5 GiB at 1 M on tmpfs), where SeaweedFS rows share one source tree and
one bucket (~1 KiB an object in its store): 24 GiB of RAM shared with other work holds one,
not the other.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from sidecar.locals3 import LocalS3
from tests.bench.peers import Server, s5cmd_binary
from tests.bench.workloads import copy_tree, remove
from tests.support.s3client import s3_client
from tests.support.seaweed import SeaweedS3

SERVERS = ("rclone", "seaweed")
SEED_WORKERS = "64"  # s5cmd workers for seeding: 64 and 256 were 17 s and 20 s for 20,000


class BenchServer(Protocol):
    kind: str
    port: int

    def start(self, buckets: list[str]) -> None: ...

    def stop(self) -> None: ...

    def server(self) -> Server: ...

    def fill(self, tree: Path, bucket: str, prefix: str, align_mtimes: bool) -> None:
        """bucket/prefix/ holds the tree's files; with align_mtimes, the tree's mtimes are
        those the server reports as LastModified afterwards."""
        ...

    def objects(self, bucket: str, prefix: str) -> list[tuple[str, int, float]]:
        """(key below prefix/, size, LastModified) of every object under bucket/prefix/, the
        sidecar's own `.netvol/` left out."""
        ...

    def remove(self, bucket: str, prefix: str) -> None: ...


def make_server(kind: str, workspace: Path) -> BenchServer:
    if kind == "rclone":
        return RcloneServer(workspace)
    if kind == "seaweed":
        return SeaweedServer(workspace)
    raise ValueError(f"unknown server {kind}; choose from {', '.join(SERVERS)}")


class RcloneServer:
    kind = "rclone"

    def __init__(self, workspace: Path):
        self.s3 = LocalS3(workspace / "s3", log_path=workspace / "rclone-serve.log")

    @property
    def port(self) -> int:
        return self.s3.port

    def start(self, buckets: list[str]) -> None:
        # The server caches folder listings (5 min): a bucket folder made on disk after the
        # server listed its parent stays invisible. So every bucket is made before it starts,
        # and each is filled on disk before anything lists it.
        for name in buckets:
            self.s3.make_bucket(name)
        self.s3.start()

    def stop(self) -> None:
        self.s3.stop()

    def server(self) -> Server:
        return Server(self.s3.endpoint, self.s3.access_key, self.s3.secret_key)

    def fill(self, tree: Path, bucket: str, prefix: str, align_mtimes: bool) -> None:
        # The server reports the files' own mtimes: a copy keeps them aligned.
        copy_tree(tree, self.s3.root / bucket / prefix)
        prime_listing(self.server(), bucket, prefix)

    def objects(self, bucket: str, prefix: str) -> list[tuple[str, int, float]]:
        root = self.s3.root / bucket / prefix
        found = []
        for folder, dirs, names in os.walk(root):
            if folder == str(root) and ".netvol" in dirs:
                dirs.remove(".netvol")
            for name in names:
                info = os.lstat(os.path.join(folder, name))
                key = os.path.relpath(os.path.join(folder, name), root)
                found.append((key, info.st_size, info.st_mtime))
        return found

    def remove(self, bucket: str, prefix: str) -> None:
        # The bucket folder stays, empty: the server still has it cached.
        remove(self.s3.root / bucket / prefix)


class SeaweedServer:
    kind = "seaweed"

    def __init__(self, workspace: Path):
        self.s3 = SeaweedS3(workspace / "seaweed", log_path=workspace / "weed.log")
        self.workspace = workspace

    @property
    def port(self) -> int:
        return self.s3.port

    def start(self, buckets: list[str]) -> None:
        self.s3.start()
        for name in buckets:
            self.s3.make_bucket(name)

    def stop(self) -> None:
        self.s3.stop()

    def server(self) -> Server:
        return Server(self.s3.endpoint, self.s3.access_key, self.s3.secret_key)

    def s5cmd(self, *args: str, timeout: float = 7200) -> str:
        # Not `--log error` here: it silences ls's answer too (s5cmd prints it at "info").
        argv = [s5cmd_binary(), "--endpoint-url", self.s3.endpoint, *args]
        env = dict(os.environ, **self.s3.env())
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"s5cmd {' '.join(args)}: exit {done.returncode}: {done.stderr[-800:]}"
            )
        return done.stdout

    def fill(self, tree: Path, bucket: str, prefix: str, align_mtimes: bool) -> None:
        self.s5cmd(
            "--log",
            "error",
            "--numworkers",
            SEED_WORKERS,
            "cp",
            f"{tree}/*",
            f"s3://{bucket}/{prefix}/",
        )
        if align_mtimes:
            for key, _size, modified in self.objects(bucket, prefix):
                os.utime(tree / key, (modified, modified))

    def objects(self, bucket: str, prefix: str) -> list[tuple[str, int, float]]:
        found = []
        head = f"s3://{bucket}/{prefix}/"
        for line in self.s5cmd("--json", "ls", f"{head}*").splitlines():
            entry = json.loads(line)
            key = entry["key"].removeprefix(head)
            if entry.get("type") == "file" and not key.startswith(".netvol/"):
                modified = datetime.fromisoformat(entry["last_modified"]).timestamp()
                found.append((key, int(entry["size"]), modified))
        return found

    def remove(self, bucket: str, prefix: str) -> None:
        # Batched DeleteObjects: seconds even for a large prefix. Nothing to remove is fine.
        argv = [s5cmd_binary(), "--endpoint-url", self.s3.endpoint, "--log", "error"]
        subprocess.run(
            [*argv, "rm", f"s3://{bucket}/{prefix}/*"],
            env=dict(os.environ, **self.s3.env()),
            capture_output=True,
            check=False,
        )


def client_of(server: Server) -> Any:
    """A client of the server, for the harness's own untimed requests."""
    return s3_client(server.endpoint, server.access_key, server.secret_key)


def prime_listing(server: Server, bucket: str, prefix: str) -> None:
    """List once, untimed: rclone computes each object's MD5 ETag on first listing."""
    client = client_of(server)
    paginator = client.get_paginator("list_objects_v2")
    for _page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        pass
