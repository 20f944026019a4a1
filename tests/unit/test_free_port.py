"""free_port() claims what it hands out: parallel test workers (pytest-xdist) each start
servers on ports they picked, and the kernel gives a just-released port to the next asker."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar import locals3
from sidecar.locals3 import PORT_CLAIM_SECONDS, free_port


class KernelSocket:
    """A socket whose bind(port 0) gets the next port of a script, as the kernel would."""

    ports: Iterator[int] = iter(())

    def __init__(self, *_args: object) -> None:
        self.port = 0

    def __enter__(self) -> KernelSocket:
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    def bind(self, _address: tuple[str, int]) -> None:
        self.port = next(self.ports)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> type[KernelSocket]:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # claims of this test only
    monkeypatch.setattr(locals3.socket, "socket", KernelSocket)
    return KernelSocket


def test_a_port_handed_out_is_not_handed_out_again(kernel: type[KernelSocket]) -> None:
    kernel.ports = iter([40001, 40001, 40002])
    assert free_port() == 40001
    # The kernel offers 40001 again (its first caller has not bound it yet): skipped.
    assert free_port() == 40002


def test_a_stale_claim_is_given_up(kernel: type[KernelSocket], tmp_path: Path) -> None:
    kernel.ports = iter([40001, 40001, 40001])
    assert free_port() == 40001
    (claim,) = tmp_path.glob("netvol-port-claims-*/40001")
    old = time.time() - PORT_CLAIM_SECONDS - 1
    os.utime(claim, (old, old))
    assert free_port() == 40001
