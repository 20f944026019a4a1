"""Start-up of the `sidecar` process (issue 16): the collector is tuned for a sidecar
process, and only for one: a library caller of main(argv) keeps its own settings."""

from __future__ import annotations

import gc
import subprocess
import sys

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
