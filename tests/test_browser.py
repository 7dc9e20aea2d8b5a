"""The report widget, proven in a real browser: JupyterLab on loopback, Debian's Chromium
headless (Playwright), exercise 1's solution with one planted mistake, Run All, and the page
must show the coloured rows, the statuses and the hint. Saves artifacts/browser/report.png."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
SOLUTION = ROOT / "solutions" / "01_stepwise_backprop.ipynb"
ARTIFACTS = ROOT / "artifacts" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# The planted mistake: a flipped sign in dh. dW2, db2 and everything before stay right; every
# gradient after dh follows correctly from the wrong dh ("inherited").
RIGHT_LINE, PLANTED_LINE = "    dh = dlogits @ W2.T\n", "    dh = -(dlogits @ W2.T)\n"
REPORT_CELL = """\
from backprop_ninja.widgets import show_report
tensors, ref = model.autograd_reference(params, Xb, Yb)
report = show_report(grads, tensors, ref)"""
FALLBACK_CELLS = [
    "import torch\nfrom backprop_ninja import model\nfrom backprop_ninja.widgets import show_report",
    """\
params = model.init_params(model.Config(n_hidden=64))
g = torch.Generator().manual_seed(42)
Xb, Yb = torch.randint(0, 27, (32, 3), generator=g), torch.randint(0, 27, (32,), generator=g)
tensors, ref = model.autograd_reference(params, Xb, Yb)
# every gradient right (autograd's own), except dh: a flipped sign
grads = dict(ref, h=-ref["h"])""",
    "report = show_report(grads, tensors, ref)",
]


def _chromium() -> str:
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is missing: install Debian's Chromium with `make browser-deps` (as root)"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI must prove the widget in a browser, never skip it
        pytest.skip(reason)
    return CHROMIUM


def _planted_notebook(folder: Path) -> tuple[Path, bool]:
    """(notebook path, from_solution). The solution with the planted mistake when possible,
    else a small notebook that plants the same mistake into autograd's gradients."""
    if SOLUTION.exists():
        nb = nbformat.read(SOLUTION, as_version=4)
        cells = [c for c in nb.cells if c.cell_type == "code" and RIGHT_LINE in c.source + "\n"]
        if len(cells) == 1:
            cells[0].source = (cells[0].source + "\n").replace(RIGHT_LINE, PLANTED_LINE).rstrip("\n")
            for c in nb.cells:
                if c.cell_type == "code":
                    c.outputs, c.execution_count = [], None
            if not any("show_report(" in c.source for c in nb.cells if c.cell_type == "code"):
                nb.cells.append(nbformat.v4.new_code_cell(REPORT_CELL))
            path = folder / "01_stepwise_backprop_planted.ipynb"
            nbformat.write(nb, path)
            return path, True
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in FALLBACK_CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / "planted.ipynb"
    nbformat.write(nb, path)
    return path, False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_kernels(marker: str) -> None:
    """Kernels run in their own session; find ours by the runtime dir in their command line."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def lab(tmp_path):
    """JupyterLab serving tmp_path on 127.0.0.1 with a token; always stopped afterwards."""
    port, token = _free_port(), secrets.token_hex(16)
    runtime = tmp_path / "runtime"
    config = tmp_path / "config"
    (config / "labconfig").mkdir(parents=True)
    # No "news" or update pop-up over the page.
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(config), JUPYTER_RUNTIME_DIR=str(runtime),
               JUPYTER_PLATFORM_DIRS="1")
    work = tmp_path / "work"
    work.mkdir()
    log = open(tmp_path / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
         f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield work, base, token
    finally:
        try:
            req = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(req, timeout=5)
            server.wait(timeout=15)
        except Exception:  # noqa: BLE001 - whatever happened, the process group goes next
            pass
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)
        _kill_kernels(str(runtime))
        log.close()


def test_report_widget_renders_in_jupyterlab(lab, tmp_path):
    chromium = _chromium()
    from playwright.sync_api import expect, sync_playwright

    work, base, token = lab
    notebook, from_solution = _planted_notebook(work)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(f"{base}/lab/tree/{notebook.name}?token={token}", timeout=60_000)
            page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=60_000)
            # wait until the kernel is up, then Run > Run All Cells
            expect(page.locator(".jp-StatusBar-Widget", has_text="| Idle").first).to_be_visible(
                timeout=90_000)
            page.locator(".lm-MenuBar-item", has_text="Run").first.click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

            report = page.locator(".backprop-ninja-report").first
            report.wait_for(timeout=90_000)
            rows = report.locator(".backprop-ninja-row")
            expect(rows).to_have_count(26, timeout=30_000)
            names = [rows.nth(i).locator("button").inner_text().strip() for i in range(26)]
            statuses = {name: rows.nth(i).locator(".widget-html").inner_text().split()[0]
                        for i, name in enumerate(names)}
            text = report.inner_text()
            assert "Fix dh first:" in text and "opposite sign" in text, text
            assert statuses["h"] == "wrong"
            for name in ("logprobs", "probs", "counts", "logits", "W2", "b2"):
                assert statuses[name] in ("exact", "close"), (name, statuses)
            after = ("hpreact", "bngain", "bnraw", "bndiff", "hprebn", "W1", "C")
            expected_after = {"inherited"} if from_solution else {"exact", "close"}
            for name in after:
                assert statuses[name] in expected_after, (name, statuses)
            # the first wrong row's heatmaps are shown straight away ...
            expect(report.locator(".backprop-ninja-caption")).to_contain_text("dh", timeout=30_000)
            expect(report.locator("img").first).to_be_visible(timeout=30_000)
            # ... and clicking another row round-trips through the kernel to show its own
            caption = report.locator(".backprop-ninja-caption")
            rows.nth(names.index("W2")).locator("button").click()
            expect(caption).to_contain_text("dW2", timeout=30_000)
            rows.nth(names.index("h")).locator("button").click()
            expect(caption).to_contain_text("sign flipped", timeout=30_000)
            # no cell raised
            assert page.locator("[data-mime-type='application/vnd.jupyter.error']").count() == 0
            report.scroll_into_view_if_needed()
            time.sleep(0.5)  # let the image finish painting
            report.screenshot(path=str(ARTIFACTS / "report.png"))
            # the same cell printed the summary for plain outputs, and exercise 1 draws the graph
            cell = page.locator(".jp-CodeCell", has=report).first
            expect(cell.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stdout']"
                                ).first).to_contain_text("11/26 gradients correct.")
            if "graph_figure(" in notebook.read_text():
                graph = cell.locator(".jp-RenderedImage img").last
                expect(graph).to_be_visible(timeout=30_000)
                graph.scroll_into_view_if_needed()
                assert graph.evaluate("img => img.naturalWidth") > 600
                graph.screenshot(path=str(ARTIFACTS / "graph.png"))
        finally:
            browser.close()
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
    shutil.copy(notebook, ARTIFACTS / notebook.name)
