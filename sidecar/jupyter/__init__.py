"""JupyterLab integration: a Jupyter server extension that is the browser's only way to the
sidecar (`handlers.py`). The JupyterLab frontend is built from `jupyterlab/` in the
repository into `labextension/`, which the wheel installs under share/jupyter/labextensions/
(see setup.py and README "In JupyterLab").

Installed with `pip install 'netvol-sidecar[jupyter]'`; the server extension is enabled by the
`jupyter_server_config.d/netvol-sidecar.json` file the wheel installs.
"""

from __future__ import annotations

from typing import Any

EXTENSION = "sidecar.jupyter"
URL_PREFIX = "netvol-sidecar"  # under the server's base_url


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": EXTENSION}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    # Imported here: `import sidecar.jupyter` must not need jupyter_server (the daemon's
    # image has no Jupyter).
    from sidecar.jupyter.handlers import setup_handlers

    setup_handlers(serverapp)
