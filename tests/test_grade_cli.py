"""Self-paced learners: ``backprop-ninja grade`` runs the hidden tests offline on their
notebooks (wherever they lie, recognised by file name), never touches them, and says
in one sentence when it cannot grade."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from backprop_ninja import autograde, cli

REPO = Path(__file__).resolve().parents[1]
STEMS = list(autograde.course_notebooks())


def _grade(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backprop_ninja.cli", "grade", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_grade_json_gives_the_solutions_full_marks(tmp_path):
    paths = [str(REPO / "solutions" / f"{stem}.ipynb") for stem in STEMS]
    before = {p: Path(p).read_bytes() for p in paths}
    run = _grade(*paths, "--json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["score"] == report["max_score"] > 0
    assert set(report["notebooks"]) == set(STEMS)
    for stem, nb in report["notebooks"].items():
        assert nb["score"] == nb["max_score"] > 0
        feedback = Path(nb["feedback"])
        assert feedback == tmp_path / "grade-feedback" / f"{stem}.html" and feedback.is_file()
    assert {p: Path(p).read_bytes() for p in paths} == before  # the learner's files untouched


@pytest.mark.slow
def test_grade_json_gives_the_untouched_release_zero(tmp_path):
    run = _grade("--json", cwd=tmp_path)  # default: the four notebooks in notebooks/
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["score"] == 0 and report["max_score"] > 0
    assert set(report["notebooks"]) == set(STEMS)


@pytest.mark.slow
def test_grade_table_names_the_first_problem_of_a_notebook_anywhere(tmp_path):
    nb = nbformat.read(str(REPO / "solutions" / "02_fused_cross_entropy.ipynb"), as_version=4)
    answer = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution"))
    answer.source = answer.source.replace("dlogits /= n", "dlogits /= 2 * n")
    mine = tmp_path / "my work" / "02_fused_cross_entropy.ipynb"
    mine.parent.mkdir()
    nbformat.write(nb, str(mine))
    run = _grade(str(mine), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split()[:3] == ["notebook", "score", "max"]
    row = next(line for line in lines if line.startswith("02_fused_cross_entropy"))
    assert row.split()[1:3] == ["0", "4"] and "dlogits is wrong" in row
    feedback = tmp_path / "grade-feedback" / "02_fused_cross_entropy.html"
    assert str(feedback) in run.stdout
    raw = re.sub(r"<(style|script)\b.*?</\1>", " ", feedback.read_text(), flags=re.S)
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", "", raw)).split())
    assert "dlogits /= 2 * n" in text          # the learner's own code
    assert "dlogits is wrong" in text          # the verdict and its reason
    assert "HIDDEN TESTS" not in text and "grade_cross_entropy(" not in text


@pytest.mark.parametrize("make, says", [
    (lambda d: d / "01_stepwise_backprop.ipynb", "does not exist"),
    (lambda d: (d / "01_stepwise_backprop.txt").write_text("x") and d / "01_stepwise_backprop.txt",
     "is not a notebook"),
    (lambda d: (d / "02_fused_cross_entropy.ipynb").write_text("{oops") and
     d / "02_fused_cross_entropy.ipynb", "is not a valid notebook"),
    (lambda d: shutil.copy(REPO / "solutions" / "02_fused_cross_entropy.ipynb", d / "homework.ipynb"),
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
