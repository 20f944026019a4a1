"""The CLI end-to-end volumes (tests/support/cli_support.py's Volume): one bucket each, on
the session's rclone (`rvol`: the quirks, a data folder the test may read) or moto (`mvol`:
conditional writes, names rclone's filesystem backend cannot hold)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import S3Server
from tests.support.cli_support import Volume


@pytest.fixture
def rvol(rclone_s3: S3Server, workdir: Path) -> Volume:
    return Volume(rclone_s3, rclone_s3.new_bucket(), workdir)


@pytest.fixture
def mvol(moto_s3: S3Server, workdir: Path) -> Volume:
    return Volume(moto_s3, moto_s3.new_bucket(), workdir)
