"""Instructor autograding: a class of right, partial, wrong, empty, broken and hostile
submissions goes through the real nbgrader pipeline (``autograde_class``), in parallel,
and every student gets the grade their work deserves, feedback that explains it, and
no hidden-test source.

Student folders are generated from ``solutions/`` and ``notebooks/`` (the release) with
small code substitutions; one class run is shared by every assertion.
"""

from __future__ import annotations

import csv
import html
import os
import re
import time
from pathlib import Path

import nbformat
import pytest

from backprop_ninja import autograde

REPO = Path(__file__).resolve().parents[1]
SOLUTIONS, RELEASE = REPO / "solutions", REPO / "notebooks"
STEMS = list(autograde.course_notebooks())
CE, BN, STEP = "02_fused_cross_entropy", "03_fused_batchnorm", "01_stepwise_backprop"
# Low limits keep the hostile cases quick; still far above what a right notebook needs.
LIMITS = autograde.Limits(cell_timeout=20, notebook_timeout=90, memory=3 << 30)

pytestmark = pytest.mark.slow


def _gid(cell) -> str | None:
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def _answer_cell(nb):
    return next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution"))


def _notebook(stem: str, *, release: bool = False, replace: dict | None = None, prepend: str = "",
              body: str | None = None, edit=None):
    """A solution (or release) notebook with its answer cell changed."""
    nb = nbformat.read(str((RELEASE if release else SOLUTIONS) / f"{stem}.ipynb"), as_version=4)
    cell = _answer_cell(nb)
    if body is not None:
        cell.source = body
    for old, new in (replace or {}).items():
        assert old in cell.source, f"{old!r} not in the {stem} answer"
        cell.source = cell.source.replace(old, new)
    cell.source = prepend + cell.source
    if edit is not None:
        edit(nb)
    return nb


def _drop(*grade_ids):
    def edit(nb):
        nb.cells = [c for c in nb.cells if _gid(c) not in grade_ids]
    return edit


def _slow_cells(count: int, seconds: int):
    """``count`` extra cells, each just under the cell limit: only the wall-clock limit stops them."""
    def edit(nb):
        nb.cells += [nbformat.v4.new_code_cell(f"import time\ntime.sleep({seconds})") for _ in range(count)]
    return edit


def _tamper_test_cell(source: str):
    def edit(nb):
        for c in nb.cells:
            if _gid(c) == f"test_{_answer_cell(nb).metadata.nbgrader['grade_id']}":
                c.source = source
                c.metadata.nbgrader.update(locked=False, grade=False)
    return edit


WRONG_CE = {"dlogits[range(n), Yb] -= 1": "dlogits[range(n), Yb] += 1"}  # sign error


def _class(tmp: Path, pid_file: Path) -> dict[str, dict[str, object]]:
    """{student: {stem: notebook or raw text}}: what each student handed in."""
    deaf_loop = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass\n"
    pid = f"import os\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
    return {
        "right": {stem: _notebook(stem) for stem in STEMS},
        "empty": {stem: _notebook(stem, release=True) for stem in STEMS},
        "partial": {STEP: _notebook(STEP, replace={
            "dbnbias = dhpreact.sum(0, keepdim=True)": "dbnbias = dhpreact.sum(0)",  # shape
            "dW2 = h.T @ dlogits": "dW2 = (h.T @ dlogits).T"})},                    # transpose
        "wrong": {CE: _notebook(CE, replace=WRONG_CE),
                  BN: _notebook(BN, replace={"n / (n - 1) * bnraw": "bnraw"})},      # Bessel
        "broken": {CE: '{"cells": [ {"cell_type": "code", "source": ',                # malformed JSON
                   BN: _notebook(BN, edit=_drop("batchnorm_backward", "check_batchnorm",
                                                "test_batchnorm_backward"))},         # half deleted
        "loops": {CE: _notebook(CE, prepend="", replace={
            '    dlogits = F.softmax(logits, 1)': "    while True:\n        pass"})},
        "deaf": {CE: _notebook(CE, prepend=deaf_loop)},          # ignores the interrupt at its limit
        "slowpoke": {CE: _notebook(CE, prepend=pid, edit=_slow_cells(12, LIMITS.cell_timeout - 5))},
        "hog": {CE: _notebook(CE, replace={
            '    dlogits = F.softmax(logits, 1)':
            "    hog = torch.empty(50 * 2**30 // 4)  # 50 GB\n    dlogits = F.softmax(logits, 1)"})},
        "import_error": {CE: _notebook(CE, prepend="import backprop_ninja.answers_from_a_friend\n")},
        "edits_tests": {CE: _notebook(CE, replace=WRONG_CE, edit=_tamper_test_cell("4.0"))},
        "deletes_tests": {CE: _notebook(CE, edit=_drop("test_cross_entropy_backward"))},
        "stderr": {CE: _notebook(CE, prepend="import sys\nprint('noise', file=sys.stderr)\n", replace={
            "    return dlogits": "    print('debug', file=sys.stderr)\n    return dlogits"})},
        "nan": {CE: _notebook(CE, replace={"    return dlogits": "    return dlogits * float('nan')"})},
        "wrong_type": {CE: _notebook(CE, replace={"    return dlogits": "    return dlogits.tolist()"})},
        "patches_torch": {CE: _notebook(CE, replace=WRONG_CE,
                                        prepend="torch.allclose = lambda *a, **k: True\n")},
        "patches_grading": {CE: _notebook(CE, replace=WRONG_CE, prepend=(
            "import backprop_ninja.grading as G\n"
            "G.compare = lambda *a, **k: G.Verdict(True, 'exact')\n"))},
        "kills_kernel": {CE: _notebook(CE, replace={"    return dlogits": "    import os\n    os._exit(0)"})},
    }


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """One class run through nbgrader, two notebooks at once, shared by every test here."""
    tmp = tmp_path_factory.mktemp("class")
    pid_file = tmp / "slowpoke.pid"
    submissions = tmp / "submitted"
    handed_in = _class(tmp, pid_file)
    for student, notebooks in handed_in.items():
        folder = submissions / student / autograde.ASSIGNMENT  # nbgrader's own layout
        folder.mkdir(parents=True)
        for stem, nb in notebooks.items():
            path = folder / f"{stem}.ipynb"
            if isinstance(nb, str):
                path.write_text(nb)
            else:
                nbformat.write(nb, str(path))
    before = {p: p.read_bytes() for p in submissions.rglob("*.ipynb")}
    started = time.perf_counter()
    results = autograde.autograde_class(tmp, jobs=2, out=tmp / "out", limits=LIMITS, progress=False)
    seconds = time.perf_counter() - started
    return {"results": results, "out": tmp / "out", "seconds": seconds, "pid_file": pid_file,
            "before": before, "students": sorted(handed_in)}


def _score(graded, student, stem):
    return graded["results"].results[student][stem].score


def _feedback_text(graded, student, stem) -> str:
    raw = (graded["out"] / "feedback" / student / f"{stem}.html").read_text()
    raw = re.sub(r"<(style|script)\b.*?</\1>", " ", raw, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", raw)).split())


def test_right_and_empty_submissions_score_full_and_zero(graded):
    results = graded["results"]
    for stem in STEMS:
        assert _score(graded, "right", stem) == results.max_scores[stem] > 0
        assert _score(graded, "empty", stem) == 0
    assert results.total("right") == results.max_score


def test_partial_credit_counts_each_right_gradient_of_exercise_1(graded):
    # 2 of 26 gradients wrong (dW2 transposed, dbnbias missing keepdim) -> 24 of 26 points
    assert _score(graded, "partial", STEP) == pytest.approx(24.0)
    text = _feedback_text(graded, "partial", STEP)
    assert "24/26 gradients right" in text and "dW2" in text and "dbnbias" in text


def test_wrong_answers_score_zero_with_the_reason(graded):
    assert _score(graded, "wrong", CE) == 0 and _score(graded, "wrong", BN) == 0
    assert "dlogits is wrong" in _feedback_text(graded, "wrong", CE)
    assert "dhprebn is wrong" in _feedback_text(graded, "wrong", BN)


def test_broken_notebooks_score_zero_and_say_why(graded):
    res = graded["results"].results["broken"]
    assert res[CE].score == 0 and "not a valid notebook" in res[CE].problem
    assert "not a valid notebook" in _feedback_text(graded, "broken", CE)
    # the deleted test cell is put back by nbgrader and run: it finds no answer
    assert res[BN].graded and res[BN].score == 0
    assert "batchnorm_backward" in res[BN].problem


@pytest.mark.parametrize("student, says", [
    ("loops", "ran longer than its 20 s limit"),
    ("deaf", "ignored the interrupt"),
    ("hog", "can't allocate memory"),
    ("import_error", "ModuleNotFoundError"),
    ("nan", "inf or nan"),
    ("wrong_type", "not a tensor"),
    ("patches_torch", "replaced torch.allclose"),
    ("patches_grading", "replaced backprop_ninja.grading.compare"),
    ("kills_kernel", "kernel died"),
])
def test_hostile_submissions_score_zero_with_a_clear_sentence(graded, student, says):
    assert _score(graded, student, CE) == 0
    assert says in _feedback_text(graded, student, CE)


def test_tests_cells_edited_or_deleted_are_restored_and_run(graded):
    # a wrong answer whose test cell was replaced by "4.0" (and unlocked) still scores 0 ...
    assert _score(graded, "edits_tests", CE) == 0
    assert "dlogits is wrong" in _feedback_text(graded, "edits_tests", CE)
    # ... and a right answer whose test cell was deleted still gets its points
    assert _score(graded, "deletes_tests", CE) == graded["results"].max_scores[CE]


def test_stderr_noise_does_not_cost_a_right_answer_its_points(graded):
    assert _score(graded, "stderr", CE) == graded["results"].max_scores[CE]
    assert "your code wrote to stderr; it costs no points" in _feedback_text(graded, "stderr", CE)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed kernel waits for init to reap it)."""
    if not Path("/proc/self").exists():  # no procfs: signal 0 tells (zombies count as alive)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_runaway_notebook_is_killed_at_its_wall_clock_limit_alone(graded):
    res = graded["results"].results["slowpoke"][CE]
    assert res.score == 0 and not res.graded and "wall-clock limit" in res.problem
    assert LIMITS.notebook_timeout <= res.seconds < LIMITS.notebook_timeout + 30
    assert "wall-clock limit" in _feedback_text(graded, "slowpoke", CE)
    assert not _running(int(graded["pid_file"].read_text()))  # its kernel is gone too
    # everyone else was graded alongside (checked above); nobody else waited on it
    others = [r.seconds for s, per in graded["results"].results.items() if s != "slowpoke"
              for r in per.values() if r.graded]
    assert max(others) < LIMITS.notebook_timeout


def test_grades_csv_has_every_student_and_the_totals(graded):
    with open(graded["out"] / "grades.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["student_id"] for r in rows] == graded["students"]
    header = list(rows[0])
    assert header == ["student_id", *STEMS, "total", "max_score"]
    by_id = {r["student_id"]: r for r in rows}
    results = graded["results"]
    for student in graded["students"]:
        assert float(by_id[student]["total"]) == pytest.approx(results.total(student))
        assert float(by_id[student]["max_score"]) == results.max_score
    assert float(by_id["partial"][STEP]) == pytest.approx(24.0)


def test_every_student_gets_feedback_for_every_notebook(graded):
    for student in graded["students"]:
        for stem in STEMS:
            assert (graded["out"] / "feedback" / student / f"{stem}.html").is_file()
    text = _feedback_text(graded, "wrong", CE)
    assert "def cross_entropy_backward" in text  # the learner's own code is shown


def _hidden_lines() -> set[str]:
    """Every line of every hidden-test region of the course source."""
    lines = set()
    for path in autograde.course_notebooks().values():
        for cell in nbformat.read(str(path), as_version=4).cells:
            inside = False
            for line in cell.source.splitlines():
                if "BEGIN HIDDEN TESTS" in line:
                    inside = True
                elif "END HIDDEN TESTS" in line:
                    inside = False
                elif inside and line.strip():
                    lines.add(line.strip())
    assert lines, "the course has hidden tests"
    return lines


def test_no_feedback_shows_hidden_test_source(graded):
    hidden = _hidden_lines()
    files = list((graded["out"] / "feedback").rglob("*.html"))
    assert len(files) == len(graded["students"]) * len(STEMS)
    for path in files:
        raw = path.read_text()
        text = html.unescape(re.sub(r"<[^>]+>", "", raw))
        assert "HIDDEN TESTS" not in text, path
        leaked = [line for line in hidden if line in text]
        assert not leaked, f"{path} shows hidden test lines {leaked}"


def test_class_gradebook_holds_every_grade_for_nbgrader(graded):
    """out/course is an nbgrader course: its gradebook has each student's merged scores."""
    import sqlite3

    db = sqlite3.connect(graded["out"] / "course" / "gradebook.db")
    rows = db.execute("SELECT student.id, notebook.name, SUM(grade.auto_score) FROM grade "
                      "JOIN submitted_notebook ON grade.notebook_id = submitted_notebook.id "
                      "JOIN notebook ON submitted_notebook.notebook_id = notebook.id "
                      "JOIN submitted_assignment AS sa ON submitted_notebook.assignment_id = sa.id "
                      "JOIN student ON sa.student_id = student.id "
                      "GROUP BY student.id, notebook.name").fetchall()
    scores = {(s, nb): score or 0 for s, nb, score in rows}
    results = graded["results"].results
    for student, per in results.items():
        for stem, res in per.items():
            if res.graded:
                assert scores[(student, stem)] == pytest.approx(res.score), (student, stem)


def test_submissions_are_never_modified(graded):
    for path, content in graded["before"].items():
        assert path.read_bytes() == content
