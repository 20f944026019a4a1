"""Sharded syncs (--shard I/N) as real `sidecar pull|finalize --once` processes against moto:
N shards together do what one unsharded run does, and each acts only within its shard."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sidecar.core.paths import temp_name
from sidecar.core.shard import Shard, shard_of, temp_tag
from tests.support.cli_support import (
    MiB,
    Run,
    Volume,
    data_of,
    hashed,
    keyed,
    temps,
    tree,
    write_tree,
)

N = 3


def _files() -> dict[str, bytes]:
    files = {f"set/part-{i:03d}.bin": data_of(1000 + i, i) for i in range(30)}
    files.update({f"deep/d{i % 4}/n{i}.txt": f"note {i}\n".encode() for i in range(18)})
    files["big.bin"] = data_of(6 * MiB, "big")
    return files


def _in_shard(files: dict[str, bytes] | set[str], index: int) -> set[str]:
    return {p for p in files if shard_of(p, N) == index}


def _pull_all(vol: Volume, local: Path, *extra: str) -> list[Run]:
    """The N shards at once, into one folder (as the pods of an Indexed Job on one RWX PVC).
    --lock-timeout 0: a shard must never wait for another."""

    def one(index: int) -> Run:
        state = vol.work / f"state-{index}"
        return vol.pull(local, state, "--shard", f"{index}/{N}", "--lock-timeout", "0", *extra)

    with ThreadPoolExecutor(N) as pool:
        return list(pool.map(one, range(N)))


def test_shards_together_do_what_one_pull_does(mvol: Volume) -> None:
    files = _files()
    src = mvol.work / "src"
    write_tree(src, files)
    assert mvol.finalize(src, mvol.work / "state-src").code == 0
    for index in range(N):
        assert _in_shard(files, index), "the test set has files in every shard"

    whole = mvol.work / "whole"
    single = mvol.pull(whole, mvol.work / "state-whole")
    assert single.code == 0, single

    sharded = mvol.work / "sharded"
    runs = _pull_all(mvol, sharded)
    for index, run in enumerate(runs):
        assert run.code == 0, run
        assert run.summary["shard"] == f"{index}/{N}"
        # Every object downloaded by exactly one shard: its own.
        assert run.summary["files_transferred"] == len(_in_shard(files, index)), run
    assert tree(sharded) == tree(whole) == hashed(files)
    assert temps(sharded) == []

    again = _pull_all(mvol, sharded)
    assert [r.summary["files_transferred"] for r in again] == [0] * N, again
    assert [r.summary["files_deleted"] for r in again] == [0] * N, again

    changed = "set/part-007.bin"
    mvol.put(f"pre/{changed}", b"a new version")
    third = _pull_all(mvol, sharded)
    moved = {i: r.summary["files_transferred"] for i, r in enumerate(third)}
    assert moved == {i: int(i == shard_of(changed, N)) for i in range(N)}, third
    assert (sharded / changed).read_bytes() == b"a new version"


def test_deletes_and_the_delete_guard_act_within_the_shard(mvol: Volume) -> None:
    files = _files()
    src = mvol.work / "src"
    write_tree(src, files)
    assert mvol.finalize(src, mvol.work / "state-src").code == 0
    local = mvol.work / "local"
    assert all(r.code == 0 for r in _pull_all(mvol, local))

    # Shard 0 loses all its objects: a small part of the volume, but all of shard 0, so its
    # guard (the share of *its* files) withholds the deletes.
    client = mvol.server.client()
    for rel in _in_shard(files, 0):
        client.delete_object(Bucket=mvol.bucket, Key=f"pre/{rel}")
    assert len(_in_shard(files, 0)) < len(files) / 2
    guarded = _pull_all(mvol, local)
    assert guarded[0].code != 0 and guarded[0].summary["deletes_blocked"], guarded[0]
    assert guarded[0].summary["files_deleted"] == 0
    assert tree(local) == hashed(files), "nothing deleted"
    for run in guarded[1:]:
        assert run.code == 0 and run.summary["files_deleted"] == 0, run

    # Forced: shard 0 deletes exactly its own files, the others none.
    forced = _pull_all(mvol, local, "--force-delete")
    assert [r.summary["files_deleted"] for r in forced] == [len(_in_shard(files, 0)), 0, 0]
    assert set(tree(local)) == set(files) - _in_shard(files, 0)


def test_sharded_finalize_uploads_each_path_once(mvol: Volume) -> None:
    files = _files()
    local = mvol.work / "local"
    write_tree(local, files)

    def one(index: int) -> Run:
        state = mvol.work / f"state-{index}"
        return mvol.finalize(local, state, "--shard", f"{index}/{N}", "--lock-timeout", "0")

    with ThreadPoolExecutor(N) as pool:
        runs = list(pool.map(one, range(N)))
    for index, run in enumerate(runs):
        assert run.code == 0, run
        assert run.summary["files_transferred"] == len(_in_shard(files, index)), run
    assert mvol.objects() == keyed(files)


def test_a_shard_removes_only_its_own_leftover_temp_files(mvol: Volume) -> None:
    mvol.put("pre/a.txt", b"a")
    local = mvol.work / "local"
    (local / "d").mkdir(parents=True)
    mine, other = Shard(0, N), Shard(1, N)
    own = local / "d" / temp_name(temp_tag(mine))
    theirs = local / "d" / temp_name(temp_tag(other))  # being written by shard 1 right now
    unsharded = local / temp_name()
    for path in (own, theirs, unsharded):
        path.write_bytes(b"half a download")
    run = mvol.pull(local, mvol.work / "state-0", "--shard", str(mine))
    assert run.code == 0, run
    assert not own.exists()
    assert theirs.exists() and unsharded.exists()
    # An unsharded run holds the folder alone: it removes them all.
    assert mvol.pull(local, mvol.work / "state-all").code == 0
    assert temps(local) == []


def test_the_speedup_limit_is_named_in_dry_run_and_log(mvol: Volume) -> None:
    files = {"huge.bin": data_of(3 * MiB, 1), **{f"{c}.txt": c.encode() for c in "abcdef"}}
    src = mvol.work / "src"
    write_tree(src, files)
    assert mvol.finalize(src, mvol.work / "state-src").code == 0
    for index in range(N):
        dry = mvol.pull(
            mvol.work / "local", mvol.work / f"st-{index}", "--shard", f"{index}/{N}", "--dry-run"
        )
        assert dry.code == 0, dry
        assert any("huge.bin" in n and "limits the speed-up" in n for n in dry.summary["notes"]), (
            dry
        )
        assert "limits the speed-up" in dry.err, "the log says it too"
    even = mvol.pull(
        mvol.work / "l2", mvol.work / "st-x", "--shard", f"0/{N}", "--include", "*.txt"
    )
    assert even.code == 0 and "notes" not in even.summary, even  # six equal files: no limit
