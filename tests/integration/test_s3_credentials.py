"""Keys from botocore's provider chain when the environment has none (issue 10 item 2:
botocore only as the credentials provider): a shared credentials file, a credential process
whose keys expire (refreshed), and no keys at all (a fatal error that says what to set)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sidecar.s3 import ClientSettings, ObjectStore, S3Error
from tests.conftest import S3Server

SETTINGS = ClientSettings(concurrency=2)


def no_env_keys(monkeypatch: pytest.MonkeyPatch, server: S3Server) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    # No instance metadata lookups from a test box.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


async def test_keys_from_a_shared_credentials_file(
    moto_s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bucket = moto_s3.new_bucket()
    no_env_keys(monkeypatch, moto_s3)
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[default]\naws_access_key_id = {moto_s3.access_key}\n"
        f"aws_secret_access_key = {moto_s3.secret_key}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    async with ObjectStore(bucket, SETTINGS) as store:
        upload = await store.create_multipart("vol/k", {})
        await store.abort_multipart("vol/k", upload)
        assert await store.abort_strays("vol/k") == []
    signer = store._signer
    assert signer is not None and signer.access_key == moto_s3.access_key


async def test_expiring_keys_are_refreshed_before_they_expire(
    moto_s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A credential_process whose keys expire within botocore's advisory window: each
    request gets keys botocore refreshed (in a thread), none signs with stale ones."""
    bucket = moto_s3.new_bucket()
    no_env_keys(monkeypatch, moto_s3)
    calls = tmp_path / "calls"
    expiry = (datetime.now(UTC) + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    answer = {
        "Version": 1,
        "AccessKeyId": moto_s3.access_key,
        "SecretAccessKey": moto_s3.secret_key,
        "SessionToken": "token",
        "Expiration": expiry,
    }
    script = tmp_path / "creds.py"
    script.write_text(
        f"import json\nopen({str(calls)!r}, 'a').write('x')\nprint(json.dumps({answer!r}))\n"
    )
    config = tmp_path / "config"
    config.write_text(f"[default]\ncredential_process = {sys.executable} {script}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    async with ObjectStore(bucket, SETTINGS) as store:
        for _ in range(3):
            await store.delete("vol/none")
    assert len(calls.read_text()) >= 3  # the first load, and a refresh per request after


async def test_no_keys_anywhere_is_fatal_and_says_what_to_set(
    moto_s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_env_keys(monkeypatch, moto_s3)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_WEB_IDENTITY_TOKEN_FILE", raising=False)
    async with ObjectStore("bkt", SETTINGS) as store:
        with pytest.raises(S3Error, match="AWS_ACCESS_KEY_ID") as caught:
            await store.delete("vol/k")
    assert caught.value.fatal and caught.value.code == "NoCredentials"


async def test_a_broken_credential_source_is_fatal_and_named(
    moto_s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    no_env_keys(monkeypatch, moto_s3)
    config = tmp_path / "config"
    config.write_text(f"[default]\ncredential_process = {sys.executable} -c 'exit(3)'\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    async with ObjectStore("bkt", SETTINGS) as store:
        with pytest.raises(S3Error, match="cannot get S3 credentials") as caught:
            await store.head("vol/k")
    assert caught.value.fatal and caught.value.key == "bkt"
