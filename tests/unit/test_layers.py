"""The layer contract (issue 17 item 1, CONTRIBUTING.md): imports point inward only (cli ->
daemon -> engine -> s3 -> core; import-linter's contracts in pyproject.toml), and the core is
pure: no I/O, no asyncio, no clock, no randomness, except the few uses named below with why.

Each check is shown to catch what it must: a forbidden import added to a copy of the package
breaks a contract, and a snippet that does I/O is refused by the purity check."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sidecar

PACKAGE = Path(sidecar.__file__).parent
REPO = PACKAGE.parent
CORE = PACKAGE / "core"

# Modules whose use is I/O, concurrency, a clock or chance: never in the core.
FORBIDDEN = frozenset(
    {
        "os",
        "io",
        "sys",
        "time",
        "socket",
        "ssl",
        "select",
        "selectors",
        "signal",
        "subprocess",
        "threading",
        "multiprocessing",
        "concurrent",
        "asyncio",
        "shutil",
        "tempfile",
        "glob",
        "fcntl",
        "mmap",
        "logging",
        "urllib",
        "http",
        "random",
        "secrets",
        "importlib",
        "aiohttp",
        "watchfiles",
        "httptools",
        "botocore",
        "boto3",
    }
)

# The exceptions, each a name of a forbidden module used in one core file, with why it stays.
ALLOWED = {
    # The random tail of a temp-file name (one pattern for every temp file): os.urandom, not
    # secrets, whose import cost ~5 ms per process.
    ("paths.py", "os.urandom"),
    # The random tail that keeps sync ids of two replicas apart (the time is an argument).
    ("backup.py", "secrets.token_hex"),
}

# Methods that touch the disk (pathlib), or read the clock: `Path` as a value is fine.
IO_METHODS = frozenset(
    {
        "read_text",
        "read_bytes",
        "write_text",
        "write_bytes",
        "exists",
        "is_file",
        "is_dir",
        "is_symlink",
        "stat",
        "lstat",
        "mkdir",
        "rmdir",
        "unlink",
        "iterdir",
        "glob",
        "rglob",
        "resolve",
        "absolute",
        "touch",
        "chmod",
        "samefile",
        "expanduser",
        "readlink",
        "symlink_to",
        "cwd",
        "home",
        "now",
        "utcnow",
        "today",
    }
)
IO_BUILTINS = frozenset({"open", "print", "input", "exec", "eval", "__import__", "breakpoint"})


def _dotted(node: ast.expr) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _forbidden(node: ast.ImportFrom) -> bool:
    return not node.level and (node.module or "").split(".")[0] in FORBIDDEN


def _imports(tree: ast.AST) -> list[tuple[str, str, int]]:
    """(local name, the forbidden module or module.name it binds, line) of each import."""
    bound: list[tuple[str, str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in FORBIDDEN:
                    bound.append(
                        (alias.asname or top, alias.name if alias.asname else top, node.lineno)
                    )
        elif isinstance(node, ast.ImportFrom) and _forbidden(node):
            bound.extend(
                (alias.asname or alias.name, f"{node.module}.{alias.name}", node.lineno)
                for alias in node.names
            )
    return bound


def _io_call(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr in IO_METHODS:
        return f".{func.attr}()"
    if isinstance(func, ast.Name) and func.id in IO_BUILTINS:
        return f"{func.id}()"
    return None


def impurities(source: str, filename: str) -> list[str]:
    """Every use in `source` of a forbidden module, an I/O method or builtin that is not an
    ALLOWED exception of `filename` (a core file's name)."""
    tree = ast.parse(source, filename=filename)
    excepted = {used for name, used in ALLOWED if name == filename}
    found: list[str] = []
    bound: dict[str, str] = {}  # local name -> the forbidden module (or module.name) it is
    for local, module, line in _imports(tree):
        bound[local] = module
        # The import alone is refused unless one of this file's exceptions lies under it.
        if not any(used == module or used.startswith(module + ".") for used in excepted):
            found.append(f"{filename}:{line}: imports {module}")
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in bound:
            top: ast.expr = node
            while isinstance(parents.get(top), ast.Attribute):
                top = parents[top]  # type: ignore[assignment]
            used = bound[node.id] + (_dotted(top) or node.id)[len(node.id) :]
            if used not in excepted:
                found.append(f"{filename}:{node.lineno}: uses {used}")
        elif isinstance(node, ast.Call) and (call := _io_call(node)):
            found.append(f"{filename}:{node.lineno}: calls {call}")
    return found


def test_the_core_is_pure() -> None:
    found = [
        problem
        for path in sorted(CORE.rglob("*.py"))
        for problem in impurities(path.read_text(), path.name)
    ]
    assert not found, "the core does I/O (move it to the engine, or name why in ALLOWED):\n" + (
        "\n".join(found)
    )


@pytest.mark.parametrize(
    "snippet",
    [
        "import os\nos.listdir('.')",
        "from os import path\npath.exists('x')",
        "import os.path as p\np.getmtime('x')",
        "import asyncio",
        "from time import sleep",
        "import socket as s",
        "from pathlib import Path\nPath('x').read_text()",
        "from datetime import datetime\ndatetime.now()",
        "open('x')",
        "import secrets\nsecrets.token_hex(3)",  # allowed in backup.py only
    ],
)
def test_the_purity_check_refuses_io(snippet: str) -> None:
    assert impurities(snippet, "planner.py"), snippet


def test_the_purity_check_allows_only_the_named_exceptions() -> None:
    assert impurities("import os\nos.urandom(8)", "paths.py") == []
    assert impurities("import secrets\nsecrets.token_hex(3)", "backup.py") == []
    assert impurities("import os\nos.path.abspath('.')", "paths.py")
    assert impurities("import os\nos.urandom(8)", "options.py")
    assert impurities("from pathlib import Path\nPath('a') / 'b'", "options.py") == []


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` with the contracts in root/pyproject.toml, on the package in root."""
    binary = Path(sys.executable).with_name("lint-imports")
    command = [str(binary)] if binary.exists() else [shutil.which("lint-imports") or "lint-imports"]
    return subprocess.run(
        command,
        cwd=root,
        env={"PATH": str(binary.parent), "PYTHONPATH": str(root), "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_imports_point_inward() -> None:
    done = _lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_outward_import_breaks_the_contract(tmp_path: Path) -> None:
    """A copy of the package whose core imports the engine: lint-imports must refuse it."""
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(PACKAGE, tmp_path / "sidecar", ignore=shutil.ignore_patterns("__pycache__"))
    units = tmp_path / "sidecar" / "core" / "units.py"
    units.write_text(units.read_text() + "\nfrom sidecar.engine import sync  # noqa\n")
    done = _lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout
    assert "sidecar.core.units -> sidecar.engine.sync" in done.stdout, done.stdout
