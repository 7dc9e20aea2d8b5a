"""Self-paced learners: ``backprop-ninja grade`` runs the hidden tests offline on their notebooks
(wherever they lie, recognised by file name), never touches them, and says in one sentence when
it cannot grade. Where learner code cannot be isolated, ``grade`` still grades (the judge is
outside the kernel) and says so, and ``autograde`` refuses unless told ``--no-sandbox``."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from learner import BN, CE, notebook

from backprop_ninja import cli
from backprop_ninja.grading.course import SOLUTIONS

BIN = Path(sys.executable).parent
NO_BWRAP = {"PATH": f"{BIN}:/nonexistent"}  # bubblewrap cannot be found: no isolation here


def _cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backprop_ninja.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env={**os.environ, **(env or {})})


def _text(path: Path) -> str:
    raw = re.sub(r"<(style|script)\b.*?</\1>", " ", path.read_text(), flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", raw)).split())


@pytest.mark.slow
def test_grade_json_reports_each_notebook_graded_in_the_sandbox(tmp_path):
    """Two notebooks at once (that every solution gets full marks is test_grading's "right" student)."""
    stems = [CE, BN]
    paths = [str(SOLUTIONS / f"{stem}.ipynb") for stem in stems]
    before = {p: Path(p).read_bytes() for p in paths}
    run = _cli("grade", *paths, "--json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["score"] == report["max_score"] == 4 + 6 and report["sandbox"] == "on"
    assert set(report["notebooks"]) == set(stems)
    for stem, nb in report["notebooks"].items():
        assert nb["score"] == nb["max_score"] > 0 and nb["flags"] == []
        feedback = Path(nb["feedback"])
        assert feedback == tmp_path / "grade-feedback" / f"{stem}.html" and feedback.is_file()
    assert {p: Path(p).read_bytes() for p in paths} == before  # the learner's files untouched


@pytest.mark.slow
def test_grade_table_names_the_first_problem_and_says_when_nothing_was_isolated(tmp_path):
    """A notebook anywhere, graded where bubblewrap cannot be found: the judge (outside the kernel)
    still grades it, and the table says so under the first problem."""
    mine = tmp_path / "my work" / f"{CE}.ipynb"
    mine.parent.mkdir()
    nbformat.write(notebook(CE, replace={"dlogits /= n": "dlogits /= 2 * n"}), str(mine))
    run = _cli("grade", str(mine), cwd=tmp_path, env=NO_BWRAP)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split()[:3] == ["notebook", "score", "max"]
    at = next(i for i, line in enumerate(lines) if line.startswith(CE))
    total = next(i for i, x in enumerate(lines) if x.startswith("total"))
    row = " ".join(" ".join(lines[at:total]).split())
    assert row.split()[1:3] == ["0", "4"] and "dlogits is wrong" in row
    assert "1/2 times the right gradient" in row and row.endswith("].")  # the reason, whole
    assert lines[total + 1].startswith("sandbox off (") and "bwrap" in lines[total + 1]
    assert "your code ran without isolation; the judge still ran outside it." in lines[total + 1]
    feedback = tmp_path / "grade-feedback" / f"{CE}.html"
    assert str(feedback) in run.stdout
    text = _text(feedback)
    assert "dlogits /= 2 * n" in text          # the learner's own code
    assert "dlogits is wrong" in text          # the verdict and its reason
    assert "HIDDEN TESTS" not in text and "hand_in(" not in text


def test_without_isolation_autograde_refuses_unless_told(tmp_path):
    (tmp_path / "class" / "ada").mkdir(parents=True)
    shutil.copy(SOLUTIONS / f"{CE}.ipynb", tmp_path / "class" / "ada")
    run = _cli("autograde", "class", "--out", "out", cwd=tmp_path, env=NO_BWRAP)
    assert run.returncode == 2 and "--no-sandbox" in run.stderr and run.stderr.count("\n") == 1
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_autograde_with_no_sandbox_grades_and_says_so_in_its_summary(tmp_path):
    (tmp_path / "class" / "ada").mkdir(parents=True)
    shutil.copy(SOLUTIONS / f"{CE}.ipynb", tmp_path / "class" / "ada")
    run = _cli("autograde", "class", "--out", "out", "--no-sandbox", cwd=tmp_path, env=NO_BWRAP)
    assert run.returncode == 0, run.stderr
    assert "sandbox off" in run.stdout
    assert "ada,0,4,0,0,4,46," in (tmp_path / "out" / "grades.csv").read_text()


@pytest.mark.parametrize("make, says", [
    (lambda d: d / "01_stepwise_backprop.ipynb", "does not exist"),
    (lambda d: (d / "01_stepwise_backprop.txt").write_text("x") and d / "01_stepwise_backprop.txt",
     "is not a notebook"),
    (lambda d: (d / "02_fused_cross_entropy.ipynb").write_text("{oops") and
     d / "02_fused_cross_entropy.ipynb", "is not a valid notebook"),
    (lambda d: shutil.copy(SOLUTIONS / "02_fused_cross_entropy.ipynb", d / "homework.ipynb"),
     "is not one of the course's notebooks"),
])
def test_grade_refuses_what_it_cannot_grade_in_one_sentence(tmp_path, capsys, make, says):
    path = make(tmp_path)
    code = cli.main(["grade", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert says in err and err.count("\n") == 1 and "Traceback" not in err


def test_autograde_refuses_a_missing_submissions_folder_in_one_sentence(tmp_path, capsys):
    code = cli.main(["autograde", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "is not a folder of student submissions" in err and err.count("\n") == 1
