"""What the browser tests share: Debian's Chromium driven headless by Playwright, screenshots in
artifacts/browser/ (a failing block keeps one as ``failed-<name>.png``), a JupyterLab with no user
configuration of this machine's, and the clean-up of what a server started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "artifacts" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium() -> str:
    """Chromium's path; without it a test fails under CI (it must prove the page) and skips elsewhere."""
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is missing: install Debian's Chromium with `make system-deps` (as root)"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI must prove the pages in a browser, never skip them
        pytest.skip(reason)
    return CHROMIUM


@contextlib.contextmanager
def kept_if_failed(page, name: str):
    """If the block fails, a screenshot of the page is kept as artifacts/browser/failed-<name>.png
    for whoever reads the failure."""
    try:
        yield page
    except BaseException:
        with contextlib.suppress(Exception):
            page.screenshot(path=str(ARTIFACTS / f"failed-{name}.png"), full_page=True)
        raise


@contextlib.contextmanager
def chromium_page(name: str, viewport: dict):
    """A page of a fresh headless Chromium, kept as a screenshot if the block fails."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            with kept_if_failed(browser.new_page(viewport=viewport), name) as page:
                yield page
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lab_environment(folder: Path) -> dict[str, str]:
    """The environment for a JupyterLab of the test's own: its config, settings, workspaces and
    runtime dirs in ``folder``, so no user configuration or saved layout of this machine's
    applies (and none is saved there); no "news" pop-up, and a
    terminal cursor that does not blink (headless Chromium repaints each blink in software)."""
    config, settings = folder / "config", folder / "settings"
    (config / "labconfig").mkdir(parents=True, exist_ok=True)
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    (settings / "@jupyterlab" / "terminal-extension").mkdir(parents=True, exist_ok=True)
    (settings / "@jupyterlab" / "terminal-extension" / "plugin.jupyterlab-settings").write_text(
        json.dumps({"cursorBlink": False}))
    return dict(os.environ, JUPYTER_CONFIG_DIR=str(config), JUPYTER_RUNTIME_DIR=str(folder / "runtime"),
                JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(folder / "workspaces"),
                JUPYTER_PLATFORM_DIRS="1")


def kill_leftovers(marker: str) -> None:
    """Kernels, terminals and graders run in sessions of their own; find ours by the scratch
    folder in their command line (the server's root, the runtime dir, the notebook being graded)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
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
