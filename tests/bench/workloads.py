"""Benchmark data sets: what files, where they live, and how a destination is checked.

Every generated file gets one whole-second mtime. The peers' sync verbs compare local mtimes
with the object's LastModified, which the server reports from the file's mtime at second or
millisecond precision: with sub-second mtimes a seeded copy would look "newer" to one tool and
"older" to another, and their no-op would not be one.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
KiB = 1 << 10

# An hour in the past: never "newer" than anything a tool writes during the run.
SEED_MTIME = int(time.time()) - 3600


@dataclass(frozen=True)
class DataSet:
    """n files of one size, nested `per_dir` files to a folder under a two-level tree."""

    name: str
    files: int
    size: int
    per_dir: int = 50
    fanout: int = 10

    @property
    def total_bytes(self) -> int:
        return self.files * self.size

    def paths(self) -> list[str]:
        if self.files <= self.per_dir and self.size >= MiB:
            # big shards sit side by side, as model shards do
            return [f"shard-{index:05d}.bin" for index in range(self.files)]
        return [self._nested(index) for index in range(self.files)]

    def _nested(self, index: int) -> str:
        leaf = index // self.per_dir
        return f"d{leaf // self.fanout:03d}/e{leaf % self.fanout:02d}/f{index:06d}.bin"


def generate(dataset: DataSet, root: Path) -> None:
    """Random content (incompressible, never deduplicated), whole-second mtimes."""
    root.mkdir(parents=True)
    for relative in dataset.paths():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_random(path, dataset.size)
        os.utime(path, (SEED_MTIME, SEED_MTIME))


def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as out:
        remaining = size
        while remaining:
            step = min(remaining, 8 * MiB)
            out.write(os.urandom(step))
            remaining -= step


def copy_tree(source: Path, target: Path) -> None:
    """A copy with the same mtimes: seeds a bucket folder or a warm destination."""
    shutil.copytree(source, target, dirs_exist_ok=True)


def tree_summary(root: Path) -> tuple[int, int]:
    """(files, bytes) under root, following no symlinks."""
    files = total = 0
    for folder, dirs, names in os.walk(root):
        if folder == str(root) and ".netvol" in dirs:
            dirs.remove(".netvol")  # the sidecar's backups and history, not the data set
        for name in names:
            files += 1
            total += os.lstat(os.path.join(folder, name)).st_size
    return files, total


def check_tree(root: Path, dataset: DataSet) -> str | None:
    """None if root holds exactly the data set's file count and bytes, else what is wrong."""
    if not root.is_dir():
        return f"{root} missing"
    files, total = tree_summary(root)
    if (files, total) != (dataset.files, dataset.total_bytes):
        return (
            f"{root}: {files} files / {total} bytes, "
            f"expected {dataset.files} / {dataset.total_bytes}"
        )
    return None


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
