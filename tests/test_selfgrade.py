"""grade_me(), the last cell of each notebook: one deterministic line outside JupyterLab or while
graded; in JupyterLab it saves, grades in a separate process and shows the result, and a failure
is one sentence. The real thing in a browser: test_browser.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from backprop_ninja import UserError, selfgrade
from backprop_ninja.handin import HANDIN_ENV

GRADE_ME_CELL = "from backprop_ninja.selfgrade import grade_me\ngrade_me()"
RESULT = {"score": 25.0, "max_score": 26.0, "sandbox": "on", "flags": [],
          "problem": "test_backward_stepwise: dh is wrong: dh has the opposite sign to the right gradient."}


class _Handle:
    """What ``display(..., display_id=True)`` returns: it keeps every update."""

    def __init__(self, shown):
        self.shown = shown

    def update(self, obj):
        self.shown.append(obj)


@pytest.fixture
def in_lab(tmp_path, monkeypatch):
    """A kernel started by JupyterLab for tmp_path/01_stepwise_backprop.ipynb: what it displays
    is recorded; saving is done by a fake frontend that rewrites the file."""
    import IPython.display

    notebook = tmp_path / "01_stepwise_backprop.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(GRADE_ME_CELL)]), notebook)
    for var in ("NBGRADER_EXECUTION", HANDIN_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JPY_SESSION_NAME", str(notebook))
    monkeypatch.setattr(selfgrade, "in_notebook", lambda: True)
    shown = []

    def display(obj, display_id=False):
        shown.append(obj)
        return _Handle(shown)

    monkeypatch.setattr(IPython.display, "display", display)
    saves = []
    monkeypatch.setattr(selfgrade, "request_save",
                        lambda: (saves.append(1), notebook.write_text(notebook.read_text() + " ")))
    return notebook, shown, saves


def test_outside_jupyterlab_it_prints_one_line_and_does_nothing_else(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert selfgrade.grade_me() is None
    assert capsys.readouterr().out == selfgrade.HOW_TO_GRADE + "\n"
    assert list(tmp_path.iterdir()) == []  # nothing graded, no feedback written


@pytest.mark.parametrize("graded_by", ["NBGRADER_EXECUTION", HANDIN_ENV])
def test_while_the_notebook_is_graded_it_prints_the_same_line(in_lab, monkeypatch, capsys, graded_by):
    notebook, shown, saves = in_lab
    monkeypatch.setenv(graded_by, "autograde")
    selfgrade.grade_me()
    assert capsys.readouterr().out == selfgrade.HOW_TO_GRADE + "\n"
    assert shown == [] and saves == []


def test_a_kernel_without_a_jupyter_session_prints_one_deterministic_line(tmp_path, monkeypatch):
    """What the build and nbval see: a real kernel started by nbclient, the cell's one output."""
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(GRADE_ME_CELL)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                   ).execute()
    (out,) = nb.cells[0].outputs
    assert out["output_type"] == "stream" and out["text"] == selfgrade.HOW_TO_GRADE + "\n"


def test_in_jupyterlab_it_saves_grades_and_shows_score_first_fix_sandbox_and_feedback(in_lab, monkeypatch,
                                                                                     capsys):
    notebook, shown, saves = in_lab
    feedback = notebook.parent / "grade-feedback" / "01_stepwise_backprop.html"
    feedback.parent.mkdir()
    feedback.write_text("<html><body><div class='bn-feedback-summary'>Score 25 / 26</div>"
                        "<p>dh is wrong: \"quoted\" & more</p></body></html>")
    graded = []

    def fake_grader(path):
        assert saves, "graded before the notebook was saved"
        graded.append(path)
        return dict(RESULT, feedback=str(feedback))

    monkeypatch.setattr(selfgrade, "run_grader", fake_grader)
    selfgrade.grade_me()
    assert capsys.readouterr().out == ""
    assert graded == [notebook] and len(saves) == 1
    saving, grading, result = shown
    assert "Saving 01_stepwise_backprop.ipynb" in saving._repr_mimebundle_()["text/plain"]
    assert "Grading 01_stepwise_backprop.ipynb" in grading._repr_mimebundle_()["text/plain"]
    bundle = result._repr_mimebundle_()
    assert bundle["text/plain"].splitlines() == [
        "01_stepwise_backprop.ipynb: 25/26 with the hidden tests.",
        f"First thing to fix: {RESULT['problem']}",
        "Sandbox: on (your code ran isolated; the judge ran outside it).",
        f"Feedback: {feedback}"]
    page = bundle["text/html"]
    assert "25/26 with the hidden tests." in page and "First thing to fix: test_backward_stepwise" in page
    assert "overflow-wrap:anywhere" in page  # long lines wrap
    assert "<iframe sandbox=''" in page and "srcdoc=\"&lt;html&gt;" in page  # the feedback, escaped
    assert "&quot;quoted&quot; &amp; more" in page  # escaped once: the frame shows the page as it is
    assert "href='grade-feedback/01_stepwise_backprop.html'" in page  # opens in a JupyterLab tab


def test_full_marks_and_a_sandbox_that_was_off_are_said_plainly(tmp_path):
    report = selfgrade.GradeReport(tmp_path / "03_fused_batchnorm.ipynb",
                                   {"score": 6.0, "max_score": 6.0, "problem": None, "flags": [],
                                    "sandbox": "off (bubblewrap is not installed)", "feedback": None})
    assert report.lines() == [
        "03_fused_batchnorm.ipynb: 6/6 with the hidden tests.",
        "Nothing to fix: full marks.",
        "Sandbox: off (bubblewrap is not installed): your code ran without isolation; the judge still "
        "ran outside it."]
    assert "<iframe" not in report._repr_mimebundle_()["text/html"]


def test_flags_are_shown(tmp_path):
    report = selfgrade.GradeReport(tmp_path / "02_fused_cross_entropy.ipynb",
                                   {"score": 0.0, "max_score": 4.0, "problem": "flagged", "sandbox": "on",
                                    "flags": [{"what": "torch.autograd.grad", "rule": "no autograd"}]})
    assert "Flagged for your instructor: torch.autograd.grad (no autograd)" in report.lines()


@pytest.mark.parametrize("error", [UserError("grading 01_stepwise_backprop.ipynb failed: it broke."),
                                   RuntimeError("boom")])
def test_a_grading_failure_is_one_sentence_never_a_traceback(in_lab, monkeypatch, capsys, error):
    notebook, shown, _ = in_lab

    def failing(path):
        raise error

    monkeypatch.setattr(selfgrade, "run_grader", failing)
    selfgrade.grade_me()
    assert capsys.readouterr().out == ""
    text = shown[-1]._repr_mimebundle_()["text/plain"]
    assert "\n" not in text and "Traceback" not in text
    if isinstance(error, UserError):
        assert text == str(error)
    else:
        assert text.startswith("grade_me() failed (RuntimeError: boom); grade from a terminal: "
                               f"backprop-ninja grade {notebook}")


def test_a_notebook_that_is_never_saved_is_not_graded(in_lab, monkeypatch):
    notebook, shown, _ = in_lab
    monkeypatch.setattr(selfgrade, "request_save", lambda: None)  # no frontend answers
    monkeypatch.setattr(selfgrade, "SAVE_TIMEOUT", 0.5)
    monkeypatch.setattr(selfgrade, "run_grader", lambda path: pytest.fail("graded an unsaved notebook"))
    selfgrade.grade_me()
    text = shown[-1]._repr_mimebundle_()["text/plain"]
    assert text == ("grade_me() could not save 01_stepwise_backprop.ipynb within 0.5 s: save it (Ctrl+S), "
                    f"then grade it from a terminal: backprop-ninja grade {notebook}")


def test_saving_waits_for_the_file_to_change(tmp_path):
    notebook = tmp_path / "01_stepwise_backprop.ipynb"
    notebook.write_text("{}")

    def frontend_saves_later():
        threading.Timer(0.6, lambda: notebook.write_text('{"saved": true}')).start()

    started = time.monotonic()
    selfgrade.save_notebook(notebook, timeout=10, request=frontend_saves_later)
    assert 0.5 < time.monotonic() - started < 5 and json.loads(notebook.read_text()) == {"saved": True}


def test_a_moved_notebook_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="cannot find this notebook at .*gone.ipynb .*restart the kernel"):
        selfgrade.save_notebook(tmp_path / "gone.ipynb", request=lambda: None)


def test_the_grader_runs_as_a_separate_command_and_its_refusal_is_one_sentence(tmp_path):
    """The real ``backprop-ninja grade`` in its own process, on a notebook it refuses at once."""
    stray = tmp_path / "my_copy.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), stray)
    with pytest.raises(UserError) as err:
        selfgrade.run_grader(stray, timeout=120)
    message = str(err.value)
    assert message.startswith("grading my_copy.ipynb failed: backprop-ninja grade: my_copy.ipynb is not "
                              "one of the course's notebooks")
    assert "\n" not in message and "Traceback" not in message


def test_the_session_path_is_jupyterlabs_absolute_path_or_the_kernels_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(selfgrade, "in_notebook", lambda: True)
    for var in ("NBGRADER_EXECUTION", HANDIN_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JPY_SESSION_NAME", str(tmp_path / "01_stepwise_backprop.ipynb"))
    assert selfgrade.session_notebook() == tmp_path / "01_stepwise_backprop.ipynb"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JPY_SESSION_NAME", "notebooks/02_fused_cross_entropy.ipynb")
    assert selfgrade.session_notebook() == Path.cwd() / "02_fused_cross_entropy.ipynb"
    monkeypatch.setenv("JPY_SESSION_NAME", "console-1")  # a console: no notebook to grade
    assert selfgrade.session_notebook() is None


@pytest.mark.filterwarnings("ignore:Traits should be given as instances:DeprecationWarning")  # ipylab's
def test_saving_asks_jupyterlab_for_its_own_save_command_through_ipylab(monkeypatch):
    from ipylab.commands import CommandRegistry

    sent = []
    monkeypatch.setattr(CommandRegistry, "send", lambda self, content, buffers=None: sent.append(content))
    close = selfgrade.request_save()
    assert sent == [{"func": "execute", "payload": {"id": "docmanager:save", "args": {}}}]
    close()  # the widgets are closed once the file has changed


def test_the_frontends_widgets_are_closed_after_saving(tmp_path):
    notebook = tmp_path / "01_stepwise_backprop.ipynb"
    notebook.write_text("{}")
    closed = []

    def save_and_hand_back_a_closer():
        notebook.write_text('{"saved": true}')
        return lambda: closed.append(True)

    selfgrade.save_notebook(notebook, timeout=10, request=save_and_hand_back_a_closer)
    assert closed == [True]
