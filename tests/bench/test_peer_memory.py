"""A peer whose re-sync would hold more memory than the machine can spare is left out of that
row with a reason, not run into the OOM killer (s5cmd `sync` at 1,000,000 files: ~13 GiB)."""

from __future__ import annotations

from tests.bench.peer_bench import PEER_MEMORY, Scenario, Sizes, memory_skip, plan
from tests.bench.peers import Rclone, S5cmd, Sidecar


def scenarios(counts: tuple[int, ...]) -> dict[str, Scenario]:
    planned = plan(["SCALE", "FIRST:pull", "CHANGED"], ["pull", "push"], Sizes(scale_counts=counts))
    return {f"{s.workload} {s.direction}": s for s in planned}


def test_s5cmd_sync_is_left_out_at_a_million_files_and_kept_at_200000() -> None:
    planned = scenarios((200_000, 1_000_000))
    for name in ("SCALE-1000000 pull", "SCALE-1000000 push", "CHANGED-1000000 push"):
        reason = memory_skip(S5cmd(), planned[name], PEER_MEMORY)
        assert reason is not None and reason.startswith("s5cmd left out of"), name
        assert "GiB" in reason and "--peer-memory" in reason
    for name in ("SCALE-200000 pull", "SCALE-200000 push", "CHANGED-200000 push"):
        assert memory_skip(S5cmd(), planned[name], PEER_MEMORY) is None, name


def test_copies_other_tools_and_a_larger_budget_run_everything() -> None:
    planned = scenarios((1_000_000,))
    # a copy streams: only the re-sync verbs hold both listings
    assert memory_skip(S5cmd(), planned["FIRST-1000000 pull"], PEER_MEMORY) is None
    for tool in (Sidecar(), Rclone()):
        assert memory_skip(tool, planned["SCALE-1000000 pull"], PEER_MEMORY) is None
    assert memory_skip(S5cmd(), planned["SCALE-1000000 pull"], 64 << 30) is None
