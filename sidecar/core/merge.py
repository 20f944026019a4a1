"""The streaming merge of a sync's three inputs: the local scan, the remote listing and BASE,
each in S3 key order, into one triple per path (rclone's "march").

Pure: takes iterators, holds O(depth of the tree) items, never a map of every path. Paths are
relative and valid (sidecar.core.paths.check_relpath): no surrogates, so Python's string order
is the order of their UTF-8 bytes, which is how S3 lists keys and SQLite sorts TEXT.

`hold_for_folders` reorders the triples so that a path comes after every path below it as a
folder: "W" after "W/x", as its file-or-folder question is only answered there. Paths sorting
between ("W-x", "W.x") come before "W/" and are not held back by it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

L = TypeVar("L")
R = TypeVar("R")
B = TypeVar("B")


class OutOfOrder(ValueError):
    """An input was not in strictly increasing key order: deciding on it could read a path
    as deleted, so the merge stops instead."""


@dataclass(slots=True)
class Triple(Generic[L, R, B]):
    path: str
    local: L | None
    remote: R | None
    base: B | None
    # Set by hold_for_folders: whether any path below this one ("path/...") was on each side.
    below_local: bool = False
    below_remote: bool = False
    below_base: bool = False


def merge(
    local: Iterable[tuple[str, L]],
    remote: Iterable[tuple[str, R]],
    base: Iterable[tuple[str, B]],
) -> Iterator[Triple[L, R, B]]:
    """One Triple per path of the three inputs, in key order; each input must be in strictly
    increasing key order (OutOfOrder otherwise, naming the side and the paths)."""
    # One head per side, each with its own type (a list of the three could not say which).
    lo, ro, bo = _Ordered(local, "local scan"), _Ordered(remote, "listing"), _Ordered(base, "BASE")
    lh, rh, bh = lo.next(), ro.next(), bo.next()
    while True:
        present = [head[0] for head in (lh, rh, bh) if head is not None]
        if not present:
            return
        path = min(present)
        lv: L | None = None
        rv: R | None = None
        bv: B | None = None
        if lh is not None and lh[0] == path:
            lv, lh = lh[1], lo.next()
        if rh is not None and rh[0] == path:
            rv, rh = rh[1], ro.next()
        if bh is not None and bh[0] == path:
            bv, bh = bh[1], bo.next()
        yield Triple(path, lv, rv, bv)


class _Ordered(Generic[L]):
    def __init__(self, items: Iterable[tuple[str, L]], name: str) -> None:
        self._items = iter(items)
        self._name = name
        self._last: str | None = None

    def next(self) -> tuple[str, L] | None:
        item = next(self._items, None)
        if item is None:
            return None
        if self._last is not None and item[0] <= self._last:
            raise OutOfOrder(
                f"the {self._name} is not in key order: {item[0]!r} came after {self._last!r}"
            )
        self._last = item[0]
        return item


def hold_for_folders(triples: Iterable[Triple[L, R, B]]) -> Iterator[Triple[L, R, B]]:
    """The triples, each path after every path below it ("W/..."), with below_* telling
    which sides had any. Holds the open paths of the current branch only: a path is let go
    as soon as a key at or after path + "0" comes ('0' follows '/'), so a flat folder of a
    million files holds one triple at a time."""
    stack: list[Triple[L, R, B]] = []
    for triple in triples:
        path = triple.path
        while stack and path >= stack[-1].path + "0":
            yield stack.pop()
        # Every held path that this one lies below learns it, per side.
        for held in stack:
            if path.startswith(held.path + "/"):
                held.below_local |= triple.local is not None
                held.below_remote |= triple.remote is not None
                held.below_base |= triple.base is not None
        stack.append(triple)
    while stack:
        yield stack.pop()
