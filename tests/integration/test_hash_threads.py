"""--hash-threads: the engine's worker threads come from the option, sized for the usable
cores when left at auto (they were fixed at 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.core.options import OptionError, SyncConfig, collect, sync_config
from sidecar.engine import threads
from sidecar.engine.sync import SyncEngine


def engine_threads(config: SyncConfig) -> int:
    engine = SyncEngine(config)
    try:
        return engine._executor._max_workers  # type: ignore[attr-defined, no-any-return]
    finally:
        engine._executor.shutdown()


def test_hash_threads_set_the_engine_pool(tmp_path: Path) -> None:
    base = {"remote": "s3://b/p", "local_dir": str(tmp_path / "l"), "state_dir": str(tmp_path)}
    config = sync_config(collect(base, {"SIDECAR_HASH_THREADS": "3"}, "sync"), {})
    assert config.hash_threads == 3 and engine_threads(config) == 3
    auto = sync_config(collect(base, {}, "sync"), {})
    assert auto.hash_threads is None
    assert engine_threads(auto) == threads.default_io_threads()
    for bad in ("0", "-2", "many"):
        with pytest.raises(OptionError, match=r"--hash-threads \(SIDECAR_HASH_THREADS\)"):
            collect({"hash_threads": bad}, {}, "sync")


@pytest.mark.parametrize(
    ("cpu_max", "cores"),
    [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1), ("garbage", None)],
)
def test_auto_follows_the_cgroup_cpu_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_max: str, cores: int | None
) -> None:
    affinity = {0, 1, 2, 3, 4, 5, 6, 7}
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _pid: affinity)
    limit = tmp_path / "cpu.max"
    limit.write_text(cpu_max)
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", str(limit))
    expected = len(affinity) if cores is None else cores
    assert threads.usable_cores() == expected
    assert threads.default_io_threads() == expected + 2
