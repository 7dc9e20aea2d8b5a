"""Does the tolerance policy (``backprop_ninja.check``) pass every correct gradient and reject
every finite-difference one? One run, for float64 and float32:

    .venv/bin/python benchmarks/tolerance.py [--cases 200] [--quick]

- correct formulations (exercise 1 stepwise with its alternatives: fused cross-entropy, fused
  BatchNorm, dC by loop / index_add_ / one-hot matmul; the lecture's own lines; exercise 2's and
  3's one-expression answers, fed autograd's dhpreact as the grader does; the course's and the
  lecture's exercise-4 backward) on ``--cases`` fresh inputs per dtype (batch 2..64, n_hidden
  4..200), each judged against autograd's gradient and, for exercise 1, against the gradient its
  own line gives from the learner's upstream (what the grader compares with). Printed: the
  worst error as a FRACTION of the tolerance (``check.tolerance_ratio``; <= 0.1 is a 10x margin).
- finite differences of the loss (central differences, a 4th-order stencil, one and two levels
  of Richardson extrapolation, each at several step sizes h; tests/test_diagnosis.py), computed in
  float64 for every variable of exercise 1 at small shapes. Printed: the best variant's error as
  a MULTIPLE of the tolerance (>= 10 is a 10x margin), per batch size. In float32: the same
  finite differences computed in float64 and cast to float32.

Every input comes from seeded generators (``fresh(seed, dtype, batch, n_hidden)`` of
tests/test_diagnosis.py, which makes them as the grader does); one torch thread, so the
figures are the same on every run.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_diagnosis import FD_EXACT, finite_differences, fresh, stepwise  # noqa: E402

from backprop_ninja import check, model, reference  # noqa: E402

BATCHES = (2, 2, 3, 4, 5, 8, 17, 32, 64)
WIDTHS = (4, 8, 17, 64, 100, 200)
FD_CASES = [(seed, n, 8) for n in (2, 3, 4, 5, 8, 16, 32) for seed in (700 + n, 800 + n)]
FD_CASES_QUICK = [(704, 4, 8), (703, 3, 8), (702, 2, 8)]


def cross_entropy_answers(t: dict) -> dict:
    """Exercise 2: dlogits in one expression, five ways."""
    logits, Yb = t["logits"], t["Yb"]
    n = logits.shape[0]
    onehot = F.one_hot(Yb, logits.shape[1])
    lecture = F.softmax(logits, 1)
    lecture[range(n), Yb] -= 1
    lecture /= n
    counts = (logits - logits.max(1, keepdim=True).values).exp()
    by_hand = counts / counts.sum(1, keepdim=True)
    by_hand[range(n), Yb] -= 1
    return {"lecture": lecture, "one-hot": (F.softmax(logits, 1) - onehot) / n, "by hand": by_hand / n,
            "the forward's probs": (t["probs"] - onehot) * (1.0 / n),
            "log_softmax().exp()": (F.log_softmax(logits, 1).exp() - onehot) / n}


def batchnorm_answers(t: dict, dh: torch.Tensor) -> dict:
    """Exercise 3: dhprebn from dhpreact, three ways (the lecture's, the course's, a chain)."""
    n = t["Xb"].shape[0]
    bngain, bnvar_inv, bnraw = t["bngain"], t["bnvar_inv"], t["bnraw"]
    lecture = bngain * bnvar_inv / n * (n * dh - dh.sum(0) - n / (n - 1) * bnraw * (dh * bnraw).sum(0))
    course = bngain * bnvar_inv * torch.addcmul(dh - dh.sum(0, keepdim=True) / n, bnraw,
                                                (bnraw * dh).sum(0, keepdim=True), value=-1 / (n - 1))
    dbndiff = bnvar_inv * bngain * dh
    dbnvar = (-0.5 * (t["bnvar"] + 1e-5) ** -1.5) * (t["bndiff"] * bngain * dh).sum(0, keepdim=True)
    dbndiff = dbndiff + 2 * t["bndiff"] * dbnvar / (n - 1)
    return {"lecture": lecture, "course": course, "chain": dbndiff - dbndiff.sum(0, keepdim=True) / n}


def formulations(t: dict, ref: dict):
    """(label, {variable: gradient}, judged locally too?) for every correct formulation."""
    yield "ex1 stepwise, dC by loop", stepwise(t), True
    yield "ex1 stepwise, fused dlogits", stepwise(t, fused_logits=True), True
    yield "ex1 stepwise, fused dhprebn", stepwise(t, fused_bn=True), True
    yield "ex1 stepwise, dC by index_add_", stepwise(t, dC="index_add"), True
    yield "ex1 stepwise, dC by one-hot, both fused", stepwise(t, dC="onehot", fused_logits=True,
                                                              fused_bn=True), True
    yield "ex1 the lecture's lines", stepwise(t, lecture=True), True
    for label, g in cross_entropy_answers(t).items():
        yield f"ex2 {label}", {"logits": g}, False
    for label, g in batchnorm_answers(t, ref["hpreact"]).items():
        yield f"ex3 {label}", {"hprebn": g}, False
    yield "ex4 course (reference.fused_backward)", reference.fused_backward(**t), False
    yield "ex4 lecture (reference.lecture_backward)", reference.lecture_backward(**t), False


def measure_correct(dtype: torch.dtype, cases: int):
    """Worst tolerance_ratio of any correct formulation, overall and per variable."""
    rng = random.Random(0)
    worst = {2: (0.0, None), 3: (0.0, None)}  # at batch 2, and at batch >= 3
    per_var: dict[str, tuple] = {}
    for i in range(cases):
        seed, n, width = 1000 + i, rng.choice(BATCHES), rng.choice(WIDTHS)
        t, ref = fresh(seed, dtype, n, width)
        terms = check.gradient_terms(t)
        for label, grads, local_too in formulations(t, ref):
            targets = [("autograd", ref)]
            if local_too:
                targets.append(("own upstream", model.local_gradients(t, grads)))
            for against, expected in targets:
                for var, got in grads.items():
                    r = check.tolerance_ratio(got, expected[var], terms[var])
                    where = (label, against, var, seed, n, width)
                    b = min(n, 3)
                    if not r <= worst[b][0]:
                        worst[b] = (r, where)
                    if var not in per_var or not r <= per_var[var][0]:
                        per_var[var] = (r, where)
    return worst, per_var


def measure_fd(cases, dtype=torch.float64) -> list[tuple]:
    """[(ratio, variable, method, h, seed, batch, n_hidden)]: for every input, variable and method,
    its best step size h. Finite differences in float64 (cast to ``dtype``), judged against
    autograd's ``dtype`` gradient on the same inputs."""
    rows = []
    for seed, n, width in cases:
        t, ref = fresh(seed, dtype, n, width)
        terms = check.gradient_terms(t)
        t64 = {k: v.double() if v.is_floating_point() else v for k, v in t.items()}
        for var in model.BACKWARD_ORDER:
            best: dict[str, tuple] = {}
            for (method, h), g in finite_differences(t64, var).items():
                r = check.tolerance_ratio(g.to(dtype), ref[var], terms[var])
                r = math.inf if math.isnan(r) else r  # nan: a step so large that it took log(<0)
                if method not in best or r < best[method][0]:
                    best[method] = (r, var, method, h, seed, n, width)
            rows += best.values()
    return rows


def _inputs(seed, n, width, dtype):
    return f"fresh(seed={seed}, {str(dtype).removeprefix('torch.')}, batch={n}, n_hidden={width})"


def _best(rows):
    r, var, method, h, seed, n, width = min(rows)
    return f"{r:.3g}x (d{var}, {method} h={h:g}, batch {n}, seed {seed})"


def report(cases: int, fd_cases) -> None:
    print("Tolerance policy (backprop_ninja.check): entry i may differ from autograd's by\n"
          "  RTOL * max|expected| + NOISE_FACTOR * eps * (|expected_i| + terms_i)")
    for dtype in (torch.float64, torch.float32):
        print(f"  {str(dtype).removeprefix('torch.')}: RTOL {check.RTOL[dtype]:g}, "
              f"NOISE_FACTOR {check.NOISE_FACTOR[dtype]:g}")
    for dtype in (torch.float64, torch.float32):
        name = str(dtype).removeprefix("torch.")
        t0 = time.perf_counter()
        worst, per_var = measure_correct(dtype, cases)
        print(f"\n{name}: correct formulations, {cases} fresh inputs (seeds 1000..{999 + cases}, "
              f"batch {min(BATCHES)}..{max(BATCHES)}, n_hidden {min(WIDTHS)}..{max(WIDTHS)})")
        for b, (r, (label, against, var, seed, n, width)) in sorted(worst.items(), key=lambda kv: -kv[1][0]):
            print(f"  worst{' at batch 2' if b == 2 else ', batch >= 3'}: {r:.3g} of the tolerance "
                  f"({1 / r if r else math.inf:.1f}x margin): d{var}, {label}, vs {against}, "
                  f"{_inputs(seed, n, width, dtype)}")
        top = sorted(per_var.items(), key=lambda kv: -kv[1][0])[:5]
        print("  next:  " + ", ".join(f"d{v} {w[0]:.3g} (batch {w[1][4]})" for v, w in top[1:]))
        fd_in = fd_cases if dtype == torch.float64 else FD_CASES_QUICK
        rows = measure_fd(fd_in, dtype)
        how = "computed in float64" if dtype == torch.float64 else "computed in float64, cast to float32"
        print(f"{name}: finite differences ({how}), every variable of exercise 1, inputs "
              + ", ".join(f"(seed {s}, batch {b})" for s, b, _ in fd_in) + f", n_hidden {fd_in[0][2]}")
        judged = [row for row in rows if row[1] not in FD_EXACT]
        best_of = {}  # each variable's best method on each input
        for row in judged:
            best_of[row[1], row[4]] = min(best_of.get((row[1], row[4]), row), row)
        if min(best_of.values())[0] > 1:
            print(f"  best:  {_best(judged)} the tolerance: REJECTED for every variable on every input")
        else:
            least = max(best_of.values())
            print(f"  each variable's best on each input is at most {_best([least])} the tolerance: "
                  + ("ACCEPTED for every variable on every input" if least[0] <= 1 else "accepted on some"))
        batches = sorted({row[5] for row in rows})
        for method in dict.fromkeys(row[2] for row in rows):
            print(f"  {method + ':':13s} " + ", ".join(
                f"batch {b} {min(row[0] for row in judged if row[2] == method and row[5] == b):.3g}x"
                for b in batches))
        exact = [row for row in rows if row[1] in FD_EXACT]
        print("  (" + ", ".join(f"d{v}" for v in FD_EXACT) + ", which a finite difference gets exactly, "
              "are not counted: up to " + ", ".join(
                  f"d{v} {max(min(r[0] for r in exact if r[1] == v and r[4] == c[0]) for c in fd_in):.2g}x"
                  for v in FD_EXACT) + ")")
        print(f"  ({time.perf_counter() - t0:.0f} s)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200,
                        help="fresh inputs per dtype for the correct formulations")
    parser.add_argument("--quick", action="store_true",
                        help="3 float64 finite-difference inputs instead of 14 (a few seconds)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report(args.cases, FD_CASES_QUICK if args.quick else FD_CASES)


if __name__ == "__main__":
    main()
