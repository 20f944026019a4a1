"""The proxy: /netvol-sidecar/{status,pull,finalize,history,undo} on the Jupyter server, to
the sidecar's control API on loopback.

Jupyter's own authentication guards every route (the notebook's token, or its login cookie
plus the XSRF token that JupyterLab sends): nobody without the notebook's token can trigger a
sync through it. Only these routes and methods pass; the query string passes as it is (the
daemon validates `wait`, `dry_run`, ...). The daemon's answer (status code and JSON) comes
back unchanged; when the daemon cannot be reached the answer is 502 with a JSON body that
says where it was looked for and why it failed, so the UI can show "sidecar unreachable".
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import parse_qsl, urlencode

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from traitlets import Float, Unicode, default
from traitlets.config import Configurable

from sidecar.core.options import OPTIONS, default_of, env_value
from sidecar.jupyter import URL_PREFIX

# route -> the one method it answers. history/undo are proxied for the daemon that has them
# (an older daemon answers 404, passed through: the UI then hides those parts).
ROUTES: dict[str, str] = {
    "status": "GET",
    "history": "GET",
    "pull": "POST",
    "finalize": "POST",
    "undo": "POST",
}

_CONTROL_URL = next(option for option in OPTIONS if option.flag == "--control-url")


class NetvolSidecar(Configurable):
    """Where the sidecar's control API is, for the Jupyter server extension."""

    control_url = Unicode(
        help=(
            "The sidecar's control API (`sidecar serve --control-addr`), on loopback. "
            f"Default: ${_CONTROL_URL.env} if set, else {_CONTROL_URL.default}."
        )
    ).tag(config=True)

    timeout = Float(
        600.0,
        help=(
            "Seconds to wait for the sidecar's answer. The UI starts syncs with ?wait=false "
            "(answered at once) and polls /status; a client asking to wait gets this long."
        ),
    ).tag(config=True)

    connect_timeout = Float(5.0, help="Seconds to connect to the sidecar.").tag(config=True)

    @default("control_url")
    def _default_control_url(self) -> str:
        # An empty SIDECAR_CONTROL_URL (a templated manifest) means unset here, as before.
        return str(env_value(_CONTROL_URL.flag, os.environ) or default_of(_CONTROL_URL.flag))


class ProxyHandler(APIHandler):
    def initialize(self, config: NetvolSidecar, route: str) -> None:
        self.sidecar = config
        self.route = route

    @tornado.web.authenticated
    async def get(self) -> None:
        await self._forward("GET")

    @tornado.web.authenticated
    async def post(self) -> None:
        await self._forward("POST")

    async def _forward(self, method: str) -> None:
        if ROUTES[self.route] != method:
            raise tornado.web.HTTPError(405)
        base = self.sidecar.control_url.rstrip("/")
        url = f"{base}/{self.route}"
        query = _without_cache_buster(self.request.query)
        if query:
            url += "?" + query
        request = HTTPRequest(
            url,
            method=method,
            body=b"" if method == "POST" else None,
            headers={"Accept": "application/json"},
            connect_timeout=self.sidecar.connect_timeout,
            request_timeout=self.sidecar.timeout,
            follow_redirects=False,
        )
        try:
            response = await AsyncHTTPClient().fetch(request, raise_error=False)
        except (OSError, HTTPClientError) as exc:
            self._unreachable(base, str(exc))
            return
        if response.code == 599:  # tornado's "no HTTP answer": refused, timeout, reset
            self._unreachable(base, str(response.error))
            return
        self.set_status(response.code)
        self.set_header("Content-Type", response.headers.get("Content-Type", "application/json"))
        self.finish(response.body)

    def _unreachable(self, base: str, cause: str) -> None:
        self.set_status(502)
        self.finish(
            json.dumps(
                {
                    "reachable": False,
                    "error": f"the sidecar is unreachable at {base}: {cause}",
                    "control_url": base,
                }
            )
        )


def _without_cache_buster(query: str) -> str:
    """The query without the bare timestamp JupyterLab's ServerConnection appends to requests
    made with `cache: 'no-store'` (its default): the sidecar refuses unknown parameters."""
    pairs = parse_qsl(query, keep_blank_values=True)
    kept = [(key, value) for key, value in pairs if not (key.isdigit() and value == "")]
    return query if len(kept) == len(pairs) else urlencode(kept)


def setup_handlers(serverapp: Any) -> None:
    config = NetvolSidecar(parent=serverapp)
    base_url = serverapp.web_app.settings["base_url"]
    handlers = [
        (
            url_path_join(base_url, URL_PREFIX, route),
            ProxyHandler,
            {"config": config, "route": route},
        )
        for route in ROUTES
    ]
    serverapp.web_app.add_handlers(".*$", handlers)
    serverapp.log.info(
        "netvol-sidecar: %s/{%s} -> %s", URL_PREFIX, ",".join(ROUTES), config.control_url
    )
