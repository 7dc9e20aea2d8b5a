"""`make lab`: the learner's one command opens JupyterLab on notebooks/, without the instructor's
tools (nbgrader's formgrader, course and assignment lists, Create Assignment, Validate) and
without nbgrader's config warnings; the instructor's `jupyter lab` in grader/ keeps them."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from browser import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NBGRADER_SERVER_EXTENSIONS = ("formgrader", "validate_assignment", "assignment_list", "course_list")


def _disabled(config: dict) -> set[str]:
    """The page config's disabledExtensions (a list, or a dict of flags)."""
    value = config.get("disabledExtensions", [])
    return {k for k, on in value.items() if on} if isinstance(value, dict) else set(value)


class _Server:
    """A JupyterLab started by ``cmd`` (its log in a file), ready once it answers; its pages by URL."""

    def __init__(self, cmd, port, tmp_path, cwd):
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
        self.port, self.log_file = port, tmp_path / "lab.log"
        with open(self.log_file, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         text=True, start_new_session=True)
        pattern = rf"http://127\.0\.0\.1:{port}/lab\?token=(\w+)"
        deadline = time.monotonic() + 120
        while not (m := re.search(pattern, self.log)):
            assert time.monotonic() < deadline and self.proc.poll() is None, self.log[-3000:]
            time.sleep(0.2)
        self.token = m.group(1)
        while True:  # the URL is printed just before the server listens
            try:
                self.get("/api/status")
                break
            except OSError:
                assert time.monotonic() < deadline and self.proc.poll() is None, self.log[-3000:]
                time.sleep(0.2)

    @property
    def log(self) -> str:
        return self.log_file.read_text()

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.port}{path}{'&' if '?' in path else '?'}token={self.token}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""

    def page_config(self, path: str = "/lab") -> dict:
        status, page = self.get(path)
        assert status == 200
        m = re.search(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>', page, re.S)
        return json.loads(m.group(1))

    def stop(self) -> str:
        """Stop the server (its whole process group); return everything it logged."""
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        return self.log


@pytest.fixture(scope="module")
def learner_lab(tmp_path_factory):
    """`make lab` on a free port, shared by this module's tests; always stopped afterwards."""
    port = free_port()
    args = f"--no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port={port} --ServerApp.port_retries=0"
    server = _Server(["make", "lab", f"LAB_ARGS={args}"], port, tmp_path_factory.mktemp("lab"), ROOT)
    try:
        yield server
    finally:
        server.stop()


def test_make_lab_starts_jupyterlab_and_prints_the_url(learner_lab):
    assert "pip install" not in learner_lab.log  # the second run does not reinstall
    assert f"Serving notebooks from local directory: {ROOT / 'notebooks'}" in learner_lab.log
    status, _ = learner_lab.get("/api/contents/01_stepwise_backprop.ipynb?content=0")
    assert status == 200


def test_the_learner_lab_has_no_instructor_tools_and_no_validate_button(learner_lab):
    config = learner_lab.page_config("/lab")
    assert "@jupyter/nbgrader" in _disabled(config), config["disabledExtensions"]
    # ... and so does Notebook 7's view of the same server
    assert "@jupyter/nbgrader" in _disabled(learner_lab.page_config("/tree"))
    # the formgrader, the course list and Validate's server side are not served at all
    for path in ("/formgrader", "/formgraders", "/courses", "/assignments", "/nbgrader_version"):
        assert learner_lab.get(path)[0] == 404, path
    log = learner_lab.log
    for ext in NBGRADER_SERVER_EXTENSIONS:
        assert f"nbgrader.server_extensions.{ext} | extension was successfully loaded" not in log
    assert "nbgrader_config.py" not in log, log[-3000:]  # "No nbgrader_config.py file found"


def test_the_learner_lab_keeps_widgets_and_the_lab_side_of_grade_me(learner_lab):
    config = learner_lab.page_config("/lab")
    loaded = {e["name"] for e in config["federated_extensions"]}
    assert {"@jupyter-widgets/jupyterlab-manager", "ipylab"} <= loaded
    assert not {"@jupyter-widgets/jupyterlab-manager", "ipylab"} & _disabled(config)
    # no news pop-up over a learner's first notebook
    status, body = learner_lab.get("/lab/api/settings/@jupyterlab/apputils-extension:notification")
    assert status == 200
    schema = json.loads(body)["schema"]["properties"]
    assert schema["fetchNews"]["default"] == "false" and schema["checkForUpdates"]["default"] is False


def test_the_instructors_lab_in_grader_keeps_the_formgrader(tmp_path):
    port = free_port()
    server = _Server([str(BIN / "jupyter"), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                      f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                      *(["--allow-root"] if os.geteuid() == 0 else [])],
                     port, tmp_path, ROOT / "grader")
    try:
        assert "@jupyter/nbgrader" not in _disabled(server.page_config("/lab"))
        assert server.get("/formgrader")[0] == 200
    finally:
        log = server.stop()
    assert "nbgrader.server_extensions.formgrader | extension was successfully loaded" in log


def test_nbgrader_labextensions_are_installed_for_the_instructor():
    out = subprocess.run([str(BIN / "jupyter"), "labextension", "list"], capture_output=True,
                         text=True, check=True)
    listing = out.stdout + out.stderr
    assert re.search(r"@jupyter/nbgrader v[\d.]+ .*enabled", listing), listing
    assert re.search(r"@jupyter-widgets/jupyterlab-manager v[\d.]+ .*enabled", listing), listing
    assert re.search(r"ipylab v[\d.]+ .*enabled", listing), listing
