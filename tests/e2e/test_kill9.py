"""kill -9 at random moments of pull and finalize of a mixed tree, then rerun (issue 9).

Real processes: `sidecar finalize|pull --once` against moto's server (it honours conditional
writes), SIGKILLed at seeded random moments and at deterministic points (a multipart upload
open on the server; a multipart download's temp file in the folder; k files moved), then
rerun. Replica A writes the tree and finalizes it; replica B pulls it. Between kills the users
keep working: A edits, adds and deletes files (and finalizes them for B's pulls), B edits files
it has pulled. After every kill:

- no half file under a final name: every file in B's folder and every object in the bucket
  holds a version that existed (sha256 against the history of that path);
- no lost record: a transfer that finished before the kill is in the journal on disk (BASE,
  read as the next run reads it), and no BASE entry names content that never existed;
- no self-conflict: no `.conflict-` copy anywhere, on either side, at any time.

At the end, reruns to completion: both sides equal, no `.netvol-tmp.*` left, no multipart
upload open on the server (ListMultipartUploads), BASE of each replica is exactly its tree,
and a rerun of every verb moves nothing.

Seeded: CHAOS_SEED=<n> replays one run; each failure message names the seed and the kill.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from sidecar.engine.hashing import content_hash_bytes
from tests.conftest import sidecar_args
from tests.support.cli_support import (
    SIZING,
    TEMP_PREFIX,
    Volume,
    data_of,
    keyed,
    kill9_when,
    running,
    sha,
    start_cli,
    tree,
    write_tree,
)
from tests.support.faultproxy import Fault, FaultProxy, Request
from tests.support.replicas import THRESHOLD, MiB, Replica, World

CONCURRENCY = ("--concurrency", "4")  # few slots: a run lasts long enough to be hit mid-way
# A transfer that ended this long before the kill must be in the journal (issue 9 item 3: "within
# a bounded time even if nothing follows"). Uploads are recorded as they end; a pull records a
# batch of downloads once their folders are fsynced (item 4: up to 0.5 s). Moto's LastModified
# has whole seconds, ctime is exact.
LOCAL_MARGIN = 1.5
REMOTE_MARGIN = 1.5
SEED = int(os.environ.get("CHAOS_SEED", "9"))
QUIET_SECONDS = 1.0  # the server is done with a dead process's requests once this quiet
# Known open defects. Each is left out of the checks below by name, and counted in the report.
# CREATE_WINDOW (fixed, no item covered it): a kill after the server created a multipart upload
# but before its id reached the journal left an upload no later run knew to abort (an orphan);
# test_kill_after_the_server_created_an_upload_leaves_no_orphan. While True, the final orphan
# check leaves out uploads the journal never recorded.
CREATE_WINDOW_OPEN = False
# PULL_RECORDS (fixed in 2a564b7; item 3 regressed by item 4's batching in 26c69ac): a pull's
# BASE records waited for a later record or the end of the sync, so kill -9 during a long
# download lost records of files placed seconds earlier. While True, such files are counted
# and left alone by A's edits instead of failing the run.
PULL_RECORDS_OPEN = False
# KNOWN_WINDOW (open): a kill after the server applied a write but before its answer reached
# the sidecar leaves an object the journal cannot know about (no record is written before the
# request). Rerun as it is, it is adopted (same bytes); but if the user edits that file first,
# the next finalize keeps the bucket's version as a `.conflict-` copy of A's own upload.
# Reproduced every time with tests/support/faultproxy.py stalling one PutObject's answer, then
# kill -9, edit, finalize. No item of issue 9 covers it (the fix is a write-ahead record of
# the hash being sent); A's edits leave those files alone so the rest stays checked.


@dataclass
class Kill:
    verb: str
    trigger: str
    killed: bool  # False: the run finished before the trigger fired or the delay ran out
    started: float  # wall clock of the start
    at: float  # wall clock of the kill (or of the end)


class Chaos(World):
    """The crash scenario: runs of A and B killed at seeded moments, with checks after each."""

    def __init__(self, vol: Volume, seed: int, logs: Path) -> None:
        super().__init__(vol, seed, CONCURRENCY, {})
        self.logs = logs  # kept by pytest after the test (tmp_path), unlike the tmpfs workdir
        self.kills: list[Kill] = []
        self.unrecorded: dict[str, str] = {}  # upload id -> key: see CREATE_WINDOW
        self.lost_pull_records = 0  # see PULL_RECORDS
        # How long a whole run of each verb lasts here (learnt from runs that ended): kill
        # times are drawn within it, whatever the machine's speed.
        self.typical = {"finalize": 1.0, "pull": 1.0}

    def where(self, what: str = "") -> str:
        return f"CHAOS_SEED={self.seed} kill #{len(self.kills)}: {what}"

    # ---- one killed run ----
    def run_and_kill(
        self, replica: Replica, verb: str, trigger: str, fired: Callable[[], bool], delay: float
    ) -> Kill:
        logs = self.logs / f"{len(self.kills):03d}-{replica.name}-{verb}"
        started = time.time()
        proc = start_cli(replica.args(verb), self.vol.env(), logs)
        deadline = time.monotonic() + 120
        began: float | None = None  # when it held its lock: the sync proper, not Python's start
        try:
            while proc.poll() is None:
                assert time.monotonic() < deadline, self.where(f"{trigger} never fired")
                if began is None and holds_lock(replica.state, proc.pid):
                    began = time.monotonic()
                if began is not None and fired():
                    break
                time.sleep(0.01)
            kill_at = time.monotonic() + delay
            while proc.poll() is None and time.monotonic() < kill_at:
                time.sleep(0.005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            ended = time.monotonic()
        finally:
            if proc.poll() is None and time.monotonic() > deadline:
                proc.kill()
            code = proc.wait(timeout=30)
        kill = Kill(verb, trigger, code == -signal.SIGKILL, started, time.time())
        self.quiesce()
        if not kill.killed:
            if began is not None:
                self.typical[verb] = ended - began
            # Nothing went wrong in this run but time: it must have ended well.
            assert code == 0, (
                self.where(f"{trigger}: exit {code}\n") + (logs / "stderr").read_text()
            )
        self.kills.append(kill)
        return kill

    def quiesce(self) -> None:
        """Wait until the server is done with what the dead process sent: a request fully
        received (a Complete of 12 MiB) is still applied after the kill, and a check that
        ran before it would see the older version."""

        def snapshot() -> tuple[object, ...]:
            objects = {rel: item["ETag"] for rel, item in self.objects().items()}
            return (objects, sorted(self.upload_ids()))

        last, stable_since = snapshot(), time.monotonic()
        while time.monotonic() - stable_since < QUIET_SECONDS:
            time.sleep(0.1)
            now = snapshot()
            if now != last:
                last, stable_since = now, time.monotonic()

    def note_unrecorded_uploads(self) -> None:
        """Uploads open on the server that A's journal never heard of: created as the kill
        came (CREATE_WINDOW). The final orphan check leaves these out while it is open."""
        known = set(self.a.open_uploads())
        for upload_id, key in self.upload_ids().items():
            if upload_id not in known:
                self.unrecorded[upload_id] = key

    def check_after_finalize_kill(self, kill: Kill) -> tuple[list[str], set[str]]:
        """Returns the files whose upload is done and recorded (safe for A to edit), and
        those the journal cannot know about (written as a kill came: see KNOWN_WINDOW)."""
        self.check_no_self_conflict()
        self.note_unrecorded_uploads()
        bodies = self.bodies()
        self.check_versions("bucket", {rel: sha(body) for rel, (_item, body) in bodies.items()})
        base = self.check_base(self.a)
        local = tree(self.a.local)
        done, in_doubt = [], set()
        for rel, (item, body) in bodies.items():
            entry = base.get(rel)
            recorded = entry is not None and entry.hash == content_hash_bytes(body)
            ended = item["LastModified"].timestamp()
            # Written by this run (moto's LastModified is truncated to the second) and
            # long enough before the kill: the journal must say so.
            if kill.started <= ended <= kill.at - REMOTE_MARGIN:
                assert recorded or local.get(rel) != sha(body), self.where(
                    f"{kill.trigger}: lost record: {rel} was uploaded {kill.at - ended:.1f}s "
                    "before the kill but A's journal does not say so"
                )
            if recorded and local.get(rel) == sha(body):
                done.append(rel)
            elif not recorded:
                in_doubt.add(rel)
        return done, in_doubt

    def check_after_pull_kill(self, kill: Kill) -> tuple[list[str], set[str]]:
        """Returns the files whose download is done and recorded (safe for B to edit), and
        those whose record may still be on its way (A leaves them alone: B's next pull could
        not tell B's own download from a local edit)."""
        self.check_no_self_conflict()
        local = tree(self.b.local)
        self.check_versions("B", local)
        base = self.check_base(self.b)
        remote = self.bucket_tree()
        done, in_doubt = [], set()
        for rel, digest in local.items():
            path = self.b.local / rel
            if remote.get(rel) != digest or rel in self.b_edited:
                continue
            entry = base.get(rel)
            if entry is not None and entry.hash == content_hash_bytes(path.read_bytes()):
                done.append(rel)
                continue
            placed = path.lstat().st_ctime
            # Placed by this run (an earlier killed run may have left it unrecorded, and this
            # one died before adopting it) and long enough before the kill.
            if kill.started <= placed <= kill.at - LOCAL_MARGIN:
                self.lost_pull_records += 1
                assert PULL_RECORDS_OPEN, self.where(
                    f"{kill.trigger}: lost record: {rel} was in place {kill.at - placed:.1f}s "
                    "before the kill but B's journal does not say so"
                )
            in_doubt.add(rel)
        return done, in_doubt

    # ---- triggers ----
    def finalize_trigger(self) -> tuple[str, Callable[[], bool], float]:
        kind = self.rng.choice(["multipart", "objects", "time", "time"])
        if kind == "multipart":  # a multipart upload is open on the server
            return kind, lambda: bool(self.upload_ids()), self.rng.uniform(0, 0.3)
        if kind == "objects":  # k objects changed since the run began
            before = {rel: item["ETag"] for rel, item in self.objects().items()}
            k = self.rng.randint(1, 15)

            def changed() -> bool:
                now = self.objects()
                return sum(before.get(rel) != item["ETag"] for rel, item in now.items()) >= k

            return f"objects>={k}", changed, 0.0
        return kind, lambda: True, self.rng.uniform(0, 1.1 * self.typical["finalize"])

    def pull_trigger(self) -> tuple[str, Callable[[], bool], float]:
        kind = self.rng.choice(["multipart", "files", "time", "time"])
        if kind == "multipart":  # a multipart download's temp file is in the folder

            def big_temp() -> bool:
                for dirpath, _dirs, names in os.walk(self.b.local):
                    for name in names:
                        if name.startswith(TEMP_PREFIX):
                            path = Path(dirpath) / name
                            try:
                                if path.stat().st_size >= THRESHOLD:
                                    return True
                            except FileNotFoundError:
                                continue
                return False

            return kind, big_temp, self.rng.uniform(0, 0.2)
        if kind == "files":  # k files renamed into place since the run began
            before = inodes(self.b.local)
            k = self.rng.randint(1, 15)

            def landed() -> bool:
                now = inodes(self.b.local)
                return sum(before.get(rel) != ino for rel, ino in now.items()) >= k

            return f"files>={k}", landed, 0.0
        return kind, lambda: True, self.rng.uniform(0, 1.1 * self.typical["pull"])

    # ---- the scenario ----
    def finalize_phase(self, kills: int) -> None:
        """A finalizes its tree under kills, editing between them; then completes."""
        self.initial_tree(bigs=2, smalls=80)
        while self.killed("finalize") < kills:
            trigger, fired, delay = self.finalize_trigger()
            kill = self.run_and_kill(self.a, "finalize", trigger, fired, delay)
            done, in_doubt = self.check_after_finalize_kill(kill)
            # A keeps working: it edits uploaded files (whose record the journal must hold,
            # or the next finalize makes a conflict copy of A's own upload) and others; but
            # not those the server may have written as the kill came: see KNOWN_WINDOW.
            self.edit_some(self.a, done, 5)
            self.a_edits(avoid=in_doubt)
        self.complete(self.a, "finalize")
        assert self.bucket_tree() == tree(self.a.local), self.where("after A's finalize")

    def pull_phase(self, kills: int) -> None:
        """B pulls under kills; between them A publishes edits and B edits what it has."""
        in_doubt: set[str] = set()
        while self.killed("pull") < kills:
            if self.count("pull"):
                self.a_edits(avoid=in_doubt)
                self.complete(self.a, "finalize")
            trigger, fired, delay = self.pull_trigger()
            kill = self.run_and_kill(self.b, "pull", trigger, fired, delay)
            done, in_doubt = self.check_after_pull_kill(kill)
            self.b_edits(done, 3)

    def count(self, verb: str) -> int:
        return sum(k.verb == verb for k in self.kills)

    def killed(self, verb: str) -> int:
        """Runs of verb killed so far; fails when too many ended before their kill."""
        killed = sum(k.verb == verb and k.killed for k in self.kills)
        assert self.count(verb) <= 3 * killed + 3, self.where(
            f"most {verb} runs ended before their kill: the scenario tests too little"
        )
        return killed

    def report(self) -> str:
        counts = Counter((k.verb, k.trigger.split(">=")[0], k.killed) for k in self.kills)
        lines = [
            f"kill -9 suite, CHAOS_SEED={self.seed}: {len(self.kills)} runs; "
            f"{len(self.unrecorded)} upload(s) whose id never reached the journal (CREATE_WINDOW), "
            f"{self.lost_pull_records} pull record(s) lost (PULL_RECORDS)"
        ]
        for (verb, trigger, killed), count in sorted(counts.items()):
            lines.append(f"  {verb:9} {trigger:10} {'killed' if killed else 'ended':7} {count:4}")
        return "\n".join(lines)


def holds_lock(state: Path, pid: int) -> bool:
    """The sync took its state lock (sidecar/engine/lock.py writes the holder's pid in `lock`)."""
    for lock in state.glob("*/lock"):
        try:
            if json.loads(lock.read_text()).get("pid") == pid:
                return True
        except (OSError, ValueError):
            continue  # not there yet, or being rewritten
    return False


def inodes(root: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if not name.startswith(TEMP_PREFIX):
                path = Path(dirpath) / name
                try:
                    out[path.relative_to(root).as_posix()] = path.lstat().st_ino
                except FileNotFoundError:
                    continue
    return out


def scenario(vol: Volume, seed: int, kills: int, logs: Path) -> Chaos:
    chaos = Chaos(vol, seed, logs)
    try:
        chaos.finalize_phase(kills)
        chaos.pull_phase(kills)
        if CREATE_WINDOW_OPEN:
            chaos.spared_uploads = set(chaos.unrecorded)
        chaos.converge()
    finally:
        print("\n" + chaos.report())
    return chaos


def test_kill9_during_finalize_and_pull_then_rerun(mvol: Volume, tmp_path: Path) -> None:
    scenario(mvol, SEED, kills=4, logs=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 104))
def test_kill9_soak(mvol: Volume, seed: int, tmp_path: Path) -> None:
    scenario(mvol, seed, kills=25, logs=tmp_path)


def test_kill_after_the_server_created_an_upload_leaves_no_orphan(mvol: Volume) -> None:
    """CREATE_WINDOW, pinned: the proxy forwards CreateMultipartUpload and holds its answer;
    the server has the upload, the journal has no id; kill -9. The next run aborts it."""
    files = {"big.bin": data_of(6 * MiB, "big"), "small.txt": b"small\n"}
    local, state, logs = mvol.work / "local", mvol.work / "state", mvol.work / "logs"
    write_tree(local, files)
    upstream = urlsplit(mvol.server.endpoint)
    assert upstream.hostname and upstream.port

    def hold_creates(request: Request) -> Fault:
        return Fault.STALL if request.operation == "CreateMultipartUpload" else Fault.NONE

    with FaultProxy(upstream.hostname, upstream.port, hold_creates) as proxy:
        env = mvol.env(AWS_ENDPOINT_URL=proxy.endpoint)
        args = sidecar_args("finalize", mvol.remote, local, state, *SIZING)
        with running(args, env, logs) as proc:
            created = "the server created the upload"
            kill9_when(proc, lambda: bool(mvol.open_uploads()), created, logs)
    again = mvol.finalize(local, state, *SIZING)
    assert again.code == 0, again
    assert mvol.open_uploads() == {}, again
    assert mvol.objects() == keyed(files)
