"""``backprop-ninja formgrader [OUT]``: nbgrader's formgrader on the course ``autograde`` wrote.

JupyterLab starts in ``OUT/course`` (nbgrader reads the course's config from the folder it
starts in), on loopback, on a free port, with a token of its own; ``--allow-root`` when run
as root (containers, CI), as ``make lab`` does. The one URL to open is printed once the server
answers (loading nbgrader takes seconds, and a URL that refuses the connection looks broken);
it opens JupyterLab with the formgrader (*Nbgrader -> Formgrader*) already open.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from backprop_ninja import UserError

STARTUP_SECONDS = 120


def find_course(out: Path) -> Path:
    """The nbgrader course in ``out`` (``out/course``, or ``out`` itself when it is one)."""
    out = Path(out)
    for course in (out / "course", out):
        if (course / "nbgrader_config.py").is_file() and (course / "gradebook.db").is_file():
            return course.resolve()
    raise UserError(f"{out} holds no autograded course (no course/gradebook.db); run "
                    f"`backprop-ninja autograde SUBMISSIONS --out {out}` first.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lab_command(course: Path, port: int) -> list[str]:
    """The ``jupyter lab`` command line that serves ``course`` with nbgrader's formgrader (its
    token comes from ``$JUPYTER_TOKEN``, out of sight of ``ps``)."""
    argv = [str(Path(sys.executable).parent / "jupyter"), "lab", f"--ServerApp.root_dir={course}",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            "--ServerApp.open_browser=False"]
    if os.geteuid() == 0:
        argv.append("--allow-root")  # JupyterLab refuses root otherwise
    return argv


def url(port: int, token: str) -> str:
    """JupyterLab in a workspace of its own, reset, with the formgrader open (a restored layout
    would put whatever tab was last in front of it)."""
    return f"http://127.0.0.1:{port}/lab/workspaces/formgrader?reset&formgrader=true&token={token}"


def run_formgrader(out: str, port: int | None = None) -> int:
    """Start JupyterLab, print the URL once it answers, and wait for it (its exit status).
    Ctrl-C is JupyterLab's: it asks, and a second Ctrl-C stops it."""
    course = find_course(Path(out))
    port = port or free_port()
    token = secrets.token_hex(24)
    print(f"starting nbgrader's formgrader on {course} ...", flush=True)
    server = subprocess.Popen(lab_command(course, port), cwd=course, preexec_fn=_die_with_parent,
                              env={**os.environ, "JUPYTER_TOKEN": token})
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the lab, in the same terminal, gets Ctrl-C itself
    deadline = time.monotonic() + STARTUP_SECONDS
    while not _answers(port, token):
        if server.poll() is not None:
            raise UserError(f"JupyterLab stopped (exit status {server.returncode}) before it served the "
                            "formgrader; its log is above.")
        if time.monotonic() > deadline:
            server.kill()
            raise UserError(f"JupyterLab did not answer on port {port} within {STARTUP_SECONDS} s; "
                            "its log is above.")
        time.sleep(0.25)
    print(f"open this in a browser (the Formgrader tab opens by itself; otherwise Nbgrader -> Formgrader):\n"
          f"  {url(port, token)}\nCtrl-C twice stops it.", flush=True)
    return server.wait()


def _die_with_parent() -> None:
    """In the lab's process: it gets SIGTERM when this command ends, however it ends."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _answers(port: int, token: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2):  # noqa: S310
            return True
    except OSError:
        return False
