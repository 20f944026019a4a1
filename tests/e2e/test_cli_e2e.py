"""End-to-end: `python -m sidecar pull|finalize --once` as a real subprocess against a real
`rclone serve s3` (and moto's server where rclone's filesystem backend cannot hold the input).

What a user of the CLI sees: exit codes, one `error\tPATH: reason` line per failed file, the JSON
summary (SIDECAR_SUMMARY_JSON=1), and the bytes on both sides. Covers the round trip around every
size threshold, interoperability with aws cli, every bad input of README "How a sync decides",
resume after SIGKILL, the free-space check and symlinks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.locals3 import free_port
from tests.conftest import sidecar_args
from tests.support.cli_support import (
    PART,
    REPO,
    SIZING,
    TEMP_PREFIX,
    MiB,
    Run,
    Volume,
    base_env,
    data_of,
    drop_file_permission_override,
    everything,
    hashed,
    keyed,
    kill9_when,
    run_cli,
    sha,
    sigkill,
    start_cli,
    temps,
    tree,
    wait_until,
    write_tree,
)

# ---- 1. round trip -------------------------------------------------------------------------
SCRIPT = b"#!/bin/sh\necho hello from the volume\n"


def threshold_tree() -> dict[str, bytes]:
    return {
        "empty.bin": b"",
        "one.bin": b"\x01",
        "part-minus-1.bin": data_of(PART - 1, 1),
        "part.bin": data_of(PART, 2),
        "part-plus-1.bin": data_of(PART + 1, 3),
        "several-parts.bin": data_of(17 * MiB, 4),
        "a/b/c/deep.txt": b"deep in the tree\n",
        "a/b/sibling.txt": b"sibling\n",
        "données/日本語_ファイル.txt": "unicode ✓\n".encode(),
        "emoji-🙂/ünïcödé.md": b"# title\n",
        "bin/run.sh": SCRIPT,
    }


def test_round_trip_sizes_mtime_exec_bit_then_noop(rvol: Volume) -> None:
    files = threshold_tree()
    src, dst = rvol.work / "A", rvol.work / "B"
    write_tree(src, files)
    mtimes: dict[str, int] = {}
    for i, rel in enumerate(sorted(files)):
        mtime = 1_700_000_000_123_456_789 + i * 1_000_003  # ns precision, distinct per file
        os.utime(src / rel, ns=(mtime, mtime))
        mtimes[rel] = mtime
        (src / rel).chmod(0o755 if rel == "bin/run.sh" else 0o644)

    up = rvol.finalize(src, rvol.work / "stateA", *SIZING).assert_moved(len(files))
    assert up.summary["bytes_transferred"] == sum(map(len, files.values())), up
    assert rvol.keys() == set(keyed(files))

    rvol.pull(dst, rvol.work / "stateB", *SIZING).assert_moved(len(files))
    assert tree(dst) == hashed(files)
    assert temps(dst) == []
    for rel in files:
        st = os.stat(dst / rel)
        assert st.st_mtime_ns == mtimes[rel], f"{rel}: mtime {st.st_mtime_ns} != {mtimes[rel]}"
        assert bool(st.st_mode & stat.S_IXUSR) == (rel == "bin/run.sh"), f"{rel}: exec bit"
    assert subprocess.run([dst / "bin/run.sh"], capture_output=True).stdout == (
        b"hello from the volume\n"
    )

    rvol.finalize(src, rvol.work / "stateA", *SIZING).assert_moved(0)
    again_down = rvol.pull(dst, rvol.work / "stateB", *SIZING).assert_moved(0)
    assert again_down.summary["files_deleted"] == 0, again_down


def test_exec_bit_change_alone_reaches_the_other_side(rvol: Volume) -> None:
    """`chmod +x` after a sync changes neither bytes nor mtime; the bit must still survive
    the round trip (finalize from A, pull into B, and into a fresh C)."""
    src, dst = rvol.work / "A", rvol.work / "B"
    write_tree(src, {"tool.sh": SCRIPT, "data.txt": b"data\n"})
    assert rvol.finalize(src, rvol.work / "stateA").code == 0
    assert rvol.pull(dst, rvol.work / "stateB").code == 0
    assert not os.stat(dst / "tool.sh").st_mode & stat.S_IXUSR

    (src / "tool.sh").chmod(0o755)
    (src / "data.txt").chmod(0o600)  # not an exec-bit change: nothing to do for it
    up = rvol.finalize(src, rvol.work / "stateA")
    assert up.code == 0, up
    fresh = rvol.work / "C"
    assert rvol.pull(fresh, rvol.work / "stateC").code == 0
    assert os.stat(fresh / "tool.sh").st_mode & stat.S_IXUSR, "chmod +x was not finalized"
    down = rvol.pull(dst, rvol.work / "stateB")
    assert down.code == 0, down
    assert os.stat(dst / "tool.sh").st_mode & stat.S_IXUSR, "chmod +x was not pulled"
    assert tree(dst) == hashed({"tool.sh": SCRIPT, "data.txt": b"data\n"})


NAMES_NEEDING_ESCAPES = {
    "with space.txt": b"space\n",
    "dir with spaces/a b c.txt": b"spaces in folder and name\n",
    "plus+sign.txt": b"plus\n",
    "both + and space.txt": b"both\n",
    "percent%20not-a-space.txt": b"percent\n",
    "ampersand&equals=.txt": b"query characters\n",
    "tilde~and'quote.txt": b"quote\n",
}


def test_names_needing_url_escapes_round_trip(rvol: Volume) -> None:
    """Listings use encoding-type=url, where S3 writes a space as '+': a key with a space,
    a literal '+' or a literal '%20' must come back as itself."""
    src, dst = rvol.work / "A", rvol.work / "B"
    write_tree(src, NAMES_NEEDING_ESCAPES)
    up = rvol.finalize(src, rvol.work / "stateA")
    assert up.code == 0, up
    assert rvol.objects() == keyed(NAMES_NEEDING_ESCAPES)

    down = rvol.pull(dst, rvol.work / "stateB")
    assert down.code == 0, down
    assert tree(dst) == hashed(NAMES_NEEDING_ESCAPES)

    again = rvol.finalize(src, rvol.work / "stateA").assert_moved(0)
    assert again.summary["files_deleted"] == 0, again
    assert rvol.objects() == keyed(NAMES_NEEDING_ESCAPES)


def test_listing_of_more_than_one_page(rvol: Volume) -> None:
    """1,100 objects: the listing is paginated (1,000 a page); nothing past page one may be
    missed on pull or taken for deleted on finalize."""
    files = {f"many/f{i:04d}.txt": f"{i}\n".encode() for i in range(1100)}
    write_tree(rvol.data_dir, files)  # straight into the server's folder: quick
    dst, state = rvol.work / "dst", rvol.work / "state"

    rvol.pull(dst, state).assert_moved(len(files))
    assert tree(dst) == hashed(files)

    (dst / "many" / "f1099.txt").write_bytes(b"changed on page two\n")
    up = rvol.finalize(dst, state).assert_moved(1)
    assert up.summary["files_deleted"] == 0, up
    assert rvol.keys() == set(keyed(files))

    rvol.pull(dst, state).assert_moved(0)


# `sidecar` run as its console script does, with an atexit hook that shows whether the
# interpreter's teardown ran.
WATCHED_MAIN = (
    "import atexit, sys; atexit.register(print, 'TEARDOWN', file=sys.stderr); "
    "from sidecar.cli.main import main; sys.exit(main())"
)


def test_one_shot_exits_without_teardown_and_keeps_every_write(rvol: Volume) -> None:
    """pull/finalize --once end with os._exit once the sync is done (issue 16: the teardown
    cost ~10 ms of CPU): the summary, the log line, BASE, the history record and the backup
    must all be there as after the usual exit."""
    src, dst = rvol.work / "A", rvol.work / "B"
    files = {f"d{i}/f{j}.bin": data_of(1000 + j, f"{i}-{j}") for i in range(3) for j in range(5)}
    write_tree(src, files)
    env = rvol.env(SIDECAR_BACKUP="copy")

    def once(verb: str, local: Path, state: Path) -> Run:
        args = sidecar_args(verb, rvol.remote, local, state)
        run = run_cli([sys.executable, "-c", WATCHED_MAIN, *args[3:]], env)
        assert run.code == 0, run
        assert "TEARDOWN" not in run.err, f"the usual exit ran:\n{run}"
        assert f"{verb}: transferred" in run.err, run  # the log line was flushed
        return run

    assert once("finalize", src, rvol.work / "sa").summary["files_transferred"] == len(files)
    (src / "d1/f2.bin").write_bytes(b"changed")
    changed = once("finalize", src, rvol.work / "sa").summary
    assert changed["files_transferred"] == 1
    assert once("pull", dst, rvol.work / "sb").summary["files_transferred"] == len(files)
    assert tree(dst) == tree(src)
    # BASE of both runs was committed: nothing to do on either side.
    assert once("finalize", src, rvol.work / "sa").summary["files_transferred"] == 0
    assert once("pull", dst, rvol.work / "sb").summary["files_transferred"] == 0
    # The history record and the copy of the replaced object were written.
    history = run_cli([*sidecar_args("history", rvol.remote, src, rvol.work / "sa"), "--json"], env)
    assert history.code == 0, history
    assert json.loads(history.out)["syncs"][0]["sync_id"] == changed["sync_id"]
    in_bucket = rvol.keys()
    assert any(key.startswith(f"{rvol.prefix}/.netvol/backup/") for key in in_bucket)


def test_dry_run_prints_the_plan_and_changes_nothing(rvol: Volume) -> None:
    rvol.put("pre/remote-only.txt", b"remote\n")
    local, state = rvol.work / "local", rvol.work / "state"
    write_tree(local, {"local-only.txt": b"local\n"})

    pull = rvol.pull(local, state, "--dry-run")
    assert pull.code == 0, pull
    assert "download\tremote-only.txt" in pull.out, pull
    assert tree(local) == {"local-only.txt": sha(b"local\n")}

    fin = rvol.finalize(local, state, "--dry-run")
    assert fin.code == 0, fin
    assert "upload\tlocal-only.txt" in fin.out, fin
    assert rvol.objects() == {"pre/remote-only.txt": sha(b"remote\n")}

    fresh = rvol.work / "fresh"
    assert rvol.pull(fresh, rvol.work / "state2", "--dry-run").code == 0
    assert not fresh.exists(), "a dry run created the folder"


# ---- 2. interoperability with aws cli ------------------------------------------------------
def test_pull_files_put_by_aws_cli(rvol: Volume) -> None:
    files = {
        "synced/small.txt": b"put by aws s3 sync\n",
        "synced/nested/empty": b"",
        "synced/aws-multipart.bin": data_of(9 * MiB, "aws-mp"),  # > aws's 8 MiB threshold
        "unicode-é/файл.txt": b"unicode by aws\n",
    }
    src = rvol.work / "aws-src"
    write_tree(src, files)
    rvol.aws("s3", "sync", "--no-progress", str(src), f"s3://{rvol.bucket}/pre/")
    expected = files  # (`aws s3 cp` puts are pulled in the overwrite test below)

    dst = rvol.work / "pulled"
    rvol.pull(dst, rvol.work / "state", *SIZING).assert_moved(len(expected))
    assert tree(dst) == hashed(expected)

    rvol.pull(dst, rvol.work / "state", *SIZING).assert_moved(0)


def test_aws_cli_reads_what_sidecar_finalized(rvol: Volume) -> None:
    files = {
        "zero": b"",
        "tiny.txt": b"t",
        "multipart.bin": data_of(12 * MiB + 7, "mp"),
        "dir/sub/ünï.txt": b"x" * 100,
        "bin/tool.sh": SCRIPT,
    }
    src = rvol.work / "src"
    write_tree(src, files)
    up = rvol.finalize(src, rvol.work / "state", *SIZING)
    assert up.code == 0, up

    out = rvol.work / "aws-out"
    rvol.aws("s3", "cp", "--recursive", "--no-progress", f"{rvol.remote}/", str(out))
    assert tree(out) == hashed(files)


def test_object_overwritten_by_aws_is_downloaded_on_next_pull(rvol: Volume) -> None:
    files = {
        "same-size.txt": b"version-1\n",
        "grows.txt": b"short\n",
        "big.bin": data_of(9 * MiB, "v1"),
        "untouched.txt": b"leave me\n",
    }
    src, dst = rvol.work / "A", rvol.work / "B"
    write_tree(src, files)
    assert rvol.finalize(src, rvol.work / "stateA", *SIZING).code == 0
    first = rvol.pull(dst, rvol.work / "stateB", *SIZING)
    assert first.code == 0, first

    # Same sizes, other bytes: only the ETag can tell (big.bin goes up as aws multipart).
    new = {
        "same-size.txt": b"version-2\n",
        "grows.txt": b"much longer now\n",
        "big.bin": data_of(9 * MiB, "v2"),
    }
    stage = rvol.work / "stage"
    write_tree(stage, new)
    rvol.aws("s3", "cp", "--recursive", "--no-progress", str(stage), f"{rvol.remote}/")

    rvol.pull(dst, rvol.work / "stateB", *SIZING).assert_moved(len(new))
    assert tree(dst) == hashed({**files, **new})

    rvol.pull(dst, rvol.work / "stateB", *SIZING).assert_moved(0)


def test_finalize_does_not_resend_content_aws_already_put(rvol: Volume) -> None:
    files = {
        "a.txt": b"same on both sides\n",
        "d/b.bin": data_of(70_000, "b"),
        "d/e/empty": b"",
        "aws-multipart.bin": data_of(9 * MiB, "mp-equal"),
    }
    src = rvol.work / "local"
    write_tree(src, files)
    rvol.aws("s3", "sync", "--no-progress", str(src), f"{rvol.remote}/")
    before = rvol.listing()
    assert len(before) == len(files)

    run = rvol.finalize(src, rvol.work / "fresh-state", *SIZING)  # no BASE
    assert run.code == 0, run
    assert run.summary["files_transferred"] == 0, run
    assert run.summary["conflicts"] == [], run
    assert rvol.listing() == before, "objects were re-uploaded"

    # And BASE now knows them: a second finalize has nothing to do either.
    rvol.finalize(src, rvol.work / "fresh-state", *SIZING).assert_moved(0)


# ---- 3. bad input --------------------------------------------------------------------------
def test_keys_escaping_the_folder_are_rejected_by_name(mvol: Volume) -> None:
    marker = f"netvol-escape-{os.getpid()}-{time.monotonic_ns()}"
    escaping = [
        "pre/../escape.txt",
        "pre/a/../../b",
        "pre//abs",
        f"pre//tmp/{marker}",
        f"pre/sub/../../../../../../../../tmp/{marker}",
        "pre/./dot.txt",
        "pre/sub/..",
    ]
    good = {"ok.txt": b"fine\n", "sub/fine.txt": b"fine too\n"}
    for key in escaping:
        mvol.put(key, b"must never land anywhere: " + key.encode())
    for rel, body in good.items():
        mvol.put("pre/" + rel, body)
    assert set(mvol.objects()) == {*escaping, *keyed(good)}, "moto refused some keys"

    # Deep enough that a '..' escape would land in folders we watch.
    local = mvol.work / "outer" / "middle" / "local"
    local.mkdir(parents=True)
    state = mvol.work / "state"
    outside_before = everything(mvol.work)

    run = mvol.pull(local, state)
    assert run.code == 1, run
    for key in escaping:
        assert key in run.error_paths, f"{key!r} not reported by name:\n{run}"
        assert f"error\t{key}" in run.err, run
    assert tree(local) == hashed(good), "the rest of the pull was not done"
    assert temps(local) == []
    outside_after = {
        p for p in everything(mvol.work) if not p.startswith(("outer/middle/local/", "state"))
    }
    assert outside_after == outside_before, "something was written outside the folder"
    assert not Path("/tmp", marker).exists()
    assert not Path("/abs").exists()

    # Nothing lost: a finalize from this folder deletes none of the keys it cannot represent.
    fin = mvol.finalize(local, state)
    assert fin.code == 1, fin
    assert set(mvol.objects()) == {*escaping, *keyed(good)}


def test_keys_clashing_as_file_and_folder(mvol: Volume) -> None:
    bucket = {"pre/a": b"I am the file a\n", "pre/a/b": b"I am a/b\n", "pre/ok.txt": b"ok\n"}
    for key, body in bucket.items():
        mvol.put(key, body)
    local, state = mvol.work / "local", mvol.work / "state"

    run = mvol.pull(local, state)
    assert run.code == 1, run
    assert {"pre/a", "pre/a/b", "a", "a/b"} & set(run.error_paths), run
    got = tree(local)
    assert got.pop("ok.txt") == sha(b"ok\n"), "the rest of the pull was not done"
    # At most one side of the clash landed, and then intact.
    assert got in ({}, {"a": sha(bucket["pre/a"])}, {"a/b": sha(bucket["pre/a/b"])}), got

    fin = mvol.finalize(local, state)
    assert fin.code == 1, fin
    assert mvol.objects() == {k: sha(v) for k, v in bucket.items()}, "a clashing key was lost"


def test_local_folder_against_remote_file_is_named_and_no_clash_created(rvol: Volume) -> None:
    """The bucket has a file `x`, the folder has `x/y`: neither side may turn it into a
    file/folder clash or lose a version."""
    rvol.put("pre/x", b"remote file x\n")
    local, state = rvol.work / "local", rvol.work / "state"
    write_tree(local, {"x/y": b"local x/y\n", "z.txt": b"z\n"})

    up = rvol.finalize(local, state)
    assert up.code == 1, up
    assert "x/y" in up.error_paths, up
    assert rvol.keys() == {"pre/x", "pre/z.txt"}, "finalize created a file/folder clash"

    down = rvol.pull(local, state)
    assert down.code == 1, down
    assert "x" in down.error_paths, down
    assert tree(local) == hashed({"x/y": b"local x/y\n", "z.txt": b"z\n"})
    assert rvol.objects() == keyed({"x": b"remote file x\n", "z.txt": b"z\n"})


def test_names_too_long_for_the_filesystem(mvol: Volume) -> None:
    too_long = [
        "pre/" + "n" * 300,  # 300 bytes in one segment
        "pre/dir/" + "é" * 200,  # 200 characters but 400 bytes
        "pre/" + "/".join(["d" * 250] * 17) + "/f",  # every segment fits, the path does not
    ]
    good = {
        "m" * 255: b"exactly NAME_MAX bytes\n",  # the boundary itself must work
        "dir/ok.txt": b"ok\n",
    }
    for key in too_long:
        mvol.put(key, b"long")
    for rel, body in good.items():
        mvol.put("pre/" + rel, body)
    local, state = mvol.work / "local", mvol.work / "state"

    run = mvol.pull(local, state)
    assert run.code == 1, run
    for key in too_long:
        assert key in run.error_paths, f"{key[:40]!r}... not reported by name:\n{run}"
    assert tree(local) == hashed(good)
    assert temps(local) == []

    fin = mvol.finalize(local, state)
    assert set(mvol.objects()) >= set(too_long), f"a long key was deleted:\n{fin}"


def test_invalid_utf8_key_is_reported_and_the_rest_pulled(rvol: Volume) -> None:
    rvol.data_dir.mkdir(parents=True)
    bad_name = os.fsencode(rvol.data_dir) + b"/bad-\xff\xfe-name.txt"
    fd = os.open(bad_name, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"bytes under a non-UTF-8 name\n")
    os.close(fd)
    (rvol.data_dir / "ok.txt").write_bytes(b"ok\n")
    listed = list(rvol.listing())
    assert len(listed) == 2, listed  # rclone lists it (with U+FFFD replacement characters)
    local, state = rvol.work / "local", rvol.work / "state"

    run = rvol.pull(local, state)
    assert run.code == 1, run
    error = run.error_for("bad-")
    assert "-name.txt" in error["path"], run
    assert "UTF-8" in error["reason"], run
    assert tree(local) == {"ok.txt": sha(b"ok\n")}
    assert temps(local) == []

    # Nothing lost: a finalize neither deletes nor replaces it.
    fin = rvol.finalize(local, state)
    assert fin.code == 1, fin
    assert open(bad_name, "rb").read() == b"bytes under a non-UTF-8 name\n"  # noqa: SIM115


def test_invalid_utf8_local_name_is_reported_and_the_rest_finalized(rvol: Volume) -> None:
    local = rvol.work / "local"
    local.mkdir()
    (local / "ok.txt").write_bytes(b"ok\n")
    fd = os.open(os.fsencode(local) + b"/latin1-caf\xe9.txt", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"latin-1 name\n")
    os.close(fd)

    run = rvol.finalize(local, rvol.work / "state")
    assert run.code == 1, run
    error = run.error_for("latin1-caf")
    assert "UTF-8" in error["reason"], run
    assert rvol.objects() == {"pre/ok.txt": sha(b"ok\n")}


@pytest.fixture
def as_ordinary_user(workdir: Path) -> Callable[[], None] | None:
    """A preexec_fn that makes the sidecar subject to file modes (None when not root)."""
    if os.geteuid() != 0:
        return None
    probe = workdir / "probe"
    probe.write_bytes(b"x")
    probe.chmod(0)
    check = subprocess.run(
        [sys.executable, "-c", f"open({str(probe)!r}).read()"],
        preexec_fn=drop_file_permission_override,
        capture_output=True,
    )
    probe.unlink()
    if check.returncode == 0:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE: chmod 000 cannot bind")
    return drop_file_permission_override


def test_unreadable_local_files_are_reported_and_nothing_lost(
    rvol: Volume, as_ordinary_user: Callable[[], None] | None
) -> None:
    local, state = rvol.work / "local", rvol.work / "state"
    v1 = {"ok.txt": b"ok v1\n", "secret.txt": b"secret v1\n", "locked/inner.txt": b"inner\n"}
    write_tree(local, v1)
    assert rvol.finalize(local, state).code == 0

    # Changed files that cannot be read (and a folder that cannot be listed).
    (local / "ok.txt").write_bytes(b"ok v2\n")
    (local / "secret.txt").write_bytes(b"secret v2, unreadable\n")
    (local / "new-unreadable.txt").write_bytes(b"never readable\n")
    for name in ("secret.txt", "new-unreadable.txt", "locked"):
        (local / name).chmod(0)
    try:
        run = rvol.finalize(local, state, preexec_fn=as_ordinary_user)
    finally:
        for name in ("secret.txt", "new-unreadable.txt", "locked"):
            (local / name).chmod(0o755)
    assert run.code == 1, run
    for name in ("secret.txt", "new-unreadable.txt", "locked"):
        assert name in " ".join(run.error_paths), f"{name} not reported by name:\n{run}"
        assert name in run.err, run
    assert run.summary["files_deleted"] == 0, run
    # The readable change went up; the unreadable ones left the bucket's versions alone.
    assert rvol.objects() == keyed(
        {"ok.txt": b"ok v2\n", "secret.txt": b"secret v1\n", "locked/inner.txt": b"inner\n"}
    )


@pytest.mark.parametrize("which", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_wrong_credentials_fail_with_one_clear_line(rvol: Volume, which: str) -> None:
    local = rvol.work / "local"
    write_tree(local, {"mine.txt": b"keep me\n"})
    rvol.put("pre/theirs.txt", b"theirs\n")
    env = rvol.env(**{which: "wrong" + "0" * 16})
    for verb in ("pull", "finalize"):
        run = rvol.run(verb, local, rvol.work / "state", env=env)
        assert run.code != 0, run
        lines = [line for line in run.sidecar_lines() if line.startswith("sidecar:")]
        assert len(lines) == 1, run
        assert which in lines[0], f"the line does not point at {which}:\n{run}"
        assert "Traceback" not in run.err, run
        assert run.summary["fatal"], run
    assert tree(local) == {"mine.txt": sha(b"keep me\n")}
    assert rvol.objects() == {"pre/theirs.txt": sha(b"theirs\n")}


def test_missing_bucket_is_named(rvol: Volume) -> None:
    missing = f"no-such-bucket-{os.getpid()}"
    local = rvol.work / "local"
    write_tree(local, {"mine.txt": b"keep me\n"})
    for verb in ("pull", "finalize"):
        args = sidecar_args(verb, f"s3://{missing}/pre", local, rvol.work / "state")
        run = run_cli(args, rvol.env())
        assert run.code != 0, run
        lines = [line for line in run.sidecar_lines() if line.startswith("sidecar:")]
        assert len(lines) == 1 and missing in lines[0], run
        assert "Traceback" not in run.err, run
    assert tree(local) == {"mine.txt": sha(b"keep me\n")}
    assert not (rvol.server.local.root / missing).exists(), "finalize created the bucket"  # type: ignore[union-attr]


class LoopThreadServer:
    """A server living on its own event loop in a daemon thread; `serve(stop)` runs until
    stop is set. Use as a context manager; `port` is known once entered."""

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name=type(self).__name__, daemon=True)

    def __enter__(self) -> Any:
        self._thread.start()
        assert self._ready.wait(10), f"{type(self).__name__} did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        stop = self._stop
        assert stop is not None
        self._loop.call_soon_threadsafe(stop.set)
        self._thread.join(10)
        self._loop.close()

    def _main(self) -> None:
        self._loop.run_until_complete(self._run())

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        await self.serve(self._stop, self._ready)

    async def serve(self, stop: asyncio.Event, ready: threading.Event) -> None:
        raise NotImplementedError


class HangingServer(LoopThreadServer):
    """A TCP server that accepts connections, reads whatever comes, and never answers."""

    connections = 0

    async def serve(self, stop: asyncio.Event, ready: threading.Event) -> None:
        handlers: set[asyncio.Task[Any]] = set()
        writers: list[asyncio.StreamWriter] = []

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writers.append(writer)
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                while await reader.read(65536):
                    pass
            except ConnectionError:
                pass

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        await stop.wait()
        server.close()
        for writer in writers:
            writer.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


class FaultyS3(LoopThreadServer):
    """A fake S3 endpoint (auth not checked) listing three objects under pre/: `ok.txt`
    serves fine, `always-500.txt` answers 500 InternalError to every GET, `stalls.bin`
    sends its headers and the first 64 KiB, then goes silent."""

    BUCKET = "faulty"
    OBJECTS = {"ok.txt": b"ok\n", "always-500.txt": b"never served", "stalls.bin": b"s" * MiB}

    def __init__(self) -> None:
        super().__init__()
        self.gets: dict[str, int] = {}

    async def serve(self, stop: asyncio.Event, ready: threading.Event) -> None:
        from aiohttp import web

        release = asyncio.Event()

        def etag(body: bytes) -> str:
            return '"' + hashlib.md5(body).hexdigest() + '"'

        async def listing(request: web.Request) -> web.Response:
            contents = "".join(
                f"<Contents><Key>pre/{name}</Key><Size>{len(body)}</Size>"
                f"<ETag>{etag(body)}</ETag>"
                "<LastModified>2026-01-01T00:00:00.000Z</LastModified></Contents>"
                for name, body in self.OBJECTS.items()
            )
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?>'
                '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>{self.BUCKET}</Name><Prefix>pre/</Prefix>"
                f"<KeyCount>{len(self.OBJECTS)}</KeyCount><MaxKeys>1000</MaxKeys>"
                f"<IsTruncated>false</IsTruncated>{contents}</ListBucketResult>"
            )
            return web.Response(body=xml.encode(), content_type="application/xml")

        async def obj(request: web.Request) -> web.StreamResponse:
            name = request.match_info["key"].removeprefix("pre/")
            body = self.OBJECTS.get(name)
            if body is None:
                return web.Response(status=404)
            headers = {"ETag": etag(body), "Content-Length": str(len(body))}
            if request.method == "HEAD":
                return web.Response(headers=headers)
            self.gets[name] = self.gets.get(name, 0) + 1
            if name == "always-500.txt":
                error = b"<Error><Code>InternalError</Code><Message>boom</Message></Error>"
                return web.Response(status=500, body=error, content_type="application/xml")
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            if name == "stalls.bin":
                await response.write(body[: 64 * 1024])
                await release.wait()  # silent until the test ends
                return response
            await response.write(body)
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_get(f"/{self.BUCKET}", listing)
        app.router.add_get(f"/{self.BUCKET}/", listing)
        app.router.add_route("*", f"/{self.BUCKET}/{{key:.+}}", obj)
        runner = web.AppRunner(app, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        ready.set()
        await stop.wait()
        release.set()
        await runner.cleanup()


def test_server_errors_and_stalled_downloads_are_named_the_rest_pulled(workdir: Path) -> None:
    """500 on every try, and a body that stops mid-way: each named, the rest pulled, no temp
    file left, bounded time with SIDECAR_REQUEST_TIMEOUT=1."""
    local = workdir / "local"
    with FaultyS3() as server:
        env = base_env(
            {
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.port}",
                "AWS_ACCESS_KEY_ID": "fake-key-0123456789",
                "AWS_SECRET_ACCESS_KEY": "fake-secret-0123456789",
                "AWS_REGION": "us-east-1",
            },
            SIDECAR_REQUEST_TIMEOUT="1",
        )
        args = sidecar_args("pull", f"s3://{FaultyS3.BUCKET}/pre", local, workdir / "state")
        run = run_cli(args, env, timeout=90)
        gets = dict(server.gets)
    assert run.code == 1, run
    assert tree(local) == {"ok.txt": sha(b"ok\n")}, run
    assert temps(local) == []
    assert (
        "500" in run.error_for("always-500.txt")["reason"]
        or "InternalError" in (run.error_for("always-500.txt")["reason"])
    ), run
    # Cut by the 1 s read deadline, not waited out: the reason names it (no wall-clock bound
    # that a loaded machine could break; run_cli's timeout catches a hang).
    assert "sent nothing for 1s" in run.error_for("stalls.bin")["reason"], run
    assert gets.get("always-500.txt", 0) >= 2, f"a 500 was not retried: {gets}"
    assert run.summary["retries"] >= 1, run


def test_unreachable_and_hanging_endpoints_fail_quickly_and_clearly(rvol: Volume) -> None:
    """Both at once (they are the slow ones): a port nobody listens on, and a server that
    accepts and never answers, with SIDECAR_REQUEST_TIMEOUT=1."""
    local = rvol.work / "local"
    write_tree(local, {"mine.txt": b"keep me\n"})
    with HangingServer() as hanging:
        endpoints = {
            "unreachable": f"http://127.0.0.1:{free_port()}",
            "hanging": f"http://127.0.0.1:{hanging.port}",
        }
        started = time.monotonic()
        procs = {}
        for name, endpoint in endpoints.items():
            args = sidecar_args("pull", rvol.remote, local, rvol.work / f"state-{name}")
            env = rvol.env(AWS_ENDPOINT_URL=endpoint, SIDECAR_REQUEST_TIMEOUT="1")
            procs[name] = (
                args,
                subprocess.Popen(
                    args,
                    env=env,
                    cwd=REPO,
                    text=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                ),
            )
        runs: dict[str, Run] = {}
        for name, (args, proc) in procs.items():
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                pytest.fail(f"{name}: still running after 60 s:\n{out}\n{err}")
            runs[name] = Run(args, proc.returncode, out, err, time.monotonic() - started)
        assert hanging.connections >= 1

    patterns = {
        "unreachable": r"cannot reach|could not connect|connection refused",
        "hanging": r"timed? ?out|did not answer",
    }
    for name, run in runs.items():
        assert run.code != 0, run
        lines = [line for line in run.sidecar_lines() if line.startswith("sidecar:")]
        assert len(lines) == 1, run
        assert re.search(patterns[name], lines[0], re.IGNORECASE), run
        assert "Traceback" not in run.err, run
    assert tree(local) == {"mine.txt": sha(b"keep me\n")}


def test_emptied_folder_finalize_deletes_nothing_until_forced(rvol: Volume) -> None:
    files = {f"f{i}.txt": f"file {i}\n".encode() for i in range(4)} | {"d/g.txt": b"g\n"}
    rvol.put("other/keep.txt", b"outside our prefix\n")
    local, state = rvol.work / "local", rvol.work / "state"
    write_tree(local, files)
    assert rvol.finalize(local, state).code == 0

    shutil.rmtree(local)  # the folder itself is gone: that is no reason to delete anything
    gone = rvol.finalize(local, state)
    assert gone.code == 1, gone
    assert rvol.objects() == keyed(files)

    local.mkdir()  # an empty folder: everything "deleted"
    blocked = rvol.finalize(local, state)
    assert blocked.code == 1, blocked
    assert blocked.summary["files_deleted"] == 0, blocked
    assert blocked.summary["deletes_blocked"], blocked
    assert "--force-delete" in blocked.err, blocked
    assert rvol.objects() == keyed(files)

    forced = rvol.finalize(local, state, "--force-delete")
    assert forced.code == 0, forced
    assert forced.summary["files_deleted"] == len(files), forced
    assert rvol.objects() == {}
    assert rvol.objects("other/") == {"other/keep.txt": sha(b"outside our prefix\n")}


def test_emptied_bucket_pull_deletes_nothing_until_forced(rvol: Volume) -> None:
    files = {f"f{i}.txt": f"file {i}\n".encode() for i in range(4)}
    local, state = rvol.work / "local", rvol.work / "state"
    write_tree(local, files)
    assert rvol.finalize(local, state).code == 0
    client = rvol.server.client()
    for key in list(rvol.objects()):
        client.delete_object(Bucket=rvol.bucket, Key=key)

    blocked = rvol.pull(local, state)
    assert blocked.code == 1, blocked
    assert blocked.summary["files_deleted"] == 0, blocked
    assert "--force-delete" in blocked.err, blocked
    assert tree(local) == hashed(files)

    forced = rvol.pull(local, state, "--force-delete")
    assert forced.code == 0, forced
    assert forced.summary["files_deleted"] == len(files), forced
    assert tree(local) == {}


@pytest.mark.parametrize(
    ("extra", "env", "named"),
    [
        (["--concurrency=0"], {}, "--concurrency"),
        (["--concurrency", "many"], {}, "--concurrency"),
        ([], {"SIDECAR_CONCURRENCY": "-3"}, "SIDECAR_CONCURRENCY"),
        (["--remote", "not-a-url"], {}, "--remote"),
        (["--remote", "s3://"], {}, "--remote"),
        (["--remote", "s3://bucket/a/../b"], {}, "--remote"),
        (["--part-size", "lots"], {}, "--part-size"),
        (["--max-delete-percent", "150"], {}, "--max-delete-percent"),
        (["--log-level", "chatty"], {}, "--log-level"),
        (["--state-dir", "{local}/.state"], {}, "--state-dir"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, list) else None,
)
def test_bad_option_values_exit_2_naming_the_flag(
    rvol: Volume, extra: list[str], env: dict[str, str], named: str
) -> None:
    local = rvol.work / "local"
    args = sidecar_args("pull", rvol.remote, local, rvol.work / "state")
    args += [a.replace("{local}", str(local)) for a in extra]
    run = run_cli(args, rvol.env(**env))
    assert run.code == 2, run
    assert named in run.err, run
    assert "Traceback" not in run.err, run
    assert not local.exists(), "a rejected command touched the folder"


# ---- 4. resume after SIGKILL ---------------------------------------------------------------
def test_pull_resumes_after_sigkill_without_fetching_done_files_again(rvol: Volume) -> None:
    rng = random.Random(7)
    files = {f"small/f{i:03d}.bin": data_of(rng.randint(0, 4000), i) for i in range(300)}
    files["big.bin"] = data_of(30 * MiB, "big")
    src = rvol.work / "src"
    write_tree(src, files)
    assert rvol.finalize(src, rvol.work / "stateA", *SIZING).code == 0
    expected = hashed(files)

    dst, state = rvol.work / "dst", rvol.work / "stateB"
    args = sidecar_args("pull", rvol.remote, dst, state, *SIZING, "--concurrency", "2")
    proc = start_cli(args, rvol.env(), rvol.work / "logs")

    def some_files_landed() -> bool:
        try:
            names = os.listdir(dst / "small")
        except FileNotFoundError:
            return False
        return sum(not n.startswith(TEMP_PREFIX) for n in names) >= 10

    kill9_when(proc, some_files_landed, "10 files landed", rvol.work / "logs")

    # The notebook never sees half a file: whatever is in place is complete.
    at_kill = {rel: digest for rel, digest in tree(dst).items() if TEMP_PREFIX not in rel}
    assert 10 <= len(at_kill) < len(files)
    for rel, digest in at_kill.items():
        assert digest == expected[rel], f"{rel} is in place but not complete"

    second = rvol.pull(dst, state, *SIZING)
    assert second.code == 0, second
    assert tree(dst) == expected
    assert temps(dst) == []
    assert 0 < second.summary["files_transferred"] <= len(files) - len(at_kill), (
        f"{len(at_kill)} files were complete before the kill:\n{second}"
    )

    rvol.pull(dst, state, *SIZING).assert_moved(0)


def test_finalize_resumes_after_sigkill_and_leaves_no_multipart_upload(rvol: Volume) -> None:
    files = {f"small/f{i:02d}.txt": f"small {i}\n".encode() for i in range(20)}
    files["big.bin"] = data_of(40 * MiB, "big-up")
    local, state = rvol.work / "local", rvol.work / "state"
    write_tree(local, files)
    args = sidecar_args("finalize", rvol.remote, local, state, *SIZING, "--concurrency", "1")
    proc = start_cli(args, rvol.env(), rvol.work / "logs")
    wait_until(
        proc, lambda: bool(rvol.open_uploads()), "a multipart upload began", rvol.work / "logs"
    )
    time.sleep(0.05)  # let the sidecar record the upload id before it dies
    sigkill(proc)
    orphans = rvol.open_uploads()
    assert orphans, "the upload completed before the kill; nothing to clean up was tested"
    assert set(orphans.values()) == {"pre/big.bin"}

    second = rvol.finalize(local, state, *SIZING)
    assert second.code == 0, second
    assert rvol.open_uploads() == {}, "the interrupted multipart upload was left behind"
    assert rvol.objects() == keyed(files)

    rvol.finalize(local, state, *SIZING).assert_moved(0)


# ---- 5. free space -------------------------------------------------------------------------
@pytest.fixture
def small_disk(workdir: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs mounted for this test (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mountpoint = workdir / "small-disk"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def test_pull_that_cannot_fit_fails_at_once_touching_nothing(
    rvol: Volume, small_disk: Path
) -> None:
    rvol.data_dir.mkdir(parents=True)
    for i in range(3):  # 24 MiB for a 20 MiB disk; each one alone would fit
        (rvol.data_dir / f"model-{i}.bin").write_bytes(data_of(8 * MiB, i))
    local = small_disk / "local"
    write_tree(local, {"notes.txt": b"mine\n"})
    used_before = shutil.disk_usage(small_disk).used

    run = rvol.pull(local, rvol.work / "state", *SIZING)
    assert run.code == 1, run
    assert run.summary["files_transferred"] == 0, run  # failed before any download
    fatal = run.summary["fatal"] or ""
    match = re.search(r"needs ([\d.]+ \w+), ([\d.]+ \w+) free", fatal)
    assert match, run
    assert match.group(1) == "24.0 MiB", run
    lines = [line for line in run.sidecar_lines() if line.startswith("sidecar:")]
    assert len(lines) == 1 and match.group(0) in lines[0], run
    assert everything(local) == {"notes.txt"}, "the failed pull touched the folder"
    assert shutil.disk_usage(small_disk).used == used_before

    # What fits is pulled: the check counts only what this pull needs.
    fits = rvol.pull(local, rvol.work / "state", *SIZING, "--exclude", "model-2.bin")
    assert fits.code == 0, fits
    assert set(tree(local)) == {"notes.txt", "model-0.bin", "model-1.bin"}


# ---- 6. symlinks ---------------------------------------------------------------------------
def test_local_symlinks_are_not_uploaded(rvol: Volume) -> None:
    outside = rvol.work / "outside"
    write_tree(outside, {"secret.txt": b"outside the volume\n", "dir/x.txt": b"x\n"})
    local = rvol.work / "local"
    write_tree(local, {"real.txt": b"real\n", "sub/real2.txt": b"real2\n"})
    (local / "link-to-file").symlink_to(local / "real.txt")
    (local / "sub" / "relative-link").symlink_to("../real.txt")
    (local / "link-outside").symlink_to(outside / "secret.txt")
    (local / "linked-dir").symlink_to(outside / "dir", target_is_directory=True)
    (local / "dangling").symlink_to(rvol.work / "does-not-exist")

    run = rvol.finalize(local, rvol.work / "state")
    assert run.code == 0, run
    assert rvol.objects() == keyed({"real.txt": b"real\n", "sub/real2.txt": b"real2\n"})

    rvol.finalize(local, rvol.work / "state").assert_moved(0)


def test_pull_never_writes_through_a_local_symlink(rvol: Volume) -> None:
    outside = rvol.work / "outside"
    outside_files = {"existing.txt": b"outside, must not change\n", "target.txt": b"target\n"}
    write_tree(outside, outside_files)
    local = rvol.work / "local"
    local.mkdir()
    (local / "link").symlink_to(outside, target_is_directory=True)
    (local / "filelink").symlink_to(outside / "target.txt")
    remote = {
        "link/x": b"would land outside\n",
        "link/existing.txt": b"would overwrite outside\n",
        "link/deeper/y": b"deeper\n",
        "filelink": b"would overwrite the link's target\n",
        "ok.txt": b"ok\n",
    }
    for rel, body in remote.items():
        rvol.put("pre/" + rel, body)

    run = rvol.pull(local, rvol.work / "state")
    assert run.code == 1, run
    for rel in ("link/x", "link/existing.txt", "link/deeper/y"):
        assert rel in " ".join(run.error_paths), f"{rel} not reported by name:\n{run}"
    assert tree(outside) == hashed(outside_files), "the pull wrote through a symlink"
    assert (local / "ok.txt").read_bytes() == b"ok\n"
    assert (local / "link").is_symlink(), "the user's symlink was replaced"
    # The bucket keeps everything: no object is lost because the folder could not take it.
    assert rvol.objects() == keyed(remote)
