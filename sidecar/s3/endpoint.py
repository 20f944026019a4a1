"""Where requests go and how: the endpoint from the environment, the Host to sign, the
proxy, TLS, and the files credentials come from."""

from __future__ import annotations

import base64
import os
import re
import ssl
from dataclasses import dataclass
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
    # proxy_bypass_environment: public in CPython's urllib.request, missing from typeshed.
    from urllib.request import (  # type: ignore[attr-defined]
        getproxies_environment,
        proxy_bypass_environment,
    )

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


ADDRESSING_STYLES = ("auto", "path", "virtual")
# A bucket name that can be the first label of a host name under a TLS wildcard (*.s3...):
# no dots (a dot makes another label the certificate does not cover), no upper case.
_VIRTUAL_SAFE = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


@dataclass(frozen=True, slots=True)
class Address:
    """Where one bucket's requests go: dial scheme://host:port, sign and send `signed_host`
    as Host, and put `path_prefix` ("/bucket" for path style, "" for virtual) before keys."""

    scheme: str
    host: str
    port: int
    signed_host: str
    path_prefix: str

    @property
    def path_style(self) -> bool:
        return bool(self.path_prefix)


def resolve_address(bucket: str, endpoint: str | None, region: str, style: str) -> Address:
    """The bucket's address. `style` auto: path style for a custom endpoint (MinIO, rclone,
    Ceph... seldom have wildcard DNS) and for bucket names that cannot be a TLS-covered host
    label (dots: `my.bucket.s3.amazonaws.com` fails the *.s3 certificate), virtual-hosted
    for the others on AWS (as botocore does)."""
    if style not in ADDRESSING_STYLES:
        raise S3Error(bucket, "BadOption", f"addressing style {style!r}: auto, path or virtual")
    if endpoint:
        parts = urlsplit(endpoint)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise S3Error(
                bucket,
                "BadEndpoint",
                f"the endpoint {endpoint!r} is not an http:// or https:// URL",
                fatal=True,
            )
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise S3Error(
                bucket, "BadEndpoint", f"the endpoint {endpoint!r} has a bad port", fatal=True
            ) from None
        netloc = signed_host(scheme, parts.netloc)
        if style == "virtual":
            return Address(scheme, f"{bucket}.{parts.hostname}", port, f"{bucket}.{netloc}", "")
        return Address(scheme, parts.hostname, port, netloc, f"/{bucket}")
    service = f"s3.{region}.amazonaws.com"
    if style == "path" or (style == "auto" and not _VIRTUAL_SAFE.match(bucket)):
        return Address("https", service, 443, service, f"/{bucket}")
    host = f"{bucket}.{service}"
    return Address("https", host, 443, host, "")
