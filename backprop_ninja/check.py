"""Compare a learner's gradient with autograd's: the lecture's ``cmp``, made shape-aware,
and ``diagnose``, which says *which* gradient is wrong, and the most likely reason why.

A diagnosis never prints the right answer: it names a mistake (a shape, a transpose,
a sign, a constant factor, a forgotten branch, an overflow) and gives a plain hint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from backprop_ninja import model


def _reference(t: torch.Tensor) -> torch.Tensor:
    """Accept either a tensor whose ``.grad`` autograd filled (lecture style) or a gradient."""
    if isinstance(t, torch.Tensor) and t.grad is not None:
        return t.grad
    return t


def cmp(s: str, dt, t) -> bool:
    """Print the lecture's line ``name | exact | approximate | maxdiff``; return approximate.

    Unlike the lecture's version it checks the shape first: ``torch.allclose``
    broadcasts, so a (64,) gradient against a (1, 64) one would pass silently.
    """
    ref = _reference(t)
    if not isinstance(dt, torch.Tensor):
        print(f"{s:15s} | not a tensor: got {type(dt).__name__}, expected shape "
              f"{tuple(ref.shape)}")
        return False
    if dt.shape != ref.shape:
        print(f"{s:15s} | wrong shape: {tuple(dt.shape)}, expected {tuple(ref.shape)}")
        return False
    dt = dt.to(ref.dtype)
    ex = torch.all(dt == ref).item()
    app = torch.allclose(dt, ref)
    maxdiff = (dt - ref).abs().max().item()
    print(f"{s:15s} | exact: {str(ex):5s} | approximate: {str(app):5s} | maxdiff: {maxdiff}")
    return bool(app)


# ----------------------------------------------------------------------------------------
# Diagnosis
# ----------------------------------------------------------------------------------------

STATUSES = ("exact", "close", "wrong", "wrong shape", "missing", "not finite", "inherited")
OK_STATUSES = ("exact", "close")

# Allowed max |got - expected|, relative to the gradient's scale (see _scale). Every correct
# formulation (stepwise, fused, index_add_, one-hot matmul) lands far below; the smallest
# real mistake (Bessel's n/(n-1) at n=64, 1.6%) lands far above.
RTOL = {torch.float64: 1e-8, torch.float32: 2e-4}
RTOL_OTHER = 2e-2  # half precision and friends
# Plus this many epsilons of the magnitude of the terms a gradient sums (_Context.magnitudes).
# Correct alternatives (stepwise, fused cross-entropy, fused BatchNorm, index_add_/one-hot dC)
# measured up to 6.7 (fused BatchNorm at batch 2, all cancellation; batch 2..64, width 4..200,
# both dtypes). At batch 32 the terms are at most ~150x the gradient (dC), so this adds <0.1%.
NOISE_FACTOR = 50.0

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
        gs = torch.autograd.grad(out, [a for _, a in diff], grad_outputs=grad_out.to(out.dtype))
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
        self._magnitudes = None

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
    def magnitudes(self) -> dict | None:
        """{variable: the sum of the absolute values of every term its gradient adds up}: the
        backward pass with every local derivative and upstream gradient replaced by its absolute
        value. Any formulation's rounding error is a few epsilons of this (the classic running
        error bound), however much the terms cancel (dlogit_maxes, db1, dhprebn at tiny batches)."""
        if self._magnitudes is None and self.usable:
            t64 = {k: v.double() if v.is_floating_point() else v for k, v in self.tensors.items()}
            a64 = {k: v.abs() if v.is_floating_point() else v for k, v in t64.items()}
            acc = {"loss": torch.ones((), dtype=torch.float64)}
            for name, inputs, op in reversed(model.GRAPH):
                # exp and max must see the signed values; every other line is (multi)linear or
                # has a derivative that the absolute value does not change
                src = t64 if name in ("counts", "logit_maxes") else a64
                for i, g in _vjp(name, inputs, op, src, acc[name]).items():
                    acc[i] = acc[i] + g.abs() if i in acc else g.abs()
            self._magnitudes = {k: float(v.max()) if v.numel() else 0.0 for k, v in acc.items()}
        return self._magnitudes

    def scale(self, var: str, expected: torch.Tensor) -> float:
        """What a difference is relative to: the reference's largest entry, plus the rounding
        error any formulation may make (NOISE_FACTOR epsilons of the terms' magnitude), as
        a multiple of RTOL."""
        s = float(expected.abs().max()) if expected.numel() else 0.0
        mags = self.magnitudes
        if mags is not None and var in mags:
            eps = torch.finfo(expected.dtype).eps if expected.is_floating_point() else 0.0
            s += NOISE_FACTOR * eps * mags[var] / _rtol(expected.dtype)
        return s if s > 0 else 1.0


def _rtol(dtype: torch.dtype) -> float:
    return RTOL.get(dtype, RTOL_OTHER)


def _close(a: torch.Tensor, b: torch.Tensor, scale: float, slack: float = 1.0) -> bool:
    if a.shape != b.shape:
        return False
    return float((a - b).abs().max()) <= slack * _rtol(b.dtype) * scale if a.numel() else True


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


def _factor_mistake(got, expected, scale, n, var, known_only):
    """'sign flipped' | 'factor ...' when got == k * expected for a constant k (a known k only,
    with ``known_only``)."""
    den = float((expected * expected).sum())
    if den == 0:
        return None
    k = float((got * expected).sum()) / den
    if not 1e-2 < abs(k) < 1e3 or abs(k - 1) < 1e-3:
        return None
    if not _close(got, k * expected, scale * max(1.0, abs(k)), slack=5):
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
    """(label, detail) for a gradient whose shape is not its variable's."""
    gs, es = tuple(got.shape), tuple(exp.shape)
    if len(gs) == 2 and len(es) == 2 and gs == es[::-1]:
        return "transposed", None
    if got.numel() == exp.numel():
        if tuple(d for d in es if d != 1) == gs and len(gs) < len(es):
            return "missing keepdim", None
        return "missing .view", None
    try:
        bshape = torch.broadcast_shapes(gs, es)
    except RuntimeError:
        bshape = None
    if bshape == gs and got.numel() > exp.numel():
        padded = (1,) * (len(gs) - len(es)) + es
        dims = tuple(d for d, (a, b) in enumerate(zip(gs, padded)) if b == 1 and a != 1)
        return "not summed over the broadcast dimension", dims
    return None, None


FUSED_NAMES = ("dlogits", "dhprebn")  # exercises 2 and 3 have their own progressive hints


def _hint(var: str, mistake: str | None, n: int | None, detail=None, status: str = "wrong",
          name: str | None = None) -> str:
    d = f"d{var}"
    if status == "missing":
        return f"{d} is missing: return a gradient (a tensor shaped like {var}) for every variable."
    if status == "not finite":
        return (f"{d} contains NaN or inf: something overflowed or divided by zero. Exponentiate "
                "logits only after subtracting each row's maximum, as the forward pass does, and "
                "never divide by a value that can be zero.")
    if mistake == "missing keepdim":
        return (f"{d} lost a dimension that {var} has. A gradient always has its variable's shape: "
                "keep the summed dimension (keepdim) so it broadcasts the way the forward pass did.")
    if mistake == "missing .view":
        return (f"{d} holds the right number of entries in the wrong shape. A gradient always has "
                f"its variable's shape: reshape it (.view) to the shape of {var}.")
    if mistake == "not summed over the broadcast dimension":
        dims = " and ".join(str(x) for x in detail) if detail else "its broadcast dimension"
        return (f"In the forward pass {var} was broadcast (copied) along dimension {dims}, so every "
                f"copy sends a gradient back: add them up along that dimension so {d} has {var}'s shape.")
    if mistake == "transposed":
        return (f"{d} looks like the transpose of the right gradient. Check the order of the "
                "matrix product and which operand is transposed, so that the shapes line up "
                f"with {var}'s.")
    if mistake == "all zeros":
        return f"{d} is all zeros: the placeholder was not replaced, or no gradient reaches {var}."
    if mistake == "sign flipped":
        return (f"{d} has the opposite sign to the right gradient. Check the sign of the local "
                "derivative: a subtraction, a negative power, or the minus in front of the mean.")
    if mistake == "Bessel's correction":
        return (f"{d} matches BatchNorm with the biased variance (1/n). The forward pass divides by "
                "n-1 (Bessel's correction); the backward pass must use the same factor.")
    if mistake and mistake.startswith("missing branch"):
        used, other = detail
        return (f"{d} holds only the gradient that flows back through {used}. {var} is also used by "
                f"{other}, and a variable used twice receives the sum of both branches' gradients.")
    if mistake and "factor" in mistake:
        label = mistake.split("factor ", 1)[1].split(" or ")[0]
        why = {
            "n": "a division by the batch size is missing (the loss is a mean over the batch).",
            "1/n": "the gradient was divided by the batch size once too often.",
            "n-1": "a 1/(n-1) from the variance is missing.",
            "1/(n-1)": "the 1/(n-1) of the variance was applied once too often.",
            "2": "check the derivative of a square (the power rule) and any factor applied twice.",
            "1/2": "check the derivative of a square or of a power (the power rule brings the "
                   "exponent down).",
        }
        if "Bessel" in label:
            reason = ("the variance uses Bessel's correction, 1/(n-1), not 1/n: use the same "
                      "factor as the forward pass.")
        else:
            reason = why.get(label, "a constant is missing or extra in the local derivative.")
        sign = "with the opposite sign and " if mistake.startswith("sign flipped and") else ""
        return f"{d} is {sign}{label} times the right gradient: {reason}"
    if mistake and mistake.startswith("inherited"):
        up = detail
        return (f"{d} follows correctly from your d{up}; it is wrong only because an earlier "
                "gradient is. Fix the first wrong gradient and this one will follow.")
    return (f"{d} does not match autograd. Work out the local derivative of the line that uses "
            f"{var}, multiply it by the upstream gradient, and add up every branch; "
            f"hint(\"{name if name in FUSED_NAMES else var}\") "
            "gives step-by-step help.")


def _classify(var: str, got: torch.Tensor, exp: torch.Tensor, scale: float, ctx: _Context,
              branch_map: dict | None = None, biased: dict | None = None):
    """(mistake label or None, detail) for a same-shape, finite, wrong gradient."""
    n = ctx.n
    if not got.any():
        return "all zeros", None
    if got.dim() == 2 and got.shape[0] == got.shape[1] and _close(got, exp.T.contiguous(), scale):
        return "transposed", None
    if biased is not None and var in biased and _close(got, biased[var].to(exp.dtype), scale, slack=5):
        return "Bessel's correction", None
    f = _factor_mistake(got, exp, scale, n, var, known_only=True)
    if f is not None:
        return f, None
    if branch_map is not None and var in branch_map and len(branch_map[var]) > 1:
        for c, contribution in branch_map[var].items():
            if _close(got, contribution.to(exp.dtype), scale, slack=5):
                other = " and ".join(o for o in branch_map[var] if o != c)
                return f"missing branch through {other}", (c, other)
    f = _factor_mistake(got, exp, scale, n, var, known_only=False)
    return f, None


def _diagnose(name, got, expected, ctx: _Context, *, local=None, branch_map=None, up_name=None):
    var = variable_name(name)
    expected = _reference(expected).detach()
    if got is None:
        return Diagnosis(name, "missing", hint=_hint(var, None, ctx.n, status="missing"), expected=expected)
    if not isinstance(got, torch.Tensor):
        return Diagnosis(name, "missing", mistake=f"not a tensor ({type(got).__name__})",
                         hint=_hint(var, None, ctx.n, status="missing"), expected=expected)
    got = got.detach().to(expected.dtype)
    scale = ctx.scale(var, expected)
    if got.shape != expected.shape:
        mistake, detail = _shape_mistake(got, expected)
        return Diagnosis(name, "wrong shape", mistake=mistake or f"shape {tuple(got.shape)}, "
                         f"expected {tuple(expected.shape)}",
                         hint=_hint(var, mistake, ctx.n, detail) if mistake else
                         (f"d{var} has shape {tuple(got.shape)} but {var} has shape "
                          f"{tuple(expected.shape)}: a gradient always has its variable's shape."),
                         got=got, expected=expected)
    if not torch.isfinite(got).all():
        return Diagnosis(name, "not finite", mistake="NaN/inf (numerical stability)",
                         hint=_hint(var, None, ctx.n, status="not finite"), got=got, expected=expected)
    diff = float((got - expected).abs().max()) if got.numel() else 0.0
    rel = diff / scale
    common = dict(max_abs_diff=diff, rel_error=rel, got=got, expected=expected)
    if torch.equal(got, expected):
        return Diagnosis(name, "exact", **common)
    if diff <= _rtol(expected.dtype) * scale:
        return Diagnosis(name, "close", **common)
    # Wrong. Is the learner's own line right, given the learner's upstream gradients?
    if local is not None and var in local and _close(got, local[var].to(expected.dtype), scale, slack=5):
        return Diagnosis(name, "inherited", mistake=f"inherited from d{up_name}",
                         hint=_hint(var, "inherited", ctx.n, up_name), **common)
    # Judge the line against what it should give from the learner's own upstream, when known.
    target = local[var].to(expected.dtype) if local is not None and var in local else expected
    mistake, detail = _classify(var, got, target, scale, ctx, branch_map if branch_map is not None
                                else ctx.branches, ctx.biased)
    if mistake is None and target is not expected:
        mistake, detail = _classify(var, got, expected, scale, ctx, ctx.branches, ctx.biased)
    return Diagnosis(name, "wrong", mistake=mistake, hint=_hint(var, mistake, ctx.n, detail, name=name),
                     **common)


def diagnose_one(name: str, got, expected, tensors: dict | None = None) -> Diagnosis:
    """Judge one gradient ``got`` against autograd's ``expected`` (same shape as variable
    ``name``; ``"dlogits"`` and ``"logits"`` both work). With the forward ``tensors`` (as from
    ``model.autograd_reference``) it also knows the batch size n, the branches of a variable
    used twice and the Bessel-less variant, so it can name more mistakes."""
    return _diagnose(name, got, expected, _Context(tensors))


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
        if d.status in ("exact", "close", "wrong"):
            upstream[v] = d.got
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
