"""Which shard of a sharded pull/finalize owns a path: pure, stable across processes.

A path belongs to shard `xxh3_64(utf-8 path) % N`. The hash is of the path relative to the
volume (not the listing order, not the prefix), so every pod of an Indexed Job computes the
same split from the same keys, whatever it listed first, and a renamed prefix keeps it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import xxhash

from sidecar.core.filters import PathFilter
from sidecar.core.paths import TEMP_PREFIX
from sidecar.core.units import format_bytes

# Set by the kubelet in every pod of an Indexed Job (completionMode: Indexed).
JOB_INDEX_ENV = "JOB_COMPLETION_INDEX"


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, relpath: str) -> bool:
        return shard_of(relpath, self.count) == self.index


def shard_of(relpath: str, count: int) -> int:
    return xxhash.xxh3_64_intdigest(relpath.encode("utf-8", "surrogateescape")) % count


def _int(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{what} must be a whole number, got {text!r}") from None


def make_shard(index: int, count: int, source: str) -> Shard:
    if count < 1:
        raise ValueError(f"{source}: the shard count N must be at least 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(
            f"{source}: the shard index must be in 0..{count - 1} (I < N), got {index}"
        )
    return Shard(index, count)


def parse_shard(text: str) -> Shard:
    """'2/8' -> Shard(2, 8); ValueError naming the text and the rule otherwise."""
    index_text, sep, count_text = text.partition("/")
    if not sep:
        raise ValueError(f"{text!r} is not I/N (e.g. 0/4)")
    index = _int(index_text, f"the shard index I in {text!r}")
    count = _int(count_text, f"the shard count N in {text!r}")
    return make_shard(index, count, repr(text))


def parse_count(text: str) -> int:
    count = _int(text, "the shard count N")
    if count < 1:
        raise ValueError(f"the shard count N must be at least 1, got {count}")
    return count


def resolve_shard(shard: Shard | None, count: int | None, env: Mapping[str, str]) -> Shard | None:
    """The shard of this process, or None (unsharded), from the parsed --shard and
    --shard-count (or their SIDECAR_* twins) and the environment.

    --shard wins; otherwise JOB_COMPLETION_INDEX (set by the kubelet) gives I and
    --shard-count gives N: an index without a count is an error, as a pod guessing N would
    silently skip or double keys."""
    if shard is not None:
        if count is not None and count != shard.count:
            raise ValueError(
                f"--shard (SIDECAR_SHARD) {shard} says N={shard.count} but --shard-count "
                f"(SIDECAR_SHARD_COUNT) says {count}; give one of them"
            )
        return shard
    job_index = env.get(JOB_INDEX_ENV, "").strip()
    if not job_index:
        return None
    if count is None:
        raise ValueError(
            f"{JOB_INDEX_ENV}={job_index} is set (an Indexed Job) but SIDECAR_SHARD_COUNT is "
            f"not: set SIDECAR_SHARD_COUNT (or --shard-count) to the Job's completions (N), "
            f"or give --shard I/N (SIDECAR_SHARD)"
        )
    index = _int(job_index, JOB_INDEX_ENV)
    return make_shard(index, count, f"{JOB_INDEX_ENV}={job_index} with SIDECAR_SHARD_COUNT={count}")


def temp_tag(shard: Shard | None) -> str:
    """What a shard's temp files carry in their names (core.paths.temp_name)."""
    return "" if shard is None else f"s{shard.index}of{shard.count}-"


class ShardFilter(PathFilter):
    """The user's filters, then the shard: every place a sync filters paths (scan, listing,
    BASE, pending writes) sees only this shard's paths, so deletes, the delete guard's count
    and conflicts act within the shard. Folders are never pruned by shard (their files are
    spread over all shards)."""

    def __init__(
        self,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
        syncignore_text: str = "",
        shard: Shard | None = None,
    ) -> None:
        super().__init__(include, exclude, syncignore_text)
        self.shard = shard

    def _decide(self, relpath: str) -> bool:
        return super()._decide(relpath) and (self.shard is None or self.shard.owns(relpath))

    def removes_temp(self, basename: str) -> bool:
        return self.shard is None or basename.startswith(TEMP_PREFIX + temp_tag(self.shard))

    def wants_any_shard(self, relpath: str) -> bool:
        """Whether the path takes part in the sync of some shard (the user's filters only)."""
        if self.shard is None:
            return self.wants(relpath)  # the same question, its verdict kept for wants()
        return super()._decide(relpath)


@dataclass(frozen=True, slots=True)
class SpeedupLimit:
    path: str
    size: int
    total: int
    count: int

    def message(self) -> str:
        return (
            f"{self.path} ({format_bytes(self.size)}) is larger than an even share of the "
            f"volume over {self.count} shards ({format_bytes(self.total)} / {self.count} = "
            f"{format_bytes(self.total / self.count)}): files are assigned whole, so its shard "
            f"limits the speed-up to {self.total / self.size:.1f}x"
        )


class SizeTally:
    """Total and largest file of the whole volume, in one pass and constant memory."""

    def __init__(self) -> None:
        self.total = 0
        self.largest: tuple[str, int] | None = None

    def add(self, path: str, size: int) -> None:
        self.total += size
        best = self.largest
        if best is None or size > best[1] or (size == best[1] and path < best[0]):
            self.largest = (path, size)

    def limit(self, count: int) -> SpeedupLimit | None:
        """The largest file, when it alone is more than total / N: files are assigned whole,
        so the shard holding it ends last whatever N is."""
        if count <= 1 or self.largest is None or self.largest[1] * count <= self.total:
            return None
        return SpeedupLimit(self.largest[0], self.largest[1], self.total, count)


def speedup_limit(sizes: Iterable[tuple[str, int]], count: int) -> SpeedupLimit | None:
    tally = SizeTally()
    for path, size in sizes:
        tally.add(path, size)
    return tally.limit(count)
