"""The JupyterLab extension for real: a real `sidecar serve` on a real S3 server, JupyterLab
with the built extension, and headless Debian Chromium driven by Playwright (the system
browser: nothing is downloaded). The user reads the status item, a file is written through
Jupyter's file API, the user clicks Push in the panel, and the object is in the bucket and
the status says so; then both sides change it, the user clicks Pull, and the item and the
panel show the conflict and where the other version was kept. Screenshots: jupyterlab-*.png
in the test's tmp folder, or in $NETVOL_SCREENSHOT_DIR when set (the README's picture comes
from there).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.locals3 import LocalS3
from tests.support.daemon_support import StartDaemon
from tests.support.jupyter_support import LABEXTENSION, start_jupyter

CHROMIUM = "/usr/bin/chromium"
# The flags this machine's closed network needs (no background calls home) and a root user.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
TIMEOUT_MS = 120_000  # JupyterLab's first load under a loaded CI machine


def _require(present: bool, reason: str) -> None:
    if not present:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (.ci/run must provide it)")
        pytest.skip(reason)


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_status_item_and_push_button_in_jupyterlab(
    s3: LocalS3, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    _require(Path(CHROMIUM).exists(), "Debian chromium is not installed (apt-get install chromium)")
    _require(
        (LABEXTENSION / "package.json").exists(),
        "the JupyterLab bundle is not built (cd jupyterlab && npm ci && npm run build)",
    )
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _require(False, "playwright is not installed (the test extra)")
        raise

    shots = Path(os.environ.get("NETVOL_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    (s3.root / "vol" / "data.csv").write_bytes(b"x,y\n1,2\n")
    daemon = start_daemon(s3, "--volume", "team-data")
    daemon.wait_ready()
    lab = start_jupyter(tmp_path, daemon.control, app="jupyterlab", root=daemon.local_dir)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),  # fresh --user-data-dir
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 800},
            )
            try:
                page = browser.new_page()
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(f"{lab.url}lab?token={lab.token}")
                item = page.locator(".nv-status-item")
                expect(item).to_contain_text("sync: synced", timeout=TIMEOUT_MS)

                # A file written through Jupyter's file API, as the notebook would.
                request = urllib.request.Request(
                    f"{lab.url}api/contents/results.txt",
                    data=json.dumps(
                        {"type": "file", "format": "text", "content": "trained: 0.93\n"}
                    ).encode(),
                    method="PUT",
                    headers={
                        "Authorization": f"token {lab.token}",
                        "Content-Type": "application/json",
                    },
                )
                with urllib.request.urlopen(request, timeout=60) as response:
                    assert response.status in (200, 201)
                assert not (daemon.bucket_dir / "results.txt").exists()

                item.click()
                panel = page.locator("#netvol-sidecar-panel")
                expect(panel).to_be_visible()
                expect(panel.locator(".nv-state")).to_contain_text("Synced")
                page.screenshot(path=str(shots / "jupyterlab-before-push.png"))
                panel.locator("button.nv-push").click()

                pushed = daemon.bucket_dir / "results.txt"
                _wait(pushed.exists, 60, "results.txt in the bucket")
                assert pushed.read_bytes() == b"trained: 0.93\n"
                expect(panel).to_contain_text("Last push", timeout=TIMEOUT_MS)
                expect(panel).to_contain_text("1 file (14 B)", timeout=TIMEOUT_MS)
                expect(item).to_have_text("sync: synced just now", timeout=TIMEOUT_MS)
                page.screenshot(path=str(shots / "jupyterlab.png"))

                # Both sides change the file, the user pulls: the conflict is on the item and
                # the panel says where the other version was kept.
                (daemon.local_dir / "results.txt").write_bytes(b"trained: 0.95 (mine)\n")
                (daemon.bucket_dir / "results.txt").write_bytes(b"trained: 0.91 (theirs)\n")
                panel.locator("button.nv-pull").click()
                expect(item).to_have_text("sync: 1 conflict", timeout=TIMEOUT_MS)
                conflicts = panel.locator("table").first
                expect(conflicts).to_contain_text("results.txt", timeout=TIMEOUT_MS)
                expect(conflicts).to_contain_text(".conflict-", timeout=TIMEOUT_MS)
                page.screenshot(path=str(shots / "jupyterlab-conflict.png"))
            finally:
                browser.close()
    finally:
        lab.stop()
    if "NETVOL_SCREENSHOT_DIR" not in os.environ:
        shutil.copy(shots / "jupyterlab.png", tmp_path / "jupyterlab-final.png")
