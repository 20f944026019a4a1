"""Syncs through a fault-injecting proxy (issue 9): 500s, 503 SlowDown, resets before and after
the server applied the request, truncated bodies, stalls and trickles at 15% of requests.

Real processes (`sidecar pull|finalize --once`) against moto's server through
tests/support/faultproxy.py (AWS_ENDPOINT_URL), with SIDECAR_REQUEST_TIMEOUT=1 so a stall costs a
second. Replica A writes a mixed tree and finalizes it, B pulls it, both edit in rounds. Every
run either succeeds or fails naming keys (exit 1, each error with its path and reason, or a
fatal naming the remote; never a traceback, never a hang); a failed run is rerun (bounded)
until it succeeds. No run may report a conflict (A and B never edit one file between syncs)
nor "the object changed in the bucket" (nobody else writes). After every run, every file and
object holds a version that existed; at the end both sides are equal by hash, read straight
from the server (not through the proxy), each object's xxh3 metadata is the hash of its bytes,
and a rerun moves nothing.

The faults injected are printed by kind and operation (`pytest -s`). FAULT_SEED=<n> replays.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from urllib.parse import urlsplit

import pytest

from tests.support.cli_support import SIZING, Run, Volume, data_of, keyed, tree, write_tree
from tests.support.faultproxy import AFTER_APPLY, ALL_FAULTS, Fault, FaultProxy, Request, Schedule
from tests.support.replicas import MiB, Replica, World

RATE = 0.15
MAX_RUNS = 8  # reruns of one sync until it succeeds; each fault is transient
RUN_TIMEOUT = 150  # a run still going after this is hung: a failure, not a slow machine
SEED = int(os.environ.get("FAULT_SEED", "14"))
CHANGED = "changed in the bucket"  # transfer.py's words for a precondition failure
# A trickled part (5 MiB) is cut only by its deadline, 2 x SIDECAR_REQUEST_TIMEOUT + 5 MiB at
# 64 KiB/s ~ 80 s: right, but too slow for the default run. There, parts are not trickled (small
# requests are); the soak trickles everything.
SMALL_ONLY = (Fault.TRICKLE,)
# Known open defects, spared until fixed (in the soak too, so that it finds the next one). None
# now; was: issue 9 item 14, a PutObject reset after the server applied it on a kept-alive
# connection, resent by http11's pool as a stale connection (fixed in cec1cc9).
SPARED: tuple[tuple[Fault, str], ...] = ()


class Faulty(World):
    """The fault scenario: every sync through the proxy, rerun until it succeeds."""

    def __init__(self, vol: Volume, seed: int, proxy: FaultProxy) -> None:
        env = {"AWS_ENDPOINT_URL": proxy.endpoint, "SIDECAR_REQUEST_TIMEOUT": "1"}
        super().__init__(vol, seed, ("--concurrency", "8"), env)
        self.proxy = proxy
        self.outcomes: Counter[str] = Counter()  # "finalize ok", "pull failed", ...
        self.reasons: Counter[str] = Counter()  # why failed runs failed (errors and fatals)
        self.step = ""

    def where(self, what: str = "") -> str:
        return f"FAULT_SEED={self.seed} {self.step}: {what}"

    def complete(self, replica: Replica, verb: str) -> Run:
        self.step = f"{replica.name} {verb}"
        for _attempt in range(MAX_RUNS):
            try:
                run = replica.run(verb, timeout=RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    self.where(f"hung for {RUN_TIMEOUT}s; faults now: {self.proxy.active()}")
                ) from None
            self.check_run(run)
            self.check_versions(f"{replica.name}'s folder", tree(replica.local))
            self.check_versions("the bucket", self.bucket_tree())
            self.outcomes[f"{verb} {'ok' if run.code == 0 else 'failed, named'}"] += 1
            summary = run.summary
            self.reasons.update(e["reason"][:70] for e in summary["errors"])
            if summary["fatal"]:
                self.reasons[str(summary["fatal"])[:70]] += 1
            if run.code == 0:
                return run
        raise AssertionError(self.where(f"still failing after {MAX_RUNS} runs\n{run}"))

    def check_run(self, run: Run) -> None:
        """Finishes, or fails by name; never a crash, a conflict or a phantom writer."""
        assert run.code in (0, 1), self.where(f"exit {run.code}\n{run}")
        assert "Traceback" not in run.err, self.where(f"a traceback\n{run}")
        summary = run.summary
        assert summary["conflicts"] == [], self.where(f"self-conflict\n{run}")
        for error in summary["errors"]:
            assert error["path"] and error["reason"], self.where(f"an unnamed error\n{run}")
            # Nobody else writes: a precondition failure is our own retried write (item 14).
            assert CHANGED not in error["reason"], self.where(f"a phantom writer\n{run}")
        if run.code == 1:
            fatal = summary["fatal"] or ""
            assert summary["errors"] or self.vol.bucket in fatal, self.where(
                f"failed without naming a key or the remote\n{run}"
            )

    def check_equal(self, *replicas: Replica) -> None:
        remote = self.bucket_tree()
        for replica in replicas:
            assert tree(replica.local) == remote, self.where(f"{replica.name} != the bucket")
        self.check_hash_metadata()

    def report(self, proxy: FaultProxy) -> str:
        runs = ", ".join(f"{name}: {count}" for name, count in sorted(self.outcomes.items()))
        why = "".join(f"\n  {count} x {reason}" for reason, count in self.reasons.most_common())
        return f"fault suite, FAULT_SEED={self.seed}\n{proxy.table()}\nruns: {runs}{why}"


def scenario(
    vol: Volume,
    seed: int,
    rounds: int,
    small_only: tuple[Fault, ...] = (),
    spared: tuple[tuple[Fault, str], ...] = (),
) -> None:
    upstream = urlsplit(vol.server.endpoint)
    assert upstream.hostname and upstream.port
    schedule = Schedule(seed, RATE, ALL_FAULTS, small_only, spared)
    with FaultProxy(upstream.hostname, upstream.port, schedule) as proxy:
        world = Faulty(vol, seed, proxy)
        try:
            world.initial_tree(bigs=2, smalls=40)
            world.complete(world.a, "finalize")
            world.check_equal(world.a)
            world.complete(world.b, "pull")
            world.check_equal(world.a, world.b)
            for _ in range(rounds):
                world.a_edits()
                world.complete(world.a, "finalize")
                world.complete(world.b, "pull")
                world.check_equal(world.a, world.b)
                world.b_edits(sorted(tree(world.b.local)), 5)
                world.complete(world.b, "finalize")
                world.complete(world.a, "pull")
                world.check_equal(world.a, world.b)
            world.converge()
        finally:
            print("\n" + world.report(proxy))
        injected = proxy.faults()
    assert sum(injected.values()) >= 20, "too few faults to have tested anything"


def test_syncs_through_faults_finish_or_fail_by_name(mvol: Volume) -> None:
    scenario(mvol, SEED, rounds=2, small_only=SMALL_ONLY, spared=SPARED)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(200, 204))
def test_faults_soak(mvol: Volume, seed: int) -> None:
    scenario(mvol, seed, rounds=6, spared=SPARED)


@pytest.mark.parametrize("fault", AFTER_APPLY)
def test_a_lost_create_multipart_answer_leaves_no_upload_behind(mvol: Volume, fault: Fault) -> None:
    """The server created the upload, its answer never came: the retry made a second one,
    and the first was never aborted (an orphan billed forever). The sync aborts it."""
    local, state = mvol.work / "local", mvol.work / "state"
    write_tree(local, {"big.bin": data_of(6 * MiB, "big"), "small.txt": b"small\n"})
    upstream = urlsplit(mvol.server.endpoint)
    assert upstream.hostname and upstream.port
    faulted: list[str] = []

    def first_create(request: Request) -> Fault:
        if request.operation == "CreateMultipartUpload" and not faulted:
            faulted.append(request.target)
            return fault
        return Fault.NONE

    env = mvol.env(SIDECAR_REQUEST_TIMEOUT="1")
    with FaultProxy(upstream.hostname, upstream.port, first_create) as proxy:
        env["AWS_ENDPOINT_URL"] = proxy.endpoint
        runs = [mvol.finalize(local, state, *SIZING, env=env)]
        if runs[0].code != 0:  # a trickled create outlives its deadline: the file fails by name
            assert runs[0].error_paths == ["big.bin"], runs[0]
            runs.append(mvol.finalize(local, state, *SIZING, env=env))
    assert faulted and runs[-1].code == 0, runs[-1]
    client = mvol.server.client()
    assert client.list_multipart_uploads(Bucket=mvol.bucket).get("Uploads", []) == []
    assert mvol.objects() == keyed({"big.bin": data_of(6 * MiB, "big"), "small.txt": b"small\n"})
