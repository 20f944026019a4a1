"""sidecar/s3/ is the only place that speaks S3 (issue 10): nothing else in the sidecar
imports botocore, aiobotocore, the HTTP client or the signer, nor reaches past the package's
public face (`sidecar.s3`) into its modules. Inside it, one transport: botocore only in the
credentials module, aiobotocore nowhere (issue 10 item 2)."""

from __future__ import annotations

import ast
from pathlib import Path

import sidecar
import sidecar.s3 as sidecar_s3

ROOT = Path(sidecar.__file__).parent
FENCED = ROOT / "s3"
SDKS = ("botocore", "aiobotocore", "boto3")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module (or module.name) an import statement in path names, lazy ones too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against the module's package
                package = path.relative_to(ROOT.parent).parent.parts
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{module}" if module else base
            found.append((node.lineno, module))
            # `from sidecar import s3` is the face; `from sidecar.s3 import http11` is not.
            found.extend((node.lineno, f"{module}.{alias.name}") for alias in node.names)
    return found


def crossing(module: str) -> bool:
    """An SDK, or a module inside sidecar/s3/ (a public name of the package is fine)."""
    if any(module == sdk or module.startswith(sdk + ".") for sdk in SDKS):
        return True
    head, _, name = module.rpartition(".")
    if head == "sidecar.s3" and name in sidecar_s3.__all__:
        return False
    return module.startswith("sidecar.s3.")


def test_only_sidecar_s3_speaks_s3() -> None:
    offenders = [
        f"{path.relative_to(ROOT.parent)}:{line}: imports {module}"
        for path in sorted(ROOT.rglob("*.py"))
        if FENCED not in path.parents
        for line, module in imported_modules(path)
        if crossing(module)
    ]
    assert not offenders, "\n".join(offenders)


# Inside the package: the one module allowed to import botocore (lazily: see its docstring).
CREDENTIALS = FENCED / "credentials.py"


def sdk(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in SDKS)


def test_inside_the_package_botocore_is_only_the_credentials_provider() -> None:
    offenders = [
        f"{path.relative_to(ROOT.parent)}:{line}: imports {module}"
        for path in sorted(FENCED.rglob("*.py"))
        for line, module in imported_modules(path)
        if sdk(module) and (path != CREDENTIALS or not module.startswith("botocore"))
    ]
    assert not offenders, "\n".join(offenders)


def test_the_credentials_module_imports_botocore_lazily() -> None:
    """Top-level imports only: a sync with keys in the environment never loads botocore."""
    tree = ast.parse(CREDENTIALS.read_text())
    top = [
        node
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom) and any(sdk(name) for name in _names(node))
    ]
    assert not top, [ast.unparse(node) for node in top]


def _names(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""]
    return [alias.name for alias in node.names]


def test_no_module_of_the_sidecar_needs_aiobotocore() -> None:
    """The package's dependencies say so too: botocore, not aiobotocore."""
    pyproject = (ROOT.parent / "pyproject.toml").read_text()
    dependencies = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "aiobotocore" not in dependencies and '"botocore' in dependencies


def test_the_fence_sees_what_it_must() -> None:
    """The checker itself: each forbidden form is caught, the public face is not."""
    assert crossing("botocore.session") and crossing("aiobotocore") and crossing("boto3")
    assert crossing("sidecar.s3.http11") and crossing("sidecar.s3.sigv4.Signer")
    assert crossing("sidecar.s3.store.ObjectStore")
    assert not crossing("sidecar.s3") and not crossing("sidecar.s3.ObjectStore")
    assert not crossing("sidecar.core.model") and not crossing("botocorex")
