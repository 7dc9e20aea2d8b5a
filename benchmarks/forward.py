"""What exercise 4's training forward costs written out (``train.forward``) against running
``model.GRAPH``'s lecture lines up to the logits (``model.evaluate``) plus the same fused loss.

    python benchmarks/forward.py [--rounds 30] [--calls 300]

Batch 32, n_hidden 200, one torch thread, under ``torch.inference_mode()`` as in training. The two
are timed interleaved (``--rounds`` rounds of ``--calls`` calls each, this thread's CPU time), and the
median µs per call of each and their difference are printed. The difference is what running GRAPH
would add to every one of the 200,000 training steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from backprop_ninja import model, train


def graph_forward(params, Xb, Yb):
    values = model.evaluate({**params, "Xb": Xb, "Yb": Yb, "n": Xb.shape[0]}, until="logits")
    values["loss"] = F.cross_entropy(values["logits"], Yb)
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    params = model.init_params(model.Config(n_hidden=train.N_HIDDEN))
    g = torch.Generator().manual_seed(model.LECTURE_SEED)
    Xb = torch.randint(0, 27, (train.BATCH_SIZE, 3), generator=g)
    Yb = torch.randint(0, 27, (train.BATCH_SIZE,), generator=g)
    variants = {"train.forward (written out)": train.forward, "GRAPH lines + cross_entropy": graph_forward}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():
            for _ in range(50):
                fn(params, Xb, Yb)
        for r in range(args.rounds):
            for name in list(variants)[r % 2:] + list(variants)[:r % 2]:
                t0 = time.thread_time()
                for _ in range(args.calls):
                    variants[name](params, Xb, Yb)
                times[name].append((time.thread_time() - t0) / args.calls * 1e6)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:30s} {v:7.1f} µs per call (median of {args.rounds} rounds)")
    written, graph = med.values()
    print(f"GRAPH costs {graph - written:+.1f} µs per training step "
          f"({graph / written:.2f}x the written-out forward)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
