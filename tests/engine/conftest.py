"""Fixtures of the engine tests: in-process engines pointed at the session's servers."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from sidecar.s3 import ObjectStore
from tests.conftest import S3Server


@pytest.fixture
def server(any_s3: S3Server, s3_env) -> S3Server:  # type: ignore[no-untyped-def]
    s3_env(any_s3)
    return any_s3


@pytest.fixture
def moto(moto_s3: S3Server, s3_env) -> S3Server:  # type: ignore[no-untyped-def]
    s3_env(moto_s3)
    return moto_s3


@pytest.fixture
def seaweed(seaweed_s3: S3Server, s3_env) -> S3Server:  # type: ignore[no-untyped-def]
    s3_env(seaweed_s3)
    return seaweed_s3


@pytest.fixture(params=["moto", "seaweed"])
def conditional(request: pytest.FixtureRequest, s3_env) -> S3Server:  # type: ignore[no-untyped-def]
    """The servers that answer a failed condition with 412 (tests/engine/test_s3_servers.py
    says which condition each honours): races on conditional writes run on both."""
    server: S3Server = request.getfixturevalue(f"{request.param}_s3")
    s3_env(server)
    return server


@pytest.fixture
def request_counter(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts every S3 request the engine sends, by operation (a spy: requests still go out)."""
    counts: Counter[str] = Counter()
    original_call = ObjectStore._call
    original_send = ObjectStore._send

    async def counting_call(self: ObjectStore, key: str, method: str, **params: Any) -> Any:
        counts[method] += 1
        return await original_call(self, key, method, **params)

    async def counting_send(self: ObjectStore, method: str, key: str | None, **kwargs: Any) -> Any:
        query = kwargs.get("query") or {}
        if "list-type" in query:
            counts["list_objects_v2"] += 1
        elif "partNumber" in query:
            counts["upload_part"] += 1
        else:
            counts[{"GET": "get_object", "HEAD": "head_object", "PUT": "put_object"}[method]] += 1
        return await original_send(self, method, key, **kwargs)

    monkeypatch.setattr(ObjectStore, "_call", counting_call)
    monkeypatch.setattr(ObjectStore, "_send", counting_send)
    return counts
