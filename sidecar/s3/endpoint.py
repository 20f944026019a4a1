"""Where requests go and how: the endpoint from the environment, the Host to sign, the
proxy, TLS, and the files credentials come from."""

from __future__ import annotations

import base64
import os
import ssl
from urllib.parse import unquote, urlsplit

from sidecar.s3.errors import S3Error
from sidecar.s3.http11 import Proxy


def endpoint_from_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def credentials_fingerprint() -> tuple[float, ...]:
    """mtimes of the files botocore reads keys from: a change means the Secret rotated."""
    stamps: list[float] = []
    for variable in (
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_CONFIG_FILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        path = os.environ.get(variable)
        if path:
            try:
                stamps.append(os.stat(path).st_mtime)
            except OSError:
                stamps.append(-1.0)
    return tuple(stamps)


def signed_host(scheme: str, netloc: str) -> str:
    """The Host header as the HTTP client sends it: default ports are left out."""
    if (scheme == "http" and netloc.endswith(":80")) or (
        scheme == "https" and netloc.endswith(":443")
    ):
        return netloc.rsplit(":", 1)[0]
    return netloc


def proxy_from_env(scheme: str, host: str) -> Proxy | None:
    """The proxy for scheme://host from HTTP(S)_PROXY and NO_PROXY, as botocore (and curl)
    read them, so every request of a sync takes the same way out of the pod."""
    if not any(name.lower() in ("http_proxy", "https_proxy") for name in os.environ):
        return None  # the common case: no proxy, and no urllib.request import (~10 ms)
    from urllib.request import getproxies_environment, proxy_bypass_environment

    proxies = getproxies_environment()
    url = proxies.get(scheme)
    if not url or proxy_bypass_environment(host, proxies):
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise S3Error(
            host,
            "BadProxy",
            f"the {scheme.upper()}_PROXY {url!r} is not an http:// proxy URL "
            "(TLS to the proxy itself is not supported)",
            fatal=True,
        )
    authorization = None
    if parts.username is not None:
        user, password = unquote(parts.username), unquote(parts.password or "")
        authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return Proxy(parts.hostname, parts.port or 80, authorization)


def ssl_context() -> ssl.SSLContext:
    """Verified TLS with the system's CAs, or AWS_CA_BUNDLE's as botocore would use."""
    return ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)
