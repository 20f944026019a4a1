"""`sidecar history`, `sidecar undo SYNC_ID`, `sidecar restore PATH --at TIME` (issue 14).

With --once (or, for history, --remote given) they run here against the bucket and the
state folder, taking the same locks as a sync; without, they ask the running daemon
(GET /history, POST /undo, POST /restore). Exit codes as for syncs: 0 ok, 1 failed or
something was skipped, 2 bad usage, 3 the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from sidecar.core.backup import history_line, parse_utc
from sidecar.core.options import SyncConfig

EXIT_OK = 0
EXIT_FAILED = 1
HISTORY_LIMIT = 50


def add_verbs(
    verbs: Any, wanted: Callable[[str], bool] = lambda _name: True
) -> list[argparse.ArgumentParser]:
    """The three verbs; the caller adds the sync and client options to each of the ones
    returned: those `wanted` (the verb of this command line, or all)."""
    history = verbs.add_parser("history", help="list the syncs that changed something")
    undo = verbs.add_parser("undo", help="put back what one sync replaced, deleted or created")
    restore = verbs.add_parser("restore", help="put back a file or folder as it was at a time")
    chosen = [
        sub
        for sub, name in ((history, "history"), (undo, "undo"), (restore, "restore"))
        if wanted(name)
    ]
    if history in chosen:
        history.add_argument("--json", action="store_true", help="one JSON document for scripts")
        history.add_argument(
            "--limit", type=int, default=HISTORY_LIMIT, help=f"newest N (default {HISTORY_LIMIT})"
        )
    if undo in chosen:
        undo.add_argument("sync_id", metavar="SYNC_ID", help="from `sidecar history`")
        undo.add_argument("--force", action="store_true", help="also paths changed since that sync")
    if restore in chosen:
        restore.add_argument("path", metavar="PATH", help="relative to the volume ('' or . = all)")
        restore.add_argument("--at", required=True, help="UTC time, e.g. 2026-12-03T12:00:00Z")
        restore.add_argument("--local", action="store_true", help="from the local (pull) backups")
    for sub in chosen:
        sub.add_argument("--once", action="store_true", help="run here, no daemon")
        if sub is not history:
            sub.add_argument("--dry-run", action="store_true", help="print, change nothing")
            sub.add_argument("--json", action="store_true", help="print the JSON report")
    return chosen


def runs_here(args: argparse.Namespace) -> bool:
    return bool(args.once or (args.verb == "history" and args.remote))


def run_here(args: argparse.Namespace, config: SyncConfig) -> int:
    from sidecar.engine.sync import SyncEngine

    async def work() -> int:
        async with SyncEngine(config) as engine:
            if args.verb == "history":
                records, problems = await engine.history(args.limit)
                return print_history([r.summary() for r in records], problems, args.json)
            if args.verb == "undo":
                call: Awaitable[Any] = engine.undo(
                    args.sync_id, dry_run=args.dry_run, force=args.force
                )
            else:
                call = engine.restore(
                    _relpath(args.path), parse_utc(args.at), local=args.local, dry_run=args.dry_run
                )
            report = await call
        return print_report(report.as_dict(), args.json)

    return asyncio.run(work())


def run_via_daemon(args: argparse.Namespace, control_url: str) -> int:
    from sidecar.cli import client

    try:
        if args.verb == "history":
            response = client._request(control_url, "GET", f"/history?limit={args.limit}")
        else:
            query: dict[str, str] = {}
            if args.verb == "undo":
                query["sync"] = args.sync_id
                if args.force:
                    query["force"] = "1"
            else:
                parse_utc(args.at)  # a bad time is refused here, before the daemon is asked
                query.update(path=_relpath(args.path), at=args.at)
                if args.local:
                    query["local"] = "1"
            if args.dry_run:
                query["dry_run"] = "1"
            path = f"/{args.verb}?{urllib.parse.urlencode(query)}"
            response = client._request(control_url, "POST", path)
        body = response.read()
    except client.Unreachable as exc:
        print(f"sidecar: cannot reach the daemon at {control_url}: {exc}", file=sys.stderr)
        return client.EXIT_UNREACHABLE
    try:
        data = json.loads(body)
    except ValueError:
        data = {"error": body.decode(errors="replace")}
    if "error" in data or "refused" in data:
        message = data.get("error") or data.get("refused")
        print(f"sidecar: daemon answered {response.status}: {message}", file=sys.stderr)
        return EXIT_FAILED if response.status >= 404 else client.EXIT_BAD_REQUEST
    if args.verb == "history":
        return print_history(data["syncs"], data.get("problems", []), args.json)
    return print_report(data, args.json)


def print_history(
    summaries: list[dict[str, Any]], problems: list[str], as_json: bool, out: TextIO = sys.stdout
) -> int:
    if as_json:
        out.write(json.dumps({"syncs": summaries, "problems": problems}, indent=2) + "\n")
    else:
        for summary in summaries:
            out.write(history_line(summary) + "\n")
        if not summaries:
            out.write("no sync has changed anything within the retention window\n")
    for problem in problems:
        print(f"error\t{problem}", file=sys.stderr)
    return EXIT_FAILED if problems else EXIT_OK


def print_report(report: dict[str, Any], as_json: bool, out: TextIO = sys.stdout) -> int:
    if as_json:
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        for path in report["put_back"]:
            out.write(f"put-back\t{path}\n")
        for path in report["removed"]:
            out.write(f"remove\t{path}\n")
        for skipped in report["skipped"]:
            print(f"skipped\t{skipped['path']}: {skipped['reason']}", file=sys.stderr)
        for error in report["errors"]:
            print(f"error\t{error['path']}: {error['reason']}", file=sys.stderr)
        out.write(report["summary"] + "\n")
        if report.get("fatal"):
            print(f"sidecar: {report['operation']} failed: {report['fatal']}", file=sys.stderr)
    return EXIT_OK if report["ok"] else EXIT_FAILED


def _relpath(path: str) -> str:
    cleaned = path.strip().strip("/")
    return "" if cleaned == "." else cleaned
