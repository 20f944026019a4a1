"""The sidecar over https: a real `rclone serve s3` with a certificate from a test CA
(trustme), trusted through AWS_CA_BUNDLE as botocore and the aws cli do."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from sidecar.locals3 import LocalS3, environ_with
from tests.conftest import sidecar_args

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def tls_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalS3, Path]]:
    root = tmp_path_factory.mktemp("tls-s3")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(root / "server.pem")
    cert.private_key_pem.write_to_path(root / "server.key")
    ca.cert_pem.write_to_path(root / "ca.pem")
    server = LocalS3(
        root / "data", log_path=root / "rclone.log", tls=(root / "server.pem", root / "server.key")
    )
    server.make_bucket("vol")
    server.start()
    try:
        yield server, root / "ca.pem"
    finally:
        server.stop()


def sidecar(
    verb: str, local: Path, state: Path, env: dict[str, str]
) -> subprocess.CompletedProcess:
    return subprocess.run(
        sidecar_args(
            verb,
            "s3://vol/data",
            local,
            state,
            "--part-size",
            "5MiB",
            "--multipart-threshold",
            "5MiB",
        ),
        env=environ_with(env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_round_trip_over_https_with_a_ca_bundle(
    tls_s3: tuple[LocalS3, Path], tmp_path: Path
) -> None:
    server, ca = tls_s3
    env = {**server.env(), "AWS_CA_BUNDLE": str(ca)}
    assert env["AWS_ENDPOINT_URL"].startswith("https://")
    source = tmp_path / "a"
    (source / "d").mkdir(parents=True)
    (source / "d" / "small.txt").write_bytes(b"over tls")
    (source / "big.bin").write_bytes(os.urandom(12 * MiB))  # multipart too
    pushed = sidecar("finalize", source, tmp_path / "sa", env)
    assert pushed.returncode == 0, pushed.stderr
    pulled = sidecar("pull", tmp_path / "b", tmp_path / "sb", env)
    assert pulled.returncode == 0, pulled.stderr
    for name in ("d/small.txt", "big.bin"):
        assert (tmp_path / "b" / name).read_bytes() == (source / name).read_bytes()


def test_an_untrusted_certificate_is_refused_by_name(
    tls_s3: tuple[LocalS3, Path], tmp_path: Path
) -> None:
    server, _ca = tls_s3
    run = sidecar("pull", tmp_path / "b", tmp_path / "sb", server.env())
    assert run.returncode != 0
    assert "certificate is not trusted" in run.stderr, run.stderr
    assert "AWS_CA_BUNDLE" in run.stderr and "127.0.0.1" in run.stderr, run.stderr
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
