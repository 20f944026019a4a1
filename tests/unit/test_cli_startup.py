"""Start-up of the `sidecar` process (issue 16): the collector is tuned for a sidecar
process, and only for one: a library caller of main(argv) keeps its own settings."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from sidecar.cli.main import GC_YOUNG_GENERATION, main


def test_the_sidecar_command_tunes_the_collector() -> None:
    # main() with no argv reads the process's command line: `sidecar --help` exits in
    # argparse, after the tuning.
    code = (
        "import gc, sys\n"
        "from sidecar.cli.main import main\n"
        "sys.argv = ['sidecar', '--help']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(gc.get_threshold()[0], gc.get_freeze_count() > 0, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stderr.split() == [str(GC_YOUNG_GENERATION), "True"]


def test_main_called_with_arguments_leaves_the_collector_alone() -> None:
    before = gc.get_threshold()
    assert main(["pull", "--once", "--remote", "not-a-url"]) != 0
    assert gc.get_threshold() == before


# Modules a one-shot sync does without, each tens of milliseconds of CPU at start-up on these
# cores, or whole subsystems of other verbs (issue 16): imported where they are used.
LAZY = (
    "aiohttp",  # the daemon's web apps
    "botocore",  # the credential chain, when the environment holds no keys
    "watchfiles",  # the daemon's auto-sync
    "pathspec",  # .syncignore, when there is one
    "sidecar.daemon",
    "sidecar.engine.undo",
    "sidecar.cli.client",
    "sidecar.jupyter",
    "sidecar.demo",
    "sidecar.locals3",
    "urllib.request",
    "http.client",
    "email",
    "xml",
    "multiprocessing",
    "certifi",
    "importlib.metadata",
    "importlib.resources",
)


def test_the_one_shot_path_imports_none_of_the_lazy_modules() -> None:
    # What `sidecar pull --once` imports before its first request (sidecar/cli/main.py,
    # _run_once), in a fresh interpreter.
    code = (
        "import sys\n"
        "from sidecar.cli.main import build_parser\n"
        "build_parser('pull').parse_args(['pull', '--once', '--remote', 's3://b/p'])\n"
        "import sidecar.s3, sidecar.cli.summary, sidecar.engine.sync\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = done.stdout.split()
    assert "sidecar.engine.sync" in loaded
    imported = [name for name in LAZY if any(m == name or m.startswith(name + ".") for m in loaded)]
    assert imported == []


def test_a_verb_gets_only_its_own_options_yet_usage_lists_every_verb() -> None:
    from sidecar.cli.main import VERBS, build_parser

    pull = build_parser("pull")
    assert pull.parse_args(["pull", "--once", "--remote", "s3://b/p"]).remote == "s3://b/p"
    assert all(verb in pull.format_usage() for verb in VERBS)
    with pytest.raises(SystemExit):  # serve's options were not added
        pull.parse_args(["serve", "--remote", "s3://b/p"])
    assert build_parser().parse_args(["serve", "--remote", "s3://b/p"]).remote == "s3://b/p"
