"""A real Jupyter server (`jupyter server`, or `jupyter lab` for the browser test) as a
subprocess with the netvol-sidecar server extension, isolated from the user's own Jupyter
configuration."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sidecar.locals3 import free_port

REPO = Path(__file__).resolve().parents[2]
# The extension's enabling file as the wheel installs it (an editable install does not).
JUPYTER_CONFIG = REPO / "jupyter-config"
# The JupyterLab bundle, built from jupyterlab/ (`npm run build`; .ci/run does it).
LABEXTENSION = REPO / "labextension"


@dataclass
class Jupyter:
    process: subprocess.Popen[bytes]
    url: str  # base URL, ends with /
    token: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_jupyter(
    tmp_path: Path, control_url: str, *, app: str = "jupyter_server", root: Path | None = None
) -> Jupyter:
    """`python -m <app>` on a free loopback port with a random token; waits until it answers."""
    port, token = free_port(), secrets.token_hex(16)
    home = tmp_path / "jupyter-home"
    (home / "config").mkdir(parents=True, exist_ok=True)
    root = root or tmp_path / "notebooks"
    root.mkdir(exist_ok=True)
    # Where the wheel puts the bundle (share/jupyter/labextensions/netvol-sidecar), here as
    # a link to the build output so an editable install finds it too.
    data = home / "data"
    (data / "labextensions").mkdir(parents=True, exist_ok=True)
    link = data / "labextensions" / "netvol-sidecar"
    if LABEXTENSION.is_dir() and not link.exists():
        link.symlink_to(LABEXTENSION, target_is_directory=True)
    env = {
        **os.environ,
        "HOME": str(home),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTER_CONFIG_PATH": str(JUPYTER_CONFIG),
        "JUPYTER_PATH": str(data),
        "JUPYTER_NO_CONFIG": "",
    }
    env.pop("SIDECAR_CONTROL_URL", None)
    # JupyterLab's own settings and workspaces, fresh; the user answered "no" to the news.
    settings = home / "lab-settings"
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True, exist_ok=True)
    news.write_text('{"fetchNews": "false"}')
    env["JUPYTERLAB_SETTINGS_DIR"] = str(settings)
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(home / "lab-workspaces")
    log_path = tmp_path / f"{app}.log"
    command = [
        sys.executable, "-m", app,
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--port-retries=0",
        "--allow-root",  # CI runs as root
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--NetvolSidecar.control_url={control_url}",
    ]  # fmt: skip
    if app == "jupyterlab":
        # No calls out of a closed network.
        command += ["--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    jupyter = Jupyter(process, f"http://127.0.0.1:{port}/", token, log_path)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{app} exited ({process.returncode}):\n{jupyter.log()}")
        try:
            request = urllib.request.Request(
                jupyter.url + "api/status", headers={"Authorization": f"token {token}"}
            )
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return jupyter
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    jupyter.stop()
    raise AssertionError(f"{app} did not answer within 90 s:\n{jupyter.log()}")
