"""Would ``torch.compile`` pay for exercise 4's 200,000 steps? The course step and the autograd step,
each eager and compiled, measured in one run.

    python benchmarks/compile_step.py [--rounds 40] [--steps 20]

Batch 32, n_hidden 200, one torch thread, the same forward (``train.forward``), minibatches and
update as ``benchmarks/train_step.py``:
  course:   forward + ``reference.fused_backward`` under ``torch.inference_mode()``
  autograd: forward with a graph, ``loss.backward()``
Compiled, ``torch.compile`` (inductor, default mode) traces the course's forward and backward as one
graph, and autograd's forward (AOTAutograd then compiles its backward on the first
``loss.backward()``); the SGD update stays the same eager ``torch._foreach_add_`` everywhere.
Compile time: the wall time of the first compiled step minus an eager step, compiled from scratch
(inductor's caches go to a new temporary directory; a warm cache would hide the C++ builds). Per
step: this thread's
CPU time, median of ``--rounds`` interleaved rounds. Break-even: the steps after which the time the
compiled step saves has paid for its compilation; it pays for the lecture's run only below 200,000.
Inductor needs a C++ compiler on CPU; without one the script says so and stops.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings

import torch

from backprop_ninja.data import lecture_data
from backprop_ninja.model import LECTURE_SEED, PARAM_NAMES, Config, init_params
from backprop_ninja.reference import fused_backward
from backprop_ninja.train import BATCH_SIZE, LECTURE_STEPS, N_HIDDEN, forward, minibatches


def course_body(params, Xb, Yb):
    tensors = forward(params, Xb, Yb)
    grads = fused_backward(**tensors)
    return tensors["loss"], [grads[k] for k in PARAM_NAMES]


def loss_of(params, Xb, Yb):
    return forward(params, Xb, Yb)["loss"]


def make_runner(kind: str, fn, splits):
    """A function running ``k`` steps of ``kind`` ("course" or "autograd") with ``fn``; returns the losses."""
    Xtr, Ytr = splits[0]
    params = init_params(Config(vocab_size=int(Ytr.max()) + 1, block_size=Xtr.shape[1], n_hidden=N_HIDDEN),
                         LECTURE_SEED)
    plist = [params[k] for k in PARAM_NAMES]
    batches = minibatches(Xtr, Ytr, BATCH_SIZE, torch.Generator().manual_seed(LECTURE_SEED))
    if kind == "autograd":
        for p in plist:
            p.requires_grad_(True)

    def run(k: int) -> list[float]:
        losses = []
        if kind == "course":
            with torch.inference_mode():
                for _, (Xb, Yb) in zip(range(k), batches):
                    loss, grads = fn(params, Xb, Yb)
                    torch._foreach_add_(plist, grads, alpha=-0.1)
                    losses.append(loss.item())
        else:
            for _, (Xb, Yb) in zip(range(k), batches):
                loss = fn(params, Xb, Yb)
                for p in plist:
                    p.grad = None
                loss.backward()
                with torch.no_grad():
                    torch._foreach_add_(plist, [p.grad for p in plist], alpha=-0.1)
                losses.append(loss.item())
        return losses
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40, help="interleaved rounds (default 40)")
    ap.add_argument("--steps", type=int, default=20, help="steps per variant per round (default 20)")
    args = ap.parse_args(argv)
    if shutil.which("g++") is None and shutil.which("c++") is None:
        print("no C++ compiler (g++ or c++) on PATH: torch.compile's inductor cannot build CPU kernels here.")
        return 1
    torch.set_num_threads(1)
    splits, _ = lecture_data()
    # train.forward's 0-dim constants come from a functools.cache; dynamo traces through it and
    # says so once. They depend only on (n, dtype), which the compiled graph's guards cover.
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    runners = {"course": make_runner("course", course_body, splits),
               "autograd": make_runner("autograd", loss_of, splits),
               "course compiled": make_runner("course", torch.compile(course_body), splits),
               "autograd compiled": make_runner("autograd", torch.compile(loss_of), splits)}

    compile_s, same = {}, {}
    for kind in ("course", "autograd"):
        t0 = time.perf_counter()
        eager = runners[kind](1)
        eager_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled = runners[f"{kind} compiled"](1)  # traces and compiles
        compile_s[kind] = time.perf_counter() - t0 - eager_s
        eager += runners[kind](49)
        compiled += runners[f"{kind} compiled"](49)
        same[kind] = max(abs(a - b) for a, b in zip(eager, compiled))

    labels = list(runners)
    times: dict[str, list[float]] = {k: [] for k in labels}
    for r in range(args.rounds):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            t0 = time.thread_time()
            runners[label](args.steps)
            times[label].append((time.thread_time() - t0) / args.steps * 1e6)
    us = {k: statistics.median(v) for k, v in times.items()}

    print(f"torch {torch.__version__}, 1 thread, batch {BATCH_SIZE}, n_hidden {N_HIDDEN}; this thread's CPU "
          f"time, median of {args.rounds} interleaved rounds x {args.steps} steps.\n")
    print(f"{'':20s} {'µs/step':>8s} {'compile':>9s} {'200k steps':>11s} {'break-even':>12s}")
    for label in labels:
        kind = label.split()[0]
        if label == kind:
            print(f"{label:20s} {us[label]:8.0f} {'':9s} {us[label] * LECTURE_STEPS / 1e6:9.0f} s")
            continue
        saved = us[kind] - us[label]
        total = compile_s[kind] + us[label] * LECTURE_STEPS / 1e6
        even = f"{compile_s[kind] / saved * 1e6:10.0f}" if saved > 0 else "     never"
        print(f"{label:20s} {us[label]:8.0f} {compile_s[kind]:7.1f} s {total:9.0f} s {even} steps")
    print(f"\nautograd / course: eager {us['autograd'] / us['course']:.2f}x, "
          f"compiled {us['autograd compiled'] / us['course compiled']:.2f}x; "
          f"course compiled vs eager {us['course'] / us['course compiled']:.2f}x")
    print("largest loss difference, compiled vs eager, over the first 50 steps: "
          + ", ".join(f"{k} {v:.1e}" for k, v in same.items()))
    return 0


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read when inductor first compiles
        raise SystemExit(main())
