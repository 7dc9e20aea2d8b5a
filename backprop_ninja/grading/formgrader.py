"""``backprop-ninja formgrader [OUT]``: nbgrader's formgrader on the course ``autograde`` wrote.

JupyterLab starts in ``OUT/course`` (nbgrader reads the course's config from the folder it
starts in), on loopback, on a free port, with a token of its own, so the one URL printed is
the one to open; ``--allow-root`` when run as root (containers, CI), as ``make lab`` does.
The URL opens JupyterLab with the formgrader (*Nbgrader -> Formgrader*) already open.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from pathlib import Path

from backprop_ninja import UserError


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
    return f"http://127.0.0.1:{port}/lab?formgrader=true&token={token}"


def run_formgrader(out: str, port: int | None = None) -> int:
    """Print the URL, then become JupyterLab (Ctrl-C stops it)."""
    course = find_course(Path(out))
    port = port or free_port()
    token = secrets.token_hex(24)
    print(f"formgrader on {course}:\n  {url(port, token)}\n"
          "open it in a browser (the Formgrader tab opens by itself; otherwise Nbgrader -> Formgrader); "
          "Ctrl-C twice stops it.", flush=True)
    argv = lab_command(course, port)
    os.chdir(course)
    os.execve(argv[0], argv, {**os.environ, "JUPYTER_TOKEN": token})
    return 0  # not reached
