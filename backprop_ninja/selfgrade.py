"""``grade_me()``: the last cell of each notebook saves it and grades it with the hidden tests.

The kernel never judges itself. It asks JupyterLab to save the notebook (ipylab runs the
frontend's own ``docmanager:save`` command, as Ctrl+S does), waits until the file on disk has
changed, and runs ``backprop-ninja grade --json`` on it in a separate process: the same command
and the same judge as in a terminal. It then shows the score, the first thing to fix, whether
the sandbox was on, and the HTML feedback, inline.

It knows its notebook from the kernel's Jupyter session: JupyterLab starts each kernel with
``JPY_SESSION_NAME`` set to the notebook's path. Without one (nbclient, nbval, the build, a
console) or while the notebook is being graded, it prints one line saying how to grade and
does nothing else.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from backprop_ninja import UserError, in_notebook
from backprop_ninja.handin import HANDIN_ENV

HOW_TO_GRADE = ("grade_me() grades this notebook when you run it in JupyterLab; "
                "from a terminal: backprop-ninja grade <notebook>")
SAVE_TIMEOUT = 30.0        # seconds for JupyterLab to write the notebook
GRADE_TIMEOUT = 20 * 60.0  # the grader's own limit is 15 minutes per notebook


def session_notebook() -> Path | None:
    """The notebook this kernel runs for in JupyterLab, or None (no Jupyter session, no kernel,
    or the notebook is being graded)."""
    if os.environ.get("NBGRADER_EXECUTION") or os.environ.get(HANDIN_ENV):
        return None
    name = os.environ.get("JPY_SESSION_NAME", "")
    if not name.endswith(".ipynb") or not in_notebook():
        return None
    path = Path(name)
    # jupyter_server gives the absolute path; a relative one is the kernel's cwd's notebook
    return path if path.is_absolute() else Path.cwd() / path.name


def grade_me() -> None:
    """Save this notebook, grade it with the hidden tests (``backprop-ninja grade``) and show the
    score, the first thing to fix and the feedback below the cell."""
    path = session_notebook()
    if path is None:
        print(HOW_TO_GRADE)
        return
    from IPython.display import display

    shown = display(_Message(f"Saving {path.name}…"), display_id=True)
    try:
        save_notebook(path)
        shown.update(_Message(f"Grading {path.name} with the hidden tests, in a separate process "
                              "(a minute or two)…"))
        started = time.monotonic()
        result = run_grader(path)
        shown.update(GradeReport(path, result, time.monotonic() - started))
    except UserError as exc:
        shown.update(_Message(str(exc), problem=True))
    except KeyboardInterrupt:  # the stop button: the grader's process is gone with it
        shown.update(_Message(f"grade_me() was interrupted: {path.name} was not graded.", problem=True))
    except Exception as exc:  # noqa: BLE001 - a learner sees one sentence, never a traceback
        shown.update(_Message(f"grade_me() failed ({type(exc).__name__}: {exc}); grade from a "
                              f"terminal: backprop-ninja grade {path}", problem=True))


# --- saving: the frontend writes the file, the kernel waits for it --------------------------------

def _file_state(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def request_save():
    """Ask JupyterLab to save the current notebook (the one whose cell is running), as Ctrl+S
    does. Only a message to the frontend: the kernel is busy and cannot wait for an answer.
    Returns what to call once the file has changed: it closes the ipylab widgets (fresh ones
    each time, so a reloaded page has them too)."""
    from ipylab import JupyterFrontEnd

    app = JupyterFrontEnd()
    app.commands.execute("docmanager:save")

    def close() -> None:
        for widget in (app.commands, app.shell, app.sessions, app.menu, app.toolbar, app):
            widget.close()

    return close


def save_notebook(path: Path, timeout: float | None = None, request=None) -> None:
    """Have the frontend save ``path`` (``request``, default ``request_save``) and wait until the
    file on disk has changed, at most ``timeout`` seconds (default ``SAVE_TIMEOUT``)."""
    timeout = SAVE_TIMEOUT if timeout is None else timeout
    if not path.is_file():
        raise UserError(f"grade_me() cannot find this notebook at {path} (renamed or moved? "
                        "restart the kernel, then run this cell again).")
    before = _file_state(path)
    done = (request or request_save)()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                if _file_state(path) != before:
                    return
            except OSError:  # replaced at this very moment: look again
                continue
    finally:
        if callable(done):
            done()
    raise UserError(f"grade_me() could not save {path.name} within {timeout:g} s: save it "
                    f"(Ctrl+S), then grade it from a terminal: backprop-ninja grade {path}")


# --- grading: the course's command, in its own process ---------------------------------------------

def run_grader(path: Path, timeout: float = GRADE_TIMEOUT) -> dict:
    """``backprop-ninja grade PATH --json`` in a separate process, run in the notebook's folder
    (the feedback goes to its ``grade-feedback/``). Returns the notebook's entry of the JSON,
    with ``sandbox`` added. Raises UserError with one sentence when grading fails."""
    env = {k: v for k, v in os.environ.items() if k != "JPY_SESSION_NAME"}
    try:
        done = subprocess.run([sys.executable, "-m", "backprop_ninja.cli", "grade", str(path), "--json"],
                              cwd=path.parent, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"grading {path.name} took more than {timeout / 60:g} minutes and was "
                        "stopped: look for a loop that never ends, then run grade_me() again.") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit status {done.returncode}"
        raise UserError(f"grading {path.name} failed: {why}")
    try:
        data = json.loads(done.stdout.strip().splitlines()[-1])
        entry = data["notebooks"][path.stem]
    except (IndexError, ValueError, KeyError, TypeError):
        raise UserError(f"grading {path.name} gave no result (the grader printed "
                        f"{done.stdout.strip()[-200:]!r}).") from None
    return {**entry, "sandbox": data.get("sandbox", "unknown")}


# --- what the learner sees ---------------------------------------------------------------------------

_BOX = ("font-family:var(--jp-ui-font-family, sans-serif);font-size:14px;line-height:1.45;"
        "white-space:normal;overflow-wrap:anywhere;max-width:100%;box-sizing:border-box;"
        "padding:8px 12px;border-radius:6px;border:2px solid {colour}")


class _Message:
    """One sentence below the cell (what grade_me() is doing, or why it could not grade)."""

    def __init__(self, text: str, problem: bool = False):
        self.text, self.problem = text, problem

    def _repr_mimebundle_(self, **kwargs):
        colour = "#d32f2f" if self.problem else "#1565c0"
        return {"text/plain": self.text,
                "text/html": f"<div class='bn-grade-me' style='{_BOX.format(colour=colour)}'>"
                             f"{html.escape(self.text)}</div>"}


class GradeReport:
    """The grade of one notebook: score, first thing to fix, flags, sandbox, and the feedback
    (an expandable block holding the HTML feedback in a frame; a link opens it in a tab)."""

    def __init__(self, path: Path, result: dict, seconds: float | None = None):
        self.path, self.result, self.seconds = Path(path), result, seconds

    @property
    def full_marks(self) -> bool:
        return self.result["score"] >= self.result["max_score"]

    def lines(self) -> list[str]:
        r = self.result
        lines = [f"{self.path.name}: {r['score']:g}/{r['max_score']:g} with the hidden tests."]
        if r.get("problem"):
            lines.append(f"First thing to fix: {r['problem']}")
        elif self.full_marks:
            lines.append("Nothing to fix: full marks.")
        for flag in r.get("flags") or []:
            lines.append(f"Flagged for your instructor: {flag.get('what', flag)} ({flag.get('rule', '')})")
        sandbox = r.get("sandbox", "unknown")
        lines.append("Sandbox: on (your code ran isolated; the judge ran outside it)." if sandbox == "on" else
                     f"Sandbox: {sandbox}: your code ran without isolation; the judge still ran outside it.")
        return lines

    def _repr_mimebundle_(self, **kwargs):
        r = self.result
        plain = self.lines() + ([f"Feedback: {r['feedback']}"] if r.get("feedback") else [])
        colour = "#2e7d32" if self.full_marks else "#d32f2f"
        head, *rest = self.lines()
        took = f" <span style='color:#616161'>(graded in {self.seconds:.0f} s)</span>" if self.seconds else ""
        parts = [f"<div class='bn-grade-me bn-grade-me-result' style='{_BOX.format(colour=colour)}'>",
                 f"<div class='bn-grade-me-score' style='font-size:16px'><b>{html.escape(head)}</b>"
                 f"{took}</div>"]
        parts += [f"<div>{html.escape(line)}</div>" for line in rest]
        parts.append(self._feedback_html())
        parts.append("</div>")
        return {"text/plain": "\n".join(plain), "text/html": "".join(parts)}

    def _feedback_html(self) -> str:
        feedback = self.result.get("feedback")
        if not feedback or not Path(feedback).is_file():
            return ""
        page = Path(feedback).read_text(encoding="utf-8", errors="replace")
        try:  # relative to the notebook, JupyterLab opens the link in a tab
            link = Path(feedback).resolve().relative_to(self.path.parent.resolve()).as_posix()
        except ValueError:
            link = Path(feedback).as_uri()
        # A frame keeps the feedback page's own styles apart from JupyterLab's; no scripts run in it.
        return ("<details class='bn-grade-me-feedback' open style='margin-top:6px'>"
                "<summary style='cursor:pointer'><b>Feedback</b>: every test's verdict "
                f"(<a href='{html.escape(link, quote=True)}' target='_blank'>"
                f"{html.escape(link)}</a>)</summary>"
                f"<iframe sandbox='' title='feedback' srcdoc=\"{html.escape(page, quote=True)}\" "
                "style='width:100%;height:520px;border:1px solid #cfd8dc;border-radius:4px;"
                "margin-top:6px;background:white'></iframe></details>")
