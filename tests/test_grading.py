"""A whole class through the real pipeline (``autograde_class``: nbgrader, every kernel in its
sandbox, the judge outside), two notebooks at once, shared by every test here.

The class: right, empty, partial, wrong, broken and resource-hungry students; every submission
of tests/submissions/; and hostile students, at least one per class of attack:

1. autograd through another door (the C++ engine, torch.func, a subprocess, the course's own
   reference, complex steps, finite differences);
2. reading the answers (the stack, the notebook's own autograd results);
3. forging the verdict in the kernel (patched torch and builtins, a lying tensor, a printed
   score, code before the set-up cell);
4. harming classmates (mallory: reads, overwrites and re-scores classmates, stops their
   kernels, leaves a process behind, poisons the template);
5. resources (100 MB printed);
6. honest but odd (a right answer in a reused buffer).

Each scores what it deserves; honest classmates keep exactly their grades; the submissions
folder is unchanged byte for byte; no process of the run outlives it; a later run is unaffected.
"""

from __future__ import annotations

import csv
import hashlib
import html
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
from learner import BN, CE, FULL, STEMS, STEP, SUBMISSIONS, add_cell, apply_submission, drop, notebook

from backprop_ninja.grading import autograde, course
from backprop_ninja.grading.course import ASSIGNMENT
from backprop_ninja.grading.sandbox import Limits, probe

pytestmark = pytest.mark.slow

# Low limits keep the hostile cases quick; still far above what a right notebook needs.
LIMITS = Limits(cell_timeout=20, notebook_timeout=90, memory=3 << 30)
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


def _class(paths: dict[str, str]) -> dict[str, Student]:
    deaf_loop = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass\n"
    right_ce = notebook(CE)
    students = {
        # honest, careless and unlucky
        "right": Student({s: notebook(s) for s in STEMS}, dict(FULL_MARKS)),
        "empty": Student({s: notebook(s, release=True) for s in STEMS}, {s: 0.0 for s in STEMS},
                         {CE: "NotImplementedError"}),
        "partial": Student({STEP: notebook(STEP, replace={
            "dbnbias = dhpreact.sum(0, keepdim=True)": "dbnbias = dhpreact.sum(0)",
            "dW2 = h.T @ dlogits": "dW2 = (h.T @ dlogits).T"})}, {STEP: 24.0}, {STEP: "24/26 gradients right"}),
        "wrong": Student({CE: notebook(CE, replace=WRONG_CE), BN: notebook(BN, replace={
            "n / (n - 1) * bnraw": "bnraw"})}, {CE: 0.0, BN: 0.0}, {CE: "dlogits is wrong", BN: "dhprebn is wrong"}),
        "broken": Student({CE: '{"cells": [ {"cell_type": "code", "source": ',
                           BN: notebook(BN, edit=drop("batchnorm_backward", "check_batchnorm"))},
                          {CE: 0.0, BN: 0.0}, {CE: "not a valid notebook", BN: "batchnorm_backward"}),
        "loops": Student({CE: notebook(CE, replace={"    dlogits = F.softmax(logits, 1)": "    while True:\n        pass"})},
                         {CE: 0.0}, {CE: "ran longer than its 20 s limit"}),
        "deaf": Student({CE: notebook(CE, prepend=deaf_loop)}, {CE: 0.0}, {CE: "ignored the interrupt"},
                        flagged=True),
        "slowpoke": Student({CE: notebook(CE, edit=_slow_cells(12, LIMITS.cell_timeout - 5))}, {CE: 0.0},
                            {CE: "wall-clock limit"}),
        "hog": Student({CE: notebook(CE, replace={"    dlogits = F.softmax(logits, 1)":
                                                  "    hog = torch.empty(50 * 2**30 // 4)\n    dlogits = F.softmax(logits, 1)"})},
                       {CE: 0.0}, {CE: "memory"}),
        "edits_tests": Student({CE: notebook(CE, replace=WRONG_CE, edit=_tamper_test_cell("4.0"))}, {CE: 0.0},
                               {CE: "dlogits is wrong"}),
        "deletes_tests": Student({CE: notebook(CE, edit=drop("test_cross_entropy_backward"))}, {CE: 4.0}),
        "stderr": Student({CE: notebook(CE, prepend="torch.tensor(torch.ones(1))  # a UserWarning on stderr\n")},
                          {CE: 4.0}),
        "nan": Student({CE: notebook(CE, replace={"    return dlogits": "    return dlogits * float('nan')"})},
                       {CE: 0.0}, {CE: "not finite"}),
        "kills_kernel": Student({CE: notebook(CE, replace={"    return dlogits": "    import os\n    os._exit(0)"})},
                                {CE: 0.0}, {CE: "kernel died"}, flagged=True),
        # 1. autograd through another door
        "engine": Student({CE: notebook(CE, body=(
            "def cross_entropy_backward(*, logits, Yb, **_):\n"
            "    x = logits.clone().requires_grad_(True)\n"
            "    loss = F.cross_entropy(x, Yb)\n"
            "    (g,) = torch._C._ImperativeEngine().run_backward((loss,), (torch.ones_like(loss),), False, False,"
            " (x,), False, False)\n"
            "    return g\n"))}, {CE: 0.0}, {CE: "autograd"}, flagged=True),
        "func_grad": Student({CE: notebook(CE, body=(
            "def cross_entropy_backward(*, logits, Yb, **_):\n"
            "    return torch.func.grad(lambda x: F.cross_entropy(x, Yb))(logits)\n"))},
            {CE: 0.0}, {CE: "torch.func"}, flagged=True),
        "subprocess": Student({BN: notebook(BN, body=(
            "import subprocess, sys\n"
            "def batchnorm_backward(**kw):\n"
            "    subprocess.run([sys.executable, '-c', 'import torch'])\n"
            "    return kw['dhpreact']\n"))}, {BN: 0.0}, {BN: "subprocess"}, flagged=True),
        "reference": Student({FULL: notebook(FULL, body=(
            "from backprop_ninja.train import fused_backward as backward\n"))},
            {FULL: 0.0}, {FULL: "course internals"}, flagged=True),
        "obfuscated": Student({CE: notebook(CE, body=(
            "ag = getattr(torch, 'auto' + 'grad')\n"
            "def cross_entropy_backward(*, logits, Yb, **_):\n"
            "    x = logits.clone().requires_grad_(True)\n"
            "    return ag.grad(F.cross_entropy(x, Yb), x)[0]\n"))}, {CE: 0.0}, {CE: "getattr"}, flagged=True),
        "complex_step": Student({CE: notebook(CE, body=(
            "def cross_entropy_backward(*, logits, Yb, n, **_):\n"
            "    g = torch.zeros_like(logits)\n"
            "    for i in range(logits.shape[0]):\n"
            "        for j in range(logits.shape[1]):\n"
            "            x = logits.to(torch.complex128)\n"
            "            x[i, j] += 1e-20j\n"
            "            p = x.exp() / x.exp().sum(1, keepdim=True)\n"
            "            g[i, j] = (-p[range(n), Yb].log().mean()).imag / 1e-20\n"
            "    return g\n"))}, {CE: 0.0}, {CE: "complex"}, flagged=True),
        "finite_differences": Student({CE: notebook(CE, body=(
            "def cross_entropy_backward(*, logits, Yb, **_):\n"
            "    g, h = torch.zeros_like(logits), 1e-6\n"
            "    for i in range(logits.numel()):\n"
            "        up, down = logits.clone(), logits.clone()\n"
            "        up.view(-1)[i] += h\n"
            "        down.view(-1)[i] -= h\n"
            "        g.view(-1)[i] = (F.cross_entropy(up, Yb) - F.cross_entropy(down, Yb)) / (2 * h)\n"
            "    return g\n"))}, {CE: 0.0}, {CE: "dlogits is wrong"}),
        # 2. reading the answers
        "frames": Student({BN: notebook(BN, body=(
            "import sys\n"
            "def batchnorm_backward(**kw):\n"
            "    frame = sys._getframe(1)\n"
            "    while frame is not None and 'ref' not in frame.f_locals:\n"
            "        frame = frame.f_back\n"
            "    return frame.f_locals['ref']['hprebn'] if frame else kw['dhpreact']\n"))},
            {BN: 0.0}, {BN: "_getframe"}, flagged=True),
        "lecture_answers": Student({BN: notebook(BN, body=(
            "def batchnorm_backward(*, dhpreact, **_):\n"
            "    return ref['hprebn'][: dhpreact.shape[0]].to(dhpreact.dtype)  # the report cell's autograd\n"))},
            {BN: 0.0}, {BN: "dhprebn is"}),
        # 3. forging the verdict inside the kernel
        "patches": Student({CE: notebook(CE, replace=WRONG_CE, edit=add_cell(
            "import builtins, torch\n"
            "torch.allclose = lambda *a, **k: True\n"
            "builtins.print = lambda *a, **k: None\n", at=2))}, {CE: 0.0}, {CE: "torch.allclose"}, flagged=True),
        "liar": Student({CE: notebook(CE, body=(
            "class Liar(torch.Tensor):\n"
            "    def __eq__(self, other):\n"
            "        return True\n"
            "def cross_entropy_backward(*, logits, **_):\n"
            "    return torch.zeros_like(logits).as_subclass(Liar)\n"))}, {CE: 0.0}, {CE: "__eq__"}, flagged=True),
        "prints_score": Student({STEP: notebook(STEP, body=(
            "def backward_stepwise(**_):\n"
            "    print('Exercise 1: 26/26 gradients right on fresh inputs -> 26/26 points.')\n"
            "    return {}\n"), edit=add_cell("26.0"))}, {STEP: 0.0}, {STEP: "0/26 gradients right"}),
        "before_setup": Student({CE: notebook(CE, replace=WRONG_CE, edit=add_cell(
            "import os\nos.environ['BACKPROP_NINJA_HANDIN'] = '/tmp'\n", at=0))},
            {CE: 0.0}, {CE: "import os"}, flagged=True),
        # 4. harming classmates
        "mallory": Student({CE: notebook(CE, edit=add_cell(_mallory(paths), at=3)), BN: notebook(BN)},
                           {CE: 0.0, BN: 6.0}, {CE: "import glob"}, flagged=True),
        # 5. resources
        "flood": Student({BN: notebook(BN, edit=add_cell("print('x' * (100 << 20))", at=3))}, {BN: 6.0}),
        # 6. honest but odd
        "reused_buffer": Student({BN: notebook(BN, body=(
            "buffer = torch.empty(0)\n"
            "def batchnorm_backward(*, dhpreact, bngain, bnvar_inv, bnraw, n, **_):\n"
            "    global buffer\n"
            "    if buffer.numel() < dhpreact.numel() or buffer.dtype != dhpreact.dtype:\n"
            "        buffer = torch.empty(10_000, dtype=dhpreact.dtype)\n"
            "    out = bngain * bnvar_inv / n * (n * dhpreact - dhpreact.sum(0) - n / (n - 1) * bnraw "
            "* (dhpreact * bnraw).sum(0))\n"
            "    buffer[: out.numel()] = out.reshape(-1)\n"
            "    return buffer[: out.numel()].view(out.shape)\n"))}, {BN: 6.0}),
    }
    assert right_ce is not None
    for name, sub in SUBMISSIONS.items():  # tests/submissions: a small change each, and its points
        students[name.replace("_", "-")] = Student({sub["notebook"]: apply_submission(sub)},
                                                    {sub["notebook"]: sum(sub["expect"].values())},
                                                    {sub["notebook"]: sub["says"]} if "says" in sub else {})
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
    results = autograde.autograde_class(tmp, jobs_at_once=2, out=out, limits=LIMITS, progress=False)
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
    assert list(next(iter(rows.values()))) == ["student_id", *STEMS, "total", "max_score", "flags"]
    for student, s in graded["students"].items():
        assert float(rows[student]["total"]) == pytest.approx(sum(s.scores.values()), abs=1e-4)
        assert bool(rows[student]["flags"]) == s.flagged, rows[student]


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
    assert not _processes_with("backprop-ninja-kernel-")


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
    import shutil

    course_dir = tmp_path / "course"
    shutil.copytree(course.source_dir(), course_dir / "source" / ASSIGNMENT)
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
    autograded = nbformat.read(str(course_dir / "autograded" / "eve" / ASSIGNMENT / f"{CE}.ipynb"), as_version=4)
    assert autograded.metadata["backprop_ninja"]["sandbox"] == "on"
    assert autograded.metadata["backprop_ninja"]["flags"]
    feedback = (course_dir / "feedback" / "eve" / ASSIGNMENT / f"{CE}.html").read_text()
    assert "torch.allclose" in feedback and "BEGIN HIDDEN TESTS" not in feedback
