"""The option table is the one place a setting is defined: every row reaches `--help` and the
README, the configs' defaults are the rows' defaults, and no other module reads SIDECAR_*."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

from sidecar.cli.main import build_parser
from sidecar.core.options import (
    OPTIONS,
    OptionError,
    ServeConfig,
    SyncConfig,
    collect,
    default_concurrency,
    default_of,
    serve_config,
    sync_config,
    unknown_env,
)

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sidecar"
TABLE = PACKAGE / "core" / "options.py"
# The verb whose --help shows each scope's options.
VERB_OF_SCOPE = {"sync": "pull", "serve": "serve", "client": "status", "once": "pull"}
ENV_NAME = re.compile(r"SIDECAR_[A-Z0-9_]+")


@functools.cache
def verb_help(verb: str) -> str:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "verb")
    return subparsers.choices[verb].format_help()  # type: ignore[attr-defined, no-any-return]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.flag)
def test_every_row_is_in_the_help_of_its_verbs(option) -> None:  # type: ignore[no-untyped-def]
    for scope in option.scopes:
        text = " ".join(verb_help(VERB_OF_SCOPE[scope]).split())  # argparse wraps lines
        assert option.flag in text, (scope, option.flag)
        assert f"[env {option.env}]" in text, (scope, option.env)


def test_every_row_is_in_the_readme_option_tables() -> None:
    documented: set[str] = set()
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("| `--"):
            first_cell = line.split("|")[1]
            documented.update(re.findall(r"`(--[a-z0-9-]+)`", first_cell))
    missing = [option.flag for option in OPTIONS if option.flag not in documented]
    assert not missing, f"options missing from README.md's option tables: {missing}"


def test_help_shows_default_and_unit() -> None:
    text = " ".join(verb_help("pull").split())
    assert "(default 16MiB; bytes) [env SIDECAR_PART_SIZE]" in text
    assert "(default 30; seconds) [env SIDECAR_REQUEST_TIMEOUT]" in text


def test_configs_defaults_are_the_rows_defaults(tmp_path: Path) -> None:
    """Built from the table (collect) or from the dataclass defaults: the same config."""
    local, state = tmp_path / "l", tmp_path / "s"
    flags = {"remote": "s3://b/p", "local_dir": str(local), "state_dir": str(state)}
    from_table = serve_config(collect(flags, {}, "serve"), {})
    direct = ServeConfig(SyncConfig(bucket="b", prefix="p/", local_dir=local, state_dir=state))
    assert from_table == direct
    assert sync_config(collect(flags, {}, "sync"), {}) == direct.sync
    assert direct.sync.part_size == default_of("--part-size") == 16 * 1024**2
    assert direct.sync.concurrency == default_of("--concurrency") == default_concurrency()


def _env_reads(tree: ast.AST) -> list[ast.expr]:
    """Keys of os.environ[...], os.environ.get/pop/setdefault(...), os.getenv(...)."""
    keys: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _is_environ(node.value):
            keys.append(node.slice)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            func = node.func
            if (_is_environ(func.value) and func.attr in ("get", "pop", "setdefault")) or (
                func.attr == "getenv"
            ):
                keys.append(node.args[0])
    return keys


def _is_environ(node: ast.expr) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


def test_no_module_but_the_table_reads_sidecar_env_vars() -> None:
    offenders: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == TABLE:
            continue
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            # A name held in a constant (NAME = "SIDECAR_X"; os.environ[NAME]) is caught here:
            # messages name variables inside longer strings, never as a whole string.
            constant = isinstance(node, ast.Constant) and isinstance(node.value, str)
            if constant and ENV_NAME.fullmatch(node.value):
                offenders.append(f"{where}:{node.lineno}: {node.value!r}")
        for key in _env_reads(tree):
            text = ast.unparse(key)
            if "SIDECAR_" in text or text.endswith(".env"):  # a literal, or a row's env twin
                offenders.append(f"{where}:{key.lineno}: environment read of {text}")
    assert not offenders, "SIDECAR_* read outside sidecar/core/options.py:\n" + "\n".join(offenders)


# Knobs of the test suite itself (README's Tests section), not settings of the sidecar.
TEST_KNOBS = {"SIDECAR_MODEL_STEPS"}


def test_every_sidecar_variable_in_docs_and_manifests_is_a_row() -> None:
    """A misspelt variable in a manifest would be ignored silently: each one names a row."""
    rows = {option.env for option in OPTIONS}
    documents = [ROOT / "README.md", *(ROOT / "container").rglob("*"), *(ROOT / "k8s").rglob("*")]
    unknown: list[str] = []
    for path in documents:
        if not path.is_file() or path.suffix not in ("", ".md", ".yaml", ".yml"):
            continue
        for name in set(ENV_NAME.findall(path.read_text(errors="replace"))):
            if name not in rows | TEST_KNOBS:
                unknown.append(f"{path.relative_to(ROOT)}: {name}")
    assert not unknown, "\n".join(unknown)


def test_a_bad_part_size_stops_the_command_at_start_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sidecar.cli.main import EXIT_USAGE, main

    # Were the value let through, the sync would fail fast here, never reach AWS.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    flags = ["--remote", "s3://b/", "--local-dir", str(tmp_path / "l"), "--part-size", "1MiB"]
    assert main(["pull", "--once", *flags]) == EXIT_USAGE
    error = capsys.readouterr().err
    assert (
        "--part-size (SIDECAR_PART_SIZE) from --part-size: must be between 5MiB and 5GiB" in error
    )


def test_unknown_sidecar_variables_are_named_with_the_closest_row() -> None:
    env = {"SIDECAR_CONCURENCY": "8", "SIDECAR_CONCURRENCY": "8", "SIDECAR_ZZZ": "1", "HOME": "/"}
    assert unknown_env(env) == [
        "SIDECAR_CONCURENCY is not an option (did you mean SIDECAR_CONCURRENCY?)",
        "SIDECAR_ZZZ is not an option",
    ]


def test_the_command_warns_of_a_misspelt_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sidecar.cli.main import EXIT_USAGE, main

    monkeypatch.setenv("SIDECAR_PART_SIZ", "8MiB")
    # A refused combination stops it right after logging is set up, before any request.
    flags = ["--remote", "s3://b/", "--local-dir", str(tmp_path / "l"), "--sse-kms-key-id", "k"]
    assert main(["pull", "--once", *flags]) == EXIT_USAGE
    error = capsys.readouterr().err
    assert (
        "SIDECAR_PART_SIZ is not an option (did you mean SIDECAR_PART_SIZE?); it is ignored"
        in error
    )


def test_relative_paths_are_taken_from_the_given_working_folder() -> None:
    flags = {"remote": "s3://b/", "local_dir": "work/../data", "state_dir": "st"}
    config = sync_config(collect(flags, {}, "sync"), {}, "/home/u")
    assert (config.local_dir, config.state_dir) == (Path("/home/u/data"), Path("/home/u/st"))
    with pytest.raises(OptionError, match=r"--local-dir \(SIDECAR_LOCAL_DIR\): 'work/../data'"):
        sync_config(collect(flags, {}, "sync"), {})


def test_the_table_is_pure() -> None:
    """No process state: the working folder and the environment are handed in."""
    tree = ast.parse(TABLE.read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"os", "sys", "io", "asyncio", "subprocess", "socket"}, imported
