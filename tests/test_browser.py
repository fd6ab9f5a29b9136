"""The explorer in a real browser: JupyterLab on localhost, driven by headless Chromium.

Starts ``jupyter lab`` on a free port with a random token, serving a copy of
``notebooks/05_explorer.ipynb`` (so autosave never writes outputs into the committed file),
with the ``tiny`` profile and the small hand-written data dir. Playwright (python, sync API)
opens the notebook in Debian's Chromium, runs all cells, moves the sparsity slider with the
keyboard, and checks that the plot image and the reported sparsity both change.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "05_explorer.ipynb"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyter_lab(tmp_path, data_dir):
    """A JupyterLab server on localhost: yields its base URL and token; stopped afterwards."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, CAP_LAB_PROFILE="tiny", CAP_LAB_DATA=str(data_dir), CAP_LAB_FIGURES=str(tmp_path / "figures"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"), MPLBACKEND="module://matplotlib_inline.backend_inline")
    log = open(tmp_path / "jupyter.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly"] + (["--allow-root"] if os.geteuid() == 0 else []),
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not start:\n{(tmp_path / 'jupyter.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_explorer_slider_updates_plot_and_sparsity_in_chromium(jupyter_lab):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    base, token = jupyter_lab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(120_000)
            page.goto(f"{base}/lab/tree/{NOTEBOOK.name}?token={token}")
            page.locator(".jp-Notebook").wait_for()
            accept = page.locator(".jp-Dialog .jp-mod-accept")  # "Select Kernel" when lab asks
            try:
                accept.wait_for(timeout=20_000)
                accept.click()
            except PlaywrightTimeout:
                pass
            expect(page.get_by_role("button", name=re.compile(r"Python 3 \(ipykernel\) \| Idle"))).to_be_visible()

            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=False).first.click()

            status = page.locator(".cap-sparsity-text")
            plot = page.locator("img.cap-pruning-plot")
            # the notebook's own check moves the slider once from code; wait for every cell to finish
            expect(page.locator(".cap-eval-result")).to_contain_text(" s", timeout=150_000)
            expect(status).to_contain_text("achieved sparsity")
            text_before, src_before = status.inner_text(), plot.get_attribute("src")
            assert src_before

            handle = page.locator(".noUi-handle").first
            handle.focus()
            handle.press("ArrowRight")
            expect(status).not_to_have_text(text_before)
            expect(status).to_contain_text("achieved sparsity")
            page.wait_for_function(
                "([sel, old]) => { const i = document.querySelector(sel); return i && i.src && i.src !== old; }",
                arg=["img.cap-pruning-plot", src_before])
            assert status.inner_text() != text_before
            assert plot.get_attribute("src") != src_before
        finally:
            browser.close()
