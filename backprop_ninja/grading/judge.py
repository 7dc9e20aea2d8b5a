"""The judge: fresh inputs from a secret seed, autograd's reference, and each test's verdict.

It runs in the grader's own process (nbgrader's), which never runs learner code. For each
hidden test cell (an ``Exercise``, by the cell's grade id) a ``Session`` draws the cases'
inputs from a seed drawn when grading starts, stages them in the sandbox's hand-in box
just before the cell runs (``stage``), and reads back what the learner's function
returned, as plain tensors, right after it (``collect``). ``verdict`` then compares every
gradient with autograd's on the same inputs, by the course's one tolerance policy
(``check.diagnose_one``, the same the learner's report uses), and explains the score.

Inputs differ in batch size (down to 2), width and dtype (float32 and float64) from the
lecture's; the structure of the cases is public, their numbers are not. Exercise 1 is
judged line by line: each gradient against its own line's backward step applied to the
learner's *own* upstream gradients (``model.local_gradients``), so one early mistake
costs one point. Exercise 4 also trains a small network with the learner's backward
(inside the sandbox) and with autograd (here), from the same secret start.
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load, save

from backprop_ninja import check, model
from backprop_ninja.grading.sandbox import Box
from backprop_ninja.model import BACKWARD_ORDER, PARAM_NAMES, Config
from backprop_ninja.train import one_thread

SEED_ENV = "BACKPROP_NINJA_JUDGE_SEED"  # fixes the secret seed, to re-grade exactly
MAX_CASE_BYTES = 32 << 20               # a case's outputs: a few MB at most when honest


@dataclass(frozen=True)
class Case:
    """The public shape of one fresh input; its numbers come from the session's secret seed."""

    n: int
    n_hidden: int = 64
    dtype: torch.dtype = torch.float64
    logit_scale: float = 1.0
    steps: int = 0   # training cases: SGD steps

    def describe(self) -> str:
        kind = "float64" if self.dtype == torch.float64 else "float32"
        big = f", logits ~{self.logit_scale:g}x larger" if self.logit_scale != 1 else ""
        return f"batch of {self.n}, n_hidden={self.n_hidden}, {kind}{big}"


def make_inputs(case: Case, seed: int):
    """(tensors, grads) of ``model.autograd_reference`` on fresh parameters and a fresh batch."""
    return model.fresh_inputs(seed, case.n, case.n_hidden, case.dtype, case.logit_scale)


@dataclass
class Returned:
    """What the learner's function handed back for one case (read from its slot)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    note: dict = field(default_factory=dict)
    problem: str | None = None   # nothing usable came back: why

    @property
    def error(self) -> str | None:
        return self.note.get("error")


@dataclass
class Verdict:
    score: float
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


# --- reading what came back -------------------------------------------------------------------


def _read_slot(data: bytes | None) -> Returned:
    if data is None:
        return Returned(problem="nothing was handed in")
    try:
        tensors = load(data)  # data only: a safetensors file cannot hold code or tensor subclasses
        header_len = int.from_bytes(data[:8], "little")  # the format: u64 length, JSON header, data
        meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
        note = json.loads(meta.get("note", "{}"))
    except (SafetensorError, ValueError, TypeError, json.JSONDecodeError, OverflowError):
        return Returned(problem="what was handed in is not readable as tensors")
    return Returned(tensors=tensors, note=note if isinstance(note, dict) else {})


def _gradients(returned: Returned) -> dict[str, torch.Tensor]:
    """The learner's {name: gradient}; "dlogits"-style keys are accepted for "logits"."""
    out: dict[str, torch.Tensor] = {}
    for key, value in returned.tensors.items():
        out.setdefault(check.variable_name(key), value)
    return out


def _call_problem(returned: Returned, function: str, case: Case) -> str | None:
    """One sentence when this call gave nothing to judge, else None."""
    if returned.problem:
        return f"{function}: {returned.problem} [{case.describe()}]."
    if returned.error:
        where = f" ({returned.note['where']})" if returned.note.get("where") else ""
        return f"{function} raised {returned.error}{where} [{case.describe()}]."
    return None


STATUS_WORDS = {"wrong shape": "has the wrong shape", "wrong dtype": "has the wrong dtype"}


def _verdict_line(name: str, d: check.Diagnosis, case: Case) -> str:
    return f"d{name} {STATUS_WORDS.get(d.status, f'is {d.status}')}: {d.hint} [{case.describe()}]"


# --- the exercises ------------------------------------------------------------------------------


def _judge_stepwise(session: Session, ex: Exercise, points: float) -> Verdict:
    """Exercise 1: one share of the points per gradient of BACKWARD_ORDER, each judged on its
    own line from the learner's own upstream gradients (autograd's stands in for one that is
    missing or unusable), on every case."""
    failures: dict[str, str] = {}
    notes: list[str] = []
    for case, seed, returned in session.results(ex):
        tensors, ref = make_inputs(case, seed)
        problem = _call_problem(returned, ex.function, case)
        if returned.problem or (not returned.error and returned.note.get("returned") != "dict"):
            kind = returned.note.get("returned", "nothing")
            why = problem or f"{ex.function} must return a dict name -> gradient, got {kind}."
            return Verdict(0.0, [f"Score 0: {why}"])
        if problem:
            notes.append(problem[:-1] + "; only the gradients computed before that line were graded.")
        grads = _gradients(returned)
        upstream = {}
        for name in BACKWARD_ORDER:
            got = grads.get(name)
            usable = (got is not None and got.shape == ref[name].shape and got.dtype == ref[name].dtype
                      and bool(torch.isfinite(got).all()))
            upstream[name] = got if usable else ref[name]
        local = model.local_gradients(tensors, upstream)
        failures.update({n: "missing" for n in BACKWARD_ORDER if n not in grads and n not in failures})
        todo = {name: (grads[name], local[name]) for name in BACKWARD_ORDER if name not in failures}
        for name, d in check.diagnose_each(todo, tensors).items():
            if not d.ok:
                failures[name] = _verdict_line(name, d, case)
    right = [name for name in BACKWARD_ORDER if name not in failures]
    score = round(points * len(right) / len(BACKWARD_ORDER), 6)
    lines = [f"Exercise 1: {len(right)}/{len(BACKWARD_ORDER)} gradients right on fresh inputs "
             f"-> {score:.4g}/{points:g} points.", *dict.fromkeys(notes)]
    lines += [f"  {failures[n]}" for n in BACKWARD_ORDER if failures.get(n, "missing") != "missing"]
    missing = [f"d{n}" for n in BACKWARD_ORDER if failures.get(n) == "missing"]
    if missing:
        lines.append(f"  missing (not returned): {', '.join(missing)}")
    return Verdict(score, lines)


def cross_entropy_reference(tensors: dict) -> torch.Tensor:
    """dloss/dlogits by autograd through F.cross_entropy: finite even where the lecture's
    chunkated forward takes log(0) (logits in the thousands)."""
    logits = tensors["logits"].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        F.cross_entropy(logits, tensors["Yb"]).backward()
    return logits.grad


def _judge_single(session: Session, ex: Exercise, points: float) -> Verdict:
    """Exercises 2 and 3: one gradient in one expression; right on every case, or no points."""
    var = ex.variable
    for case, seed, returned in session.results(ex):
        tensors, ref = make_inputs(case, seed)
        problem = _call_problem(returned, ex.function, case)
        if problem:
            return Verdict(0.0, [f"Score 0: {problem}"])
        got = returned.tensors.get("result")
        if got is None:
            kind = returned.note.get("returned", "nothing")
            return Verdict(0.0, [f"Score 0: {ex.function} must return d{var} as a tensor, got {kind} "
                                 f"[{case.describe()}]."])
        expected = cross_entropy_reference(tensors) if var == "logits" else ref[var]
        d = check.diagnose_one(var, got, expected, tensors)
        if not d.ok:
            return Verdict(0.0, [f"Score 0: {_verdict_line(var, d, case)}."])
    return Verdict(float(points), [f"{ex.function}: d{var} right on {len(ex.cases)} fresh inputs "
                                   f"-> {points:g}/{points:g} points."])


def _judge_parameters(session: Session, ex: Exercise, points: float) -> Verdict:
    """Exercise 4: the seven parameter gradients on fresh batches; one share per parameter."""
    failures: dict[str, str] = {}
    for case, seed, returned in session.results(ex):
        tensors, ref = make_inputs(case, seed)
        problem = _call_problem(returned, ex.function, case)
        if problem or returned.note.get("returned") != "dict":
            why = problem or (f"{ex.function} must return a dict name -> gradient of the 7 parameters, "
                              f"got {returned.note.get('returned', 'nothing')}.")
            return Verdict(0.0, [f"Score 0: {why}"])
        grads = _gradients(returned)
        todo = {name: (grads.get(name), ref[name]) for name in PARAM_NAMES if name not in failures}
        for name, d in check.diagnose_each(todo, tensors).items():
            if not d.ok:
                failures[name] = _verdict_line(name, d, case)
    right = [n for n in PARAM_NAMES if n not in failures]
    score = round(points * len(right) / len(PARAM_NAMES), 6)
    return Verdict(score, [f"{ex.function}: {len(right)}/{len(PARAM_NAMES)} parameter gradients right on "
                           f"fresh batches -> {score:.4g}/{points:g} points."]
                   + [f"  {failures[n]}" for n in PARAM_NAMES if n in failures])


@functools.cache
def _training_set() -> tuple[torch.Tensor, torch.Tensor]:
    from backprop_ninja import data

    return data.lecture_splits(data.load_words())[0]


def _training_inputs(case: Case, seed: int) -> dict[str, torch.Tensor]:
    """Start parameters (float64), the minibatches and the learning rate of every step."""
    Xtr, Ytr = _training_set()
    params = model.init_params(Config(n_hidden=case.n_hidden), seed=seed, dtype=torch.float64)
    ix = torch.randint(0, Xtr.shape[0], (case.steps, case.n), generator=torch.Generator().manual_seed(seed))
    return {**params, "Xb": Xtr[ix], "Yb": Ytr[ix], "lr": torch.full((case.steps,), 0.1, dtype=torch.float64)}


def autograd_training(inputs: dict[str, torch.Tensor], steps: int) -> tuple[dict, list[float]]:
    """The reference run: the same SGD as ``handin``'s, with ``loss.backward()``."""
    params = {k: inputs[k] for k in PARAM_NAMES}
    losses = []
    for step in range(steps):
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            loss = model.forward(leaves, inputs["Xb"][step], inputs["Yb"][step])["loss"]
            loss.backward()
        losses.append(float(loss.detach()))
        params = {k: (leaves[k] - inputs["lr"][step] * leaves[k].grad).detach() for k in PARAM_NAMES}
    return params, losses


def _judge_training(session: Session, ex: Exercise, points: float) -> Verdict:
    """Exercise 4: training with the learner's backward must follow autograd's run step for step
    (the same parameters at the end) and bring the loss well below its start (ln 27 = 3.3)."""
    (case, seed, returned), = session.results(ex)
    if returned.problem or returned.error or "losses" not in returned.tensors:
        if returned.error:
            why = f"{ex.function} raised {returned.error} at training step {returned.note.get('step', '?')}"
        elif returned.note.get("missing"):
            why = (f"{ex.function} must return the 7 parameter gradients, each shaped like its parameter "
                   f"(wrong or missing: {', '.join(returned.note['missing'])})")
        else:
            why = f"{ex.function}: {returned.problem or 'the training run handed in no result'}"
        return Verdict(0.0, [f"Score 0: {why}."])
    with torch.enable_grad():
        theirs, ref_losses = autograd_training(_training_inputs(case, seed), case.steps)
    mine = returned.tensors
    my_losses = mine["losses"].tolist()
    shapes_ok = all(k in mine and mine[k].shape == theirs[k].shape for k in PARAM_NAMES)
    drift = (max(float((mine[k].double() - theirs[k]).abs().max()) for k in PARAM_NAMES)
             if shapes_ok else math.inf)
    start, end = ((sum(my_losses[:20]) / 20, sum(my_losses[-20:]) / 20) if len(my_losses) >= 20
                  else (0.0, math.inf))
    ref_start, ref_end = sum(ref_losses[:20]) / 20, sum(ref_losses[-20:]) / 20
    if not math.isfinite(end) or not math.isfinite(drift) or drift > 1e-6 or end > start - 0.4:
        return Verdict(0.0, [f"Score 0: training {case.steps} steps with your backward went from loss "
                             f"{start:.3f} to {end:.3f}, autograd's from {ref_start:.3f} to {ref_end:.3f} "
                             f"(parameters differ by up to {drift:.3g}); fix the gradients above first."])
    return Verdict(float(points), [f"Training with your backward: loss {start:.3f} -> {end:.3f} in "
                                   f"{case.steps} steps, step for step the same as autograd -> "
                                   f"{points:g}/{points:g} points."])


@dataclass(frozen=True)
class Exercise:
    """One hidden test: its cell's grade id, the learner's function it hands in, its cases."""

    test: str
    function: str
    cases: tuple[Case, ...]
    judge: Callable[[Session, Exercise, float], Verdict]
    kind: str = "call"                      # "call": fn(**inputs) per case; "train": SGD with fn
    variable: str = ""                      # exercises 2 and 3: the one gradient
    extra: tuple[str, ...] = ()             # reference gradients passed as inputs ("hpreact" -> dhpreact)


F32, F64 = torch.float32, torch.float64
EXERCISES = {ex.test: ex for ex in (
    Exercise("test_backward_stepwise", "backward_stepwise", (
        Case(32), Case(5), Case(5), Case(2, n_hidden=16), Case(17, n_hidden=40, dtype=F32)), _judge_stepwise),
    Exercise("test_cross_entropy_backward", "cross_entropy_backward", (
        Case(32, dtype=F32), Case(3), Case(7), Case(7), Case(32, dtype=F32, logit_scale=2000.0),
        Case(4, logit_scale=20000.0)), _judge_single, variable="logits"),
    Exercise("test_batchnorm_backward", "batchnorm_backward", (
        Case(32, dtype=F32), Case(4), Case(2, n_hidden=16), Case(9, n_hidden=200), Case(32)),
        _judge_single, variable="hprebn", extra=("hpreact",)),
    Exercise("test_backward_gradients", "backward", (
        Case(32, n_hidden=200, dtype=F32), Case(3), Case(11, n_hidden=30), Case(32)), _judge_parameters),
    Exercise("test_training", "backward", (Case(32, steps=300),), _judge_training, kind="train"),
)}


class Session:
    """One notebook's judging: a secret seed, then per test cell stage -> (cell runs) -> collect,
    and at the end a verdict per test."""

    def __init__(self, box: Box, seed: int | None = None):
        self.box = box
        env_seed = os.environ.get(SEED_ENV)
        self.seed = seed if seed is not None else int(env_seed) if env_seed else secrets.randbits(62)
        self.returned: dict[str, list[Returned]] = {}

    @staticmethod
    def judges(test: str | None) -> bool:
        """Whether ``test`` (a test cell's grade id) is one the judge gives verdicts for."""
        return test in EXERCISES

    def case_seeds(self, ex: Exercise) -> list[int]:
        g = torch.Generator().manual_seed((self.seed + sum(map(ord, ex.test))) % (1 << 62))
        return torch.randint(1, 1 << 62, (len(ex.cases),), generator=g).tolist()

    # The judge's tensors are tiny and it shares the cores with the kernels being graded, so it
    # computes on one torch thread (one_thread). With one thread per core, exercise 4's 300-step
    # judgement took 5-12x longer on a loaded machine (tests/test_judge.py: 56-89 s against 8-12 s).

    def stage(self, test: str) -> None:
        """Before the test cell runs: its inputs in the box, an empty slot per case."""
        ex = EXERCISES[test]
        self.box.clear_inbox()
        cases = []
        for i, (case, seed) in enumerate(zip(ex.cases, self.case_seeds(ex))):
            with one_thread():
                if ex.kind == "train":
                    inputs, scalars = _training_inputs(case, seed), {"steps": case.steps}
                else:
                    tensors, ref = make_inputs(case, seed)
                    inputs = {**tensors, **{f"d{v}": ref[v] for v in ex.extra}}
                    scalars = {"scalars": {"n": case.n}}
            data = save({k: v.clone().contiguous() for k, v in inputs.items()})  # clone: no shared storage
            self.box.put(f"case-{i}.safetensors", data)
            self.box.slot(f"case-{i}.safetensors")
            cases.append(scalars)
        self.box.put("task.json", json.dumps({"kind": ex.kind, "cases": cases}).encode())

    def collect(self, test: str) -> None:
        """Right after the test cell: what came back (later writes are never read)."""
        ex = EXERCISES[test]
        self.returned[test] = [_read_slot(self.box.take(f"case-{i}.safetensors", MAX_CASE_BYTES))
                               for i in range(len(ex.cases))]
        self.box.clear_inbox()

    def results(self, ex: Exercise):
        returned = self.returned.get(ex.test) or [Returned(problem="nothing was handed in")] * len(ex.cases)
        return zip(ex.cases, self.case_seeds(ex), returned)

    def verdict(self, test: str, points: float) -> Verdict:
        ex = EXERCISES[test]
        with one_thread(), torch.no_grad():
            return ex.judge(self, ex, points)
