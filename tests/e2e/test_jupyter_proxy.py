"""The Jupyter server extension (sidecar/jupyter/handlers.py) against a real `jupyter server`
process, a real `sidecar serve` and a real S3 server: it proxies status/pull/finalize to the
control API, only for callers Jupyter authenticates (token, or login cookie + XSRF token)."""

from __future__ import annotations

import http.cookiejar
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.locals3 import LocalS3, free_port
from tests.support.daemon_support import StartDaemon
from tests.support.jupyter_support import Jupyter, start_jupyter


@pytest.fixture
def jupyter_for(tmp_path: Path) -> Iterator[Any]:
    started: list[Jupyter] = []

    def start(control_url: str) -> Jupyter:
        started.append(start_jupyter(tmp_path, control_url))
        return started[-1]

    yield start
    for jupyter in started:
        jupyter.stop()


def call(
    opener: urllib.request.OpenerDirector,
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    body = b"" if method == "POST" else None
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, {"text": text.decode(errors="replace")}


def test_proxy_behind_jupyter_auth(
    s3: LocalS3, start_daemon: StartDaemon, jupyter_for: Any
) -> None:
    (s3.root / "vol" / "remote.txt").write_bytes(b"from the bucket")
    daemon = start_daemon(s3, "--volume", "team-data")
    daemon.wait_ready()
    jupyter = jupyter_for(daemon.control)
    api = jupyter.url + "netvol-sidecar/"
    anonymous = urllib.request.build_opener()
    token = {"Authorization": f"token {jupyter.token}"}

    # No token, no sync: reading the status and starting a sync are both refused.
    assert call(anonymous, "GET", api + "status")[0] == 403
    (daemon.local_dir / "mine.txt").write_bytes(b"pushed through Jupyter")
    assert call(anonymous, "POST", api + "finalize")[0] == 403
    assert not (daemon.bucket_dir / "mine.txt").exists()

    status, body = call(anonymous, "GET", api + "status", token)
    assert status == 200, body
    assert body["ready"] is True and body["volume"] == "team-data"
    # JupyterLab's ServerConnection adds a bare timestamp by default: not the sidecar's business.
    assert call(anonymous, "GET", api + "status?1796293635161", token)[0] == 200

    # The browser's way: the login cookie, and on POST the XSRF token JupyterLab sends.
    jar = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    browser.open(f"{jupyter.url}?token={jupyter.token}", timeout=30).read()
    xsrf = next(cookie.value for cookie in jar if cookie.name == "_xsrf")
    assert call(browser, "GET", api + "status")[0] == 200
    status, body = call(browser, "POST", api + "finalize")
    assert status == 403 and "_xsrf" in body["message"], body
    assert not (daemon.bucket_dir / "mine.txt").exists()

    status, body = call(browser, "POST", api + "finalize", {"X-XSRFToken": xsrf})
    assert status == 200 and body["ok"] is True and body["files_transferred"] == 1, body
    assert (daemon.bucket_dir / "mine.txt").read_bytes() == b"pushed through Jupyter"

    # The query string passes through: an async start answers 202 with where to watch.
    (s3.root / "vol" / "later.txt").write_bytes(b"later")
    status, body = call(anonymous, "POST", api + "pull?wait=false", token)
    assert status == 202 and body["accepted"] is True, body
    daemon.wait_until(lambda: (daemon.local_dir / "later.txt").exists(), 30, "the async pull")

    # Only the listed routes, each with its one method.
    assert call(anonymous, "GET", api + "pull", token)[0] == 405
    assert call(anonymous, "GET", api + "metrics", token)[0] == 404


def test_unreachable_sidecar_is_a_readable_502(jupyter_for: Any) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    jupyter = jupyter_for(closed)
    token = {"Authorization": f"token {jupyter.token}"}
    opener = urllib.request.build_opener()
    for method, route in (("GET", "status"), ("POST", "finalize")):
        status, body = call(opener, method, jupyter.url + "netvol-sidecar/" + route, token)
        assert status == 502, body
        assert body["reachable"] is False and body["control_url"] == closed
        assert closed in body["error"] and "refused" in body["error"].lower()


def test_control_url_default_and_env_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar.jupyter.handlers import NetvolSidecar

    monkeypatch.delenv("SIDECAR_CONTROL_URL", raising=False)
    assert NetvolSidecar().control_url == "http://127.0.0.1:8080"
    monkeypatch.setenv("SIDECAR_CONTROL_URL", "http://127.0.0.1:9999")
    assert NetvolSidecar().control_url == "http://127.0.0.1:9999"
