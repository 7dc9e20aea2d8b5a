"""The four exercises grade right: real ``nbgrader autograde`` over right and wrong submissions.

One scratch copy of the course autogrades every submission in one run (one student per
submission): the untouched release (0 everywhere), the solutions (full marks) and the
suite in tests/submissions/ (each a small change to a solution notebook, with the points
it deserves). The grading functions are also tested directly, where that is faster and
says more (autograd blocked, fresh inputs, tampering).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from backprop_ninja import grading, model
from backprop_ninja.build import ASSIGNMENT, COURSE, NOTEBOOKS, SOLUTIONS, SOURCE

SUBMISSIONS = Path(__file__).parent / "submissions"
STEMS = sorted(p.stem for p in SOURCE.glob("*.ipynb"))


# --- the real nbgrader pipeline --------------------------------------------------------------


def nbgrader(course: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def scratch_course(tmp: Path) -> Path:
    """A copy of grader/ with the assignment generated (the gradebook knows every cell)."""
    course = tmp / "course"
    shutil.copytree(SOURCE, course / "source" / ASSIGNMENT)
    shutil.copy(COURSE / "nbgrader_config.py", course)
    nbgrader(course, "generate_assignment", ASSIGNMENT, "--force")
    return course


def autograde(course: Path, submissions: dict[str, dict[str, nbformat.NotebookNode]]) -> dict:
    """Autograde {student: {stem: notebook}}; return {(student, stem): {grade_id: (score, text)}}."""
    from nbgrader.api import Gradebook

    for student, notebooks in submissions.items():
        folder = course / "submitted" / student / ASSIGNMENT
        folder.mkdir(parents=True)
        for stem, nb in notebooks.items():
            nbformat.write(nb, folder / f"{stem}.ipynb")
    nbgrader(course, "autograde", ASSIGNMENT, "--force", "--Autograde.create_student=True")
    results = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for student, notebooks in submissions.items():
            for stem in notebooks:
                graded = nbformat.read(course / "autograded" / student / ASSIGNMENT / f"{stem}.ipynb",
                                       as_version=4)
                outputs = {c.metadata.get("nbgrader", {}).get("grade_id"): _text(c)
                           for c in graded.cells if c.cell_type == "code"}
                nb = gb.find_submission_notebook(stem, ASSIGNMENT, student)
                results[student, stem] = {g.name: (g.score, outputs.get(g.name, "")) for g in nb.grades}
    return results


def _text(cell) -> str:
    parts = []
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            parts.append(o.text)
        elif o.output_type == "error":
            parts.append(f"{o.ename}: {o.evalue}")
        elif "data" in o:
            parts.append(str(o.data.get("text/plain", "")))
    return "".join(parts)


# --- submissions: a small change to a solution notebook ------------------------------------


def parse_submission(path: Path) -> dict:
    header, body = {}, []
    for line in path.read_text().splitlines():
        m = re.match(r"# (notebook|cell|replace|expect|says): (.*)$", line)
        if m and not body:
            header[m.group(1)] = m.group(2)
        elif body or not line.startswith("#"):
            body.append(line)
    expect = {k: float(v) for k, v in (item.split("=") for item in header["expect"].split())}
    return {**header, "body": "\n".join(body).strip("\n"), "expect": expect}


def apply_submission(sub: dict) -> nbformat.NotebookNode:
    nb = nbformat.read(SOLUTIONS / f"{sub['notebook']}.ipynb", as_version=4)
    answers = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
    if "cell" in sub:
        answers = [c for c in answers if c.metadata.nbgrader.grade_id == sub["cell"]]
    assert len(answers) == 1, f"{sub['notebook']}: say which answer cell to change"
    cell = answers[0]
    if "replace" in sub:
        lines = cell.source.split("\n")
        hits = [i for i, line in enumerate(lines) if line.strip() == sub["replace"].strip()]
        assert len(hits) == 1, f"line not found exactly once in the solution: {sub['replace']}"
        indent = re.match(r"\s*", lines[hits[0]]).group(0)
        lines[hits[0]:hits[0] + 1] = [indent + b for b in sub["body"].split("\n")]
        cell.source = "\n".join(lines)
    else:
        cell.source = sub["body"]
    return nb


CASES = {p.stem: parse_submission(p) for p in sorted(SUBMISSIONS.glob("*.txt"))}


def full_marks(stem: str) -> dict[str, float]:
    nb = nbformat.read(SOURCE / f"{stem}.ipynb", as_version=4)
    return {c.metadata.nbgrader.grade_id: float(c.metadata.nbgrader.points) for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("grade")}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Everything autograded in one nbgrader run (kernel start-up dominates; one run is cheapest)."""
    course = scratch_course(tmp_path_factory.mktemp("autograde"))
    subs = {
        "release": {s: nbformat.read(NOTEBOOKS / f"{s}.ipynb", as_version=4) for s in STEMS},
        "solutions": {s: nbformat.read(SOLUTIONS / f"{s}.ipynb", as_version=4) for s in STEMS},
    }
    for name, sub in CASES.items():
        subs[name.replace("_", "-")] = {sub["notebook"]: apply_submission(sub)}
    return autograde(course, subs)


@pytest.mark.slow
@pytest.mark.parametrize("stem", STEMS)
def test_untouched_release_scores_zero(graded, stem):
    scores = graded["release", stem]
    assert set(scores) == set(full_marks(stem))
    assert all(score == 0 for score, _ in scores.values()), scores


@pytest.mark.slow
@pytest.mark.parametrize("stem", STEMS)
def test_solutions_score_full_marks(graded, stem):
    scores = graded["solutions", stem]
    assert {k: s for k, (s, _) in scores.items()} == full_marks(stem), scores
    for _, text in scores.values():
        assert "Traceback" not in text and "Error" not in text


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_submission_scores_what_it_deserves(graded, name):
    sub = CASES[name]
    scores = graded[name.replace("_", "-"), sub["notebook"]]
    texts = []
    for grade_id, points in sub["expect"].items():
        score, text = scores[grade_id]
        assert score == pytest.approx(points, abs=1e-4), f"{grade_id}: {score} != {points}\n{text}"
        assert "BEGIN HIDDEN TESTS" not in text and "grade_stepwise(" not in text
        texts.append(text)
    if "says" in sub:  # the feedback explains the score
        assert any(sub["says"].lower() in text.lower() for text in texts), texts


# --- the grading functions, called directly ----------------------------------------------------


def _solution(stem: str, grade_id: str, replace: tuple[str, str] | None = None):
    """The solution function of an answer cell, defined in a namespace like the notebook's
    (optionally with one line replaced, as a learner's mistake)."""
    nb = nbformat.read(SOLUTIONS / f"{stem}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)
    source = cell.source
    if replace:
        assert replace[0] in source
        source = source.replace(replace[0], replace[1])
    scope = {"torch": torch, "F": torch.nn.functional}
    exec(source, scope)
    return scope[grade_id]


def test_autograd_is_unavailable_inside_the_learners_call():
    def sneaky(**kw):
        x = torch.ones(2, requires_grad=True)
        with torch.enable_grad():
            try:
                (x * 2).sum().backward()
            except RuntimeError:
                pass
            return torch.autograd.grad((x * 3).sum(), x)

    call = grading.call_learner(sneaky, {})
    assert call.used_autograd and isinstance(call.error, grading.AutogradUnavailable)
    # ... and is back to normal afterwards.
    x = torch.ones(2, requires_grad=True)
    (x * 2).sum().backward()
    assert torch.equal(x.grad, torch.full((2,), 2.0))


def test_learners_prints_and_warnings_never_reach_stderr(capfd):
    def noisy(**kw):
        import warnings
        print("debug", file=sys.stderr)
        warnings.warn("careful", UserWarning, stacklevel=1)
        return kw["logits"].softmax(1)

    tensors, _ = grading.make_inputs(grading.Case(7, 4))
    call = grading.call_learner(noisy, grading.learner_kwargs(tensors, 4))
    assert call.error is None
    assert capfd.readouterr().err == ""


def test_fresh_inputs_are_not_the_lecture_batch():
    shapes = {(c.n, c.n_hidden, c.dtype) for c in grading.STEPWISE_CASES}
    assert any(n <= 5 for n, _, _ in shapes) and any(d == torch.float64 for _, _, d in shapes)
    assert len({c.seed for c in grading.STEPWISE_CASES}) == len(grading.STEPWISE_CASES)
    assert model.LECTURE_SEED not in {c.seed for c in grading.STEPWISE_CASES}


def test_replacing_torch_allclose_scores_zero(capsys, monkeypatch):
    fn = _solution("02_fused_cross_entropy", "cross_entropy_backward")
    monkeypatch.setattr(torch, "allclose", lambda *a, **k: True)
    assert grading.grade_cross_entropy(fn) == 0.0
    monkeypatch.undo()
    assert "torch.allclose" in capsys.readouterr().out
    assert grading.grade_cross_entropy(fn) == 4.0


def test_patching_the_grader_itself_scores_zero(capsys, monkeypatch):
    fn = _solution("03_fused_batchnorm", "batchnorm_backward")
    monkeypatch.setattr(grading, "compare", lambda *a, **k: grading.Verdict(True, "exact"))
    assert grading.grade_batchnorm(lambda **_: None) == 0.0
    monkeypatch.undo()
    assert "backprop_ninja.grading.compare" in capsys.readouterr().out
    assert grading.grade_batchnorm(fn) == 6.0


def test_switching_off_the_tamper_check_is_itself_caught(capsys, monkeypatch):
    fn = _solution("03_fused_batchnorm", "batchnorm_backward")
    monkeypatch.setattr(grading, "tampering", lambda: [])
    assert grading.grade_batchnorm(fn) == 0.0
    monkeypatch.undo()
    assert "backprop_ninja.grading.tampering" in capsys.readouterr().out


def test_hard_coded_answer_scores_zero(capsys):
    tensors, ref = grading.make_inputs(grading.CROSS_ENTROPY_CASES[1])
    frozen = ref["logits"].clone()
    assert grading.grade_cross_entropy(lambda **_: frozen.clone()) == 0.0
    assert "dlogits" in capsys.readouterr().out


def test_large_logits_reference_is_finite():
    case = next(c for c in grading.CROSS_ENTROPY_CASES if c.logit_scale > 1 and c.dtype == torch.float32)
    tensors, _ = grading.make_inputs(case)
    assert tensors["logits"].abs().max() > 200  # exp() of these overflows float32
    assert torch.isfinite(grading._cross_entropy_reference(tensors)).all()


def test_one_early_mistake_is_charged_once(capsys):
    """Exercise 1 judges each line locally: a wrong dprobs does not sink every line after it."""
    fn = _solution("01_stepwise_backprop", "backward_stepwise")
    # Wrong by a factor 2, and every gradient after it is computed from the wrong one.
    wrong_dprobs = _solution("01_stepwise_backprop", "backward_stepwise",
                             ("dprobs = (1.0 / probs) * dlogprobs", "dprobs = (2.0 / probs) * dlogprobs"))
    assert grading.grade_stepwise(fn) == 26.0
    capsys.readouterr()
    assert grading.grade_stepwise(wrong_dprobs) == pytest.approx(25.0)
    assert "dprobs" in capsys.readouterr().out


def test_hidden_tests_call_guarded_graders():
    """The hidden cells refuse a grader that is not this module's guarded function."""
    names = set()
    for path in SOURCE.glob("*.ipynb"):
        names |= set(re.findall(r"from backprop_ninja\.grading import (\w+) as grade", path.read_text()))
    assert names == {"grade_stepwise", "grade_cross_entropy", "grade_batchnorm", "grade_full_backward",
                     "grade_training"}
    for name in names:
        fn = getattr(grading, name)
        assert fn.__wrapped__ is not None and fn.__module__ == "backprop_ninja.grading"
