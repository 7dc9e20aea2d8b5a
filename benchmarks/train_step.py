"""How long one exercise-4 training step takes with each backward pass.

    python benchmarks/train_step.py [--runs 5] [--rounds 100] [--steps 20] [--clock cpu|wall]
                                    [--json] [--no-memory]

Times the FULL training step (minibatch draw, forward, backward, SGD update, loss.item()),
batch 32, n_hidden 200, one torch thread, for
  (a) autograd:  forward with a graph, then loss.backward()
  (b) lecture:   the lecture's manual backward, Python double loop for dC
  (c) course:    the course's fused backward (backprop_ninja.reference.fused_backward)
All three share the same forward and update code, so only the backward (and whether the
forward records a graph) differs. The variants are interleaved: each round times
``--steps`` steps of each in turn, so load from other processes on a shared machine hits
them alike. A run is ``--rounds`` rounds; its figure per variant is the median over
rounds. ``--runs`` independent runs give the ratios a/c and b/c as min/median/max; the
µs/step figures shown (and in the JSON) are those of the median run by a/c.
The default clock is this thread's CPU time (torch runs on this one thread), which time
spent waiting for a core that other processes hold does not inflate; ``--clock wall``
times elapsed seconds instead.

Peak memory: each variant trains ``--memory-steps`` steps in a fresh subprocess (which
loads the dataset as saved tensors, so building it from Python lists does not set the
peak). It reports the resident set after one warm-up step and the peak resident set
*during training* (it sees torch's allocations, which tracemalloc does not); their
difference is what training added on top of Python, torch and the dataset. The process's
lifetime peak (``ru_maxrss``) cannot show that: importing torch sets a higher peak than
training does, so the child resets the peak (Linux: ``/proc/self/clear_refs``) before training.

With --json the last line printed is one JSON object with autograd_us, lecture_us,
course_us (median µs per step) and speedup (autograd_us / course_us).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from backprop_ninja.data import lecture_data
from backprop_ninja.speed import step_times
from backprop_ninja.train import LECTURE_STEPS, train

VARIANTS = {"autograd": None, "lecture": "lecture", "course": "manual"}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def memory_child(variant: str, steps: int, data: str) -> None:
    """Runs in a subprocess: print the resident set (MiB) after importing, after one warm-up step,
    and its peak while training ``steps`` steps."""
    imported = _maxrss_mb()
    splits, itos = torch.load(data)
    train(VARIANTS[variant], 1, splits=splits, itos=itos, progress=False, calibrate_bn=False)
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5": the peak resident set restarts from now
            f.write("5")
    except OSError as e:
        sys.exit(f"train_step: cannot reset this process's peak memory ({e}); measure with --no-memory.")
    before = _status_mb("VmRSS")
    train(VARIANTS[variant], steps, splits=splits, itos=itos, progress=False, calibrate_bn=False)
    print(json.dumps({"imported_mb": imported, "before_mb": before, "after_mb": _status_mb("VmHWM")}))


def peak_memory(steps: int) -> dict[str, dict]:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "splits.pt")
        torch.save(lecture_data(), data)
        for variant in VARIANTS:
            proc = subprocess.run([sys.executable, __file__, "--_memory-child", variant, "--memory-steps",
                                   str(steps), "--_data", data], capture_output=True, text=True)
            if proc.returncode != 0:  # the child's last line says why
                lines = proc.stderr.strip().splitlines() or [f"train_step: the {variant} memory run failed."]
                sys.exit(lines[-1])
            out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def summary(values: list[float]) -> str:
    return f"min {min(values):.2f}  median {statistics.median(values):.2f}  max {max(values):.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="independent runs (default 5)")
    ap.add_argument("--rounds", type=int, default=100, help="interleaved rounds per run (default 100)")
    ap.add_argument("--steps", type=int, default=20, help="steps per variant per round (default 20)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: this thread's CPU time (default); wall: elapsed time")
    ap.add_argument("--memory-steps", type=int, default=2000,
                    help="steps each memory subprocess trains (default 2000)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    ap.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    ap.add_argument("--_data", dest="data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.memory_steps, args.data)
        return 0

    splits, _ = lecture_data()
    print(f"torch {torch.__version__}, 1 thread, batch 32, n_hidden 200. Timed: the full step "
          f"(minibatch + forward + backward + update), {args.clock} clock; {args.runs} runs x "
          f"{args.rounds} interleaved rounds x {args.steps} steps per variant.", flush=True)
    labels = {"autograd": "(a) autograd loss.backward()", "lecture": "(b) lecture (loop dC)",
              "course": "(c) course fused backward"}
    run_medians: dict[str, list[float]] = {k: [] for k in VARIANTS}
    a_c, b_c = [], []
    t0 = time.perf_counter()
    for run in range(args.runs):
        times = step_times(VARIANTS, steps=args.steps, repeats=args.rounds, splits=splits, clock=args.clock)
        med = {k: statistics.median(v) for k, v in times.items()}
        a_c.append(med["autograd"] / med["course"])
        b_c.append(med["lecture"] / med["course"])
        for k in VARIANTS:
            run_medians[k].append(med[k])
        print(f"run {run + 1}: median µs/step " + ", ".join(f"{k} {v:.0f}" for k, v in med.items())
              + f"; (a)/(c) {a_c[-1]:.2f}, (b)/(c) {b_c[-1]:.2f}", flush=True)
    # Report the median run (by its (a)/(c) ratio): runs differ by how busy the machine was,
    # and one run's figures were measured side by side, so its ratio is its figures' ratio.
    middle = sorted(range(args.runs), key=lambda r: a_c[r])[(args.runs - 1) // 2]
    med = {k: v[middle] for k, v in run_medians.items()}
    print(f"({time.perf_counter() - t0:.0f} s)\n")
    print(f"{f'median run (run {middle + 1})':28s} {'µs/step':>15s} {'200k steps':>11s}")
    for k, label in labels.items():
        print(f"{label:28s} {med[k]:15.0f} {med[k] * LECTURE_STEPS / 1e6:9.0f} s")
    print(f"\n(a)/(c) course backward vs autograd, over runs:       {summary(a_c)}")
    print(f"(b)/(c) course backward vs the lecture's loop dC:     {summary(b_c)}")

    result = {"autograd_us": round(med["autograd"], 1), "lecture_us": round(med["lecture"], 1),
              "course_us": round(med["course"], 1),
              "speedup": round(med["autograd"] / med["course"], 3),
              "speedup_runs": {"min": round(min(a_c), 3), "median": round(statistics.median(a_c), 3),
                               "max": round(max(a_c), 3)},
              "lecture_speedup": round(med["lecture"] / med["course"], 3),
              "clock": args.clock,
              "projected_200k_s": {k: round(v * LECTURE_STEPS / 1e6, 1) for k, v in med.items()}}
    if not args.no_memory:
        mem = peak_memory(args.memory_steps)
        print(f"\nresident memory of a fresh process training {args.memory_steps} steps ('added': its peak "
              "while training minus its resident set before):")
        for k, label in labels.items():
            peak, added = mem[k]["after_mb"], mem[k]["after_mb"] - mem[k]["before_mb"]
            print(f"{label:28s} training peak {peak:7.1f} MiB   added {added:6.1f} MiB   "
                  f"(peak while importing python + torch: {mem[k]['imported_mb']:.1f} MiB)")
        result["training_peak_rss_mb"] = {k: round(m["after_mb"], 1) for k, m in mem.items()}
        result["added_rss_mb"] = {k: round(m["after_mb"] - m["before_mb"], 1) for k, m in mem.items()}
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
