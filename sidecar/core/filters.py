"""Which paths the sync sees. Excluded paths are invisible on every side: never sent, never
fetched, never deleted.

Patterns use gitignore semantics (pathspec): `dir/` matches a folder and everything under
it, `*.tmp` matches at any depth, `/top.txt` only at the root, `!keep.tmp` re-includes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pathspec

from sidecar.core.paths import is_temp_name

DEFAULT_EXCLUDES: tuple[str, ...] = (".ipynb_checkpoints/", "__pycache__/")
SYNCIGNORE = ".syncignore"


class PathFilter:
    def __init__(
        self,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
        syncignore_text: str = "",
    ) -> None:
        excludes = [*DEFAULT_EXCLUDES, *exclude, *syncignore_text.splitlines()]
        self._exclude = _matcher(pathspec.GitIgnoreSpec.from_lines(excludes))
        includes = list(include)
        self._include = _matcher(pathspec.GitIgnoreSpec.from_lines(includes)) if includes else None
        # A sync asks about most paths three times (scan, listing, BASE): answer once.
        self._verdicts: dict[str, bool] = {}

    def wants(self, relpath: str) -> bool:
        """True if the file at relpath takes part in the sync."""
        verdict = self._verdicts.get(relpath)
        if verdict is None:
            verdict = self._verdicts[relpath] = self._decide(relpath)
        return verdict

    def _decide(self, relpath: str) -> bool:
        if is_temp_name(relpath.rsplit("/", 1)[-1]):
            return False
        if self._exclude(relpath):
            return False
        return self._include is None or self._include(relpath)

    def wants_dir(self, reldir: str) -> bool:
        """False if nothing under reldir can take part (lets the scan prune whole trees)."""
        return not self._exclude(reldir + "/")


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
