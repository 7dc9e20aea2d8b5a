"""Compare a learner's gradient with autograd's: the lecture's ``cmp``, made shape-aware,
and ``diagnose``, which says *which* gradient is wrong, and the most likely reason why.

A diagnosis never prints the right answer: it names a mistake (a shape, a transpose,
a sign, a constant factor, a forgotten branch, an overflow) and gives a plain hint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from backprop_ninja import mistakes, model


def _reference(t: torch.Tensor) -> torch.Tensor:
    """Accept either a tensor whose ``.grad`` autograd filled (lecture style) or a gradient."""
    if isinstance(t, torch.Tensor) and t.grad is not None:
        return t.grad
    return t


def cmp(s: str, dt, t, tensors: dict | None = None) -> bool:
    """Print the lecture's line ``name | exact | approximate | maxdiff``; return approximate.

    "approximate" is the course's verdict (``within_tolerance``, the same one the report and
    the grader use), not ``torch.allclose``. ``tensors`` (the forward's Xb, Yb, parameters and
    intermediates: ``model.autograd_reference``'s first result, or a notebook's ``lecture``
    dict) tells it how large the terms this gradient adds up are; without it see
    ``allowed_difference``. Unlike the lecture's version it checks the shape first
    (``torch.allclose`` broadcasts, so a (64,) gradient against a (1, 64) one would pass
    silently) and the dtype.
    """
    ref = _reference(t).detach()
    d = _diagnose(s, dt, ref, _context(tensors))
    if not isinstance(dt, torch.Tensor):
        print(f"{s:15s} | not a tensor: got {type(dt).__name__}, expected shape "
              f"{tuple(ref.shape)}")
    elif d.status == "wrong shape":
        print(f"{s:15s} | wrong shape: {tuple(dt.shape)}, expected {tuple(ref.shape)}")
    elif d.status == "wrong dtype":
        print(f"{s:15s} | wrong dtype: {d.mistake} | {d.hint}")
    else:
        got = dt.detach().to(ref.dtype)
        maxdiff = (got - ref).abs().max().item() if got.numel() else 0.0
        exact = d.status == "exact"
        print(f"{s:15s} | exact: {str(exact):5s} | approximate: {str(d.ok):5s} | maxdiff: {maxdiff}")
    return d.ok


# ----------------------------------------------------------------------------------------
# Diagnosis
# ----------------------------------------------------------------------------------------

OK_STATUSES = ("exact", "close")

# ----------------------------------------------------------------------------------------
# The tolerance policy: the one place that decides "close enough", for cmp, the report (and
# its widget) and the grader alike.
#
# A correct gradient differs from autograd's by rounding alone, and rounding is bounded by the
# size of the *terms* the gradient adds up (_Context.terms), entry by entry, not by the size of
# the result: dlogit_maxes and db1 are sums that cancel to ~0, and at batch 2 BatchNorm's
# gradients are a millionth of their terms. So entry i may differ from autograd's by
#
#     RTOL[dtype] * max|expected|  +  NOISE_FACTOR[dtype] * eps(dtype) * (|expected[i]| + terms[i])
#
# float64: rounding and nothing else (RTOL 0), so that a finite difference fails. Measured by
# benchmarks/tolerance.py (200 fresh inputs, batch 2..64, n_hidden 4..200): every correct
# formulation (exercise 1 stepwise with fused dlogits / fused dhprebn / dC by loop, index_add_
# or one-hot matmul, the lecture's lines, five exercise-2 and three exercise-3 answers, the
# course's and the lecture's exercise-4 backward) stays below 3.1 eps of |expected| + terms:
# NOISE_FACTOR 30 leaves >= 11x. The best finite difference of the loss misses by >= 230 eps
# at batch >= 3 (7.7x; central differences >= 2500x, a 4th-order stencil >= 42x, Richardson
# extrapolation >= 30x, only a two-level Richardson comes that close) and by >= 100 eps at
# batch 2 (3.4x). So the gap is ~75x, not the 100x that 10x on both sides would need; a right
# answer judged wrong costs a learner points, so the margin goes to the correct ones. Three
# gradients a finite difference gets exactly (dlogprobs: the loss is linear in it; dlogit_maxes,
# db1: the loss does not depend on them, they are ~0) no tolerance can tell apart.
# float32: a finite difference cannot be rejected at all (one done in float64 and cast is more
# accurate than float32 autograd), which is why the grader always has float64 cases. The RTOL
# floor (2e-4 of the largest entry) and a NOISE_FACTOR of 150 (nothing to reject there, so the
# margin goes to the learner: >= 200x measured) keep the notebooks' float32 checks lenient; the
# smallest real mistake the course knows (Bessel's n/(n-1) at n=64) is off by 1.6%.
RTOL = {torch.float64: 0.0, torch.float32: 2e-4}
RTOL_OTHER = 2e-2  # half precision and friends
NOISE_FACTOR = {torch.float64: 30.0, torch.float32: 150.0}
NOISE_FACTOR_OTHER = 150.0


def allowed_difference(expected: torch.Tensor, terms: torch.Tensor | None = None) -> torch.Tensor:
    """Entry by entry, the largest ``|got - expected|`` rounding explains (the policy above), as
    float64, shaped like ``expected``.

    ``terms``: the size of the terms each entry of the gradient adds up (``_Context.terms``).
    Unknown (no forward tensors, or not finite because the chunked forward overflowed: huge
    logits), each entry's terms are taken as ``max(1, max|expected|)``, the scale of a mean of
    per-example gradients of size <= 1. Every correct formulation still passes that way (batch
    2..64, both dtypes), but so do some finite differences: the grader always has the tensors.
    """
    e = expected.detach().double().abs()
    big = float(e.max()) if e.numel() else 0.0
    fallback = max(1.0, big)
    if terms is None or tuple(terms.shape) != tuple(e.shape):
        terms = torch.full_like(e, fallback)
    else:
        terms = terms.double()
        terms = torch.where(torch.isfinite(terms), terms, torch.full_like(terms, fallback))
    dtype = expected.dtype
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return (RTOL.get(dtype, RTOL_OTHER) * big
            + NOISE_FACTOR.get(dtype, NOISE_FACTOR_OTHER) * eps * (e + terms))


def tolerance_ratio(got: torch.Tensor, expected: torch.Tensor, terms: torch.Tensor | None = None) -> float:
    """The largest ``|got - expected| / allowed_difference`` over the entries (same shapes): <= 1
    is "close". 0 where they agree exactly, inf where they differ and nothing is allowed."""
    if not got.numel():
        return 0.0
    diff = (got.detach().double() - expected.detach().double()).abs()
    allowed = allowed_difference(expected, terms)
    ratio = torch.where(diff == 0, torch.zeros_like(diff), diff / allowed)
    return float(ratio.max())  # nan (got holds nan) compares False below, as it should


def within_tolerance(got: torch.Tensor, expected: torch.Tensor, terms: torch.Tensor | None = None,
                     slack: float = 1.0) -> bool:
    """The verdict: is ``got`` (same shape) ``expected`` up to rounding? ``slack`` widens the
    allowance (the diagnosis uses 5 to recognise a variant of the gradient, never for the verdict)."""
    return got.shape == expected.shape and tolerance_ratio(got, expected, terms) <= slack


def gradient_terms(tensors: dict) -> dict[str, torch.Tensor] | None:
    """{variable: the size of the terms its gradient adds up, entry by entry}: the policy's context
    for these forward tensors (None without Xb, Yb and the parameters). See ``_Context.terms``."""
    return _Context(tensors).terms


# Which lines consume each variable; a variable used by two lines gets two gradient branches.
CONSUMERS: dict[str, tuple[str, ...]] = {}
for _out, _inputs, _ in model.GRAPH:
    for _i in _inputs:
        if _i not in model.NOT_DIFFERENTIABLE:
            CONSUMERS[_i] = CONSUMERS.get(_i, ()) + (_out,)
USED_TWICE = tuple(v for v, cs in CONSUMERS.items() if len(cs) > 1)  # hprebn, bndiff, logits, counts

_KNOWN_NAMES = set(model.BACKWARD_ORDER)


def variable_name(name: str) -> str:
    """``"dlogits"`` -> ``"logits"``; lecture names pass through (none starts with d)."""
    if name not in _KNOWN_NAMES and name.startswith("d") and name[1:] in _KNOWN_NAMES:
        return name[1:]
    return name


@dataclass
class Diagnosis:
    """One gradient's verdict. ``got``/``expected`` are kept for plots, never printed."""

    name: str
    status: str
    max_abs_diff: float = math.nan
    rel_error: float = math.nan
    mistake: str | None = None
    hint: str = ""
    got: torch.Tensor | None = field(default=None, repr=False, compare=False)
    expected: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES

    def line(self) -> str:
        """``name | status | maxdiff | rel error | mistake``: deterministic, for logs and tests."""
        diff = "-" if math.isnan(self.max_abs_diff) else f"{self.max_abs_diff:.2e}"
        rel = "-" if math.isnan(self.rel_error) else f"{self.rel_error:.1e}"
        return (f"{self.name:15s} | {self.status:11s} | maxdiff {diff:>8s} | rel {rel:>7s}"
                + (f" | {self.mistake}" if self.mistake else ""))


@dataclass
class Report:
    """Every gradient's diagnosis, in backward order."""

    rows: list[Diagnosis]

    @property
    def first_wrong(self) -> str | None:
        """The gradient to fix first: the earliest in backward order that is wrong on its own."""
        for d in self.rows:
            if not d.ok and d.status != "inherited":
                return d.name
        return None

    @property
    def score(self) -> float:
        return sum(d.ok for d in self.rows) / len(self.rows) if self.rows else 0.0

    def __getitem__(self, name: str) -> Diagnosis:
        for d in self.rows:
            if d.name == name or variable_name(d.name) == variable_name(name):
                return d
        raise KeyError(name)

    @property
    def hint(self) -> str:
        first = self.first_wrong
        return self[first].hint if first else ""

    def summary(self) -> str:
        """``k/N gradients correct.`` and, if any is wrong, which to fix first and the hint."""
        n_ok = sum(d.ok for d in self.rows)
        lines = [f"{n_ok}/{len(self.rows)} gradients correct."]
        first = self.first_wrong
        if first:
            lines.append(f"Fix d{variable_name(first)} first: {self[first].hint}")
        return "\n".join(lines)

    def text(self) -> str:
        """A plain table (one line per gradient) and the summary."""
        return "\n".join([d.line() for d in self.rows] + [self.summary()])

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        first = self.first_wrong
        return (f"<Report: {sum(d.ok for d in self.rows)}/{len(self.rows)} correct"
                + (f", fix d{variable_name(first)} first>" if first else ">"))


# --- the reference, branch by branch ---------------------------------------------------------

def _vjp(name, inputs, op, tensors, grad_out):
    """{input: gradient contributed by this one line}, given the gradient of its output."""
    args = [tensors[i] if i in model.NOT_DIFFERENTIABLE else
            tensors[i].detach().requires_grad_(True) for i in inputs]
    diff = [(i, a) for i, a in zip(inputs, args) if i not in model.NOT_DIFFERENTIABLE]
    with torch.enable_grad():
        out = op(*args)
        gs = model.vjp(out, [a for _, a in diff], grad_out.to(out.dtype))
    return {i: g for (i, _), g in zip(diff, gs)}


def branches(tensors: dict, upstream: dict) -> dict[str, dict[str, torch.Tensor]]:
    """``{variable: {consumer: contribution}}``: each line's vector-Jacobian product, fed
    ``upstream[consumer]``. Summing a variable's branches gives ``model.local_gradients``."""
    result: dict[str, dict[str, torch.Tensor]] = {}
    for name, inputs, op in model.GRAPH:
        grad_out = torch.ones(()) if name == "loss" else upstream[name]
        for i, g in _vjp(name, inputs, op, tensors, grad_out).items():
            result.setdefault(i, {})[name] = g
    return result


def _backprop(tensors: dict, overrides: dict | None = None) -> dict[str, torch.Tensor]:
    """Backpropagate line by line at the stored forward values; ``overrides`` swaps a line's
    operation (e.g. the variance without Bessel's correction) to model a learner's slip."""
    overrides = overrides or {}
    acc: dict[str, torch.Tensor] = {"loss": torch.ones((), dtype=tensors["logprobs"].dtype)}
    for name, inputs, op in reversed(model.GRAPH):
        for i, g in _vjp(name, inputs, overrides.get(name, op), tensors, acc[name]).items():
            acc[i] = acc[i] + g if i in acc else g
    return acc


def _biased_variance(bndiff2):
    return 1 / bndiff2.shape[0] * bndiff2.sum(0, keepdim=True)


class _Context:
    """What diagnosing needs beyond one tensor pair: batch size, the reference gradients and
    their branches, the Bessel-less variant. Computed lazily from the forward ``tensors``."""

    def __init__(self, tensors: dict | None, ref: dict | None = None):
        self.tensors = tensors
        self._ref = ref
        self._branches = None
        self._biased = None
        self._terms = None

    @property
    def n(self) -> int | None:
        if self.tensors is None or "Xb" not in self.tensors:
            return None
        return int(self.tensors["Xb"].shape[0])

    @property
    def usable(self) -> bool:
        return self.tensors is not None and all(k in self.tensors for k in ("Xb", "Yb", *model.PARAM_NAMES))

    @property
    def ref(self) -> dict | None:
        if self._ref is None and self.usable:
            self._ref = _backprop(self.tensors)
        return self._ref

    @property
    def branches(self):
        if self._branches is None and self.usable:
            self._branches = branches(self.tensors, self.ref)
        return self._branches

    @property
    def biased(self):
        if self._biased is None and self.usable:
            self._biased = _backprop(self.tensors, {"bnvar": _biased_variance})
        return self._biased

    @property
    def terms(self) -> dict[str, torch.Tensor] | None:
        """{variable: entry by entry, the size of the terms its gradient adds up} (float64): the
        backward pass with every local derivative and upstream gradient replaced by the size of
        its terms. Any formulation's rounding error is a few epsilons of this (the classic
        running error bound), however much the terms cancel (dlogit_maxes, db1, dhprebn at tiny
        batches). Not finite where the chunked forward overflowed (huge logits: probs == 0)."""
        if self._terms is None and self.usable:
            t64 = {k: v.double() if v.is_floating_point() else v
                   for k, v in self.tensors.items() if isinstance(v, torch.Tensor)}
            a64 = {k: v.abs() if v.is_floating_point() else v for k, v in t64.items()}
            acc = {"loss": torch.ones((), dtype=torch.float64)}
            for name, inputs, op in reversed(model.GRAPH):
                if name == "h":  # tanh's derivative 1 - h**2 cancels where h saturates: terms 1, h**2
                    acc["hpreact"] = (1 + t64["h"] ** 2) * acc["h"]
                    continue
                if name == "hprebn":
                    # bndiff = hprebn - bnmeani carries bnmeani's rounding, eps*|bnmeani|, which is
                    # large next to bndiff where a column's values nearly agree. The fused BatchNorm
                    # backward assumes the centred values sum to zero and the chain does not: they
                    # differ by that error times the variance branch, 2*dbndiff2 (measured up to
                    # 23 eps of the other terms at batch 2 without this).
                    acc["hprebn"] = acc["hprebn"] + 2 * a64["bnmeani"] * acc["bndiff2"]
                # exp and max must see the signed values; every other line is (multi)linear or
                # has a derivative that the absolute value does not change
                src = t64 if name in ("counts", "logit_maxes") else a64
                for i, g in _vjp(name, inputs, op, src, acc[name]).items():
                    acc[i] = acc[i] + g.abs() if i in acc else g.abs()
            self._terms = acc
        return self._terms

    def terms_of(self, var: str, expected: torch.Tensor) -> torch.Tensor | None:
        """``terms[var]`` if known and shaped like ``expected``, else None (see allowed_difference)."""
        terms = self.terms
        if terms is None or var not in terms or tuple(terms[var].shape) != tuple(expected.shape):
            return None
        return terms[var]


def _scale(expected: torch.Tensor, terms: torch.Tensor | None) -> float:
    """What ``rel_error`` is relative to: the largest |expected| + terms (the gradient's size, or
    the size of what it sums when that cancels)."""
    e = expected.detach().double().abs()
    if terms is not None and tuple(terms.shape) == tuple(e.shape):
        e = e + torch.where(torch.isfinite(terms), terms.double(), torch.zeros_like(e))
    s = float(e.max()) if e.numel() else 0.0
    return s if s > 0 else 1.0


def _close(a: torch.Tensor, b: torch.Tensor, terms: torch.Tensor | None, slack: float = 1.0) -> bool:
    """Is ``a`` the gradient-like ``b`` (whose entries add up terms of size ``terms``), within
    ``slack`` times the policy's allowance? Recognises variants of a gradient (a factor, the
    other branch, ...); the verdict itself is ``within_tolerance`` with slack 1."""
    return within_tolerance(a, b, terms, slack)


def _known_factors(n: int | None, var: str) -> list[tuple[str, float]]:
    """Constant factors a learner plausibly slips by, most specific first."""
    out = []
    if n is not None and n > 1:
        bessel = [("n/(n-1) (Bessel's correction)", n / (n - 1)),
                  ("(n-1)/n (Bessel's correction)", (n - 1) / n)]
        batch = [("n", n), ("1/n", 1 / n), ("n-1", n - 1), ("1/(n-1)", 1 / (n - 1))]
        # around the variance, a Bessel slip is likelier than a batch-size one
        near_variance = var in ("bnvar", "bndiff2", "bndiff", "bnmeani", "hprebn")
        out += bessel + batch if near_variance else batch + bessel
    out += [("2", 2.0), ("1/2", 0.5)]
    return out


def _factor_mistake(got, expected, terms, n, var, known_only):
    """'sign flipped' | 'factor ...' when got == k * expected for a constant k (a known k only,
    with ``known_only``)."""
    den = float((expected * expected).sum())
    if den == 0:
        return None
    k = float((got * expected).sum()) / den
    if not 1e-2 < abs(k) < 1e3 or abs(k - 1) < 1e-3:
        return None
    if not _close(got, k * expected, None if terms is None else terms * max(1.0, abs(k)), slack=5):
        return None
    sign, mag = k < 0, abs(k)
    if sign and abs(mag - 1) < 1e-3:
        return "sign flipped"
    # at small n several names fit (n-1 = 2 at n = 3): name them all, likeliest first
    labels = [label for label, f in _known_factors(n, var) if abs(mag - f) <= 1e-3 * f]
    if labels:
        label = " or ".join(dict.fromkeys(labels))
        return f"sign flipped and factor {label}" if sign else f"factor {label}"
    if known_only:
        return None
    return f"sign flipped and factor {mag:.3g}" if sign else f"factor {mag:.3g}"


def _shape_mistake(got: torch.Tensor, exp: torch.Tensor):
    """(label, detail) for a gradient whose shape is not its variable's; detail fills its sentence."""
    gs, es = tuple(got.shape), tuple(exp.shape)
    if len(gs) == 2 and len(es) == 2 and gs == es[::-1]:
        return "transposed", {}
    if got.numel() == exp.numel():
        if tuple(d for d in es if d != 1) == gs and len(gs) < len(es):
            return "missing keepdim", {}
        return "missing .view", {}
    try:
        bshape = torch.broadcast_shapes(gs, es)
    except RuntimeError:
        bshape = None
    if bshape == gs and got.numel() > exp.numel():
        padded = (1,) * (len(gs) - len(es)) + es
        dims = tuple(d for d, (a, b) in enumerate(zip(gs, padded)) if b == 1 and a != 1)
        return "not summed over the broadcast dimension", {
            "dims": " and ".join(str(x) for x in dims) or "its broadcast dimension"}
    return None, {}


def _classify(var: str, got: torch.Tensor, exp: torch.Tensor, terms, ctx: _Context,
              branch_map: dict | None = None, biased: dict | None = None):
    """(mistake label or None, detail filling its sentence) for a same-shape, finite, wrong gradient."""
    n = ctx.n
    if not got.any():
        return "all zeros", {}
    if got.dim() == 2 and got.shape[0] == got.shape[1] and _close(got, exp.T.contiguous(),
                                                                         _transpose(terms)):
        return "transposed", {}
    if biased is not None and var in biased and _close(got, biased[var].to(exp.dtype), terms, slack=5):
        return "Bessel's correction", {}
    f = _factor_mistake(got, exp, terms, n, var, known_only=True)
    if f is not None:
        return f, {}
    if branch_map is not None and var in branch_map and len(branch_map[var]) > 1:
        for c, contribution in branch_map[var].items():
            if _close(got, contribution.to(exp.dtype), terms, slack=5):
                other = " and ".join(o for o in branch_map[var] if o != c)
                return f"missing branch through {other}", {"used": c, "other": other}
    f = _factor_mistake(got, exp, terms, n, var, known_only=False)
    return f, {}


def _diagnose(name, got, expected, ctx: _Context, *, local=None, branch_map=None, up_name=None):
    var = variable_name(name)
    expected = _reference(expected).detach()
    if got is None:
        return Diagnosis(name, "missing", hint=mistakes.sentence(var, "missing"), expected=expected)
    if not isinstance(got, torch.Tensor):
        return Diagnosis(name, "missing", mistake=f"not a tensor ({type(got).__name__})",
                         hint=mistakes.sentence(var, "missing"), expected=expected)
    got = got.detach()
    if got.shape != expected.shape:
        got = _as_dtype(got, expected.dtype)
        mistake, detail = _shape_mistake(got, expected)
        return Diagnosis(name, "wrong shape", mistake=mistake or f"shape {tuple(got.shape)}, "
                         f"expected {tuple(expected.shape)}",
                         hint=mistakes.sentence(var, mistake, **detail) if mistake else mistakes.sentence(
                             var, "wrong shape", got=tuple(got.shape), expected=tuple(expected.shape)),
                         got=got, expected=expected)
    terms = ctx.terms_of(var, expected)
    if got.dtype != expected.dtype:
        return _wrong_dtype(name, var, got, expected, terms, ctx.n)
    if not torch.isfinite(got).all():
        return Diagnosis(name, "not finite", mistake="NaN/inf (numerical stability)",
                         hint=mistakes.sentence(var, "not finite"), got=got, expected=expected)
    diff = float((got - expected).abs().max()) if got.numel() else 0.0
    common = dict(max_abs_diff=diff, rel_error=diff / _scale(expected, terms), got=got, expected=expected)
    if torch.equal(got, expected):
        return Diagnosis(name, "exact", **common)
    if within_tolerance(got, expected, terms):
        return Diagnosis(name, "close", **common)
    # Wrong. Is the learner's own line right, given the learner's upstream gradients?
    if local is not None and var in local and _close(got, local[var].to(expected.dtype), terms, slack=5):
        return Diagnosis(name, "inherited", mistake=f"inherited from d{up_name}",
                         hint=mistakes.sentence(var, "inherited", up=up_name), **common)
    # Judge the line against what it should give from the learner's own upstream, when known.
    target = local[var].to(expected.dtype) if local is not None and var in local else expected
    mistake, detail = _classify(var, got, target, terms, ctx, branch_map if branch_map is not None
                                else ctx.branches, ctx.biased)
    if mistake is None and target is not expected:
        mistake, detail = _classify(var, got, expected, terms, ctx, ctx.branches, ctx.biased)
    return Diagnosis(name, "wrong", mistake=mistake, hint=mistakes.sentence(var, mistake, **detail),
                     **common)


def _wrong_dtype(name, var, got, expected, terms, n) -> Diagnosis:
    """A gradient whose dtype is not its variable's: torch.zeros((n, 27)) is float32 whatever the
    inputs are, and in a float64 case it silently throws away half the digits."""
    values = _as_dtype(got, expected.dtype)
    finite = bool(torch.isfinite(values).all())
    diff = float((values - expected).abs().max()) if finite and values.numel() else math.nan
    # right apart from the dtype? Judged at the lower of the two precisions.
    right = None
    if got.is_floating_point() and finite:
        lower = max(got.dtype, expected.dtype, key=lambda dt: torch.finfo(dt).eps)
        if within_tolerance(values.to(lower), expected.to(lower), terms):
            right = lower
    return Diagnosis(name, "wrong dtype", max_abs_diff=diff, rel_error=diff / _scale(expected, terms),
                     mistake=f"{_dtype_name(got.dtype)}, expected {_dtype_name(expected.dtype)}",
                     hint=_dtype_sentence(var, got.dtype, expected.dtype, right),
                     got=values, expected=expected)


def _dtype_sentence(var: str, got: torch.dtype, expected: torch.dtype, right: torch.dtype | None) -> str:
    kind = (f"is {_dtype_name(got)}" if got.is_floating_point or got.is_complex
            else f"holds integers ({_dtype_name(got)})")
    right = f" Its values are right to {_dtype_name(right)} precision." if right else ""
    return mistakes.sentence(var, "wrong dtype", kind=kind, expected=_dtype_name(expected), right=right)


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (t.real if t.is_complex() else t).to(dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _transpose(terms):
    return None if terms is None else terms.T.contiguous()


_last: list = [None, None]  # (tensors, their _Context): cmp is called once per gradient on one forward


def _context(tensors: dict | None) -> _Context:
    """The analysis of ``tensors``, kept for the next call on the same dict (the notebooks' check
    cells call cmp 26 times on one ``lecture``: analysing it 26 times costs a second)."""
    if tensors is None or _last[0] is not tensors:
        _last[:] = [tensors, _Context(tensors)]
    return _last[1]


def diagnose_one(name: str, got, expected, tensors: dict | None = None) -> Diagnosis:
    """Judge one gradient ``got`` against autograd's ``expected`` (same shape as variable
    ``name``; ``"dlogits"`` and ``"logits"`` both work). With the forward ``tensors`` (as from
    ``model.autograd_reference``) it also knows the batch size n, the branches of a variable
    used twice and the Bessel-less variant, so it can name more mistakes."""
    return _diagnose(name, got, expected, _Context(tensors))


def diagnose_each(pairs: dict, tensors: dict | None = None) -> dict[str, Diagnosis]:
    """``diagnose_one`` for every ``{name: (got, expected)}`` on the same forward ``tensors``,
    which are analysed once (the grader judges 26 gradients per input this way)."""
    ctx = _Context(tensors)
    return {name: _diagnose(name, got, expected, ctx) for name, (got, expected) in pairs.items()}


def diagnose(grads: dict, tensors: dict, ref: dict, order=model.BACKWARD_ORDER) -> Report:
    """Diagnose every gradient in ``order`` (names as in ``grads``; ``dlogits`` style works).

    ``grads`` is the learner's {name: gradient}; ``tensors``/``ref`` come from
    ``model.autograd_reference``. A gradient that is wrong only because the learner's upstream
    gradients are is marked "inherited"; ``Report.first_wrong`` names the one to fix.
    """
    ref = {variable_name(k): _reference(v) for k, v in ref.items()}
    learner = {variable_name(k): v for k, v in grads.items()}
    ctx = _Context(tensors, ref)
    first = {v: _diagnose(v, learner.get(v), ref[v], ctx) for v in map(variable_name, order)}
    # Upstream as the learner has it, where usable (right shape, finite); autograd's elsewhere.
    upstream = dict(ref)
    for v, d in first.items():
        if d.status in ("exact", "close", "wrong", "wrong dtype"):
            upstream[v] = d.got  # (a wrong dtype's values, in the reference's dtype)
        elif d.status == "wrong shape" and d.mistake == "transposed":
            upstream[v] = d.got.T  # what the learner's next lines most likely used
        elif d.status == "wrong shape" and d.mistake in ("missing keepdim", "missing .view"):
            upstream[v] = d.got.reshape(ref[v].shape)
    wrong_up = {v for v, d in first.items() if not d.ok}
    local_branches = None
    if ctx.usable and wrong_up:
        local_branches = branches(tensors, upstream)
    rows = []
    for name in order:
        var = variable_name(name)
        d = first[var]
        bad_up = [c for c in CONSUMERS.get(var, ()) if c in wrong_up]
        if d.status == "wrong" and bad_up and local_branches is not None:
            local = {var: sum(local_branches[var].values())}
            d = _diagnose(var, learner.get(var), ref[var], ctx, local=local,
                          branch_map=local_branches, up_name=bad_up[0])
        d.name = name
        rows.append(d)
    return Report(rows)


def collect_gradients(scope: dict, names=model.BACKWARD_ORDER) -> dict[str, torch.Tensor]:
    """``{name: scope['d' + name]}`` for the names the scope defines (pass ``locals()``).

    Lets a learner's function return what it has computed so far; the rest shows as missing.
    """
    return {name: scope["d" + name] for name in names if "d" + name in scope}
