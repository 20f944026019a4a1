"""Priority-ready pull (issue 13): which downloads come before readiness, and in what order.

Pure. A download belongs to one of three phases, decided per path:
- PRIORITY: fetched before `/readyz` turns 200: every file of at most `max_size` bytes, and
  every path a `--priority` / `.syncpriority` pattern matches, whatever its size;
- BACKGROUND: the rest, fetched after ready;
- DEFERRED: paths a `!pattern` names: never in the priority set even when small, and fetched
  after every other file.
Within a phase the smallest file goes first (many files arrive early; big files, which move
as parallel parts anyway, go last). Patterns are gitignore-style, read by the same PathFilter
as `.syncignore`: `notebooks/`, `*.ipynb`, `/config.yaml`, `!data/huge.bin`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from sidecar.core.filters import PathFilter
from sidecar.core.options import default_of

SYNCPRIORITY = ".syncpriority"


class Phase(enum.IntEnum):
    PRIORITY = 0
    BACKGROUND = 1
    DEFERRED = 2


@dataclass(frozen=True)
class PriorityRules:
    max_size: int = default_of("--priority-max-size")
    patterns: tuple[str, ...] = ()  # flags/env first, then the lines of .syncpriority
    # PathFilter.wants is False for a path a pattern "excludes": here, a path it names.
    _named: PathFilter = field(init=False, repr=False, compare=False)
    _deferred: PathFilter = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lines = [line.strip() for line in self.patterns]
        negated = [line[1:] for line in lines if line.startswith("!") and len(line) > 1]
        object.__setattr__(self, "_named", PathFilter(exclude=lines))
        object.__setattr__(self, "_deferred", PathFilter(exclude=negated))

    def with_patterns(self, more: Iterable[str]) -> PriorityRules:
        return PriorityRules(self.max_size, (*self.patterns, *more))

    def phase(self, path: str, size: int) -> Phase:
        if not self._named.wants(path):
            return Phase.PRIORITY  # a pattern names it (and no later `!` took it back)
        if not self._deferred.wants(path):
            return Phase.DEFERRED
        return Phase.PRIORITY if size <= self.max_size else Phase.BACKGROUND

    def key(self, path: str, size: int) -> tuple[int, int, str]:
        """Sort key: phase, then smallest first, then by name (a stable order)."""
        return (self.phase(path, size), size, path)


def normalize_wait_path(text: str, local_dir: str) -> str:
    """A /wait path as a path relative to the folder ('' = the whole folder).

    Accepts 'a/b', './a/b', '/a/b' (from the folder's root) and an absolute path inside the
    local folder (what `$PWD/file` gives in a notebook terminal). Raises ValueError for a
    path that leaves the folder.
    """
    path = text.strip()
    root = local_dir.rstrip("/")
    if path == root or path.startswith(root + "/"):
        path = path[len(root) :]
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{text!r} leaves the folder ('..' is not allowed)")
    return "/".join(parts)


def covers(spec: str, path: str) -> bool:
    """Whether waiting for `spec` (a file or a folder; '' = everything) includes `path`."""
    return not spec or path == spec or path.startswith(spec + "/")
