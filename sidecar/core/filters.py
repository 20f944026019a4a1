"""Which paths the sync sees. Excluded paths are invisible on every side: never sent, never
fetched, never deleted.

Always excluded: folders named in DEFAULT_EXCLUDED_DIRS, at any depth, and our temp files.
User patterns use gitignore semantics (pathspec): `dir/` matches a folder and everything
under it, `*.tmp` matches at any depth, `/top.txt` only at the root, `!keep.tmp`
re-includes (never from inside an excluded folder, as in git).

pathspec is imported only when there are user patterns: its import is ~12-20 ms of a
~0.3 s one-shot no-op sync, and the defaults need only a look at folder names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from sidecar.core.paths import is_temp_name

if TYPE_CHECKING:
    import pathspec

# Notebook and interpreter caches: never data. (gitignore: `.ipynb_checkpoints/`, ...)
DEFAULT_EXCLUDED_DIRS = frozenset({".ipynb_checkpoints", "__pycache__"})
SYNCIGNORE = ".syncignore"


class PathFilter:
    def __init__(
        self,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
        syncignore_text: str = "",
    ) -> None:
        self._exclude = _spec_matcher([*exclude, *syncignore_text.splitlines()])
        self._include = _spec_matcher(list(include))
        # A sync asks about most paths three times (scan, listing, BASE): answer once.
        self._verdicts: dict[str, bool] = {}

    def wants(self, relpath: str) -> bool:
        """True if the file at relpath takes part in the sync."""
        verdict = self._verdicts.get(relpath)
        if verdict is None:
            verdict = self._verdicts[relpath] = self._decide(relpath)
        return verdict

    def _decide(self, relpath: str) -> bool:
        folder, _, name = relpath.rpartition("/")
        if is_temp_name(name) or in_excluded_dir(folder):
            return False
        if self._exclude is not None and self._exclude(relpath):
            return False
        return self._include is None or self._include(relpath)

    def wants_dir(self, reldir: str) -> bool:
        """False if nothing under reldir can take part (lets the scan prune whole trees)."""
        if in_excluded_dir(reldir):
            return False
        return self._exclude is None or not self._exclude(reldir + "/")


def in_excluded_dir(reldir: str) -> bool:
    """Whether the folder reldir ('' = the top) is, or is inside, a default-excluded one."""
    return bool(reldir) and not DEFAULT_EXCLUDED_DIRS.isdisjoint(reldir.split("/"))


def _spec_matcher(lines: list[str]) -> Callable[[str], bool] | None:
    """A matcher for gitignore lines; None when they hold no pattern at all."""
    if not any(line.strip() and not line.lstrip().startswith("#") for line in lines):
        return None
    import pathspec

    return _matcher(pathspec.GitIgnoreSpec.from_lines(lines))


def _matcher(spec: pathspec.GitIgnoreSpec) -> Callable[[str], bool]:
    """spec.match_file, or an equal and ~4x cheaper test when no pattern is a negation.

    Without '!' patterns, gitignore's "last matching pattern decides" is "any pattern
    matches"; our paths are already normalized (POSIX, relative), which match_file would
    redo for every file of every sync.
    """
    active = [pattern for pattern in spec.patterns if pattern.include is not None]
    if any(not pattern.include or pattern.regex is None for pattern in active):
        return spec.match_file
    regexes = [pattern.regex for pattern in active]
    return lambda relpath: any(regex.match(relpath) for regex in regexes)
