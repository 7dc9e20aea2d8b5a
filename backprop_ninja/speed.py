"""How fast a training step is: microseconds per full step (minibatch, forward, backward,
update) of any backward, timed against autograd. Notebook 04's ``compare_speed`` and
``benchmarks/train_step.py`` measure with this one function.
"""

from __future__ import annotations

import statistics
import time

import torch

from backprop_ninja import UserError
from backprop_ninja.data import lecture_data
from backprop_ninja.model import LECTURE_SEED, Config, init_params
from backprop_ninja.train import BATCH_SIZE, N_HIDDEN, make_step, minibatches, resolve, training_mode


def step_times(backwards: dict[str, object], steps: int = 200, repeats: int = 7, *,
               seed: int = LECTURE_SEED, n_hidden: int = N_HIDDEN, batch_size: int = BATCH_SIZE,
               splits=None, warmup: int = 50, clock: str = "cpu") -> dict[str, list[float]]:
    """Microseconds per full training step (minibatch, forward, backward, update) of each backward.

    The variants are timed *interleaved*: ``repeats`` rounds, each timing ``steps``
    steps of every variant in turn (order rotated each round), so a neighbour's load
    on a shared machine hits them alike. ``clock="cpu"`` counts the CPU time of this
    thread (torch runs on it alone here), which time spent waiting for a busy core does
    not inflate; ``"wall"`` counts elapsed time. Returns name -> list of µs/step, one per round.
    """
    if clock not in ("cpu", "wall"):
        raise UserError(f"clock must be 'cpu' or 'wall', got {clock!r}.")
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    if splits is None:
        splits, _ = lecture_data()
    Xtr, Ytr = splits[0]
    cfg = Config(vocab_size=int(Ytr.max()) + 1, block_size=Xtr.shape[1], n_hidden=n_hidden)
    runners = {}
    for label, backward in backwards.items():
        name, fn = resolve(backward)
        params = init_params(cfg, seed)
        runners[label] = (fn is None, params, make_step(name, fn, params),
                          minibatches(Xtr, Ytr, batch_size, torch.Generator().manual_seed(seed)))

    def run(label, k):
        autograd, params, step, batches = runners[label]
        with training_mode(autograd, params):
            t0 = timer()
            for _, (Xb, Yb) in zip(range(k), batches):
                step(Xb, Yb, 0.01).item()
            return (timer() - t0) / k * 1e6

    labels = list(runners)
    for label in labels:
        run(label, warmup)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            times[label].append(run(label, steps))
    return times


def compare_speed(backward, steps: int = 200, repeats: int = 5, **kw) -> dict:
    """Median µs/step of ``backward`` and of autograd, timed interleaved, and their ratio."""
    times = step_times({"yours": backward, "autograd": None}, steps, repeats, **kw)
    yours, auto = statistics.median(times["yours"]), statistics.median(times["autograd"])
    return {"yours_us": yours, "autograd_us": auto, "speedup": auto / yours}
