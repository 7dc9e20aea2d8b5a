"""What the notebooks teach: no solution line leaks into a learner notebook or a hint, every
figure the prose states is the figure the code measures, and each notebook tells a learner
what to do, guides the derivations and keeps the full ones collapsed after the answer."""

from __future__ import annotations

import ast
import importlib
import math
import re
import textwrap
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F

from backprop_ninja import check, data, hints, model
from backprop_ninja.build import NOTEBOOKS, SOLUTIONS, SOURCE

STEMS = sorted(p.stem for p in SOURCE.glob("*.ipynb"))
STEP, CE, BN, FULL = STEMS
HINTS_FILE = Path(importlib.util.find_spec("backprop_ninja.hints").origin)
REGION = re.compile(r"^[ \t]*### BEGIN SOLUTION[ \t]*\n(.*?)^[ \t]*### END SOLUTION",
                    re.DOTALL | re.MULTILINE)
SHORTEST = 10  # characters, whitespace removed: shorter right-hand sides (-dbndiff, C[Xb], 1.0/n) are trivial
TRIVIAL_CALLS = {"zeros_like", "ones_like", "empty_like", "clone"}
# The one solution line a notebook shows on purpose: notebook 1 works it out, as the lecture does.
WORKED_LINE = "dlogprobs[range(n), Yb] = -1.0 / n"


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def squeeze(text: str) -> str:
    """Whitespace-normalised: every space, tab and newline removed."""
    return re.sub(r"\s+", "", text)


def canonical(code: str) -> str | None:
    """Python's own spelling of ``code`` (redundant parentheses dropped), whitespace removed; None
    when it does not parse. So `(2 * bndiff) * dbndiff2` and `2*bndiff*dbndiff2` are the same."""
    try:
        return squeeze(ast.unparse(ast.parse(code.strip())))
    except (SyntaxError, ValueError, RecursionError):
        return None


def forms(text: str) -> set[str]:
    """A text as the leak test reads it: whole (whitespace removed), and the canonical form of
    every inline code span and every line of it that parses as Python."""
    pieces = re.findall(r"`([^`\n]+)`", text) + text.splitlines()
    return {squeeze(text)} | {c for c in map(canonical, pieces) if c}


# --------------------------------------------------------------------------- the leak test


def _trivial(node: ast.expr) -> bool:
    """A bare name or constant, `x.clone()`, `torch.zeros_like(x)`: they give nothing away."""
    if isinstance(node, ast.Name | ast.Constant):
        return True
    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in TRIVIAL_CALLS:
        return all(isinstance(a, ast.Name) for a in node.args) and not node.keywords
    return False


def _given_away(code: str) -> list[str]:
    """What a solution region's lines would give away: the right-hand side of `x = expr`,
    `x += expr` and `return expr`, the whole statement where it writes into an index
    (`d[range(n), Yb] -= 1`) or is a bare call (`dC.index_add_(...)`)."""
    code = textwrap.dedent(code)
    found = []
    for node in ast.walk(ast.parse(code)):
        value = getattr(node, "value", None)
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign) and value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Subscript) for t in targets):
                found.append(ast.get_source_segment(code, node))
            elif not _trivial(value):
                found.append(ast.get_source_segment(code, value))
        elif isinstance(node, ast.Return) and value is not None and not _trivial(value):
            found.append(ast.get_source_segment(code, value))
        elif isinstance(node, ast.Expr) and isinstance(value, ast.Call):
            found.append(ast.get_source_segment(code, node))
    worked = canonical(WORKED_LINE)
    return [text for text in found if len(squeeze(text)) >= SHORTEST and canonical(text) != worked]


def answer_cells(path: Path):
    return [c for c in read(path).cells
            if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("solution")]


def solution_expressions() -> dict[str, tuple[str, ...]]:
    """{where it comes from: its spellings (as written, canonical; whitespace removed)} for every
    solution line of grader/source."""
    found = {}
    for stem in STEMS:
        for cell in answer_cells(SOURCE / f"{stem}.ipynb"):
            for body in REGION.findall(cell.source):
                for text in _given_away(body):
                    where = f"{stem}:{cell.metadata.nbgrader.grade_id}: {' '.join(text.split())}"
                    found[where] = (squeeze(text), canonical(text))
    return found


def learner_texts() -> dict[str, str]:
    """{where: text} for every cell of every learner notebook (markdown, read-only code, templates)."""
    return {f"notebooks/{path.name} cell {i} ({cell.cell_type})": cell.source
            for path in sorted(NOTEBOOKS.glob("*.ipynb")) for i, cell in enumerate(read(path).cells)}


def _strings(value, seen: set[int]) -> list[str]:
    if isinstance(value, str):
        return [value]
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, list | tuple | set | frozenset):
        items = list(value)
    elif hasattr(value, "__dataclass_fields__") and not isinstance(value, type):  # a hint table's entries
        items = [getattr(value, f) for f in value.__dataclass_fields__]
    else:
        return []
    return [s for item in items for s in _strings(item, seen)]


def hint_texts() -> dict[str, str]:
    """{where: text} for every string of backprop_ninja/hints.py: its literals (read with ast, whatever
    its API), every string its module-level tables hold once imported (composed hints included),
    and every hint a learner can be shown (``hints.texts()``)."""
    tree = ast.parse(HINTS_FILE.read_text())
    texts = {f"hints.py line {node.lineno}": node.value for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    for name, value in vars(hints).items():
        if not name.startswith("__"):
            texts.update({f"hints.{name} string {k}": s for k, s in enumerate(_strings(value, set()))})
    texts.update({f"hint shown: {where}": s for where, s in hints.texts().items()})
    return texts


def leaks(texts: dict[str, str]) -> list[str]:
    """Every (solution line, place) where a text holds a solution line's right-hand side."""
    answers = solution_expressions()
    read_as = {where: forms(text) for where, text in texts.items()}
    return [f"{origin}  ->  in {where}" for origin, spellings in answers.items()
            for where, variants in read_as.items() if any(s in v for s in spellings for v in variants)]


def test_the_leak_test_knows_every_solution_line():
    answers = solution_expressions()
    assert {origin.split(":")[0] for origin in answers} == set(STEMS)
    assert any(":training_loop:" in origin for origin in answers)
    spellings = {s for pair in answers.values() for s in pair}
    for line in ("dlogits @ W2.T", "dC.index_add_(0, Xb.view(-1), demb.view(-1, C.shape[1]))",
                 "dlogits[range(n), Yb] -= 1"):
        assert canonical(line) in spellings, line
    assert not {canonical(k) for k in ("dnorm_logits.clone()", "torch.zeros_like(C)", "-dbndiff")} & spellings
    # It finds a line however it is spaced or parenthesised, in prose or in code.
    found = leaks({"prose": "we write `dbnraw = bngain*dhpreact` here", "code": "x = 2 * bndiff * dbndiff2"})
    assert len(found) == 2, found


def test_notebook_1_works_out_one_solution_line_in_the_open():
    (cell,) = answer_cells(SOURCE / f"{STEP}.ipynb")
    lines = {canonical(line) for body in REGION.findall(cell.source)
             for line in textwrap.dedent(body).splitlines()}
    assert canonical(WORKED_LINE) in lines, "the worked line is no longer a line of the solution"
    cells = read(NOTEBOOKS / f"{STEP}.ipynb").cells
    shown = [i for i, c in enumerate(cells) if canonical(WORKED_LINE) in forms(c.source)]
    assert len(shown) == 1 and cells[shown[0]].cell_type == "markdown"


def test_no_solution_line_is_in_a_learner_notebook():
    found = leaks(learner_texts())
    assert not found, "solution lines in learner notebooks:\n" + "\n".join(found)


def test_no_solution_line_is_in_a_hint():
    found = leaks(hint_texts())
    assert not found, "solution lines in backprop_ninja/hints.py:\n" + "\n".join(found)


# --------------------------------------------------------------------------- the lecture batch


def prose(stem: str) -> str:
    """A source notebook's markdown, whitespace collapsed to single spaces."""
    return " ".join(" ".join(c.source.split()) for c in read(SOURCE / f"{stem}.ipynb").cells
                    if c.cell_type == "markdown")


def solution(stem: str, grade_id: str, replace: tuple[str, str] | None = None, **scope):
    """A source answer cell run as the solutions run it; its namespace (optionally one line changed)."""
    (cell,) = [c for c in answer_cells(SOURCE / f"{stem}.ipynb") if c.metadata.nbgrader.grade_id == grade_id]
    source = cell.source
    if replace is not None:
        assert re.search(replace[0], source, re.MULTILINE), replace[0]
        source = re.sub(replace[0], replace[1], source, count=1, flags=re.MULTILINE)
    namespace = {"torch": torch, "F": F, "model": model, **scope}
    exec(compile(source, f"{stem}:{grade_id}", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def lecture(canonical_words):
    """The notebooks' lecture batch: (keyword arguments of the answer functions, autograd's gradients)."""
    stoi, itos = data.vocabulary(canonical_words)
    (Xtr, Ytr), _, _ = data.lecture_splits(canonical_words, 3)
    params = model.init_params(model.Config(vocab_size=len(itos), block_size=3, n_embd=10, n_hidden=64))
    Xb, Yb = model.sample_batch(Xtr, Ytr, 32, torch.Generator().manual_seed(42))
    tensors, ref = model.autograd_reference(params, Xb, Yb)
    return {**tensors, "n": 32}, ref


def _power_of_ten(x: float, up: bool) -> str:
    return f"1e{math.ceil(math.log10(x)) if up else math.floor(math.log10(x))}"


def test_notebook_1_says_which_gradients_are_exact_with_the_lecture_lines(lecture):
    """cmp's `exact` column for the solution on the lecture batch is what the prose says it is."""
    kw, ref = lecture
    grads = solution(STEP, "backward_stepwise")["backward_stepwise"](**kw)
    exact = [v for v in model.BACKWARD_ORDER if torch.equal(grads[v], ref[v])]
    rest = model.BACKWARD_ORDER[len(exact):]
    assert exact == list(model.BACKWARD_ORDER[:len(exact)]), "exact gradients should be a prefix"
    diffs = [float((grads[v] - ref[v]).abs().max()) for v in rest]
    assert all(d > 0 for d in diffs)
    words = {11: "eleven"}
    text = prose(STEP)
    assert (f"the first {words[len(exact)]} gradients, `d{exact[0]}` to `d{exact[-1]}`, come out exact"
            in text)
    assert f"From `d{rest[0]}` on, every row says `exact: False`" in text
    low, high = _power_of_ten(min(diffs), up=False), _power_of_ten(max(diffs), up=True)
    assert f"maxdiffs between {low} and {high}" in text
    assert "just means a different order" not in text


def test_notebook_1_says_why_dhpreact_is_not_bit_exact(lecture):
    """PyTorch's tanh backward rounds 1 - h² once (a fused multiply-add), the lecture's line twice, so
    some entries differ by a rounding error; given autograd's own dhpreact every later line is bit-exact."""
    kw, ref = lecture
    h, dh = kw["h"], ref["h"]
    assert torch.equal(ref["hpreact"], (1 - h.double() * h.double()).float() * dh)  # one rounding
    lines = solution(STEP, "backward_stepwise")["backward_stepwise"](**kw)["hpreact"]  # two roundings
    differ, size = int((lines != ref["hpreact"]).sum()), ref["hpreact"].numel()
    maxdiff = float((lines - ref["hpreact"]).abs().max())
    assert 0 < differ < size
    ns = solution(STEP, "backward_stepwise", (r"^(\s*)dhpreact = .*$", r"\1dhpreact = AUTOGRAD_DHPREACT"),
                  AUTOGRAD_DHPREACT=ref["hpreact"])
    grads = ns["backward_stepwise"](**kw)
    after = model.BACKWARD_ORDER[model.BACKWARD_ORDER.index("hpreact"):]
    assert [v for v in after if not torch.equal(grads[v], ref[v])] == []
    text = prose(STEP)
    assert "a single rounding (a fused multiply-add)" in text and "each of those lines is bit-exact" in text
    assert f"So {differ} of the {size:,} entries of `dhpreact` differ" in text, differ
    assert f"a rounding error (at most {maxdiff:.0e})" in text, f"{maxdiff:.0e}"


def test_notebook_1_says_the_sums_that_vanish_are_below_1e_8(lecture):
    _, ref = lecture
    for var in ("logit_maxes", "b1"):
        assert 0 < float(ref[var].abs().max()) < 1e-8, var
    text = prose(STEP)
    assert "`dlogit_maxes`: a broadcast again, and a minus sign. Expect numbers below 1e-8" in text
    assert "`db1` is below 1e-8 too" in text


def test_notebook_3_states_the_true_cost_of_n_instead_of_n_minus_1(lecture):
    """The issue's "off by a few percent" was wrong: 0.44% at n = 32, measured here."""
    kw, ref = lecture
    kw = {**kw, "dhpreact": ref["hpreact"]}
    n = kw["n"]
    right = solution(BN, "batchnorm_backward")["batchnorm_backward"](**kw)
    biased = solution(BN, "batchnorm_backward", (r"n / \(n - 1\)", "1"))["batchnorm_backward"](**kw)
    assert check.diagnose_one("hprebn", right, ref["hprebn"], kw).ok
    d = check.diagnose_one("hprebn", biased, ref["hprebn"], kw)
    assert d.status == "wrong" and d.mistake == "Bessel's correction"
    relative = float((biased - ref["hprebn"]).norm() / ref["hprebn"].norm())
    maxdiff = float((biased - ref["hprebn"]).abs().max())
    text = prose(BN)
    assert f"the result is off by {relative:.2%} at n = {n}" in text, f"{relative:.2%}"
    assert f"`cmp` shows a maxdiff of {maxdiff:.0e}" in text, f"{maxdiff:.0e}"
    assert "few percent" not in text
    assert "At a batch of 2 the factor itself is 2" in text and 2 / (2 - 1) == 2


def test_notebook_3_states_how_much_dividing_by_n_underestimates_the_variance():
    text = prose(BN)
    for n, said in ((32, "For n = 32 the difference is about"), (4, "for a batch of 4 it is")):
        assert f"{said} {1 - (n - 1) / n:.0%}" in text, n


def test_the_lectures_maxdiff_comments_match_the_solutions(lecture):
    """The lecture's own comments in the check cells ("maxdiff ~6e-9", "~9e-10")."""
    kw, ref = lecture
    got = {CE: solution(CE, "cross_entropy_backward")["cross_entropy_backward"](**kw) - ref["logits"],
           BN: solution(BN, "batchnorm_backward")["batchnorm_backward"](**kw, dhpreact=ref["hpreact"])
           - ref["hprebn"]}
    for stem, grade_id in ((CE, "check_cross_entropy"), (BN, "check_batchnorm")):
        (cell,) = [c for c in read(SOURCE / f"{stem}.ipynb").cells
                   if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id]
        said = float(re.search(r"maxdiff (?:is )?~([0-9.e-]+)", cell.source).group(1))
        measured = float(got[stem].abs().max())
        assert said / 2 < measured < said * 2, (stem, said, measured)


def test_notebook_2_states_where_exp_overflows():
    assert torch.isinf(torch.exp(torch.tensor(89.0))) and torch.isfinite(torch.exp(torch.tensor(88.0)))
    assert torch.isinf(torch.exp(torch.tensor(1000.0, dtype=torch.float64)))
    assert "`exp(1000)` is infinity in floating point (already `exp(89)` in float32)" in prose(CE)


def test_graded_cells_state_the_judges_cases():
    """"sizes 3 to 32", "widths 16 to 200", "logits in the thousands", "a few hundred steps"."""
    from backprop_ninja.grading.judge import EXERCISES

    def span(test, field):
        values = [getattr(c, field) for c in EXERCISES[test].cases]
        return f"{min(values)} to {max(values)}"

    assert f"sizes {span('test_cross_entropy_backward', 'n')}" in prose(CE)
    assert max(c.logit_scale for c in EXERCISES["test_cross_entropy_backward"].cases) >= 1000
    assert "logits in the thousands" in prose(CE)
    for test, stem in (("test_batchnorm_backward", BN), ("test_backward_gradients", FULL)):
        assert f"sizes {span(test, 'n')}, widths {span(test, 'n_hidden')}" in prose(stem), test
    (train,) = EXERCISES["test_training"].cases
    assert 100 <= train.steps < 1000 and "for a few hundred steps" in prose(FULL)


def test_notebook_4_states_the_networks_size_and_the_dC_loop():
    params = model.init_params(model.Config(n_hidden=200))
    text = prose(FULL)
    assert f"{sum(p.numel() for p in params.values()):,} parameters" in text
    assert f"32 × 3 = {32 * 3} iterations per step" in text


def _stored_output(stem: str, grade_id: str) -> str:
    (cell,) = [c for c in read(SOLUTIONS / f"{stem}.ipynb").cells
               if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id]
    return "".join(o.get("text", "") for o in cell.outputs)


def test_notebook_4_quotes_losses_the_solution_reaches(canonical_words):
    """"The lecture got train 2.07 and val 2.11": the solution's own 200k run is in that range."""
    said = re.search(r"The lecture got train ([0-9.]+) and val ([0-9.]+)", prose(FULL))
    out = _stored_output(FULL, "evaluate")
    got = {split: float(x) for split, x in re.findall(r"^(train|val) ([0-9.]+)$", out, re.MULTILINE)}
    assert abs(got["train"] - float(said.group(1))) < 0.05 and abs(got["val"] - float(said.group(2))) < 0.05


def test_notebook_4_training_loop_runs_and_the_loss_falls_as_stated(canonical_words):
    stoi, itos = data.vocabulary(canonical_words)
    (Xtr, Ytr), _, _ = data.lecture_splits(canonical_words, 3)
    params = model.init_params(model.Config(vocab_size=len(itos), n_hidden=200))
    (forward_cell,) = [c for c in read(SOURCE / f"{FULL}.ipynb").cells
                       if c.metadata.get("nbgrader", {}).get("grade_id") == "training_forward"]
    scope = {"torch": torch, "F": F, "model": model}
    exec(forward_cell.source, scope)
    backward = solution(FULL, "backward")["backward"]
    ns = solution(FULL, "training_loop", forward=scope["forward"], backward=backward, params=params,
                  Xtr=Xtr, Ytr=Ytr)
    losses = ns["losses"]
    assert len(losses) == ns["max_steps"] and 100 <= ns["max_steps"] <= 1000
    first, last = round(losses[0], 1), round(sum(losses[-50:]) / 50, 1)
    assert f"the loss should fall from about {first} to about {last}" in prose(FULL), (first, last)
    assert not any(torch.equal(p, params[k]) for k, p in ns["parameters"].items()), "every parameter trained"
    assert torch.equal(params["W1"], model.init_params(model.Config(n_hidden=200))["W1"]), "params untouched"


# --------------------------------------------------------------------------- what a learner meets


@pytest.mark.parametrize("stem", STEMS)
def test_the_first_cell_says_what_to_do(stem):
    first = " ".join(read(NOTEBOOKS / f"{stem}.ipynb").cells[0].source.split())
    for step in ("**What to do.**", "`# YOUR CODE HERE`", "delete the line `raise NotImplementedError()`",
                 "Run the check cell", 'hint("d', "The `grade_me()` cell at the end grades your notebook",
                 "**The rules.**"):
        assert step in first, step


@pytest.mark.parametrize("exercise, stem", list(enumerate(STEMS, 1)))
def test_hint_is_bound_to_the_notebooks_exercise_and_the_prose_asks_for_hints_it_has(exercise, stem):
    nb = read(SOURCE / f"{stem}.ipynb")
    (setup,) = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "setup"]
    assert "from backprop_ninja.hints import Hints\n" in setup.source
    assert f"hint = Hints(exercise={exercise})" in setup.source
    named = set(re.findall(r'hint\("(d\w+)"\)', "\n".join(c.source for c in nb.cells)))
    assert named
    hint = hints.Hints(exercise=exercise)
    for name in named:
        hint._key(name)  # raises a UserError for a gradient this exercise has no hints for


@pytest.mark.parametrize("folder", [SOURCE, NOTEBOOKS])
@pytest.mark.parametrize("stem", STEMS)
def test_every_notebook_ends_with_grade_me(folder, stem):
    cells = read(folder / f"{stem}.ipynb").cells
    intro, last = cells[-2], cells[-1]
    assert last.cell_type == "code"
    assert last.source == "from backprop_ninja.selfgrade import grade_me\n\ngrade_me()"
    meta = last.metadata.nbgrader
    assert (meta.grade_id, meta.grade, meta.solution, meta.locked) == ("grade_me", False, False, True)
    text = " ".join(intro.source.split())
    assert intro.cell_type == "markdown" and "same hidden tests and the same judge" in text
    assert "in a sandbox, on fresh inputs" in text and "only prints one line saying how to grade" in text


@pytest.mark.parametrize("stem, answer, formula", [
    (CE, "cross_entropy_backward", r"\mathrm{onehot}"),
    (BN, "batchnorm_backward", r"\frac{n}{n-1}\,\hat x_i"),
])
def test_derivations_are_guided_before_the_answer_and_collapsed_after_it(stem, answer, formula):
    cells = read(NOTEBOOKS / f"{stem}.ipynb").cells
    at = next(i for i, c in enumerate(cells) if c.metadata.get("nbgrader", {}).get("grade_id") == answer)
    before = "\n".join(c.source for c in cells[:at] if c.cell_type == "markdown")
    assert "your turn" in before and re.search(r"^1\. .*\n(.*\n)*^2\. ", before, re.MULTILINE)
    assert formula not in before and "In code:" not in before
    (details,) = [i for i, c in enumerate(cells) if "Check your derivation</b>" in c.source]
    source = cells[details].source
    assert details > at and source.startswith("<details>\n<summary>") and source.endswith("</details>")
    assert formula in source


def test_notebook_4_has_the_learners_training_loop_between_backward_and_train():
    cells = read(SOURCE / f"{FULL}.ipynb").cells
    ids = [c.metadata.get("nbgrader", {}).get("grade_id") for c in cells]
    loop = cells[ids.index("training_loop")]
    assert ids.index("backward") < ids.index("training_loop") < ids.index("train")
    meta = loop.metadata.nbgrader
    assert (meta.solution, meta.grade, meta.locked) == (True, False, False)
    assert "nbval-ignore-output" in loop.metadata.tags
    template = REGION.sub("", loop.source)
    assert "from backprop_ninja.progress import LivePlot" in template and "with torch.no_grad()" in template
    body = REGION.findall(loop.source)[0]
    for part in ("torch.randint(", "forward(", "backward(", "p -= lr *", "0.01", "losses.append("):
        assert part in body, part
    released = read(NOTEBOOKS / f"{FULL}.ipynb").cells[ids.index("training_loop")].source
    assert "raise NotImplementedError()" in released and "torch.randint(" not in released


def test_notebook_4_shows_the_lectures_evaluation_and_no_reference_backward():
    cells = {c.metadata.get("nbgrader", {}).get("grade_id"): c.source
             for c in read(SOURCE / f"{FULL}.ipynb").cells}
    assert "def split_loss(split):" in cells["evaluate"] and "result." not in cells["evaluate"]
    assert "torch.multinomial(" in cells["sample"] and "result." not in cells["sample"]
    assert "hpreact.var(0, keepdim=True, unbiased=True)" in cells["calibrate"]
    assert "compare_speed(backward)" in cells["speed"]  # the learner's own function against autograd
    for path in NOTEBOOKS.glob("*.ipynb"):
        text = nbformat.writes(read(path))
        for pointer in ("fused_backward", "lecture_backward", '"manual"', "--backward", "reference backward"):
            assert pointer not in text, (path.name, pointer)


def test_notebook_1_explains_the_report_colours_and_why_its_count_differs_from_the_grade():
    text = prose(STEP)
    assert 'amber ones ("inherited") are wrong *only because*' in text and "grey ones are missing" in text
    assert "The grader judges each line on its own" in text
    assert "an inherited row still earns its point" in text
