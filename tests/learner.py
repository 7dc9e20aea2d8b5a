"""What the tests hand in as a learner: solution functions, and notebooks changed the way a
learner (honest, careless or hostile) would change them. Shared by the test modules."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import torch

from backprop_ninja import check
from backprop_ninja.grading.course import NOTEBOOKS, SOLUTIONS, course_notebooks

STEMS = list(course_notebooks())
STEP, CE, BN, FULL = STEMS
ANSWER = {STEP: "backward_stepwise", CE: "cross_entropy_backward", BN: "batchnorm_backward", FULL: "backward"}


def grade_id(cell) -> str | None:
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def answer_cell(nb, name: str | None = None):
    cells = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
    return next(c for c in cells if name is None or grade_id(c) == name)


def solution_function(stem: str, replace: tuple[str, str] | None = None):
    """The solution's answer function, defined in a namespace like the notebook's (optionally
    with one line replaced, as a learner's mistake)."""
    source = answer_cell(nbformat.read(SOLUTIONS / f"{stem}.ipynb", as_version=4)).source
    if replace:
        assert replace[0] in source, replace[0]
        source = source.replace(replace[0], replace[1])
    return _defined(source, ANSWER[stem])


def _defined(source: str, name: str):
    scope = {"torch": torch, "F": torch.nn.functional, "collect_gradients": check.collect_gradients}
    exec(source, scope)
    return scope[name]


def notebook(stem: str, *, release: bool = False, replace: dict | None = None, prepend: str = "",
             body: str | None = None, edit=None):
    """A solution (or the release) notebook with its answer cell changed."""
    nb = nbformat.read(str((NOTEBOOKS if release else SOLUTIONS) / f"{stem}.ipynb"), as_version=4)
    cell = answer_cell(nb)
    if body is not None:
        cell.source = body
    for old, new in (replace or {}).items():
        assert old in cell.source, f"{old!r} not in the {stem} answer"
        cell.source = cell.source.replace(old, new)
    cell.source = prepend + cell.source
    if edit is not None:
        edit(nb)
    return nb


def add_cell(source: str, at: int | None = None):
    """An edit: a code cell the learner added (at the end, or at index ``at``)."""
    def edit(nb):
        cell = nbformat.v4.new_code_cell(source)
        nb.cells.insert(len(nb.cells) if at is None else at, cell)
    return edit


def add_markdown(source: str, at: int):
    """An edit: a markdown cell the learner added at index ``at``."""
    def edit(nb):
        nb.cells.insert(at, nbformat.v4.new_markdown_cell(source))
    return edit


def drop(*grade_ids):
    def edit(nb):
        nb.cells = [c for c in nb.cells if grade_id(c) not in grade_ids]
    return edit


# tests/submissions/*.txt: a small change to a solution notebook and the points it deserves


def parse_submission(path: Path) -> dict:
    header, body = {}, []
    for line in path.read_text().splitlines():
        m = re.match(r"# (notebook|cell|replace|expect|says|flagged): (.*)$", line)
        if m and not body:
            header[m.group(1)] = m.group(2)
        elif body or not line.startswith("#"):
            body.append(line)
    expect = {k: float(v) for k, v in (item.split("=") for item in header["expect"].split())}
    return {**header, "body": "\n".join(body).strip("\n"), "expect": expect}


def apply_submission(sub: dict) -> nbformat.NotebookNode:
    nb = nbformat.read(SOLUTIONS / f"{sub['notebook']}.ipynb", as_version=4)
    cell = answer_cell(nb, sub.get("cell"))
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


SUBMISSIONS = {p.stem: parse_submission(p)
               for p in sorted((Path(__file__).parent / "submissions").glob("*.txt"))}
# The hostile ones (`# flagged: <rule>`), by name: the source rule that must flag each.
HOSTILE_SUBMISSIONS = {name: sub["flagged"] for name, sub in SUBMISSIONS.items() if "flagged" in sub}


def submitted_answer(sub: dict) -> str:
    """The source of the answer cell a tests/submissions/ entry changes, as submitted."""
    return answer_cell(apply_submission(sub), sub.get("cell")).source


def submission_function(sub: dict):
    """The answer function of a tests/submissions/ entry, defined as solution_function does."""
    return _defined(submitted_answer(sub), ANSWER[sub["notebook"]])
