"""A client of a loopback S3 server: what other writers (aws cli, another tool) do in the
tests and the benchmark's untimed requests. One way for every server kind.

botocore, not boto3: the benchmark's extra installs awscli (botocore) only, and every call
the tests make is a botocore client method."""

from __future__ import annotations

from functools import cache
from typing import Any

import botocore.session
from botocore.config import Config


@cache
def _session() -> Any:
    # One session for all clients, as boto3's default one: each new session loads the S3
    # service model again (~0.1 s).
    return botocore.session.get_session()


def s3_client(endpoint: str, access_key: str, secret_key: str, config: Config | None = None) -> Any:
    """An S3 client of the server at `endpoint` with these credentials."""
    return _session().create_client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=config,
    )
