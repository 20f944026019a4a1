"""`sidecar pull|finalize|status` without --once: ask the running daemon.

Standard library only (http.client), so the command starts fast from a notebook terminal or a
preStop hook. Syncs always stream progress: on a terminal one bar redrawn in place, otherwise
plain lines; then the summary. Exit codes: 0 ok, 1 the sync failed or was refused,
2 bad request, 3 the daemon cannot be reached.
"""

from __future__ import annotations

import http.client
import json
import shutil
import sys
import time
import urllib.parse
from typing import Any, TextIO

from sidecar.cli.summary import write_summary
from sidecar.core.units import format_bytes, format_duration

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_REQUEST = 2
EXIT_UNREACHABLE = 3

CONNECT_TIMEOUT = 5.0
# Progress lines arrive every second while a sync runs or waits; a long silence means the
# daemon is wedged or gone.
READ_TIMEOUT = 120.0


class Unreachable(Exception):
    pass


def run_client(
    verb: str,
    *,
    control_url: str,
    dry_run: bool = False,
    as_json: bool = False,
    paths: list[str] | None = None,
    timeout: float | None = None,
) -> int:
    try:
        if verb == "status":
            return _status(control_url, as_json, sys.stdout)
        if verb == "wait":
            return _wait(control_url, paths or [], timeout, sys.stdout)
        return _sync(verb, control_url, dry_run, sys.stdout)
    except Unreachable as exc:
        print(
            f"sidecar: cannot reach the daemon at {control_url}: {exc} "
            "(is `sidecar serve` running? set --control-url or SIDECAR_CONTROL_URL)",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE


def _connect(control_url: str) -> tuple[http.client.HTTPConnection, str]:
    url = urllib.parse.urlsplit(control_url)
    if url.scheme not in ("http", "") or not url.hostname:
        raise Unreachable(f"not an http:// URL: {control_url!r}")
    connection = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=CONNECT_TIMEOUT)
    try:
        connection.connect()
    except OSError as exc:
        raise Unreachable(exc.strerror or str(exc)) from None
    assert connection.sock is not None
    connection.sock.settimeout(READ_TIMEOUT)
    return connection, url.path.rstrip("/")


def _request(control_url: str, method: str, path: str) -> http.client.HTTPResponse:
    connection, base = _connect(control_url)
    try:
        connection.request(method, base + path, headers={"Accept": "application/json"})
        return connection.getresponse()
    except OSError as exc:
        raise Unreachable(f"{method} {path}: {exc}") from None


def _sync(verb: str, control_url: str, dry_run: bool, out: TextIO) -> int:
    query = "?progress=1" + ("&dry_run=1" if dry_run else "")
    response = _request(control_url, "POST", f"/{verb}{query}")
    if response.status != 200:
        return _failed_answer(response)
    summary = _follow(response, out, verb)
    return _print_summary(summary, out)


def _wait(control_url: str, paths: list[str], timeout: float | None, out: TextIO) -> int:
    """GET /wait with progress: exit 0 when every path is local, 1 when one is unknown,
    failed or the timeout passed (the reason on stderr)."""
    query = [("path", path) for path in paths] + [("progress", "1")]
    if timeout is not None:
        query.append(("timeout", f"{timeout:g}"))
    response = _request(control_url, "GET", "/wait?" + urllib.parse.urlencode(query))
    if response.status != 200:
        return _failed_answer(response)
    answer = _follow(response, out, "wait")
    if answer.get("status") == 200:
        out.write("local: " + ", ".join(p or "." for p in answer.get("paths", paths)) + "\n")
        return EXIT_OK
    print(f"sidecar: {answer.get('error', answer)}", file=sys.stderr)
    return EXIT_FAILED


def _follow(response: http.client.HTTPResponse, out: TextIO, what: str) -> dict[str, Any]:
    """Progress lines (one bar redrawn on a terminal) until the final JSON line."""
    tty = out.isatty()
    drawn = 0
    final: dict[str, Any] | None = None
    try:
        for raw in response:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith("{"):
                final = json.loads(line)
                break
            if tty:
                shown = line[: shutil.get_terminal_size().columns - 1]
                out.write("\r" + shown.ljust(drawn))
                drawn = len(shown)
            else:
                out.write(line + "\n")
            out.flush()
    except (OSError, http.client.HTTPException) as exc:
        raise Unreachable(f"the connection broke during {what}: {exc}") from None
    if tty and drawn:
        out.write("\n")
    if final is None:
        raise Unreachable(f"the daemon ended the {what} answer without a summary")
    return final


def _print_summary(summary: dict[str, Any], out: TextIO) -> int:
    if "refused" in summary:
        print(f"sidecar: {summary['refused']}", file=sys.stderr)
        return EXIT_FAILED
    write_summary(summary, out, sys.stderr)
    return EXIT_OK if summary.get("ok") else EXIT_FAILED


def _failed_answer(response: http.client.HTTPResponse) -> int:
    body = response.read().decode(errors="replace")
    try:
        data = json.loads(body)
    except ValueError:
        data = {"error": body.strip() or response.reason}
    message = data.get("refused") or data.get("error") or body
    print(f"sidecar: daemon answered {response.status}: {message}", file=sys.stderr)
    if response.status in (409, 503) or response.status >= 500:
        return EXIT_FAILED
    return EXIT_BAD_REQUEST


def _status(control_url: str, as_json: bool, out: TextIO) -> int:
    response = _request(control_url, "GET", "/status")
    if response.status != 200:
        return _failed_answer(response)
    try:
        status = json.loads(response.read())
    except (OSError, ValueError) as exc:
        raise Unreachable(f"unreadable /status answer: {exc}") from None
    if as_json:
        out.write(json.dumps(status, indent=2) + "\n")
    else:
        out.write(describe_status(status, time.time()))
    return EXIT_OK


def describe_status(status: dict[str, Any], now: float) -> str:
    lines = [f"volume: {status.get('remote')} <-> {status.get('local_dir')}"]
    ready = "yes" if status.get("ready") else "no"
    initial = status.get("initial_pull") or {}
    if not status.get("ready") and initial:
        ready += f" (initial pull {initial.get('state')}, attempt {initial.get('attempts')})"
    lines.append(f"ready: {ready}" + ("  [read-only]" if status.get("read_only") else ""))
    degraded = status.get("degraded_by")
    if status.get("degraded") and degraded:
        lines.append(f"degraded: {degraded['message']}")
    if status.get("shutting_down"):
        lines.append("shutting down")
    background = status.get("background_pull") or {}
    if background.get("enabled") and background.get("state") != "complete":
        eta = background.get("eta_seconds")
        lines.append(
            f"background pull: {background['state']}, {background['files_pending']} file(s) "
            f"({format_bytes(background['bytes_pending'])}) to come"
            + (f", ETA {format_duration(eta)}" if eta is not None else "")
            + (f", {background['failed_count']} failed" if background.get("failed_count") else "")
        )
    current = status.get("current")
    lines.append(f"now: {current['line']}" if current else "now: idle")
    for queued in status.get("queued", []):
        lines.append(f"queued: {queued['operation']} ({queued['waiting_seconds']:.0f}s)")
    for name, result in sorted((status.get("last_results") or {}).items()):
        ago = now - result.get("finished_at", now)
        lines.append(f"last {name} ({ago:.0f}s ago): {result.get('summary')}")
    error = status.get("last_error")
    if error:
        lines.append(f"last error ({now - error['at']:.0f}s ago): {error['message']}")
    auto = status.get("auto_sync") or {}
    if auto.get("enabled"):
        watching = "" if auto.get("watching", True) else f" (NOT watching: {auto['watcher_state']})"
        lines.append(
            f"auto-sync: {auto['state']}{watching}, {auto['pending_changes']} unpushed "
            f"change(s), {auto['pushes']} push(es)"
        )
    return "\n".join(lines) + "\n"
