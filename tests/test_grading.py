"""A whole class through the real pipeline (``autograde_class``: nbgrader, every kernel in its
sandbox, the judge outside), two notebooks at once, shared by every test here.

The class: right, empty, partial, broken and resource-hungry students; the hostile
submissions of tests/submissions/ (tests/test_judge.py judges the honest ones without a kernel;
a wrong answer's verdict reaching the feedback is also bob's in tests/test_instructor_path.py);
and hostile students, at least one per class of attack:

1. autograd through another door (the C++ engine, torch.func, a subprocess, the course's own
   reference, complex steps);
2. reading the answers (the stack, the notebook's own autograd results);
3. forging the verdict in the kernel (patched torch and builtins, a lying tensor, a printed
   score, code before the set-up cell);
4. harming classmates (mallory: reads, overwrites and re-scores classmates, stops their
   kernels, leaves a process behind, poisons the template);
5. resources (24 MB printed in one cell).

Each scores what it deserves; honest classmates keep exactly their grades; the submissions
folder is unchanged byte for byte; no process of the run outlives it; a later run is unaffected.
"""

from __future__ import annotations

import csv
import hashlib
import html
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
from learner import (
    BN,
    CE,
    FULL,
    HOSTILE_SUBMISSIONS,
    STEMS,
    STEP,
    SUBMISSIONS,
    add_cell,
    add_markdown,
    apply_submission,
    drop,
    notebook,
)

from backprop_ninja.grading import autograde, course, folders
from backprop_ninja.grading.course import ASSIGNMENT
from backprop_ninja.grading.sandbox import Limits, probe

pytestmark = pytest.mark.slow

# Low limits keep the hostile cases quick (a looping function costs two cell limits: it loops in the
# check cell and again in the hidden test); still well above what a right notebook needs (7-14 s in
# all, two at once on two idle cores) while the other pytest worker shares the two cores.
LIMITS = Limits(cell_timeout=20, notebook_timeout=120, memory=3 << 30)
JOBS = 2  # notebooks at once (the other pytest worker shares the two cores too)
FULL_MARKS = {STEP: 26.0, CE: 4.0, BN: 6.0, FULL: 10.0}
TOKEN = str(300000 + secrets.randbelow(600000))   # marks every process a hostile student leaves behind
WRONG_CE = {"dlogits[range(n), Yb] -= 1": "dlogits[range(n), Yb] += 1"}  # sign error


@dataclass
class Student:
    notebooks: dict[str, object]            # stem -> notebook, or raw text for a broken file
    scores: dict[str, float]                # stem -> the points the work deserves
    says: dict[str, str] = field(default_factory=dict)   # stem -> a phrase its feedback must hold
    flagged: bool = False                   # the source rules must flag it for review


def _slow_cells(count: int, seconds: int):
    def edit(nb):
        nb.cells += [nbformat.v4.new_code_cell(f"import time\ntime.sleep({seconds})") for _ in range(count)]
    return edit


def _tamper_test_cell(source: str):
    def edit(nb):
        for c in nb.cells:
            if c.metadata.get("nbgrader", {}).get("grade_id") == "test_cross_entropy_backward":
                c.source = source
                c.metadata.nbgrader.update(locked=False, grade=False)
    return edit


def _mallory(paths: dict[str, str]) -> str:
    """Everything a student with the grader's paths would try against classmates."""
    return f"""\
import glob, os, signal, subprocess, sys
found = glob.glob({paths['submissions']!r} + "/**/*.ipynb", recursive=True)
print("classmates found:", len(found))
for path in found + glob.glob({paths['out']!r} + "/**", recursive=True):
    try:
        open(path, "a").write("mallory was here")
    except OSError as exc:
        print("could not touch", path, exc)
for path in glob.glob({paths['cache']!r} + "/**/*", recursive=True):
    try:
        open(path, "w").write("poisoned")
    except OSError as exc:
        print("could not poison", path, exc)
try:
    os.kill(-1, signal.SIGSTOP)  # every process it can see
except OSError as exc:
    print(exc)
subprocess.Popen(["sh", "-c", "sleep {TOKEN}; echo mallory,100 > {paths['out']}/grades.csv"],
                 start_new_session=True)
"""


def _one(stem: str, nb, score: float, says: str | None = None, flagged: bool = False) -> Student:
    """A student who hands in one notebook."""
    return Student({stem: nb}, {stem: score}, {stem: says} if says else {}, flagged)


def _answer(stem: str, body: str):
    """The stem's solution notebook with this answer cell instead."""
    return notebook(stem, body=body)


ENGINE = """\
def cross_entropy_backward(*, logits, Yb, **_):
    x = logits.clone().requires_grad_(True)
    loss = F.cross_entropy(x, Yb)
    engine = torch._C._ImperativeEngine()
    (g,) = engine.run_backward((loss,), (torch.ones_like(loss),), False, False, (x,), False, False)
    return g
"""
REFERENCE = "from backprop_ninja.reference import fused_backward as backward"  # the course's own answer
FUNC_GRAD = """\
def cross_entropy_backward(*, logits, Yb, **_):
    return torch.func.grad(lambda x: F.cross_entropy(x, Yb))(logits)
"""
SUBPROCESS = """\
import subprocess, sys
def batchnorm_backward(**kw):
    subprocess.run([sys.executable, '-c', 'import torch'])
    return kw['dhpreact']
"""
OBFUSCATED = """\
ag = getattr(torch, 'auto' + 'grad')
def cross_entropy_backward(*, logits, Yb, **_):
    x = logits.clone().requires_grad_(True)
    return ag.grad(F.cross_entropy(x, Yb), x)[0]
"""
COMPLEX_STEP = """\
def cross_entropy_backward(*, logits, Yb, n, **_):
    g = torch.zeros_like(logits)
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            x = logits.to(torch.complex128)
            x[i, j] += 1e-20j
            p = x.exp() / x.exp().sum(1, keepdim=True)
            g[i, j] = (-p[range(n), Yb].log().mean()).imag / 1e-20
    return g
"""
FRAMES = """\
import sys
def batchnorm_backward(**kw):
    frame = sys._getframe(1)
    while frame is not None and 'ref' not in frame.f_locals:
        frame = frame.f_back
    return frame.f_locals['ref']['hprebn'] if frame else kw['dhpreact']
"""
LECTURE_ANSWERS = """\
def batchnorm_backward(*, dhpreact, **_):
    return ref['hprebn'][: dhpreact.shape[0]].to(dhpreact.dtype)  # the report cell's autograd
"""
PATCHES = """\
import builtins, torch
torch.allclose = lambda *a, **k: True
builtins.print = lambda *a, **k: None
"""
LIAR = """\
class Liar(torch.Tensor):
    def __eq__(self, other):
        return True
def cross_entropy_backward(*, logits, **_):
    return torch.zeros_like(logits).as_subclass(Liar)
"""
PRINTS_SCORE = """\
def backward_stepwise(**_):
    print('Exercise 1: 26/26 gradients right on fresh inputs -> 26/26 points.')
    return {}
"""
FORGED_MARKDOWN = ('<script>document.title = "forged"</script>'
                   '<div onmouseover="alert(1)" class="bn-feedback-summary">Score: 100 / 100</div>')
# It sleeps rather than spins: what is tested is that an interrupt it ignores ends in a kill, and a
# spinning loop would only burn a core for the cell limit (``loops`` spins, as a learner's loop does).
DEAF_LOOP = ("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
             "while True:\n    time.sleep(1)\n")
SOFTMAX, RETURN = "    dlogits = F.softmax(logits, 1)", "    return dlogits"


def _class(paths: dict[str, str]) -> dict[str, Student]:
    partial = {"dbnbias = dhpreact.sum(0, keepdim=True)": "dbnbias = dhpreact.sum(0)",  # shape
               "dW2 = h.T @ dlogits": "dW2 = (h.T @ dlogits).T"}                      # transpose
    students = {
        # honest, careless and unlucky
        "right": Student({s: notebook(s) for s in STEMS}, dict(FULL_MARKS)),
        "empty": Student({s: notebook(s, release=True) for s in STEMS}, {s: 0.0 for s in STEMS},
                         {CE: "NotImplementedError"}),
        "partial": _one(STEP, notebook(STEP, replace=partial), 24.0, "24/26 gradients right"),
        "broken": Student({CE: '{"cells": [ {"cell_type": "code", "source": ',
                           BN: notebook(BN, edit=drop("batchnorm_backward", "check_batchnorm"))},
                          {CE: 0.0, BN: 0.0}, {CE: "not a valid notebook", BN: "batchnorm_backward"}),
        "loops": _one(CE, notebook(CE, replace={SOFTMAX: "    while True:\n        pass"}), 0.0,
                      f"ran longer than its {LIMITS.cell_timeout} s limit"),
        "deaf": _one(CE, notebook(CE, prepend=DEAF_LOOP), 0.0, "ignored the interrupt", flagged=True),
        "slowpoke": _one(CE, notebook(CE, edit=_slow_cells(12, LIMITS.cell_timeout - 5)), 0.0,
                         "wall-clock limit"),
        "hog": _one(CE, notebook(CE, replace={SOFTMAX: "    hog = torch.empty(50 * 2**30 // 4)\n" + SOFTMAX}),
                    0.0, "memory"),
        "edits_tests": _one(CE, notebook(CE, replace=WRONG_CE, edit=_tamper_test_cell("4.0")), 0.0,
                            "dlogits is wrong"),
        "deletes_tests": _one(CE, notebook(CE, edit=drop("test_cross_entropy_backward")), 4.0),
        "stderr": _one(CE, notebook(CE, prepend="torch.tensor(torch.ones(1))  # warns on stderr\n"), 4.0),
        "kills_kernel": _one(CE, notebook(CE, replace={RETURN: "    import os\n    os._exit(0)"}),
                             0.0, "kernel died", flagged=True),
        # 1. autograd through another door
        "engine": _one(CE, _answer(CE, ENGINE), 0.0, "autograd", flagged=True),
        "func_grad": _one(CE, _answer(CE, FUNC_GRAD), 0.0, "torch.func", flagged=True),
        "subprocess": _one(BN, _answer(BN, SUBPROCESS), 0.0, "subprocess", flagged=True),
        "reference": _one(FULL, _answer(FULL, REFERENCE), 0.0, "course internals", flagged=True),
        "obfuscated": _one(CE, _answer(CE, OBFUSCATED), 0.0, "getattr", flagged=True),
        "complex_step": _one(CE, _answer(CE, COMPLEX_STEP), 0.0, "complex", flagged=True),
        # 2. reading the answers
        "frames": _one(BN, _answer(BN, FRAMES), 0.0, "_getframe", flagged=True),
        "lecture_answers": _one(BN, _answer(BN, LECTURE_ANSWERS), 0.0, "dhprebn"),
        # 3. forging the verdict inside the kernel
        "patches": _one(CE, notebook(CE, replace=WRONG_CE, edit=add_cell(PATCHES, at=2)), 0.0,
                        "torch.allclose", flagged=True),
        "liar": _one(CE, _answer(CE, LIAR), 0.0, "__eq__", flagged=True),
        "prints_score": _one(STEP, notebook(STEP, body=PRINTS_SCORE, edit=add_cell("26.0")), 0.0,
                             "0/26 gradients right"),
        "forger": _one(CE, notebook(CE, edit=add_markdown(FORGED_MARKDOWN, at=1)), 4.0),
        "before_setup": _one(CE, notebook(CE, replace=WRONG_CE, edit=add_cell(
            "import os\nos.environ['BACKPROP_NINJA_HANDIN'] = '/tmp'\n", at=0)), 0.0, "import os",
            flagged=True),
        # 4. harming classmates
        "mallory": Student({CE: notebook(CE, edit=add_cell(_mallory(paths), at=3)), BN: notebook(BN)},
                           {CE: 0.0, BN: 6.0}, {CE: "import glob"}, flagged=True),
        # 5. resources: one print larger than a kernel message may be (steps.MAX_MESSAGE_BYTES, 16 MB)
        "flood": _one(BN, notebook(BN, edit=add_cell("print('x' * (24 << 20))", at=3)), 6.0),
    }
    for name in HOSTILE_SUBMISSIONS:  # the hostile ones of tests/submissions (test_judge.py: the rest)
        sub = SUBMISSIONS[name]
        student = _one(sub["notebook"], apply_submission(sub), sum(sub["expect"].values()), sub.get("says"),
                       flagged=True)
        students[name.replace("_", "-")] = student
    return students


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    if probe() is not None:
        pytest.fail(f"the class must be graded in the sandbox: {probe()} (`make system-deps`)")
    tmp = tmp_path_factory.mktemp("class")
    submissions, out = tmp / "submitted", tmp / "out"
    paths = {"submissions": str(submissions), "out": str(out), "cache": str(course.cache_dir())}
    students = _class(paths)
    for student, s in students.items():
        folder = submissions / student / ASSIGNMENT  # nbgrader's own layout
        folder.mkdir(parents=True)
        for stem, nb in s.notebooks.items():
            path = folder / f"{stem}.ipynb"
            if isinstance(nb, str):
                path.write_text(nb)
            else:
                nbformat.write(nb, str(path))
    before = _tree(submissions)
    template = course.cached_template()
    started = time.perf_counter()
    results = autograde.autograde_class(tmp, jobs_at_once=JOBS, out=out, limits=LIMITS, progress=False)
    return {"results": results, "out": out, "seconds": time.perf_counter() - started, "students": students,
            "submissions": submissions, "before": before, "template": template}


def _feedback_text(graded, student, stem) -> str:
    raw = (graded["out"] / "feedback" / student / f"{stem}.html").read_text()
    raw = re.sub(r"<(style|script)\b.*?</\1>", " ", raw, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", raw)).split())


def _student_ids():
    paths = {"submissions": "/x", "out": "/x", "cache": "/x"}
    return sorted(_class(paths))


@pytest.mark.parametrize("student", _student_ids())
def test_every_student_scores_what_their_work_deserves(graded, student):
    s = graded["students"][student]
    results = graded["results"].results[student]
    for stem, score in s.scores.items():
        res = results[stem]
        assert res.score == pytest.approx(score, abs=1e-4), (stem, res.score, res.problem)
        if stem in s.says:
            assert s.says[stem].lower() in _feedback_text(graded, student, stem).lower(), (stem, res.problem)
    assert bool(graded["results"].flags(student)) == s.flagged, graded["results"].flags(student)
    assert all(r.sandbox == "on" for r in results.values() if r.graded)


def test_grades_csv_has_every_student_their_totals_and_the_flags(graded):
    with open(graded["out"] / "grades.csv") as f:
        rows = {r["student_id"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == sorted(graded["students"])
    assert list(next(iter(rows.values()))) == ["student_id", *STEMS, "total", "max_score", "flags", "late",
                                               "late_penalty"]
    for student, s in graded["students"].items():
        assert float(rows[student]["total"]) == pytest.approx(sum(s.scores.values()), abs=1e-4)
        assert bool(rows[student]["flags"]) == s.flagged, rows[student]
        assert (rows[student]["late"], rows[student]["late_penalty"]) == ("", "0")  # no due date given


def test_honest_classmates_keep_exactly_their_grades_and_files(graded):
    """mallory tried to read, overwrite and re-score them, stop their kernels, poison the template."""
    assert graded["results"].total("right") == sum(FULL_MARKS.values())
    assert graded["results"].results["partial"][STEP].score == 24.0
    assert _tree(graded["submissions"]) == graded["before"]  # byte for byte
    text = _feedback_text(graded, "mallory", CE)
    assert "classmates found: 0" in text or "classmates found" not in text


def test_no_process_of_the_run_outlives_it(graded):
    deadline = time.monotonic() + 10
    while _processes_with(TOKEN) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_with(TOKEN)
    # The run's scratch folder is named by this process's pid (other pytest workers grade too):
    # no kernel, sandbox or job of the run is left, and no scratch folder.
    scratch = f"{folders.SCRATCH_PREFIX}{os.getpid()}-"
    assert not _processes_with(str(Path(tempfile.gettempdir()) / scratch))
    assert not list(Path(tempfile.gettempdir()).glob(scratch + "*"))


def test_a_later_run_is_unaffected(graded, tmp_path):
    cached = course.cached_template()
    assert cached is not None and graded["template"] in (None, cached)  # the cache is intact
    folder = tmp_path / "later" / "right" / ASSIGNMENT
    folder.mkdir(parents=True)
    nbformat.write(notebook(CE), str(folder / f"{CE}.ipynb"))
    later = autograde.autograde_class(tmp_path / "later", out=None, limits=LIMITS, progress=False)
    assert later.results["right"][CE].score == FULL_MARKS[CE]
    with open(graded["out"] / "grades.csv") as f:
        assert "mallory,100" not in f.read()


def test_runaway_notebook_is_killed_at_its_wall_clock_limit_alone(graded):
    res = graded["results"].results["slowpoke"][CE]
    assert res.score == 0 and not res.graded and "wall-clock limit" in res.problem
    assert LIMITS.notebook_timeout <= res.seconds < LIMITS.notebook_timeout + 30
    others = [r.seconds for s, per in graded["results"].results.items() if s != "slowpoke"
              for r in per.values() if r.graded]
    assert max(others) < LIMITS.notebook_timeout


def test_printed_output_is_bounded(graded):
    feedback = graded["out"] / "feedback" / "flood" / f"{BN}.html"
    assert feedback.stat().st_size < 4 << 20
    assert "output cut" in _feedback_text(graded, "flood", BN)


def test_feedback_runs_no_learner_html_and_opens_with_the_judges_score(graded):
    raw = (graded["out"] / "feedback" / "forger" / f"{CE}.html").read_text()
    assert "<script>document.title" not in raw and "onmouseover" not in raw
    assert raw.index("Score: 4 / 4") < raw.index("Score: 100 / 100")  # the judge's summary comes first


def test_every_student_gets_feedback_and_none_shows_hidden_tests(graded):
    hidden = _hidden_lines()
    for student, s in graded["students"].items():
        for stem in s.notebooks:
            text = _feedback_text(graded, student, stem)
            assert "HIDDEN TESTS" not in text
            assert not [line for line in hidden if line in text], (student, stem)


def test_class_gradebook_holds_every_grade_for_nbgrader(graded):
    db = sqlite3.connect(graded["out"] / "course" / "gradebook.db")
    rows = db.execute("SELECT student.id, notebook.name, SUM(grade.auto_score) FROM grade "
                      "JOIN submitted_notebook ON grade.notebook_id = submitted_notebook.id "
                      "JOIN notebook ON submitted_notebook.notebook_id = notebook.id "
                      "JOIN submitted_assignment AS sa ON submitted_notebook.assignment_id = sa.id "
                      "JOIN student ON sa.student_id = student.id "
                      "GROUP BY student.id, notebook.name").fetchall()
    scores = {(s, nb): score or 0 for s, nb, score in rows}
    for student, per in graded["results"].results.items():
        for stem, res in per.items():
            if res.graded:
                assert scores[(student, stem)] == pytest.approx(res.score), (student, stem)


def _hidden_lines() -> set[str]:
    lines = set()
    for path in course.course_notebooks().values():
        for cell in nbformat.read(str(path), as_version=4).cells:
            inside = False
            for line in cell.source.splitlines():
                if "BEGIN HIDDEN TESTS" in line:
                    inside = True
                elif "END HIDDEN TESTS" in line:
                    inside = False
                elif inside and line.strip():
                    lines.add(line.strip())
    assert lines
    return lines


def _processes_with(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                if "\nState:\tZ" not in (proc / "status").read_text():
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


# --- the plain nbgrader route: grader/nbgrader_config.py calls harden_nbgrader ------------------


def _nbgrader(course_dir: Path, *args: str) -> str:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course_dir, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_plain_nbgrader_grades_with_the_same_sandbox_and_judge(tmp_path):
    course_dir = tmp_path / "course"  # an assignment of notebook 02 alone
    (course_dir / "source" / ASSIGNMENT).mkdir(parents=True)
    shutil.copy(course.source_dir() / f"{CE}.ipynb", course_dir / "source" / ASSIGNMENT)
    shutil.copy(course.COURSE / "nbgrader_config.py", course_dir)
    _nbgrader(course_dir, "generate_assignment", ASSIGNMENT, "--force")
    handed_in = {"ada": notebook(CE), "eve": notebook(CE, replace=WRONG_CE, edit=add_cell(
        "torch.allclose = lambda *a, **k: True", at=2))}
    for student, nb in handed_in.items():
        folder = course_dir / "submitted" / student / ASSIGNMENT
        folder.mkdir(parents=True)
        nbformat.write(nb, str(folder / f"{CE}.ipynb"))
    _nbgrader(course_dir, "autograde", ASSIGNMENT, "--force")
    _nbgrader(course_dir, "generate_feedback", ASSIGNMENT, "--force")
    _nbgrader(course_dir, "export")
    with open(course_dir / "grades.csv") as f:
        scores = {r["student_id"]: float(r["score"]) for r in csv.DictReader(f)}  # nbgrader's own export
    assert scores == {"ada": 4.0, "eve": 0.0}
    autograded = nbformat.read(str(course_dir / "autograded" / "eve" / ASSIGNMENT / f"{CE}.ipynb"),
                               as_version=4)
    assert autograded.metadata["backprop_ninja"]["sandbox"] == "on"
    assert autograded.metadata["backprop_ninja"]["flags"]
    feedback = (course_dir / "feedback" / "eve" / ASSIGNMENT / f"{CE}.html").read_text()
    assert "torch.allclose" in feedback and "BEGIN HIDDEN TESTS" not in feedback
