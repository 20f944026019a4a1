"""Shard assignment (--shard I/N): pure, stable, and every path in exactly one shard."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from sidecar.core.options import OptionError, collect, sync_config
from sidecar.core.paths import TEMP_PREFIX, is_temp_name, temp_name
from sidecar.core.shard import (
    Shard,
    ShardFilter,
    parse_shard,
    resolve_shard,
    shard_of,
    speedup_limit,
    temp_tag,
)
from sidecar.engine.state import state_path_for

PATHS = [
    *(f"models/llama/shard-{i:05d}.safetensors" for i in range(300)),
    *(f"d{i % 7}/f{i}.bin" for i in range(300)),
    "a",
    "é/ü/名前.txt",
    "x" * 200,
]


@pytest.mark.parametrize("count", range(1, 17))
def test_every_path_is_in_exactly_one_shard(count: int) -> None:
    shards = [Shard(i, count) for i in range(count)]
    for path in PATHS:
        owners = [s.index for s in shards if s.owns(path)]
        assert owners == [shard_of(path, count)], path
    # The shards together are the whole set, with no path twice.
    union = list(itertools.chain.from_iterable([p for p in PATHS if s.owns(p)] for s in shards))
    assert sorted(union) == sorted(PATHS)


def test_assignment_is_the_documented_hash_and_never_changes() -> None:
    # xxh3_64 of the UTF-8 relative path, mod N: pods of one Job (and of a later Job run with
    # a newer sidecar) must agree, or a key would be skipped or fetched twice.
    import xxhash

    for path in PATHS:
        assert shard_of(path, 8) == xxhash.xxh3_64_intdigest(path.encode()) % 8
    assert [shard_of(p, 5) for p in ("a", "b", "models/m.bin", "é")] == [
        xxhash.xxh3_64_intdigest(b"a") % 5,
        xxhash.xxh3_64_intdigest(b"b") % 5,
        xxhash.xxh3_64_intdigest(b"models/m.bin") % 5,
        xxhash.xxh3_64_intdigest("é".encode()) % 5,
    ]
    # Pinned: the same digests on every platform and version of the xxhash package.
    assert xxhash.xxh3_64_intdigest(b"a") == 0xE6C632B61E964E1F


def test_spread_is_roughly_even() -> None:
    paths = [f"data/part-{i:06d}.parquet" for i in range(8000)]
    counts = [sum(1 for p in paths if shard_of(p, 8) == i) for i in range(8)]
    assert min(counts) > 800 and max(counts) < 1200, counts


def test_parse_shard() -> None:
    assert parse_shard("0/1") == Shard(0, 1)
    assert parse_shard(" 3 / 8 ") == Shard(3, 8)
    assert str(parse_shard("2/4")) == "2/4"
    for bad, why in [
        ("3", "not I/N"),
        ("4/4", r"0\.\.3 \(I < N\)"),
        ("5/4", r"I < N"),
        ("-1/4", r"I < N"),
        ("0/0", "at least 1"),
        ("a/4", "shard index I in 'a/4' must be a whole number"),
        ("1/b", "shard count N in '1/b' must be a whole number"),
        ("1.5/4", "whole number"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_shard(bad)


def test_resolve_from_flag_env_and_indexed_job() -> None:
    assert resolve_shard(None, None, {}) is None
    assert resolve_shard(None, 3, {}) is None  # a count alone shards nothing
    assert resolve_shard(Shard(1, 3), None, {"JOB_COMPLETION_INDEX": "2"}) == Shard(1, 3)
    assert resolve_shard(Shard(1, 3), 3, {}) == Shard(1, 3)
    env = {"JOB_COMPLETION_INDEX": "2"}
    assert resolve_shard(None, 3, env) == Shard(2, 3)
    with pytest.raises(ValueError, match=r"JOB_COMPLETION_INDEX=2 is set .* SIDECAR_SHARD_COUNT"):
        resolve_shard(None, None, env)
    with pytest.raises(ValueError, match=r"JOB_COMPLETION_INDEX=2 .* 0\.\.1 \(I < N\)"):
        resolve_shard(None, 2, env)
    with pytest.raises(ValueError, match="JOB_COMPLETION_INDEX must be a whole number"):
        resolve_shard(None, 2, {"JOB_COMPLETION_INDEX": "x"})
    with pytest.raises(ValueError, match="says N=3 but --shard-count"):
        resolve_shard(Shard(1, 3), 4, {})


def _config(flags: dict[str, str], env: dict[str, str], tmp_path: Path):  # type: ignore[no-untyped-def]
    flags = {"remote": "s3://b/p", "local_dir": str(tmp_path / "d"), **flags}
    full_env = {"HOME": str(tmp_path), **env}
    return sync_config(collect(flags, full_env, "sync"), full_env)


def test_options_validate_up_front(tmp_path: Path) -> None:
    assert _config({}, {}, tmp_path).shard is None
    assert _config({"shard": "1/4"}, {}, tmp_path).shard == Shard(1, 4)
    assert _config({}, {"SIDECAR_SHARD": "3/4"}, tmp_path).shard == Shard(3, 4)
    kubelet = {"JOB_COMPLETION_INDEX": "1", "SIDECAR_SHARD_COUNT": "3"}
    assert _config({}, kubelet, tmp_path).shard == Shard(1, 3)
    assert _config({"shard_count": "3"}, {"JOB_COMPLETION_INDEX": "0"}, tmp_path).shard == Shard(
        0, 3
    )
    with pytest.raises(OptionError, match=r"--shard \(SIDECAR_SHARD\) from SIDECAR_SHARD: .*I < N"):
        _config({}, {"SIDECAR_SHARD": "4/4"}, tmp_path)
    with pytest.raises(OptionError, match=r"SIDECAR_SHARD_COUNT.*at least 1"):
        _config({}, {"JOB_COMPLETION_INDEX": "0", "SIDECAR_SHARD_COUNT": "0"}, tmp_path)
    with pytest.raises(OptionError, match=r"JOB_COMPLETION_INDEX=0 is set.*SIDECAR_SHARD_COUNT"):
        _config({}, {"JOB_COMPLETION_INDEX": "0"}, tmp_path)


def test_filter_applies_user_filters_then_the_shard() -> None:
    shard = Shard(1, 3)
    f = ShardFilter(exclude=["*.log"], shard=shard)
    for path in PATHS:
        assert f.wants(path) == shard.owns(path)
        assert f.wants_any_shard(path)
    assert not f.wants_any_shard("x.log") and not f.wants("x.log")
    assert f.wants_dir("models")  # folders hold every shard's files: never pruned by shard
    unsharded = ShardFilter()
    assert all(unsharded.wants(p) for p in PATHS)


def test_each_shard_removes_only_its_own_temp_files() -> None:
    mine, other = Shard(1, 3), Shard(2, 3)
    f = ShardFilter(shard=mine)
    own, theirs, plain = temp_name(temp_tag(mine)), temp_name(temp_tag(other)), temp_name()
    assert all(is_temp_name(n) for n in (own, theirs, plain))
    assert own.startswith(TEMP_PREFIX + "s1of3-")
    assert f.removes_temp(own)
    assert not f.removes_temp(theirs) and not f.removes_temp(plain)
    # Unsharded: the folder is ours alone (the folder lock excludes shards), remove them all.
    assert all(ShardFilter().removes_temp(n) for n in (own, theirs, plain))
    assert not is_temp_name(TEMP_PREFIX + "s1of3-xyz")


def test_state_folder_per_shard(tmp_path: Path) -> None:
    args = (tmp_path, "s3://b/p/", tmp_path / "d")
    unsharded = state_path_for(*args)
    assert state_path_for(*args, None) == unsharded
    per_shard = {state_path_for(*args, f"{i}/3") for i in range(3)}
    assert len(per_shard) == 3 and unsharded not in per_shard
    assert state_path_for(*args, "0/3") != state_path_for(*args, "0/4")


def test_speedup_limit_names_a_file_bigger_than_an_even_share() -> None:
    assert speedup_limit([("a", 10), ("b", 10), ("c", 10)], 3) is None
    assert speedup_limit([("a", 10)], 1) is None
    assert speedup_limit([], 4) is None
    limit = speedup_limit([("big", 70), ("s1", 10), ("s2", 10), ("s3", 10)], 4)
    assert limit is not None and (limit.path, limit.size, limit.total) == ("big", 70, 100)
    assert "big" in limit.message() and "1.4x" in limit.message()
    # Exactly an even share is no limit.
    assert speedup_limit([("a", 25), ("b", 75)], 4) is not None
    assert speedup_limit([("a", 50), ("b", 50)], 2) is None
