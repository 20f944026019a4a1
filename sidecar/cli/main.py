"""The `sidecar` command: argparse built from the option table, one verb per job.

sidecar serve                     the daemon (control API, probes, lifecycle)
sidecar pull|finalize --once      one sync without a daemon (Jobs, CronJobs)
sidecar pull|finalize|status      talk to the running daemon
sidecar wait PATH... [--timeout S]  until paths are local (exit 0; 1 failed; 3 unreachable)
sidecar demo                      quickstart on an embedded loopback S3 server
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from sidecar.cli.logs import setup_logging
from sidecar.core.model import Direction
from sidecar.core.options import (
    OPTIONS,
    OptionError,
    SyncConfig,
    collect,
    serve_config,
    sync_config,
    unknown_env,
)

EXIT_OK = 0
EXIT_SYNC_FAILED = 1
EXIT_USAGE = 2

# The collector's young generation in a sidecar process (Python's default: 700 allocations).
# A sync allocates containers by the hundred thousand that never become garbage (listing
# entries, scan results, plan actions): at 700 a first pull of 20,000 files ran the collector
# ~1,100 times, 9 of them full collections, 0.85 s of its ~7.5 s of CPU; at 10,000, 0.24 s
# (a no-op pull of 2,000 files: 14 -> 8 ms). Cyclic garbage waits at most that many
# allocations longer: a few MiB at most.
GC_YOUNG_GENERATION = 10_000

VERBS = frozenset(
    ("serve", "pull", "finalize", "history", "undo", "restore", "wait", "status", "demo")
)


def _add_options(parser: argparse.ArgumentParser, scope: str) -> None:
    for option in OPTIONS:
        if scope not in option.scopes:
            continue
        help_text = option.help_text()
        if option.is_switch:
            parser.add_argument(option.flag, action="store_true", default=False, help=help_text)
        elif option.repeatable:
            parser.add_argument(option.flag, action="append", default=[], help=help_text)
        else:
            parser.add_argument(option.flag, default=None, help=help_text)


def _add_client_only_options(parser: argparse.ArgumentParser) -> None:
    for option in OPTIONS:
        if "client" in option.scopes and "sync" not in option.scopes:
            parser.add_argument(option.flag, default=None, help=option.help_text())


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; given the verb argv names, only that verb gets its options.

    Each verb's subparser is still there (usage lines and errors list them all), but the
    ~100 add_argument calls of the verbs this run does not use are skipped: ~5 ms of a
    one-shot sync's start-up on this machine.
    """
    parser = argparse.ArgumentParser(prog="sidecar", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    def wanted(name: str) -> bool:
        return verb is None or verb == name

    serve = verbs.add_parser("serve", help="run the sync daemon")
    if wanted("serve"):
        _add_options(serve, "serve")

    for name in ("pull", "finalize"):
        sub = verbs.add_parser(name, help=f"{name}: via the daemon, or --once without one")
        if wanted(name):
            sub.add_argument("--once", action="store_true", help="run the sync here, no daemon")
            sub.add_argument(
                "--dry-run", action="store_true", help="print the plan, change nothing"
            )
            _add_options(sub, "sync")
            _add_options(sub, "once")
            _add_client_only_options(sub)

    from sidecar.cli.undo import add_verbs

    for sub in add_verbs(verbs, wanted):  # history, undo, restore (issue 14)
        _add_options(sub, "sync")
        _add_client_only_options(sub)

    wait = verbs.add_parser("wait", help="wait until paths are local (--ready-when priority)")
    if wanted("wait"):
        wait.add_argument("paths", nargs="+", metavar="PATH", help="a file or folder of the volume")
        wait.add_argument("--timeout", type=float, default=None, help="give up after S seconds")
        _add_options(wait, "client")

    status = verbs.add_parser("status", help="show the daemon's status")
    if wanted("status"):
        status.add_argument("--json", action="store_true", help="print the raw JSON")
        _add_options(status, "client")

    demo = verbs.add_parser("demo", help="quickstart: loopback S3 + demo bucket + daemon")
    if wanted("demo"):
        demo.add_argument("--workdir", default=None, help="where the demo keeps its files")
        demo.add_argument("--port", type=int, default=8080, help="control API port")
    return parser


def _verb_of(argv: Sequence[str]) -> str | None:
    """The verb argv names (its first word), or None (no verb, --help, a typo): then the
    whole parser is built, so usage and errors are what they always were."""
    return argv[0] if argv and argv[0] in VERBS else None


def tune_collector() -> None:
    """For a sidecar process (not a library caller): what was imported so far lives as long
    as the process, so the collector stops scanning it, and collects less often."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_GENERATION, 20, 20)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the process's own command line: this process is a sidecar
        tune_collector()
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_verb_of(words)).parse_args(words)
    env = os.environ
    try:
        if args.verb == "serve":
            values = collect(vars(args), env, "serve")
            _setup_logging(values, env)
            from sidecar.daemon.service import run_serve

            config = serve_config(values, env, os.getcwd())
            _check_key_file(config.sync)
            return run_serve(config)
        if args.verb in ("pull", "finalize") and args.once:
            values = collect(vars(args), env, "sync")
            _setup_logging(values, env)
            once = sync_config(values, env, os.getcwd())
            _check_key_file(once)
            summary_json = collect(vars(args), env, "once")["summary_json"]
            code = _run_once(Direction(args.verb), once, args.dry_run, summary_json)
            return exit_now(code) if argv is None else code
        if args.verb in ("history", "undo", "restore"):
            from sidecar.cli import undo as undo_cli

            if undo_cli.runs_here(args):
                values = collect(vars(args), env, "sync")
                _setup_logging(values, env)
                return undo_cli.run_here(args, sync_config(values, env, os.getcwd()))
            values = collect(vars(args), env, "client")
            return undo_cli.run_via_daemon(args, values["control_url"])
        if args.verb == "demo":
            from sidecar.demo import run_demo

            return run_demo(workdir=args.workdir, control_port=args.port)
        values = collect(vars(args), env, "client")
        from sidecar.cli.client import run_client

        return run_client(
            args.verb,
            control_url=values["control_url"],
            dry_run=getattr(args, "dry_run", False),
            as_json=getattr(args, "json", False),
            paths=getattr(args, "paths", None),
            timeout=getattr(args, "timeout", None),
        )
    except (OptionError, ValueError) as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return EXIT_USAGE


def exit_now(code: int) -> int:
    """End a one-shot sync's process here, without the interpreter's teardown (freeing every
    object and module one by one: ~8 ms of CPU of a no-op pull on this machine).

    What the usual exit guarantees still holds: the sync has committed BASE (fsynced, as
    kill -9 at this point would keep it too) and closed its files; the threads that are
    not daemons are waited for first, as the interpreter does (the sync's I/O workers end
    after its pool's shutdown, one may still be finishing a write); the log and stdout are
    flushed here. A flush that fails (a closed pipe) takes the usual exit, which reports it
    as it always did."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return code
    os._exit(code)


def _setup_logging(values: Mapping[str, Any], env: Mapping[str, str]) -> None:
    setup_logging(values["log_format"], values["log_level"])
    for note in unknown_env(env):
        logging.getLogger("sidecar").warning("%s; it is ignored", note)


def _check_key_file(config: SyncConfig) -> None:
    """An unusable --sse-c-key-file is a usage error at start, not a daemon's retried pull."""
    if config.sse_c_key_file is None:
        return
    from sidecar.s3 import S3Error, SseCKey

    try:
        SseCKey(str(config.sse_c_key_file)).headers()
    except S3Error as exc:
        raise OptionError(str(exc)) from None


def _run_once(direction: Direction, config: SyncConfig, dry_run: bool, summary_json: bool) -> int:
    # The first connection's handshake goes on while the engine is imported and set up.
    from sidecar.s3 import connect_ahead

    connect_ahead(config.bucket, config.addressing_style)
    from sidecar.cli.summary import write_summary
    from sidecar.engine.sync import SyncEngine

    async def run() -> int:
        async with SyncEngine(config) as engine:
            result = await engine.run(direction, dry_run=dry_run)
        summary = {**result.as_dict(), "summary": result.one_line()}
        write_summary(summary, sys.stdout, sys.stderr)
        if summary_json:
            print(json.dumps(result.as_dict()))
        return EXIT_OK if result.ok else EXIT_SYNC_FAILED

    return asyncio.run(run())
