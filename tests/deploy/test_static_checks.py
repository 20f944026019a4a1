"""The static checks CI enforces through this suite (issue 17 item 6): `mypy --strict` on
sidecar/ ([tool.mypy]), `ruff check` (with the complexity cap of 12) and `ruff format
--check` on the repository. A failure prints the tool's own report: file, line and rule.

mypy keeps its cache in .mypy_cache/ at the repository root, as a developer's own run does:
a cold run (CI's fresh clone) costs ~20 s of CPU, a warm one ~1 s. On a 2-core machine at a
load average of 22 the cold run took 116 s of wall time, well inside the per-test timeout."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .k8s import REPO


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=280
    )


def test_mypy_strict_is_clean() -> None:
    done = _run("mypy")  # files and strictness come from pyproject.toml
    assert done.returncode == 0, f"mypy --strict found errors:\n{done.stdout}{done.stderr}"


@pytest.mark.parametrize(
    "check", [("check", "."), ("format", "--check", ".")], ids=["lint", "format"]
)
def test_ruff_is_clean(check: tuple[str, ...]) -> None:
    done = _run("ruff", *check)
    assert done.returncode == 0, f"ruff {' '.join(check)}:\n{done.stdout}{done.stderr}"
