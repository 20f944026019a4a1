"""Two replicas of one volume and the history of every version, for the crash and fault
suites of issue 9 (test_kill9.py, test_faults.py).

Replica A writes a mixed tree (files above the multipart threshold and many small ones) and
finalizes it; replica B pulls it; both keep editing. `World` holds the seeded edits, the
history of every content each path ever had (so a file or an object can be checked to hold a
version that existed, never half of one or a mix), the bucket read straight from the server,
and the checks both suites share: no self-conflict, no half file, no wrong BASE record, and
at the end both sides equal, nothing left behind, and a rerun that moves nothing.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.core.model import BaseEntry
from sidecar.engine.hashing import content_hash_bytes
from sidecar.engine.state import StateStore, state_path_for
from tests.conftest import sidecar_args
from tests.support.cli_support import SIZING, TEMP_PREFIX, Run, Volume, data_of, sha, temps, tree

MiB = 1024**2
THRESHOLD = 5 * MiB  # SIZING: the smallest part S3 allows, so big files stay small
CONFLICT_MARK = ".conflict-"


@dataclass
class Replica:
    name: str
    vol: Volume
    local: Path
    state: Path
    options: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # on top of the server's

    def args(self, verb: str) -> list[str]:
        return sidecar_args(verb, self.vol.remote, self.local, self.state, *self.options)

    def run(self, verb: str, timeout: float = 180) -> Run:
        return self.vol.run(
            verb, self.local, self.state, *self.options, env=self.vol.env(**self.env),
            timeout=timeout,
        )  # fmt: skip

    def stored(self) -> StateStore:
        """The state as the next run will load it: snapshot + journal, from the disk."""
        remote = f"s3://{self.vol.bucket}/{self.vol.prefix}/"
        store = StateStore(state_path_for(self.state, remote, self.local), remote, self.local)
        store.load()
        store.close_journal()
        return store

    def base(self) -> dict[str, BaseEntry]:
        return self.stored().base

    def open_uploads(self) -> dict[str, str]:
        """upload id -> key of the multipart uploads the journal says are open."""
        return self.stored().open_uploads


@dataclass
class History:
    """Every content each path ever had, on either side (sha256 and xxh3-128)."""

    sha: dict[str, set[str]] = field(default_factory=dict)
    xxh: dict[str, set[str]] = field(default_factory=dict)

    def add(self, path: str, body: bytes) -> None:
        self.sha.setdefault(path, set()).add(sha(body))
        self.xxh.setdefault(path, set()).add(content_hash_bytes(body))


class World:
    """A and B on one bucket prefix, seeded edits, the history, the shared checks."""

    def __init__(
        self, vol: Volume, seed: int, options: tuple[str, ...], env: dict[str, str]
    ) -> None:
        self.vol = vol
        self.seed = seed
        self.rng = random.Random(seed)
        self.client = vol.server.client()  # straight to the server, never through a proxy
        options = (*SIZING, *options)
        self.a = Replica("A", vol, vol.work / "A", vol.work / "stateA", options, env)
        self.b = Replica("B", vol, vol.work / "B", vol.work / "stateB", options, env)
        self.history = History()
        self.b_edited: set[str] = set()  # A leaves these alone: no real conflict, ever
        self.generation = 0
        self.spared_uploads: set[str] = set()  # upload ids the orphan check leaves out

    def where(self, what: str = "") -> str:
        """Names the seed (and the step) in every failure, so it can be replayed."""
        return f"seed {self.seed}: {what}"

    # ---- the users' side ----
    def write(self, replica: Replica, rel: str, body: bytes) -> None:
        path = replica.local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".edit")
        tmp.write_bytes(body)
        os.replace(tmp, path)  # the user's editor saves atomically, as most do
        self.history.add(rel, body)

    def body(self, rel: str, big: bool) -> bytes:
        self.generation += 1
        # Big: three parts at the multipart threshold; small: up to 3,000 bytes.
        size = 2 * THRESHOLD + self.rng.randint(MiB, 3 * MiB) if big else self.rng.randint(0, 3000)
        return data_of(size, f"{self.seed}/{rel}/{self.generation}")

    def initial_tree(self, bigs: int, smalls: int) -> None:
        for number in range(bigs):
            self.write(self.a, f"models/big{number}.bin", self.body("big", True))
        for number in range(smalls):
            self.write(self.a, f"d{number % 8}/f{number:03d}.txt", self.body("small", False))

    def edit_some(self, replica: Replica, among: list[str], count: int) -> list[str]:
        chosen = self.rng.sample(among, min(count, len(among)))
        for rel in chosen:
            self.write(replica, rel, self.body(rel, rel.startswith("models/")))
        return chosen

    def a_edits(self, avoid: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """A modifies one big and some small files, adds some and deletes a couple (never
        a file B edited: B's edits must reach the bucket without a real conflict)."""
        files = sorted(set(tree(self.a.local)) - self.b_edited - avoid)
        smalls = [p for p in files if not p.startswith("models/")]
        self.edit_some(self.a, [p for p in files if p.startswith("models/")], 1)
        self.edit_some(self.a, smalls, 12)
        for _ in range(4):
            rel = f"new/g{self.generation:04d}.txt"
            self.write(self.a, rel, self.body(rel, False))
        for rel in self.rng.sample(smalls, min(2, len(smalls))):
            (self.a.local / rel).unlink(missing_ok=True)

    def b_edits(self, among: list[str], count: int) -> None:
        self.b_edited.update(self.edit_some(self.b, among, count))

    # ---- the bucket, read straight from the server ----
    def objects(self) -> dict[str, dict[str, Any]]:
        """relpath -> listing entry for every object under the prefix."""
        prefix = self.vol.prefix + "/"
        out: dict[str, dict[str, Any]] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.vol.bucket, Prefix=prefix
        ):
            for item in page.get("Contents", []):
                out[item["Key"][len(prefix) :]] = item
        return out

    def get(self, rel: str) -> dict[str, Any]:
        return self.client.get_object(Bucket=self.vol.bucket, Key=f"{self.vol.prefix}/{rel}")  # type: ignore[no-any-return]

    def bodies(self) -> dict[str, tuple[dict[str, Any], bytes]]:
        """relpath -> (listing entry, bytes)."""
        return {rel: (item, self.get(rel)["Body"].read()) for rel, item in self.objects().items()}

    def bucket_tree(self) -> dict[str, str]:
        return {rel: sha(body) for rel, (_item, body) in self.bodies().items()}

    def upload_ids(self) -> dict[str, str]:
        """upload id -> key of every multipart upload open on the server."""
        listed = self.client.list_multipart_uploads(Bucket=self.vol.bucket)
        return {u["UploadId"]: u["Key"] for u in listed.get("Uploads", [])}

    # ---- shared checks ----
    def check_no_self_conflict(self) -> None:
        """No writer but A and B, who never edit one file between syncs: a conflict copy
        anywhere is the engine mistaking its own write for someone else's."""
        for side, names in (
            ("A", tree(self.a.local)),
            ("B", tree(self.b.local)),
            ("the bucket", self.objects()),
        ):
            copies = sorted(n for n in names if CONFLICT_MARK in n)
            assert not copies, self.where(f"self-conflict copies on {side}: {copies}")

    def check_versions(self, side: str, contents: dict[str, str]) -> None:
        """No half file under a final name: each one holds a version that existed."""
        for rel, digest in contents.items():
            if rel.rsplit("/", 1)[-1].startswith(TEMP_PREFIX):
                continue  # a temp file: the notebook ignores it, the next run removes it
            assert digest in self.history.sha.get(rel, set()), self.where(
                f"{side}: {rel} holds bytes that were never a version of it"
            )

    def check_base(self, replica: Replica) -> dict[str, BaseEntry]:
        """No wrong record: every BASE hash is a version that existed."""
        base = replica.base()
        for rel, entry in base.items():
            assert entry.hash in self.history.xxh.get(rel, set()), self.where(
                f"{replica.name}'s BASE records {rel} with content that never existed"
            )
        return base

    def check_hash_metadata(self) -> None:
        """Both sides by hash: each object's xxh3 metadata is the hash of its bytes."""
        for rel, (_item, body) in self.bodies().items():
            meta = self.client.head_object(Bucket=self.vol.bucket, Key=f"{self.vol.prefix}/{rel}")
            assert meta["Metadata"].get("xxh3-128") == content_hash_bytes(body), self.where(
                f"the object {rel} carries a hash that is not of its bytes"
            )

    # ---- the end ----
    def complete(self, replica: Replica, verb: str) -> Run:
        """One run that must succeed (the crash suite); the fault suite retries."""
        run = replica.run(verb)
        assert run.code == 0, self.where(f"{replica.name} {verb} to completion\n{run}")
        assert run.summary["conflicts"] == [], self.where(f"self-conflict\n{run}")
        return run

    def converge(self) -> None:
        """Everything settles: B pulls, pushes its edits, A pulls; then both sides are
        equal by hash, nothing is left behind, and a rerun of every verb moves nothing."""
        self.complete(self.b, "pull")
        remote, local_b = self.bucket_tree(), tree(self.b.local)
        for rel in (set(remote) | set(local_b)) - self.b_edited:
            assert local_b.get(rel) == remote.get(rel), self.where(f"B's {rel} != the bucket's")
        self.complete(self.b, "finalize")
        self.complete(self.a, "pull")
        remote = self.bucket_tree()
        self.check_versions("the bucket", remote)
        assert tree(self.b.local) == remote, self.where("B != the bucket")
        assert tree(self.a.local) == remote, self.where("A != the bucket")
        self.check_hash_metadata()
        for replica in (self.a, self.b):
            assert temps(replica.local) == [], self.where(f"temp files left in {replica.name}")
            for verb in ("pull", "finalize"):
                again = self.complete(replica, verb)
                moved = again.summary["files_transferred"] + again.summary["files_deleted"]
                assert moved == 0, self.where(f"a no-op {verb} moved files\n{again}")
            hashes = {rel: e.hash for rel, e in replica.base().items()}
            assert hashes == {
                rel: content_hash_bytes((replica.local / rel).read_bytes()) for rel in remote
            }, self.where(f"{replica.name}'s BASE is not exactly its tree")
        orphans = {i: k for i, k in self.upload_ids().items() if i not in self.spared_uploads}
        assert not orphans, self.where(f"multipart uploads left open (orphans): {orphans}")
        self.check_no_self_conflict()
