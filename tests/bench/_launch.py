"""Start one tool, report its wall time and peak RSS: `python -S -I _launch.py OUT argv...`.

Why a launcher: Linux carries a process's RSS high-water mark across exec (exec records the old
mm's peak in the process's maxrss). A tool forked straight from the harness, a Python process
holding botocore, a proxy and its buffers, would report the harness's peak as its own. Forked
from this small interpreter (started without site, about 9 MiB), the floor is this process's
size, below any tool's. wait4 here gives the tool's own rusage (and that of any child it
reaped): peak RSS and CPU seconds (user + system), the latter much steadier than wall time on
a busy machine.
Standard library only, no site: it must stay small and start fast.
"""

import os
import sys
import time


def main() -> None:
    out_path, argv = sys.argv[1], sys.argv[2:]
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            os.write(2, f"cannot start {argv[0]}: {exc}\n".encode())
        os._exit(127)
    _pid, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - started
    with open(out_path, "w") as out:
        cpu = usage.ru_utime + usage.ru_stime
        code = os.waitstatus_to_exitcode(status)
        out.write(f"{wall:.6f} {usage.ru_maxrss} {code} {cpu:.6f}\n")


main()
