"""What the microseconds of one exercise-4 training step are spent on: torch calls, their fixed
cost, and arithmetic.

    python benchmarks/step_ops.py [--rounds 30] [--steps 20]

For the course's fused backward and for autograd (the same forward, update and minibatches as
``benchmarks/train_step.py``), batch 32, n_hidden 200, one torch thread:

- **ops per step**: the torch operator calls of one step, counted by ``torch.profiler``; "called"
  are those no other operator made: the step's own Python calls and, for autograd, the ones its
  engine's backward nodes make; "aten in all" adds the calls those make inside torch (an ``@`` is
  a ``matmul`` calling ``mm``; a Python number is wrapped with ``to``, ``_to_copy``, ``copy_``).
- **µs per step**: the step at full size, and the very same step on tiny tensors (batch 4,
  n_hidden 4), where arithmetic is next to nothing: what is left is the fixed cost of the calls
  (Python, argument parsing, dispatch, allocation) and of the loop. Their difference is the
  arithmetic. Both are timed interleaved (this thread's CPU time, median over ``--rounds``).
- **dispatch overhead per op**: the cheapest calls there are, each on 1-element tensors: an
  in-place ``a.add_(b)``, an ``a + b`` (which also allocates its result), a view, and ``a + 1.0``
  (a Python number: torch wraps it in a tensor and converts it on every call).
- **where the arithmetic goes**: the operators with the most self time in the profile of the
  full-size step (the profiler's own overhead inflates every figure a little).
- **the forward's tanh against its elementwise peers** on the hidden layer's (32, 200) values:
  ``tanh`` against ``sigmoid`` and ``exp``, which cost as much per value in a vectorised kernel.
  On torch 2.13's CPU build ``tanh`` costs ~6x ``sigmoid``, the same under every
  ``ATEN_CPU_CAPABILITY`` (so it is not vectorised): the largest single cost of the shared forward.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from backprop_ninja.data import lecture_data
from backprop_ninja.model import LECTURE_SEED, Config, init_params
from backprop_ninja.speed import step_times
from backprop_ninja.train import BATCH_SIZE, N_HIDDEN, make_step, minibatches, resolve, training_mode

VARIANTS = {"course": "manual", "autograd": None}
TINY = dict(batch_size=4, n_hidden=4)


def profile_steps(backward, splits, steps: int = 50):
    """Profile ``steps`` full-size steps: (calls made by the step's code, all aten calls, Counter of
    the calls made by name, Counter of self µs by operator), each per step."""
    Xtr, Ytr = splits[0]
    name, fn = resolve(backward)
    params = init_params(Config(vocab_size=int(Ytr.max()) + 1, block_size=Xtr.shape[1], n_hidden=N_HIDDEN))
    step = make_step(name, fn, params)
    batches = minibatches(Xtr, Ytr, BATCH_SIZE, torch.Generator().manual_seed(LECTURE_SEED))
    with training_mode(fn is None, params):  # warm-up, not profiled
        for _, (Xb, Yb) in zip(range(20), batches):
            step(Xb, Yb, 0.01).item()
    # the profiler starts before training_mode blocks autograd: starting it imports torch._dynamo,
    # which refuses to load while torch.autograd.grad is patched
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with training_mode(fn is None, params):
            for _, (Xb, Yb) in zip(range(steps), batches):
                step(Xb, Yb, 0.01).item()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    called = [e for e in events if not _has_aten_parent(e)]
    self_us = Counter()
    for e in events:
        self_us[e.name] += e.self_cpu_time_total / steps
    names = Counter({k: v / steps for k, v in Counter(e.name for e in called).items()})
    return len(called) / steps, len(events) / steps, names, self_us


def _has_aten_parent(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def per_call_us(fn, calls: int = 20_000, rounds: int = 7) -> float:
    """Median µs per call of ``fn`` (this thread's CPU time), after a warm-up."""
    for _ in range(1000):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        times.append((time.thread_time() - t0) / calls * 1e6)
    return statistics.median(times)


def dispatch_costs() -> dict[str, float]:
    a, b = torch.ones(1), torch.ones(1)
    with torch.inference_mode():
        return {"a.add_(b)  in place": per_call_us(lambda: a.add_(b)),
                "a + b      new tensor": per_call_us(lambda: a + b),
                "a.view(-1) a view": per_call_us(lambda: a.view(-1)),
                "a + 1.0    Python number": per_call_us(lambda: a + 1.0)}


def elementwise_costs() -> dict[str, float]:
    x = torch.randn(BATCH_SIZE, N_HIDDEN, generator=torch.Generator().manual_seed(LECTURE_SEED))
    with torch.inference_mode():
        return {"tanh": per_call_us(lambda: torch.tanh(x), calls=2000),
                "sigmoid": per_call_us(lambda: torch.sigmoid(x), calls=2000),
                "exp": per_call_us(lambda: torch.exp(x), calls=2000)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default 30)")
    ap.add_argument("--steps", type=int, default=20, help="steps per variant per round (default 20)")
    ap.add_argument("--top", type=int, default=8, help="operators listed by self time (default 8)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    splits, _ = lecture_data()

    full = {f"{k} full": v for k, v in VARIANTS.items()}
    tiny = {f"{k} tiny": v for k, v in VARIANTS.items()}
    times = step_times(full, args.steps, args.rounds, splits=splits)
    times.update(step_times(tiny, args.steps, args.rounds, splits=splits, **TINY))
    us = {k: statistics.median(v) for k, v in times.items()}
    costs = dispatch_costs()
    floor = costs["a + b      new tensor"]

    print(f"torch {torch.__version__}, 1 thread, batch {BATCH_SIZE}, n_hidden {N_HIDDEN}; "
          f"tiny = batch {TINY['batch_size']}, n_hidden {TINY['n_hidden']}; this thread's CPU time, "
          f"median of {args.rounds} interleaved rounds x {args.steps} steps.\n")
    print("dispatch overhead per op (1-element tensors):")
    for k, v in costs.items():
        print(f"  {k:28s} {v:5.2f} µs")
    profiles = {}
    print(f"\n{'per step':10s} {'called':>7s} {'aten in all':>12s} {'µs full':>8s} {'µs tiny':>8s} "
          f"{'arithmetic':>11s} {'tiny/called':>12s}")
    for k, backward in VARIANTS.items():
        called, every, names, self_us = profiles[k] = profile_steps(backward, splits)
        f, t = us[f"{k} full"], us[f"{k} tiny"]
        print(f"{k:10s} {called:7.0f} {every:12.0f} {f:8.0f} {t:8.0f} {f - t:8.0f} µs {t / called:9.2f} µs")
    print(f"\nautograd / course: {us['autograd full'] / us['course full']:.2f}x at full size, "
          f"{us['autograd tiny'] / us['course tiny']:.2f}x on tiny tensors (fixed costs only)")
    print(f"course step: {profiles['course'][0]:.0f} calls x {floor:.2f} µs (the cheapest allocating op) = "
          f"{profiles['course'][0] * floor:.0f} µs of dispatch at the least; its tiny step takes "
          f"{us['course tiny']:.0f} µs, its full step {us['course full']:.0f} µs.")
    elementwise = elementwise_costs()
    costs_us = ", ".join(f"{k} {v:.1f} µs" for k, v in elementwise.items())
    print(f"\nthe forward's tanh on ({BATCH_SIZE}, {N_HIDDEN}) values (CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}): {costs_us}; "
          f"tanh / sigmoid {elementwise['tanh'] / elementwise['sigmoid']:.1f}x")
    for k in VARIANTS:
        _, _, names, self_us = profiles[k]
        total = sum(self_us.values())
        print(f"\n{k}: operators by self time (profiled, {total:.0f} µs of aten self time per step)")
        for name, t in self_us.most_common(args.top):
            print(f"  {name:34s} {t:6.1f} µs  {names.get(name, 0):4.1f} called per step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
