"""Only what pyproject.toml cannot say: a wheel carries the prebuilt JupyterLab bundle.

The bundle (labextension/, built from jupyterlab/ with node; never committed)
goes to share/jupyter/labextensions/netvol-sidecar, where JupyterLab finds it, so users of
the wheel need no node. Building a wheel without it fails with the command that builds it;
an editable install (development, tests) does not need it.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel

HERE = Path(__file__).parent
BUNDLE = HERE / "labextension"
TARGET = "share/jupyter/labextensions/netvol-sidecar"


def _data_files() -> list[tuple[str, list[str]]]:
    # Enables the server extension in every Jupyter server of the environment.
    found = {
        "etc/jupyter/jupyter_server_config.d": [
            "jupyter-config/jupyter_server_config.d/netvol-sidecar.json"
        ]
    }
    for path in sorted(p for p in BUNDLE.rglob("*") if p.is_file()):
        folder = path.parent.relative_to(BUNDLE).as_posix()
        target = TARGET if folder == "." else f"{TARGET}/{folder}"
        found.setdefault(target, []).append(path.relative_to(HERE).as_posix())
    return sorted(found.items())


class BdistWheelWithBundle(bdist_wheel):
    def run(self) -> None:
        if not (BUNDLE / "package.json").is_file():
            raise SystemExit(
                "netvol-sidecar: the JupyterLab bundle is not built; run "
                "`cd jupyterlab && npm ci && npm run build` (node, and jupyterlab in the "
                "environment) before building the wheel"
            )
        super().run()


setup(data_files=_data_files(), cmdclass={"bdist_wheel": BdistWheelWithBundle})
