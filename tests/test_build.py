"""notebooks/ and solutions/ come from grader/source, and each track is what it claims to be."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest

from backprop_ninja import build
from backprop_ninja.build import NOTEBOOKS, SOLUTIONS, SOURCE

STEMS = sorted(p.stem for p in SOURCE.glob("*.ipynb"))
REGION = re.compile(r"### BEGIN (SOLUTION|HIDDEN TESTS)\n(.*?)### END \1", re.DOTALL)


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def hidden_and_solution_lines(stem: str) -> dict[str, set[str]]:
    """The lines inside the source's solution and hidden-test regions (ignoring trivial ones)."""
    found = {"SOLUTION": set(), "HIDDEN TESTS": set()}
    for cell in read(SOURCE / f"{stem}.ipynb").cells:
        for kind, body in REGION.findall(cell.source):
            found[kind] |= {line.strip() for line in body.splitlines() if len(line.strip()) > 12}
    return found


def code_text(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def code_lines(nb) -> set[str]:
    return {line.strip() for c in nb.cells if c.cell_type == "code" for line in c.source.splitlines()}


def test_every_exercise_has_both_tracks():
    assert STEMS == ["01_stepwise_backprop", "02_fused_cross_entropy", "03_fused_batchnorm",
                     "04_full_training"]
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == STEMS
    assert sorted(p.stem for p in SOLUTIONS.glob("*.ipynb")) == STEMS


@pytest.mark.parametrize("stem", STEMS)
def test_release_has_no_solution_code_no_hidden_test_and_no_outputs(stem):
    nb = read(NOTEBOOKS / f"{stem}.ipynb")
    regions = hidden_and_solution_lines(stem)
    assert regions["SOLUTION"] and regions["HIDDEN TESTS"]
    lines = code_lines(nb)
    assert not regions["SOLUTION"] & lines, "solution code leaked into the learner notebook"
    assert not regions["HIDDEN TESTS"] & lines, "a hidden test leaked into the learner notebook"
    text = nbformat.writes(nb)
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text
    assert "raise NotImplementedError()" in code_text(nb)  # the stub (the first cell names it too)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("stem", STEMS)
def test_solutions_keep_the_solution_but_no_hidden_test(stem):
    nb = read(SOLUTIONS / f"{stem}.ipynb")
    regions = hidden_and_solution_lines(stem)
    lines = code_lines(nb)
    assert regions["SOLUTION"] <= lines
    assert not regions["HIDDEN TESTS"] & lines
    assert "NotImplementedError" not in code_text(nb)
    executed = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert all(c.execution_count for c in executed), "solutions are stored executed"
    assert not [o for c in executed for o in c.outputs if o.output_type == "error"]


def test_solutions_say_they_are_generated_in_their_first_cell():
    for path in SOLUTIONS.glob("*.ipynb"):
        first = read(path).cells[0]
        assert first.cell_type == "markdown" and "GENERATED" in first.source
        assert f"grader/source/backprop/{path.name}" in first.source


@pytest.mark.parametrize("stem", STEMS)
def test_learner_notebooks_open_with_the_exercise_not_a_maintainer_note(stem):
    nb = read(NOTEBOOKS / f"{stem}.ipynb")
    assert nb.cells[0].source == read(SOURCE / f"{stem}.ipynb").cells[0].source
    assert nb.cells[0].source.startswith("# Backprop Ninja, exercise")
    text = nbformat.writes(nb)
    assert "GENERATED" not in text and "Maintainers" not in text and "do not edit" not in text


def test_build_check_is_clean_and_notices_a_hand_edit(tmp_path, monkeypatch):
    assert build.run_build(check=True, log=lambda _: None) == 0
    released = build.release(tmp_path)  # generate once; the checks below reuse it
    monkeypatch.setattr(build, "release", lambda _scratch: released)
    for name in ("notebooks", "solutions"):
        shutil.copytree(build.REPO_ROOT / name, tmp_path / name)
    monkeypatch.setattr(build, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(build, "NOTEBOOKS", tmp_path / "notebooks")
    monkeypatch.setattr(build, "SOLUTIONS", tmp_path / "solutions")
    # Outputs are nbval's business, not --check's: a different output is not "out of date".
    path = tmp_path / "solutions" / f"{STEMS[0]}.ipynb"
    nb = read(path)
    next(c for c in nb.cells if c.cell_type == "code" and c.outputs).outputs[0]["text"] = "other\n"
    nbformat.write(nb, path)
    messages = []
    assert build.run_build(check=True, log=messages.append) == 0
    # A hand edit of a learner notebook is.
    path = tmp_path / "notebooks" / f"{STEMS[1]}.ipynb"
    nb = read(path)
    nb.cells[2].source += "\n# edited by hand"
    nbformat.write(nb, path)
    assert build.run_build(check=True, log=messages.append) == 1
    assert STEMS[1] in messages[-1]
