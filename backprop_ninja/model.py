"""The lecture's MLP: seeded parameters and the "chunkated" forward pass.

Every intermediate keeps its lecture name, so a learner's gradient dict, the
autograd reference and the diagnosis all speak the same language.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

LECTURE_SEED = 2147483647
BN_EPS = 1e-5

PARAM_NAMES = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")
# Exercise 1: the order in which the lecture back-propagates.
BACKWARD_ORDER = ("logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits",
                  "logit_maxes", "logits", "h", "W2", "b2", "hpreact", "bngain", "bnbias",
                  "bnraw", "bnvar_inv", "bnvar", "bndiff2", "bndiff", "bnmeani", "hprebn",
                  "embcat", "W1", "b1", "emb", "C")


@dataclass(frozen=True)
class Config:
    vocab_size: int = 27
    block_size: int = 3
    n_embd: int = 10
    n_hidden: int = 64


def init_params(cfg: Config = Config(), seed: int = LECTURE_SEED,
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The lecture's initialisation, with *every* tensor drawn from one seeded generator.

    The lecture draws bngain/bnbias from the global RNG, so its numbers cannot be
    reproduced; here they come from ``g`` too. Shapes: C (vocab, n_embd),
    W1 (block*n_embd, n_hidden), b1 (n_hidden,), W2 (n_hidden, vocab), b2 (vocab,),
    bngain/bnbias (1, n_hidden). Small non-zero biases expose wrong gradients that
    zeros would hide.
    """
    g = torch.Generator().manual_seed(seed)
    fan_in = cfg.n_embd * cfg.block_size
    p = {
        "C": torch.randn((cfg.vocab_size, cfg.n_embd), generator=g),
        "W1": torch.randn((fan_in, cfg.n_hidden), generator=g) * (5 / 3) / fan_in**0.5,
        "b1": torch.randn(cfg.n_hidden, generator=g) * 0.1,
        "W2": torch.randn((cfg.n_hidden, cfg.vocab_size), generator=g) * 0.1,
        "b2": torch.randn(cfg.vocab_size, generator=g) * 0.1,
        "bngain": torch.randn((1, cfg.n_hidden), generator=g) * 0.1 + 1.0,
        "bnbias": torch.randn((1, cfg.n_hidden), generator=g) * 0.1,
    }
    return {k: v.to(dtype) for k, v in p.items()}


def sample_batch(X: torch.Tensor, Y: torch.Tensor, batch_size: int, g: torch.Generator):
    """A minibatch (Xb (B, block), Yb (B,)) drawn with the given generator."""
    ix = torch.randint(0, X.shape[0], (batch_size,), generator=g)
    return X[ix], Y[ix]


def _nll(logprobs, Yb):
    return -logprobs[torch.arange(logprobs.shape[0]), Yb].mean()


# The forward pass, one lecture line per row: (output, inputs, operation). forward(),
# local_gradients() and the drawn computational graph all read this one table.
GRAPH = (
    ("emb", ("C", "Xb"), lambda C, Xb: C[Xb]),                       # (n, block, n_embd)
    ("embcat", ("emb",), lambda emb: emb.view(emb.shape[0], -1)),   # (n, block*n_embd)
    ("hprebn", ("embcat", "W1", "b1"), lambda embcat, W1, b1: embcat @ W1 + b1),
    ("bnmeani", ("hprebn",), lambda hprebn: 1 / hprebn.shape[0] * hprebn.sum(0, keepdim=True)),
    ("bndiff", ("hprebn", "bnmeani"), lambda hprebn, bnmeani: hprebn - bnmeani),
    ("bndiff2", ("bndiff",), lambda bndiff: bndiff**2),
    # Bessel's correction: divide by n-1
    ("bnvar", ("bndiff2",), lambda bndiff2: 1 / (bndiff2.shape[0] - 1) * bndiff2.sum(0, keepdim=True)),
    ("bnvar_inv", ("bnvar",), lambda bnvar: (bnvar + BN_EPS) ** -0.5),
    ("bnraw", ("bndiff", "bnvar_inv"), lambda bndiff, bnvar_inv: bndiff * bnvar_inv),
    ("hpreact", ("bngain", "bnraw", "bnbias"), lambda bngain, bnraw, bnbias: bngain * bnraw + bnbias),
    ("h", ("hpreact",), torch.tanh),
    ("logits", ("h", "W2", "b2"), lambda h, W2, b2: h @ W2 + b2),    # (n, vocab)
    ("logit_maxes", ("logits",), lambda logits: logits.max(1, keepdim=True).values),
    ("norm_logits", ("logits", "logit_maxes"), lambda logits, logit_maxes: logits - logit_maxes),
    ("counts", ("norm_logits",), torch.exp),
    ("counts_sum", ("counts",), lambda counts: counts.sum(1, keepdim=True)),
    ("counts_sum_inv", ("counts_sum",), lambda counts_sum: counts_sum**-1),
    ("probs", ("counts", "counts_sum_inv"), lambda counts, counts_sum_inv: counts * counts_sum_inv),
    ("logprobs", ("probs",), torch.log),
    ("loss", ("logprobs", "Yb"), _nll),
)
NOT_DIFFERENTIABLE = ("Xb", "Yb")
# Forward intermediates in the order the forward pass creates them.
FORWARD_NAMES = tuple(name for name, _, _ in GRAPH if name != "loss")


def evaluate(values: dict[str, torch.Tensor], until: str = "loss") -> dict[str, torch.Tensor]:
    """Add to ``values`` what GRAPH's lines compute on the way to ``until``, and return it.

    ``values`` holds the parameters and Xb (and Yb for the loss). Only the lines ``until``
    depends on are run, and none whose output is already given: given the calibrated
    ``bnmeani`` and ``bnvar``, the same lines compute the lecture's inference-time BatchNorm.
    """
    for name, inputs, op in _plan(until, frozenset(values)):
        values[name] = op(*(values[i] for i in inputs))
    return values


@functools.cache
def _plan(until: str, given: frozenset) -> tuple:
    """The lines of GRAPH that compute ``until`` from ``given``, in order."""
    if until != "loss" and until not in FORWARD_NAMES:
        raise ValueError(f"no line of the forward pass computes {until!r}")
    needed, plan = {until}, []
    for name, inputs, op in reversed(GRAPH):
        if name in needed and name not in given:
            plan.append((name, inputs, op))
            needed.update(inputs)
    return tuple(reversed(plan))


def forward(params: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor,
            retain_grad: bool = False) -> dict[str, torch.Tensor]:
    """The lecture's forward pass, chunkated; returns every intermediate and ``loss``.

    With ``retain_grad`` every intermediate keeps its ``.grad`` after ``loss.backward()``.
    """
    values = evaluate({**params, "Xb": Xb, "Yb": Yb})
    if retain_grad:
        for name in FORWARD_NAMES:
            values[name].retain_grad()
    return {name: values[name] for name, _, _ in GRAPH}


def vjp(out: torch.Tensor, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The vector-Jacobian product of ``out`` with ``grad_out``, as the gradient of
    ``(out * grad_out).sum()``: the same numbers as ``torch.autograd.grad(out, inputs, grad_out)``
    (mul's backward hands ``grad_out`` on unchanged), without the symbolic-shapes machinery torch
    imports on the first explicit ``grad_outputs`` (a second, in every kernel and grading job)."""
    return torch.autograd.grad((out * grad_out).sum(), inputs)


def local_gradients(tensors: dict[str, torch.Tensor], upstream: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """Each variable's gradient from its own lines' backward steps, fed ``upstream``.

    For every variable v, sum over the lines that consume v of the vector-Jacobian
    product of that line with ``upstream[output]`` (``dloss/dloss = 1``). Given the
    learner's gradients as ``upstream``, this is what each of the learner's lines
    should produce *from the learner's own inputs*, so one early mistake is not
    charged again to every line after it. ``tensors`` holds Xb, Yb, the parameters
    and the intermediates (as returned by ``autograd_reference``); every consumer's
    gradient must be in ``upstream`` with its variable's shape.
    """
    result: dict[str, torch.Tensor] = {}
    for name, inputs, op in GRAPH:
        args = [tensors[i] if i in NOT_DIFFERENTIABLE else
                tensors[i].detach().requires_grad_(True) for i in inputs]
        with torch.enable_grad():
            out = op(*args)
            grad_out = torch.ones_like(out) if name == "loss" else upstream[name]
            diff = [(i, a) for i, a in zip(inputs, args) if i not in NOT_DIFFERENTIABLE]
            grads = vjp(out, [a for _, a in diff], grad_out)
        for (i, _), g in zip(diff, grads):
            result[i] = result[i] + g if i in result else g
    return result


def autograd_reference(params: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor):
    """Run forward + ``loss.backward()`` on detached copies of ``params``.

    Returns (tensors, grads): Xb, Yb, every intermediate and parameter detached, and
    autograd's gradient of the loss for each, keyed by lecture name.
    """
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    out = forward(leaves, Xb, Yb, retain_grad=True)
    out["loss"].backward()
    tensors = {k: v.detach() for k, v in {**leaves, **out}.items()}
    tensors.update(Xb=Xb, Yb=Yb)
    grads = {k: leaves[k].grad.detach() for k in PARAM_NAMES}
    grads.update({k: out[k].grad.detach() for k in FORWARD_NAMES})
    return tensors, grads


def fresh_inputs(seed: int, n: int, n_hidden: int = 64, dtype: torch.dtype = torch.float64,
                 logit_scale: float = 1.0):
    """``autograd_reference`` on parameters and a batch of ``n`` random contexts drawn from ``seed``:
    inputs nobody has seen (the grader's hidden tests, the course's own tests). ``logit_scale``
    multiplies W2, for logits large enough that the chunked forward's exp under/overflows."""
    cfg = Config(n_hidden=n_hidden)
    params = init_params(cfg, seed=seed, dtype=dtype)
    params["W2"] = params["W2"] * logit_scale
    g = torch.Generator().manual_seed(seed + 1)
    Xb = torch.randint(0, cfg.vocab_size, (n, cfg.block_size), generator=g)
    Yb = torch.randint(0, cfg.vocab_size, (n,), generator=g)
    with torch.enable_grad():
        return autograd_reference(params, Xb, Yb)
