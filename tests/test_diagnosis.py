"""Exercise feedback: the diagnosis names the gradient to fix and the likely mistake, and never
flags a correct formulation (stepwise, fused, index_add_, one-hot), on fresh inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from backprop_ninja import check, model
from backprop_ninja.check import diagnose, diagnose_one


def fresh(seed, dtype=torch.float32, n=32, n_hidden=64, logit_scale=1.0):
    """(tensors, ref) on inputs drawn from ``seed``, as the grader makes them (float32 by default)."""
    return model.fresh_inputs(seed, n, n_hidden, dtype, logit_scale)


def stepwise(t, dC="loop", fused_logits=False, fused_bn=False, lecture=False):
    """The lecture's exercise 1, line by line (with the alternatives a learner may choose; with
    ``lecture``, its dbnmeani as the lecture wrote it, without keepdim, reshaped afterwards)."""
    n = t["Xb"].shape[0]
    d = {}
    d["logprobs"] = torch.zeros_like(t["logprobs"])
    d["logprobs"][range(n), t["Yb"]] = -1.0 / n
    d["probs"] = (1.0 / t["probs"]) * d["logprobs"]
    d["counts_sum_inv"] = (t["counts"] * d["probs"]).sum(1, keepdim=True)
    d["counts"] = t["counts_sum_inv"] * d["probs"]
    d["counts_sum"] = (-t["counts_sum"] ** -2) * d["counts_sum_inv"]
    d["counts"] = d["counts"] + torch.ones_like(t["counts"]) * d["counts_sum"]
    d["norm_logits"] = t["counts"] * d["counts"]
    d["logits"] = d["norm_logits"].clone()
    d["logit_maxes"] = (-d["norm_logits"]).sum(1, keepdim=True)
    d["logits"] += F.one_hot(t["logits"].max(1).indices, num_classes=t["logits"].shape[1]) * d["logit_maxes"]
    if fused_logits:
        d["logits"] = F.softmax(t["logits"], 1)
        d["logits"][range(n), t["Yb"]] -= 1
        d["logits"] /= n
    d["h"] = d["logits"] @ t["W2"].T
    d["W2"] = t["h"].T @ d["logits"]
    d["b2"] = d["logits"].sum(0)
    d["hpreact"] = (1.0 - t["h"] ** 2) * d["h"]
    d["bngain"] = (t["bnraw"] * d["hpreact"]).sum(0, keepdim=True)
    d["bnraw"] = t["bngain"] * d["hpreact"]
    d["bnbias"] = d["hpreact"].sum(0, keepdim=True)
    d["bndiff"] = t["bnvar_inv"] * d["bnraw"]
    d["bnvar_inv"] = (t["bndiff"] * d["bnraw"]).sum(0, keepdim=True)
    d["bnvar"] = (-0.5 * (t["bnvar"] + 1e-5) ** -1.5) * d["bnvar_inv"]
    d["bndiff2"] = (1.0 / (n - 1)) * torch.ones_like(t["bndiff2"]) * d["bnvar"]
    d["bndiff"] += (2 * t["bndiff"]) * d["bndiff2"]
    d["hprebn"] = d["bndiff"].clone()
    d["bnmeani"] = (-d["bndiff"]).sum(0, keepdim=not lecture)
    d["hprebn"] += 1.0 / n * (torch.ones_like(t["hprebn"]) * d["bnmeani"])
    d["bnmeani"] = d["bnmeani"].view(1, -1)
    if fused_bn:
        bnvar_inv, bnraw, dh = t["bnvar_inv"], t["bnraw"], d["hpreact"]
        d["hprebn"] = t["bngain"] * bnvar_inv / n * (
            n * dh - dh.sum(0) - n / (n - 1) * bnraw * (dh * bnraw).sum(0))
    d["embcat"] = d["hprebn"] @ t["W1"].T
    d["W1"] = t["embcat"].T @ d["hprebn"]
    d["b1"] = d["hprebn"].sum(0)
    d["emb"] = d["embcat"].view(t["emb"].shape)
    if dC == "loop":
        d["C"] = torch.zeros_like(t["C"])
        for k in range(t["Xb"].shape[0]):
            for j in range(t["Xb"].shape[1]):
                d["C"][t["Xb"][k, j]] += d["emb"][k, j]
    elif dC == "index_add":
        rows = d["emb"].view(-1, d["emb"].shape[-1])
        d["C"] = torch.zeros_like(t["C"]).index_add_(0, t["Xb"].view(-1), rows)
    else:  # one-hot matmul
        onehot = F.one_hot(t["Xb"].view(-1), num_classes=t["C"].shape[0]).to(t["C"].dtype)
        d["C"] = onehot.T @ d["emb"].view(-1, d["emb"].shape[-1])
    return d


def loss_as_function_of(tensors, var):
    """The loss as a function of variable ``var`` alone: every line after ``var`` recomputed from
    ``value``, everything else as in ``tensors``."""
    names = [name for name, _, _ in model.GRAPH]
    rest = model.GRAPH if var in model.PARAM_NAMES else model.GRAPH[names.index(var) + 1:]

    def loss(value):
        values = {**tensors, var: value}
        for name, inputs, op in rest:
            values[name] = op(*(values[i] for i in inputs))
        return values["loss"]
    return loss


# Finite differences of the loss, the ways a learner might compute them (L(s): the loss with one
# entry moved by s). Each is an estimate of dloss/dvar that a tolerance must reject.
def central(L, h):
    return (L(h) - L(-h)) / (2 * h)


def fourth_order(L, h):
    return (8 * (L(h) - L(-h)) - (L(2 * h) - L(-2 * h))) / (12 * h)


def richardson(L, h):  # central differences at h and h/2, extrapolated: error O(h**4)
    return (4 * central(L, h / 2) - central(L, h)) / 3


def richardson2(L, h):  # two levels of extrapolation: error O(h**6)
    return (16 * richardson(L, h / 2) - richardson(L, h)) / 15


FD_VARIANTS = ([(central, h) for h in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)]
               + [(fourth_order, h) for h in (3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4)]
               + [(richardson, h) for h in (3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3)]
               + [(richardson2, h) for h in (1.0, 3e-1, 1e-1, 3e-2, 1e-2, 3e-3)])
# A finite difference gets these exactly, so no tolerance can reject it there: the loss is linear
# in logprobs, and does not depend on logit_maxes or b1 at all (their gradients are ~0).
FD_EXACT = ("logprobs", "logit_maxes", "b1")


def finite_differences(tensors, var, variants=FD_VARIANTS):
    """{(method name, h): the finite-difference estimate of dloss/d``var``}, in ``tensors``' dtype,
    every entry of ``var`` moved in turn (vectorised with torch.func.vmap)."""
    x = tensors[var]
    offsets = set()
    for method, h in variants:  # which moves each method needs
        method(lambda s: offsets.add(s) or 0.0, h)
    loss = torch.func.vmap(loss_as_function_of(tensors, var))
    moves = torch.eye(x.numel(), dtype=x.dtype).view(-1, *x.shape)
    offsets, at = sorted(offsets), {}
    group = max(1, 4096 // x.numel())  # forward passes per vmap call: bounded memory
    for i in range(0, len(offsets), group):
        steps = torch.tensor(offsets[i:i + group], dtype=x.dtype).view(-1, 1, *(1,) * x.dim())
        losses = loss((x + steps * moves).view(-1, *x.shape)).view(len(steps), -1)
        at.update(zip(offsets[i:i + group], losses))
    return {(method.__name__, h): method(at.__getitem__, h).view(x.shape) for method, h in variants}


CASES = [  # (seed, dtype, batch, width)
    (1, torch.float32, 32, 64), (2, torch.float64, 32, 64), (3, torch.float32, 2, 4),
    (4, torch.float32, 64, 200), (5, torch.float64, 5, 17), (6, torch.float32, 7, 100),
]
ALTERNATIVES = [dict(), dict(fused_logits=True), dict(fused_bn=True), dict(dC="index_add"),
                dict(dC="onehot", fused_logits=True, fused_bn=True)]


@pytest.mark.parametrize("seed,dtype,n,width", CASES)
def test_every_correct_formulation_passes(seed, dtype, n, width):
    tensors, ref = fresh(seed, dtype, n, width)
    for alt in ALTERNATIVES:
        report = diagnose(stepwise(tensors, **alt), tensors, ref)
        assert report.first_wrong is None, (alt, report.text())
        assert report.score == 1.0
        assert all(d.status in ("exact", "close") for d in report.rows)


def test_the_reference_itself_is_exact():
    tensors, ref = fresh(0)
    report = diagnose(ref, tensors, ref)
    assert {d.status for d in report.rows} == {"exact"}
    assert [d.name for d in report.rows] == list(model.BACKWARD_ORDER)


# (variable, how to break a correct gradient, expected status, expected mistake label (substring))
def _transpose(g, t):
    return g.T.contiguous()


MISTAKES = [
    ("W2", _transpose, "wrong shape", "transposed"),
    ("bnvar", lambda g, t: g.view(-1), "wrong shape", "missing keepdim"),
    ("counts_sum", lambda g, t: g.view(-1), "wrong shape", "missing keepdim"),
    ("emb", lambda g, t: g.view(g.shape[0], -1), "wrong shape", "missing .view"),
    ("bngain", lambda g, t: g.expand(t["Xb"].shape[0], -1) / t["Xb"].shape[0], "wrong shape",
     "not summed over the broadcast dimension"),
    ("b2", lambda g, t: g.expand(t["Xb"].shape[0], -1).clone(), "wrong shape",
     "not summed over the broadcast dimension"),
    ("h", lambda g, t: -g, "wrong", "sign flipped"),
    ("logprobs", lambda g, t: g * t["Xb"].shape[0], "wrong", "factor n"),
    ("logprobs", lambda g, t: g / t["Xb"].shape[0], "wrong", "factor 1/n"),
    ("bndiff2", lambda g, t: g * (t["Xb"].shape[0] - 1) / t["Xb"].shape[0], "wrong", "Bessel"),
    ("bnvar", lambda g, t: g * 2, "wrong", "factor 2"),
    ("hpreact", lambda g, t: g * 0.5, "wrong", "factor 1/2"),
    ("logits", lambda g, t: g * 0, "wrong", "all zeros"),
    ("b1", lambda g, t: g * float("nan"), "not finite", "NaN"),
    ("probs", lambda g, t: g + float("inf"), "not finite", "NaN/inf"),
]


@pytest.mark.parametrize("var,break_,status,label", MISTAKES, ids=[f"{m[0]}-{m[3]}" for m in MISTAKES])
@pytest.mark.parametrize("seed,dtype", [(11, torch.float32), (12, torch.float64), (13, torch.float32)])
def test_an_injected_mistake_is_named(var, break_, status, label, seed, dtype):
    tensors, ref = fresh(seed, dtype, n=16 + seed, n_hidden=24)
    grads = stepwise(tensors, dC="index_add")
    grads[var] = break_(grads[var], tensors)
    report = diagnose(grads, tensors, ref)
    assert report.first_wrong == var, report.text()
    d = report[var]
    assert d.status == status and label in d.mistake, report.text()
    assert d.hint and f"d{var}" in d.hint
    assert f"Fix d{var} first" in report.text()


def test_a_square_transpose_is_named():
    tensors, ref = fresh(21, torch.float64, n=10, n_hidden=30)  # W1 is (30, 30)
    grads = stepwise(tensors)
    grads["W1"] = grads["W1"].T.contiguous()
    assert diagnose(grads, tensors, ref)["W1"].mistake == "transposed"


@pytest.mark.parametrize("seed,dtype", [(31, torch.float32), (32, torch.float64)])
@pytest.mark.parametrize("var", check.USED_TWICE)
def test_a_missing_branch_is_named(var, seed, dtype):
    """Each variable used twice; the learner keeps only one branch (the one that matters)."""
    assert set(check.USED_TWICE) == {"counts", "bndiff", "hprebn", "logits"}
    tensors, ref = fresh(seed, dtype, n=20, n_hidden=32)
    grads = stepwise(tensors)
    parts = check.branches(tensors, ref)[var]
    # keep the larger branch (logits' branch through logit_maxes is ~0, dropping it is harmless)
    keep = max(parts, key=lambda c: float(parts[c].abs().max()))
    dropped = [c for c in parts if c != keep]
    grads[var] = parts[keep].clone()
    report = diagnose(grads, tensors, ref)
    d = report[var]
    if var == "logits":  # dropping the ~0 branch is within rounding: the lecture says so too
        assert d.ok
        grads[var] = parts["logit_maxes"].clone()
        d = diagnose(grads, tensors, ref)[var]
        dropped = ["norm_logits"]
    assert d.status == "wrong" and d.mistake == f"missing branch through {dropped[0]}", report.text()
    assert "used twice" in d.hint or "also used" in d.hint


@pytest.mark.parametrize("seed,dtype", [(41, torch.float32), (42, torch.float64)])
def test_later_gradients_are_inherited_and_the_first_is_named(seed, dtype):
    tensors, ref = fresh(seed, dtype, n=24, n_hidden=40)
    g = stepwise(tensors)
    # A learner whose dprobs has a flipped sign, and who then chains everything correctly.
    g["probs"] = -g["probs"]
    g["counts_sum_inv"] = (tensors["counts"] * g["probs"]).sum(1, keepdim=True)
    g["counts_sum"] = (-tensors["counts_sum"] ** -2) * g["counts_sum_inv"]
    g["counts"] = tensors["counts_sum_inv"] * g["probs"] + g["counts_sum"]
    g["norm_logits"] = tensors["counts"] * g["counts"]
    g["h"] = (g["norm_logits"] + 0) @ tensors["W2"].T  # fine given norm_logits (logit_maxes branch ~0)
    report = diagnose(g, tensors, ref)
    assert report.first_wrong == "probs"
    assert report["probs"].mistake == "sign flipped"
    for v in ("counts_sum_inv", "counts_sum", "counts", "norm_logits"):
        assert report[v].status == "inherited", report.text()
        assert "earlier gradient" in report[v].hint


def test_a_second_independent_mistake_after_a_wrong_upstream_is_judged_on_its_own_line():
    tensors, ref = fresh(51, torch.float64, n=12, n_hidden=20)
    g = stepwise(tensors)
    g["probs"] = 2 * g["probs"]
    g["counts_sum_inv"] = -(tensors["counts"] * g["probs"]).sum(1, keepdim=True)  # its own sign slip
    report = diagnose(g, tensors, ref)
    assert report.first_wrong == "probs"
    assert report["counts_sum_inv"].status == "wrong"
    assert report["counts_sum_inv"].mistake == "sign flipped"


def test_missing_and_non_tensor_gradients():
    tensors, ref = fresh(61)
    g = stepwise(tensors)
    del g["bnvar_inv"]
    g["b1"] = [0.0] * 64
    report = diagnose(g, tensors, ref)
    assert report["bnvar_inv"].status == "missing" and report["b1"].status == "missing"
    assert report.first_wrong == "bnvar_inv"
    assert report.score == pytest.approx(24 / 26)


@pytest.mark.parametrize("seed,dtype", [(71, torch.float32), (72, torch.float64)])
def test_fused_exercises_through_diagnose_one(seed, dtype):
    """Exercises 2 and 3 judge one gradient: dlogits and dhprebn."""
    tensors, ref = fresh(seed, dtype, n=32, n_hidden=64)
    n = tensors["Xb"].shape[0]
    good = stepwise(tensors, fused_logits=True, fused_bn=True)
    for name, var in (("dlogits", "logits"), ("dhprebn", "hprebn")):
        d = diagnose_one(name, good[var], ref[var], tensors)
        assert d.ok and d.name == name
        assert d.rel_error < 1e-3
    # exercise 2: forgetting the division by n
    d = diagnose_one("dlogits", good["logits"] * n, ref["logits"], tensors)
    assert d.status == "wrong" and d.mistake == "factor n" and "batch" in d.hint
    # exercise 3: the biased variance (1/n) instead of Bessel's 1/(n-1) inside the fused formula
    bnraw, dh = tensors["bnraw"], good["hpreact"]
    biased = tensors["bngain"] * tensors["bnvar_inv"] / n * (n * dh - dh.sum(0) - bnraw * (dh * bnraw).sum(0))
    d = diagnose_one("dhprebn", biased, ref["hprebn"], tensors)
    assert d.status == "wrong" and d.mistake == "Bessel's correction" and "n-1" in d.hint
    # without the forward tensors it still judges, it just knows less
    d = diagnose_one("dhprebn", -good["hprebn"], ref["hprebn"])
    assert d.status == "wrong" and d.mistake == "sign flipped"


def test_the_hint_never_contains_code_or_numbers_of_the_answer():
    tensors, ref = fresh(81)
    g = stepwise(tensors)
    for var, break_, *_ in MISTAKES:
        broken = dict(g, **{var: break_(g[var], tensors)})
        hint = diagnose(broken, tensors, ref)[var].hint
        assert hint.count(".") <= 4 and "=" not in hint and "torch" not in hint, hint


def test_report_text_is_deterministic_and_readable():
    tensors, ref = fresh(91)
    g = stepwise(tensors)
    g["W2"] = g["W2"].T
    a = diagnose(g, tensors, ref).text()
    b = diagnose(g, tensors, ref).text()
    assert a == b
    lines = a.splitlines()
    assert lines[0].startswith("logprobs") and ("exact" in lines[0] or "close" in lines[0])
    assert "25/26 gradients correct." in a and "Fix dW2 first:" in a
    assert "0x" not in a  # no addresses


def test_dlogit_maxes_is_judged_on_the_scale_of_what_it_sums():
    tensors, ref = fresh(101, torch.float32, n=64, n_hidden=200)
    noise = torch.full_like(ref["logit_maxes"], 1e-7)  # ~rounding noise, not a mistake
    assert diagnose_one("logit_maxes", ref["logit_maxes"] + noise, ref["logit_maxes"], tensors).ok
    wrong = ref["logit_maxes"] + ref["norm_logits"].abs().max()
    d = diagnose_one("logit_maxes", wrong, ref["logit_maxes"], tensors)
    assert d.status == "wrong" and not math.isnan(d.rel_error)


def test_inherited_mistakes_and_a_shape_slip_are_reported_side_by_side():
    tensors, ref = fresh(111, torch.float64, n=12, n_hidden=20)
    g = stepwise(tensors)
    g["h"] = g["h"] * 2  # wrong, and its (correct) consequences follow
    g["hpreact"] = (1.0 - tensors["h"] ** 2) * g["h"]
    g["emb"] = g["emb"].view(12, -1)  # wrong shape, right numbers: dC from it is right
    report = diagnose(g, tensors, ref)
    assert report.first_wrong == "h" and report["hpreact"].status == "inherited"
    assert report["emb"].status == "wrong shape" and report["emb"].mistake == "missing .view"


# --- the tolerance policy: finite differences, tiny slips, huge logits, wrong dtypes -------------

@pytest.mark.parametrize("seed,n,n_hidden", [(131, 4, 8), (132, 3, 5)])
def test_finite_differences_are_wrong_in_float64(seed, n, n_hidden):
    """Every variable of exercise 1 by finite differences of the loss (central, 4th-order,
    Richardson, several step sizes each): judged wrong, by a margin (benchmarks/tolerance.py
    has the figures). FD_EXACT are the three a finite difference gets exactly."""
    tensors, ref = fresh(seed, torch.float64, n, n_hidden)
    terms = check.gradient_terms(tensors)
    for var in model.BACKWARD_ORDER:
        if var in FD_EXACT:
            continue
        fds = finite_differences(tensors, var)
        ratios = {variant: check.tolerance_ratio(fd, ref[var], terms[var]) for variant, fd in fds.items()}
        best = min(ratios, key=lambda v: math.inf if math.isnan(ratios[v]) else ratios[v])  # nan: log(<0)
        assert ratios[best] > 5, (var, best, ratios[best])
        d = diagnose_one(var, fds[best], ref[var], tensors)
        assert d.status == "wrong", (var, best, d.line())


@pytest.mark.parametrize("var", ["logits", "h", "bngain", "hprebn", "W1", "C"])
def test_a_float64_gradient_off_by_one_part_in_ten_million_is_wrong_in_the_report_and_in_cmp(var, capsys):
    tensors, ref = fresh(141, torch.float64, n=16, n_hidden=24)
    grads = stepwise(tensors, dC="index_add")
    assert diagnose(grads, tensors, ref)[var].ok
    grads[var] = grads[var] * (1 + 1e-7)
    assert torch.allclose(grads[var], ref[var])  # what the lecture's cmp would accept
    assert diagnose(grads, tensors, ref)[var].status == "wrong"
    assert not check.cmp(var, grads[var], ref[var], tensors)
    assert "approximate: False" in capsys.readouterr().out


@pytest.mark.parametrize("seed,dtype,n,scale", [(204, torch.float32, 32, 2000.0),
                                                (205, torch.float64, 4, 20000.0)])
def test_huge_logits_are_judged_on_a_finite_tolerance(seed, dtype, n, scale):
    """Exercise 2's overflow cases: the chunked forward takes log(0), so what dlogits sums is not
    finite; the reference is F.cross_entropy's. A stable answer passes, a slip does not."""
    tensors, _ = fresh(seed, dtype, n, 64, logit_scale=scale)
    assert not torch.isfinite(tensors["logprobs"]).all()
    logits = tensors["logits"].clone().requires_grad_(True)
    F.cross_entropy(logits, tensors["Yb"]).backward()
    expected = logits.grad
    onehot = F.one_hot(tensors["Yb"], 27)
    lecture = F.softmax(tensors["logits"], 1)
    lecture[range(n), tensors["Yb"]] -= 1
    for good in (lecture / n, (F.softmax(tensors["logits"], 1) - onehot) / n):
        d = diagnose_one("dlogits", good, expected, tensors)
        assert d.ok and math.isfinite(d.rel_error), d.line()
    good = lecture / n
    for bad, label in ((-good, "sign flipped"), (good * n, "factor n")):
        d = diagnose_one("dlogits", bad, expected, tensors)
        assert d.status == "wrong" and d.mistake == label, d.line()


@pytest.mark.parametrize("bad_dtype", [torch.float32, torch.int64])
def test_a_gradient_of_the_wrong_dtype_is_named_with_what_to_do(bad_dtype):
    tensors, ref = fresh(151, torch.float64, n=8, n_hidden=16)
    grads = stepwise(tensors)
    grads["logits"] = grads["logits"].to(bad_dtype)  # e.g. made with torch.zeros((n, 27))
    report = diagnose(grads, tensors, ref)
    d = report["logits"]
    assert d.status == "wrong dtype" and not d.ok
    assert report.first_wrong == "logits" and report.score == pytest.approx(25 / 26)
    assert "zeros_like" in d.hint and "dtype" in d.hint and "float64" in d.hint
    if bad_dtype == torch.float32:  # right apart from the dtype: say so
        assert d.mistake == "float32, expected float64" and "right to float32 precision" in d.hint
    else:
        assert "integers" in d.hint and "precision" not in d.hint
