"""`make lab`: the learner's one command opens JupyterLab on notebooks/, nbgrader included."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_lab_starts_jupyterlab_and_prints_the_url(tmp_path):
    port = _free_port()
    args = f"--no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port={port} --ServerApp.port_retries=0"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    proc = subprocess.Popen(["make", "lab", f"LAB_ARGS={args}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if re.search(rf"http://127\.0\.0\.1:{port}/lab\?token=\w+", line):
                break
        log = "".join(lines)
        assert re.search(rf"http://127\.0\.0\.1:{port}/lab\?token=\w+", log), log[-3000:]
        assert "nbgrader.server_extensions.formgrader | extension was successfully loaded" in log
        assert "pip install" not in log  # the second run does not reinstall
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_nbgrader_labextensions_are_enabled():
    out = subprocess.run([str(BIN / "jupyter"), "labextension", "list"], capture_output=True,
                         text=True, check=True)
    listing = out.stdout + out.stderr
    assert re.search(r"@jupyter/nbgrader v[\d.]+ .*enabled", listing), listing
    assert re.search(r"@jupyter-widgets/jupyterlab-manager v[\d.]+ .*enabled", listing), listing
