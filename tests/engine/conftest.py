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


def operation(method: str, query: dict[str, str], headers: dict[str, str]) -> str:
    """The S3 operation (botocore's name) of a request the store sends."""
    if "list-type" in query:
        return "list_objects_v2"
    if "uploads" in query:
        return "list_multipart_uploads" if method == "GET" else "create_multipart_upload"
    if "uploadId" in query:
        if "partNumber" in query:
            return "upload_part"
        return {"POST": "complete_multipart_upload", "DELETE": "abort_multipart_upload"}[method]
    if method == "PUT" and "x-amz-copy-source" in headers:
        return "copy_object"
    return {
        "GET": "get_object",
        "HEAD": "head_object",
        "PUT": "put_object",
        "DELETE": "delete_object",
    }[method]


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


@pytest.fixture(params=["moto", "rclone", "seaweed"])
def each_server(request: pytest.FixtureRequest, s3_env) -> S3Server:  # type: ignore[no-untyped-def]
    """All three servers, for the few end-to-end cases where each one's ETags and ranges
    matter (rclone's two ETags of one multipart object, SeaweedFS's `-N` ones and 206s)."""
    server: S3Server = request.getfixturevalue(f"{request.param}_s3")
    s3_env(server)
    return server


@pytest.fixture
def request_counter(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts every S3 request the engine sends, by operation (a spy: requests still go out)."""
    counts: Counter[str] = Counter()
    original_exchange = ObjectStore._exchange

    async def counting_exchange(
        self: ObjectStore, method: str, key: str | None, read: Any, **kwargs: Any
    ) -> Any:
        counts[operation(method, kwargs.get("query") or {}, kwargs.get("headers") or {})] += 1
        return await original_exchange(self, method, key, read, **kwargs)

    monkeypatch.setattr(ObjectStore, "_exchange", counting_exchange)
    return counts
