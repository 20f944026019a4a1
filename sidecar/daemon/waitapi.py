"""GET /wait on the control API (issue 13): until paths are local, for notebooks and
`sidecar wait`.

    GET /wait?path=P[&path=Q][&timeout=SECONDS][&progress=1]

200 every path is local and verified; 404 names a path the volume does not hold; 500 names
a path whose download failed and why; 504 the timeout passed first (the answer lists what is
still pending). A path is a file or a folder (every file under it; '' or '.' is the whole
folder), relative to the folder's root or absolute inside it. Waited paths jump the queue of
the background pull. Without a background pull the answer comes at once.
With progress=1 the answer is a stream (always 200): one line per second while waiting, then
the JSON answer on one line, whose "status" is the code it would have had.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from aiohttp import web

from sidecar.core.units import format_bytes
from sidecar.daemon.pullqueue import PriorityPull, WaitAnswer
from sidecar.daemon.web import SERVICE, _error, _flag, _json, _params, progress_bar, progress_stream


def _timeout(request: web.Request) -> float | None:
    raw = request.query.get("timeout")
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw.strip().removesuffix("s"))
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"timeout={raw!r} is not a number of seconds >= 0"}),
            content_type="application/json",
        )
    return value


@_params(frozenset({"path", "timeout", "progress"}))
async def wait_handler(request: web.Request) -> web.StreamResponse:
    paths = request.query.getall("path", [])
    if not paths:
        return _error(400, "give at least one path: GET /wait?path=notebooks/&path=data/x.bin")
    timeout = _timeout(request)
    stream = _flag(request, "progress", False)
    waits: PriorityPull = request.app[SERVICE].priority
    try:
        waits.progress(paths)  # checks every path before anything waits
    except ValueError as exc:
        return _error(400, f"path: {exc}")
    if not stream:
        answer = await waits.wait(paths, timeout)
        return _json(answer.body, status=answer.status)
    return await _stream(request, waits, paths, timeout)


async def _stream(
    request: web.Request, waits: PriorityPull, paths: list[str], seconds: float | None
) -> web.StreamResponse:
    waiter = asyncio.ensure_future(waits.wait(paths, seconds))
    _files, total = waits.progress(paths)

    def line() -> str:
        nonlocal total
        files, left = waits.progress(paths)
        total = max(total, left)
        return _line(waits, files, left, total)

    def final() -> dict[str, Any]:
        answer: WaitAnswer = waiter.result()
        return {**answer.body, "status": answer.status}

    return await progress_stream(request, waiter, line, final)


def _line(waits: PriorityPull, files: int, left: int, total: int) -> str:
    status = waits.status()
    rate = status.get("rate_bytes_per_second") or 0.0
    eta = f", ETA {left / rate:.0f}s" if rate > 0 and left else ""
    done = 1.0 - left / total if total else 0.0
    return (
        f"{progress_bar(done)} waiting for {files} file(s), {format_bytes(left)} to come, "
        f"{format_bytes(rate)}/s{eta}"
    )
