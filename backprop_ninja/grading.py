"""What the hidden test cells call: fresh inputs, autograd switched off, comparison, score.

A hidden test cell imports one ``grade_*`` function, refuses it unless it is this
module's guarded function (a learner's replacement scores zero), and calls it::

    from backprop_ninja.grading import grade_stepwise as grade
    if getattr(grade, "__wrapped__", None) is None or grade.__module__ != "backprop_ninja.grading":
        grade = lambda *a, **k: print("Score 0: ...") or 0.0
    grade(backward_stepwise, points=26)

Each ``grade_*`` builds inputs the learner never saw (other seeds, batch sizes down
to 2, other widths, float64), computes the reference with autograd itself
(``model.autograd_reference``: never a stored answer, never the solution), calls the
learner's function with keyword arguments while ``Tensor.backward``,
``torch.autograd.grad`` and ``torch.autograd.backward`` raise, and returns the points
earned as a float: nbgrader (``utils.determine_grade``) reads a numeric
``execute_result`` of a test cell as its partial credit. Explanations go to stdout;
nothing goes to stderr (nbgrader zeroes a cell with stderr output), so the learner's
prints and warnings are captured while it runs. A test never raises for a wrong
answer, so a failure never shows the hidden cell's source in a traceback.

Tamper resistance: the read-only set-up cell of every notebook imports this module
before any learner code runs, so the references captured below are the originals.
Every grade first checks (``_guarded``, bound at import) that torch, ``backprop_ninja.model``
and this module still hold them; a replaced one scores zero with a message naming it.
In-process checks can be defeated by a determined author who reads this file; they catch
the casual and the accidental, and the sandbox (``backprop_ninja.autograde``) does the rest.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import math
import sys
import types
import warnings
from dataclasses import dataclass, field

import torch

from backprop_ninja import model
from backprop_ninja.model import BACKWARD_ORDER, PARAM_NAMES, Config

# --- originals, captured at import (the set-up cell imports this module first) ---------
_WATCHED = [
    (torch, "torch", name) for name in
    ("allclose", "isclose", "equal", "all", "abs", "tanh", "exp", "log", "enable_grad",
     "no_grad", "randint", "randn", "zeros_like", "ones_like", "arange", "isfinite")
] + [
    (torch.Tensor, "torch.Tensor", name) for name in
    ("backward", "__eq__", "__sub__", "__add__", "__mul__", "__matmul__", "__pow__",
     "__truediv__", "__getitem__", "abs", "max", "sum", "item", "view", "detach", "clone",
     "to", "allclose", "requires_grad_")
] + [
    (torch.autograd, "torch.autograd", name) for name in ("grad", "backward")
] + [
    (model, "backprop_ninja.model", name) for name in
    ("forward", "autograd_reference", "local_gradients", "init_params", "GRAPH", "BACKWARD_ORDER")
]
_ORIGINALS = {(label, name): getattr(owner, name) for owner, label, name in _WATCHED}
_allclose = torch.allclose
_isfinite = torch.isfinite
_real_grad = torch.autograd.grad
_real_backward = torch.autograd.backward
_real_tensor_backward = torch.Tensor.backward
_real_engine = torch.autograd.variable.Variable._execution_engine
_real_engine_run = getattr(torch.autograd, "_engine_run_backward", None)
_real_graph_engine_run = getattr(torch.autograd.graph, "_engine_run_backward", None)

# Tolerance, relative to the size of the expected gradient (floor: the size of dloss/dlogprobs,
# 1/n, so that gradients which are ~0, like dlogit_maxes, compare by rounding noise). Every
# correct formulation lands below 1e-6 (float64) / 1e-4 (float32); the smallest wrong one the
# course knows (n instead of n-1 at n=256) is off by 4e-3.
RTOL = {torch.float64: 1e-6, torch.float32: 1e-4}


class AutogradUnavailable(RuntimeError):
    """Raised by .backward()/torch.autograd.grad while a learner's function runs."""


def _no_autograd(*_args, **_kwargs):
    raise AutogradUnavailable(
        "autograd is switched off while your function is graded: compute the gradient by hand "
        "instead of calling .backward() or torch.autograd.grad.")


class _EngineStub:
    def run_backward(self, *args, **kwargs):
        _no_autograd()

    def __getattr__(self, name):
        return getattr(_real_engine, name)


@contextlib.contextmanager
def autograd_blocked(attempts: list | None = None):
    """Make Tensor.backward, torch.autograd.grad/backward (and the engine under them) raise.

    Every attempt is recorded in ``attempts``, so a learner who catches the exception
    is still caught.
    """
    attempts = [] if attempts is None else attempts

    def refuse(*args, **kwargs):
        attempts.append(1)
        _no_autograd()

    patches = [(torch.Tensor, "backward", refuse), (torch.autograd, "grad", refuse),
               (torch.autograd, "backward", refuse),
               (torch.autograd.variable.Variable, "_execution_engine", _EngineStub())]
    if _real_engine_run is not None:
        patches.append((torch.autograd, "_engine_run_backward", refuse))
    if _real_graph_engine_run is not None:
        patches.append((torch.autograd.graph, "_engine_run_backward", refuse))
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield attempts
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def tampering() -> list[str]:
    """What learner code replaced among the functions grading relies on (empty: nothing)."""
    problems = [f"{label}.{name}" for owner, label, name in _WATCHED
                if getattr(owner, name, None) is not _ORIGINALS[(label, name)]]
    this = sys.modules.get(__name__)
    if this is None or not isinstance(this, types.ModuleType):
        problems.append(__name__)
    else:
        problems += [f"{__name__}.{name}" for name, obj in _SELF.items()
                     if this.__dict__.get(name) is not obj]
    return problems


def collect_gradients(scope: dict, names=BACKWARD_ORDER) -> dict[str, torch.Tensor]:
    """``{name: scope['d' + name]}`` for the names the scope defines (pass ``locals()``).

    Lets a learner's function return what it has computed so far; the rest shows as missing.
    """
    return {name: scope["d" + name] for name in names if "d" + name in scope}


# --- fresh inputs --------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One fresh input: parameters from ``seed``, a random batch of ``n`` contexts."""
    seed: int
    n: int
    n_hidden: int = 64
    dtype: torch.dtype = torch.float64
    logit_scale: float = 1.0

    def describe(self) -> str:
        kind = "float64" if self.dtype == torch.float64 else "float32"
        big = f", logits ~{self.logit_scale:g}x larger" if self.logit_scale != 1 else ""
        return f"batch of {self.n}, n_hidden={self.n_hidden}, {kind}{big}"


def make_inputs(case: Case):
    """(tensors, grads) of ``model.autograd_reference`` on this case's fresh inputs."""
    cfg = Config(n_hidden=case.n_hidden)
    params = model.init_params(cfg, seed=case.seed, dtype=case.dtype)
    if case.logit_scale != 1:
        params["W2"] = params["W2"] * case.logit_scale
    g = torch.Generator().manual_seed(case.seed + 1)
    Xb = torch.randint(0, cfg.vocab_size, (case.n, cfg.block_size), generator=g)
    Yb = torch.randint(0, cfg.vocab_size, (case.n,), generator=g)
    with torch.enable_grad():
        return model.autograd_reference(params, Xb, Yb)


def learner_kwargs(tensors: dict, n: int, **extra) -> dict:
    """Fresh copies of every lecture variable (no requires_grad, no .grad), plus n."""
    kw = {k: v.detach().clone() for k, v in tensors.items()}
    kw.update({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in extra.items()})
    kw["n"] = n
    return kw


@dataclass
class Call:
    """The outcome of calling a learner's function once."""
    result: object = None
    error: BaseException | None = None
    used_autograd: bool = False
    partial: dict = field(default_factory=dict)   # d-variables computed before an error
    where: str = ""


def call_learner(fn, kwargs: dict) -> Call:
    """Call ``fn(**kwargs)`` with autograd blocked, its output and warnings captured."""
    call = Call()
    attempts: list = []
    sink = io.StringIO()
    kwargs = _accepted(fn, kwargs)
    with (autograd_blocked(attempts), contextlib.redirect_stdout(sink),
          contextlib.redirect_stderr(sink), warnings.catch_warnings()):
        warnings.simplefilter("ignore")
        try:
            call.result = fn(**kwargs)
        except (Exception, SystemExit) as exc:  # a learner's bug must not end the grading
            call.error = exc
            call.partial, call.where = _frame_locals(exc, fn)
    call.used_autograd = bool(attempts) or isinstance(call.error, AutogradUnavailable)
    return call


def _accepted(fn, kwargs: dict) -> dict:
    """Only the keywords ``fn`` declares, unless it takes ``**_`` (the contract asks for it;
    a learner who forgot it should get graded, not a TypeError)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in kwargs.items() if k in names}


def as_gradient_dict(result, names) -> dict | None:
    """The learner's {name: gradient}; "dlogits"-style keys are accepted for "logits"."""
    if not isinstance(result, dict):
        return None
    out = {}
    for key, value in result.items():
        if isinstance(key, str) and key not in names and key.startswith("d") and key[1:] in names:
            key = key[1:]
        out.setdefault(key, value)
    return out


def _frame_locals(exc: BaseException, fn) -> tuple[dict, str]:
    """The learner function's local variables at the moment it raised, and the line."""
    code = getattr(fn, "__code__", None)
    tb, found = exc.__traceback__, ({}, "")
    while tb is not None:
        if tb.tb_frame.f_code is code:
            found = (dict(tb.tb_frame.f_locals), f"line {tb.tb_lineno - code.co_firstlineno + 1} "
                     f"of {code.co_name}")
        tb = tb.tb_next
    return found


def _error_text(call: Call, fn_name: str) -> str:
    where = f" ({call.where})" if call.where else ""
    return f"{fn_name} raised {type(call.error).__name__}{where}: {call.error}"


# --- comparison ----------------------------------------------------------------------


@dataclass
class Verdict:
    ok: bool
    status: str          # exact/close/wrong/wrong shape/missing/not a tensor/not finite/copied
    message: str = ""
    max_abs_diff: float = math.nan


def _grad_tensors_in_notebook() -> list[torch.Tensor]:
    """Every ``.grad`` autograd filled in the notebook's namespace (the lecture batch)."""
    main = sys.modules.get("__main__")
    found = []
    for value in list(getattr(main, "__dict__", {}).values()):
        values = value.values() if isinstance(value, dict) else [value]
        for v in values:
            if isinstance(v, torch.Tensor) and v.grad is not None:
                found.append(v.grad)
    return found


def _is_copied_grad(got: torch.Tensor) -> bool:
    for g in _grad_tensors_in_notebook():
        if got is g or (got.numel() and g.numel() and got.untyped_storage().data_ptr()
                        == g.untyped_storage().data_ptr()):
            return True
    return False


def compare(name: str, got, expected: torch.Tensor, n: int, tensors: dict | None = None) -> Verdict:
    """Is ``got`` the gradient ``expected`` (same shape, close for its dtype)?"""
    if got is None:
        return Verdict(False, "missing", f"d{name} is missing")
    if not isinstance(got, torch.Tensor):
        return Verdict(False, "not a tensor", f"d{name} is a {type(got).__name__}, not a tensor")
    if _is_copied_grad(got):
        return Verdict(False, "copied", f"d{name} is autograd's .grad from the lecture batch: "
                       "compute it from the function's arguments instead")
    if tuple(got.shape) != tuple(expected.shape):
        return Verdict(False, "wrong shape", f"d{name} has shape {tuple(got.shape)}, expected "
                       f"{tuple(expected.shape)} (same as {name}); "
                       + _likely_mistake(name, got.detach(), expected, tensors))
    got = got.detach().to(expected.dtype)
    if not bool(_isfinite(got).all()):
        return Verdict(False, "not finite", f"d{name} contains inf or nan (an overflow? "
                       "subtract the row max before exp)")
    diff = (got - expected).abs().max().item() if got.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0 / n)
    if diff <= RTOL.get(expected.dtype, 1e-4) * scale:
        return Verdict(True, "exact" if diff == 0 else "close", "", diff)
    return Verdict(False, "wrong", f"d{name} is wrong (max abs diff {diff:.3g}); "
                   + _likely_mistake(name, got, expected, tensors), diff)


def _likely_mistake(name: str, got: torch.Tensor, expected: torch.Tensor, tensors=None) -> str:
    """A short hint at what went wrong (``check.diagnose_one``), never the answer."""
    try:
        from backprop_ninja import check

        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            hint = check.diagnose_one(name, got, expected, tensors).hint
        if hint:
            return hint
    except Exception:  # the diagnosis only adds a hint; the verdict stands without it
        pass
    return "check the chain rule for its line, and that every branch that uses it is summed."


def _tamper_message(problems: list[str]) -> str:
    return ("Score 0: code in this notebook replaced " + ", ".join(problems)
            + ", which the hidden tests rely on. Remove the assignment and restart the kernel.")


def _guarded(grade, check=tampering):
    """Every grade: first the tamper check, then the grade with nothing reaching stderr.

    ``check`` is bound here, when the module is imported, so replacing
    ``grading.tampering`` does not switch the check off (it is itself reported). Nothing
    may reach stderr (nbgrader zeroes a cell with stderr output): torch's warnings (e.g.
    reading .grad of a non-leaf tensor) are silenced and stray stderr writes dropped.
    """
    @functools.wraps(grade)
    def wrapper(*args, **kwargs):
        problems = check()
        if problems:
            print(_tamper_message(problems))
            return 0.0
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                return grade(*args, **kwargs)
            except Exception as exc:  # never a traceback: it would show the hidden cell
                print(f"Score 0: the grader could not judge this answer ({type(exc).__name__}: {exc}); "
                      "check that your function returns what its docstring says.")
                return 0.0
    return wrapper


def _say(lines: list[str]) -> None:
    print("\n".join(lines))


# --- the four exercises --------------------------------------------------------------

STEPWISE_CASES = (Case(101, 32), Case(102, 5), Case(105, 5), Case(103, 2, n_hidden=16),
                  Case(104, 17, n_hidden=40, dtype=torch.float32))


@_guarded
def grade_stepwise(fn, points: float = 26.0, cases=STEPWISE_CASES) -> float:
    """Exercise 1: one share of ``points`` per gradient of BACKWARD_ORDER, judged locally.

    Each of the learner's gradients is compared with its own line's backward step applied
    to the learner's *own* upstream gradients (``model.local_gradients``; autograd's
    gradient stands in for an upstream one that is missing or malformed), on every case.
    """
    failures: dict[str, str] = {}
    notes: list[str] = []
    previous: dict[tuple, dict] = {}
    for case in cases:
        tensors, ref = make_inputs(case)
        call = call_learner(fn, learner_kwargs(tensors, case.n))
        if call.used_autograd:
            _say(["Score 0: backward_stepwise used autograd (.backward() or torch.autograd.grad). "
                  "The point of the exercise is to compute every gradient by hand."])
            return 0.0
        if call.error is not None:
            notes.append(_error_text(call, "backward_stepwise") + f" [{case.describe()}]; "
                         "only the gradients computed before that line were graded.")
            grads = {k: v for k, v in collect_gradients(call.partial).items()}
        elif isinstance(call.result, dict):
            grads = as_gradient_dict(call.result, BACKWARD_ORDER)
        else:
            _say([f"Score 0: backward_stepwise must return a dict name -> gradient, got "
                  f"{type(call.result).__name__}."])
            return 0.0
        upstream = {}
        for name in BACKWARD_ORDER:
            got = grads.get(name)
            good = (isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(ref[name].shape)
                    and bool(_isfinite(got.detach()).all()))
            upstream[name] = got.detach().to(ref[name].dtype) if good else ref[name]
        with torch.enable_grad():
            local = model.local_gradients(tensors, upstream)
        key = (case.n, case.n_hidden, case.dtype)
        for name in BACKWARD_ORDER:
            if name in failures:
                continue
            verdict = compare(name, grads.get(name), local[name], case.n, tensors)
            if verdict.ok and key in previous and isinstance(previous[key].get(name), torch.Tensor):
                if torch.equal(previous[key][name].detach().to(grads[name].dtype), grads[name].detach()):
                    verdict = Verdict(False, "constant", f"d{name} is identical for different "
                                      "inputs: hard-coded numbers?")
            if not verdict.ok:
                failures[name] = ("missing" if verdict.status == "missing"
                                  else f"{verdict.message} [{case.describe()}]")
        previous[key] = {k: v for k, v in grads.items() if isinstance(v, torch.Tensor)}
    right = [name for name in BACKWARD_ORDER if name not in failures]
    score = points * len(right) / len(BACKWARD_ORDER)
    lines = [f"Exercise 1: {len(right)}/{len(BACKWARD_ORDER)} gradients right on fresh inputs "
             f"-> {score:.4g}/{points:g} points."]
    lines += notes
    missing = [f"d{name}" for name in BACKWARD_ORDER if failures.get(name) == "missing"]
    lines += [f"  {failures[name]}" for name in BACKWARD_ORDER if failures.get(name, "missing") != "missing"]
    if missing:
        lines.append(f"  missing (not returned): {', '.join(missing)}")
    _say(lines)
    return round(score, 6)


def _cross_entropy_reference(tensors: dict) -> torch.Tensor:
    """dloss/dlogits by autograd through F.cross_entropy: finite even where the lecture's
    chunkated forward takes log(0) (logits in the thousands)."""
    logits = tensors["logits"].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        torch.nn.functional.cross_entropy(logits, tensors["Yb"]).backward()
    return logits.grad


@_guarded
def _grade_single(fn, fn_name: str, var: str, points: float, cases, extra=lambda ref: {}) -> float:
    """Exercises 2 and 3: all-or-nothing on every case (one expression, one gradient)."""
    results: dict[tuple, torch.Tensor] = {}
    for case in cases:
        tensors, ref = make_inputs(case)
        call = call_learner(fn, learner_kwargs(tensors, case.n, **extra(ref)))
        if call.used_autograd:
            _say([f"Score 0: {fn_name} used autograd (.backward() or torch.autograd.grad); "
                  f"derive d{var} by hand."])
            return 0.0
        if call.error is not None:
            _say([f"Score 0: {_error_text(call, fn_name)} [{case.describe()}]."])
            return 0.0
        expected = _cross_entropy_reference(tensors) if var == "logits" else ref[var]
        verdict = compare(var, call.result, expected, case.n, tensors)
        key = (case.n, case.n_hidden, case.dtype)
        if verdict.ok and key in results and torch.equal(results[key], call.result.detach()):
            verdict = Verdict(False, "constant", f"d{var} is identical for different inputs: "
                              "hard-coded numbers?")
        if not verdict.ok:
            _say([f"Score 0: {verdict.message} [{case.describe()}]."])
            return 0.0
        results[key] = call.result.detach().to(expected.dtype)
    _say([f"{fn_name}: d{var} right on {len(cases)} fresh inputs -> {points:g}/{points:g} points."])
    return float(points)


CROSS_ENTROPY_CASES = (Case(201, 32, dtype=torch.float32), Case(202, 3), Case(203, 7), Case(206, 7),
                       Case(204, 32, dtype=torch.float32, logit_scale=2000.0),
                       Case(205, 4, logit_scale=20000.0))


@_guarded
def grade_cross_entropy(fn, points: float = 4.0, cases=CROSS_ENTROPY_CASES) -> float:
    """Exercise 2: dlogits in one expression, including logits large enough to overflow exp."""
    return _grade_single(fn, "cross_entropy_backward", "logits", points, cases)


BATCHNORM_CASES = (Case(301, 32, dtype=torch.float32), Case(302, 4), Case(303, 2, n_hidden=16),
                   Case(304, 9, n_hidden=200), Case(305, 32))


@_guarded
def grade_batchnorm(fn, points: float = 6.0, cases=BATCHNORM_CASES) -> float:
    """Exercise 3: dhprebn in one expression, given dhpreact (from autograd)."""
    return _grade_single(fn, "batchnorm_backward", "hprebn", points, cases,
                         extra=lambda ref: {"dhpreact": ref["hpreact"]})


FULL_CASES = (Case(401, 32, n_hidden=200, dtype=torch.float32), Case(402, 3), Case(403, 11, n_hidden=30),
              Case(404, 32, n_hidden=64))


@_guarded
def grade_full_backward(fn, points: float = 6.0, cases=FULL_CASES) -> float:
    """Exercise 4: the seven parameter gradients on fresh batches; one share per parameter."""
    failures: dict[str, str] = {}
    previous: dict[tuple, dict] = {}
    for case in cases:
        tensors, ref = make_inputs(case)
        call = call_learner(fn, learner_kwargs(tensors, case.n))
        if call.used_autograd:
            _say(["Score 0: backward used autograd (.backward() or torch.autograd.grad); "
                  "exercise 4 trains with your hand-written gradients only."])
            return 0.0
        if call.error is not None:
            _say([f"Score 0: {_error_text(call, 'backward')} [{case.describe()}]."])
            return 0.0
        result = as_gradient_dict(call.result, PARAM_NAMES)
        if result is None:
            _say([f"Score 0: backward must return a dict name -> gradient of the 7 parameters, got "
                  f"{type(call.result).__name__}."])
            return 0.0
        key = (case.n, case.n_hidden, case.dtype)
        for name in PARAM_NAMES:
            if name in failures:
                continue
            got = result.get(name)
            verdict = compare(name, got, ref[name], case.n, tensors)
            if verdict.ok and key in previous and torch.equal(previous[key][name], got.detach()):
                verdict = Verdict(False, "constant", f"d{name} is identical for different inputs")
            if not verdict.ok:
                failures[name] = f"{verdict.message} [{case.describe()}]"
        previous[key] = {k: v.detach() for k, v in result.items() if isinstance(v, torch.Tensor)}
    right = [name for name in PARAM_NAMES if name not in failures]
    score = points * len(right) / len(PARAM_NAMES)
    _say([f"backward: {len(right)}/{len(PARAM_NAMES)} parameter gradients right on fresh batches "
          f"-> {score:.4g}/{points:g} points."] + [f"  {failures[n]}" for n in PARAM_NAMES if n in failures])
    return round(score, 6)


def _short_training(grad_fn, steps: int, seed: int, n_hidden: int, batch: int, lr: float,
                    Xtr: torch.Tensor, Ytr: torch.Tensor):
    """SGD on float64 parameters with ``grad_fn(params, tensors) -> grads``; returns (params, losses)."""
    params = model.init_params(Config(n_hidden=n_hidden), seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        Xb, Yb = model.sample_batch(Xtr, Ytr, batch, g)
        with torch.no_grad():
            tensors = {**params, "Xb": Xb, "Yb": Yb, **model.forward(params, Xb, Yb)}
        grads = grad_fn(params, tensors)
        if grads is None:
            return params, losses
        losses.append(tensors["loss"].item())
        with torch.no_grad():
            for name in PARAM_NAMES:
                params[name] = params[name] - lr * grads[name].to(torch.float64)
    return params, losses


@_guarded
def grade_training(fn, points: float = 4.0, steps: int = 300, seed: int = 4242) -> float:
    """Exercise 4: a short seeded training run with the learner's ``backward``, autograd off.

    It must follow autograd's run step for step (same parameters at the end) and bring the
    loss well below its starting value (ln 27 = 3.3).
    """
    from backprop_ninja import data

    (Xtr, Ytr), _, _ = data.lecture_splits(data.load_words())
    trouble: list[str] = []

    def learner_grads(params, tensors):
        call = call_learner(fn, learner_kwargs(tensors, tensors["Xb"].shape[0]))
        if call.used_autograd:
            trouble.append("backward used autograd while training; train with your own gradients.")
        elif call.error is not None:
            trouble.append(_error_text(call, "backward") + " while training.")
        result = as_gradient_dict(call.result, PARAM_NAMES) or {}
        if not trouble and any(not isinstance(result.get(k), torch.Tensor)
                               or tuple(result[k].shape) != tuple(params[k].shape) for k in PARAM_NAMES):
            trouble.append("backward must return the 7 parameter gradients, each shaped like its parameter.")
        return None if trouble else result

    def reference_grads(params, tensors):
        with torch.enable_grad():
            return model.autograd_reference(params, tensors["Xb"], tensors["Yb"])[1]

    mine, my_losses = _short_training(learner_grads, steps, seed, 64, 32, 0.1, Xtr, Ytr)
    if trouble:
        _say([f"Score 0: {trouble[0]}"])
        return 0.0
    theirs, ref_losses = _short_training(reference_grads, steps, seed, 64, 32, 0.1, Xtr, Ytr)
    drift = max((mine[k] - theirs[k]).abs().max().item() for k in PARAM_NAMES)
    start, end = sum(my_losses[:20]) / 20, sum(my_losses[-20:]) / 20
    ref_start, ref_end = sum(ref_losses[:20]) / 20, sum(ref_losses[-20:]) / 20
    if not math.isfinite(end) or drift > 1e-6 or end > start - 0.4:
        _say([f"Score 0: training {steps} steps with your backward went from loss {start:.3f} to "
              f"{end:.3f}, autograd's from {ref_start:.3f} to {ref_end:.3f} "
              f"(parameters differ by up to {drift:.3g}); fix the gradients above first."])
        return 0.0
    _say([f"Training with your backward: loss {start:.3f} -> {end:.3f} in {steps} steps, "
          f"step for step the same as autograd -> {points:g}/{points:g} points."])
    return float(points)


# This module's own public functions, checked by tampering() before every grade.
_SELF = {name: obj for name, obj in dict(globals()).items()
         if isinstance(obj, types.FunctionType) and obj.__module__ == __name__}
