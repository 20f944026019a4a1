"""Credentials in long-running pods (issue 11 item 5): keys that expire during a sync are
refreshed before they expire, and the sync finishes.

The keys come from a `credential_process` we control (botocore's provider chain, as IRSA's
web identity or an ECS role would): each call is counted and gives a session token that
expires a few seconds later. moto does not check tokens, so a proxy in front of it does what
AWS does: a request signed with an expired token gets 400 ExpiredToken. The proxy holds one
request of the sync until the first token has expired, so the sync outlives it whatever the
machine's speed.

botocore refreshes RefreshableCredentials 15 minutes before they expire (advisory, one thread
refreshes, the others go on with the current keys) and blocks every caller within 10 minutes
of expiry (mandatory). Keys that live a few seconds are always in the mandatory window:
every request asks botocore, which runs the process again. That is what a sidecar that asks
before each request must do, and what one that kept its keys would fail.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from botocore.credentials import RefreshableCredentials

from sidecar.s3 import ClientSettings, ObjectStore
from sidecar.s3.credentials import Credentials
from tests.conftest import S3Server
from tests.support.engine_support import FIN, MiB, config, sync, write
from tests.support.faultproxy import Fault, FaultProxy, Request

LIFETIME = 3  # seconds a token is good for


def _expired() -> bytes:
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ExpiredToken</Code>'
        b"<Message>The provided token has expired.</Message></Error>"
    )
    return (
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class ExpiringTokens(FaultProxy):
    """Refuses a request signed (x-amz-date) at or after its token's expiry
    (`exp-<epoch>-<call>`); holds the first request of `hold` until `release` is set.

    AWS checks at receipt; this checks at signing, a moment the client alone decides, so the
    verdict does not depend on how fast this machine moves the bytes in between."""

    def __init__(self, host: str, port: int, hold: str) -> None:
        super().__init__(host, port, lambda _request: Fault.NONE)
        self.hold = hold
        self.holding = threading.Event()
        self.release = threading.Event()
        self.tokens: list[tuple[str, str, float]] = []  # (operation, token, signed at)
        self.refused: list[str] = []
        self._guard = threading.Lock()

    async def _answer(
        self,
        request: Request,
        fault: Fault,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        token = request.headers.get("x-amz-security-token", "")
        signed = datetime.strptime(request.headers["x-amz-date"], "%Y%m%dT%H%M%SZ")
        signed_at = signed.replace(tzinfo=UTC).timestamp()
        with self._guard:
            self.tokens.append((request.operation, token, signed_at))
            hold = request.operation == self.hold and not self.holding.is_set()
            if hold:
                self.holding.set()
        if signed_at >= token_expiry(token):
            self.refused.append(f"{request.operation} signed with {token or 'no token'}")
            writer.write(_expired())
            await writer.drain()
            return True
        if hold:
            await asyncio.to_thread(self.release.wait, 120)
        return await super()._answer(request, fault, reader, writer)


def token_expiry(token: str) -> float:
    return float(token.split("-")[1]) if token.startswith("exp-") else 0.0


def _credential_process(tmp_path: Path, server: S3Server) -> tuple[Path, Path]:
    """A shared config file whose credential_process counts its calls (one byte each) and
    prints keys whose token expires LIFETIME seconds later."""
    calls = tmp_path / "calls"
    calls.write_bytes(b"")
    script = tmp_path / "creds.sh"
    answer = (
        f'{{"Version": 1, "AccessKeyId": "{server.access_key}", '
        f'"SecretAccessKey": "{server.secret_key}", '
        '"SessionToken": "exp-%s-%s", "Expiration": "%s"}'
    )
    script.write_text(
        f"printf x >> {calls}\n"
        f"expiry=$(( $(date +%s) + {LIFETIME} ))\n"
        f'printf \'{answer}\' "$expiry" "$(wc -c < {calls})" '
        '"$(date -u -d "@$expiry" +%Y-%m-%dT%H:%M:%SZ)"\n'
    )
    config_file = tmp_path / "config"
    config_file.write_text(f"[default]\ncredential_process = /bin/sh {script}\n")
    return config_file, calls


def _keys_from_the_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server: S3Server
) -> Path:
    config_file, calls = _credential_process(tmp_path, server)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return calls


def _proxy(server: S3Server, hold: str) -> ExpiringTokens:
    upstream = urlsplit(server.endpoint)
    assert upstream.hostname and upstream.port
    return ExpiringTokens(upstream.hostname, upstream.port, hold)


async def _release_after_expiry(proxy: ExpiringTokens) -> None:
    """Once a request is held: release it when the first token has expired (and a second
    more), so what follows is signed after that expiry."""
    assert await asyncio.to_thread(proxy.holding.wait, 60), "no request to hold"
    expiry = token_expiry(proxy.tokens[0][1])
    await asyncio.sleep(max(0.0, expiry + 1 - time.time()))
    proxy.release.set()


async def test_a_sync_outliving_its_keys_refreshes_them_and_finishes(
    moto: S3Server, workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = moto.new_bucket()
    s3 = moto.client()
    calls = _keys_from_the_process(monkeypatch, tmp_path, moto)
    local = workdir / "l"
    files = {f"small-{i}.txt": os.urandom(100) for i in range(4)}
    files["big.bin"] = os.urandom(6 * MiB)  # a part held across the expiry, then Complete
    for name, data in files.items():
        write(local / name, data)
    with _proxy(moto, "UploadPart") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        releasing = asyncio.ensure_future(_release_after_expiry(proxy))
        # One request at a time: every request after the held one waits for it.
        result = await sync(config(bucket, local, workdir / "s", concurrency=1), FIN)
        await releasing
    assert not proxy.refused, proxy.refused
    assert result.ok and result.files_transferred == len(files), result.as_dict()
    first_token, first_expiry = proxy.tokens[0][1], token_expiry(proxy.tokens[0][1])
    after = [(op, token) for op, token, at in proxy.tokens if at > first_expiry]
    assert after, "the sync ended before its first keys expired"
    assert all(token != first_token for _op, token in after), after
    assert "CompleteMultipartUpload" in {op for op, _token in after}, after
    assert len(calls.read_bytes()) >= 2  # the process ran again: the keys were refreshed
    for name, data in files.items():
        assert s3.get_object(Bucket=bucket, Key=f"vol/{name}")["Body"].read() == data


async def test_a_request_waiting_for_a_slot_signs_with_keys_fetched_after_the_wait(
    moto: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keys were fetched before the wait for a slot of the in-flight budget: a request
    queued behind a slow one (a big part, a throttled budget) longer than its keys had left
    was signed with expired keys (ExpiredToken from AWS). They are fetched once the slot is
    held, right before signing."""
    bucket = moto.new_bucket()
    _keys_from_the_process(monkeypatch, tmp_path, moto)
    with _proxy(moto, "PutObject") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        async with ObjectStore(bucket, ClientSettings(concurrency=1)) as store:
            first = asyncio.ensure_future(store.put("vol/first", b"1", {}))
            assert await asyncio.to_thread(proxy.holding.wait, 60), "no request to hold"
            queued = asyncio.ensure_future(store.put("vol/queued", b"2", {}))
            await asyncio.sleep(LIFETIME + 1.5)  # longer than any key fetched so far lives
            proxy.release.set()
            await asyncio.gather(first, queued)
    assert not proxy.refused, proxy.refused


async def test_keys_far_from_expiry_are_reused_and_refreshed_within_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other side, on botocore's clock (moved by the test): keys an hour from expiry are
    reused (no fetch per request); 14 minutes from expiry (botocore's advisory window) they
    are fetched again, before they expire."""
    now = [datetime(2026, 12, 3, 12, 0, tzinfo=UTC)]
    fetched: list[datetime] = []

    def fetch() -> dict[str, str]:
        fetched.append(now[0])
        expiry = now[0] + timedelta(hours=1)
        return {
            "access_key": "k",
            "secret_key": "s",
            "token": f"t{len(fetched)}",
            "expiry_time": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    first = fetch()
    provided = RefreshableCredentials(
        first["access_key"],
        first["secret_key"],
        first["token"],
        now[0] + timedelta(hours=1),
        fetch,
        "test",
        time_fetcher=lambda: now[0],
    )

    async def chain(self: Credentials) -> RefreshableCredentials:
        return provided

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(Credentials, "_from_provider_chain", chain)
    credentials = Credentials("bkt")
    for _ in range(5):
        assert (await credentials.frozen())[2] == "t1"
    now[0] += timedelta(minutes=40)  # 20 minutes left: still outside the window
    assert (await credentials.frozen())[2] == "t1"
    assert len(fetched) == 1
    now[0] += timedelta(minutes=6)  # 14 minutes left
    assert (await credentials.frozen())[2] == "t2"
    assert len(fetched) == 2
