"""Progressive hints for a stuck learner, one exercise at a time.

Each notebook's set-up cell binds ``hint = Hints(exercise=N)``; ``hint("dbnvar")`` (or
``hint("bnvar")``) then shows the next hint for that gradient *of this exercise*: its shape,
then the local derivative, then how it chains with the gradient flowing in. Words and
maths, never code, never a solution's right-hand side.

Beside every hint's words the table keeps what those words compute, as a ``Check`` on the
forward tensors: never shown, evaluated by tests/test_hints.py against autograd on fresh
inputs, so a hint that misleads fails a test instead of a learner.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backprop_ninja import UserError, check, in_notebook, model

# ----------------------------------------------------------------------------------------
# The table's shape: exercise -> {variable: Gradient}; a Gradient is its hints in order, and
# each hint (a Step) carries the Checks of what its words state.
# ----------------------------------------------------------------------------------------


class Forward(dict):
    """The forward pass's tensors by lecture name (``t.h``, ``t["h"]``) and the batch size ``t.n``."""

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Autograd(dict):
    """autograd's gradients of the loss by lecture name (``d.h`` is dloss/dh, ``d.loss`` is 1), and
    what one line (``line``) or every path (``path``) from a variable to a later one sends back."""

    def __init__(self, tensors: dict, grads: dict):
        one = torch.ones((), dtype=tensors["logprobs"].dtype)
        super().__init__(grads, loss=one)
        self._tensors = tensors
        self._branches = None

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def line(self, var: str, out: str) -> torch.Tensor:
        """The gradient ``var`` receives through the one line that computes ``out``."""
        if self._branches is None:
            self._branches = check.branches(self._tensors, self)
        return self._branches[var][out]

    def path(self, var: str, out: str) -> torch.Tensor:
        """The gradient ``var`` receives from ``dout`` along every path from ``var`` to ``out``."""
        leaf = self._tensors[var].detach().clone().requires_grad_(True)
        values = {**self._tensors, var: leaf}
        with torch.enable_grad():
            for name, inputs, op in model.GRAPH:
                if name != var:
                    values[name] = op(*(values[i] for i in inputs))
                if name == out:
                    break
            return model.vjp(values[out], [leaf], self[out])[0]


Expr = Callable[[Forward, Autograd], torch.Tensor]


@dataclass(frozen=True)
class Check:
    """Never shown: what a hint's words compute (``says``), in terms of the forward tensors ``t`` and
    autograd's upstream gradients ``d``, and the autograd value it must equal (``equals``; by
    default autograd's gradient of the hint's variable). ``scale``: ``equals`` is that many times
    (part of) the variable's gradient, which scales the tolerance."""

    says: Expr
    equals: Expr | None = None
    scale: Callable[[Forward], float] | None = None

    def run(self, var: str, tensors: dict, grads: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the words give, what autograd gives) on these forward tensors and gradients."""
        t = Forward(tensors, n=int(tensors["Xb"].shape[0]))
        d = Autograd(tensors, grads)
        return self.says(t, d), (self.equals or (lambda t, d: d[var]))(t, d)


@dataclass(frozen=True)
class Step:
    """One hint: the words the learner reads, and the checks of the formulas they state."""

    text: str
    checks: tuple[Check, ...] = ()


@dataclass(frozen=True)
class Gradient:
    """The hints for one gradient, shown in order. ``shape`` (in the first hint's words, with
    ``n``, ``n_hidden`` and numbers) is checked against the variable's real shape."""

    var: str
    shape: str
    steps: tuple[Step, ...]


def _sum_to(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Add ``x`` up over the dimensions that broadcasting added or stretched, down to ``shape``."""
    while x.dim() > len(shape):
        x = x.sum(0)
    for i, size in enumerate(shape):
        if size == 1 and x.shape[i] != 1:
            x = x.sum(i, keepdim=True)
    return x


def _local(var: str, out: str, derivative: Callable[[Forward], torch.Tensor]) -> Check:
    """The claim "the line computing ``out`` has local derivative ``derivative`` with respect to ``var``"
    (entry by entry, on the broadcast shape): chained with dout, it gives that line's branch of dvar."""
    return Check(says=lambda t, d: _sum_to(derivative(t) * d[out], t[var].shape),
                 equals=lambda t, d: d.line(var, out))


def _gradient(says: Expr) -> Check:
    """The claim "following the words gives dvar"."""
    return Check(says=says)


def _shape(var: str, shape: str, more: str = "") -> Step:
    return Step(f"d{var} has the shape of {var}, {shape}{more}")


def _ones(var: str) -> Callable[[Forward], torch.Tensor]:
    return lambda t: torch.ones_like(t[var])


def _broadcast(var: str, what: str, aside: str = "") -> str:
    """The rule for a variable broadcast in the forward pass: its gradient adds up the copies'."""
    return (f"Every one of the {what}{aside} used its own copy of {var}, and every copy sends a gradient "
            f"back: add them up over the {what}")


def _broadcast_operand(var: str, out: str, other: str | None, shape: str, unit: str, local: str,
                       copies: tuple[str, str], dim: int, keeps: str) -> Gradient:
    """The gradient of an operand broadcast in ``out = other * var`` (``out = x - var`` when
    ``other`` is None): the local derivative is ``other`` (or −1), and the copies' gradients
    are added up over dimension ``dim``."""
    if other is None:
        derivative, first = (lambda t: -torch.ones_like(t[out])), f"Take minus d{out}. "
        gradient = lambda t, d: -d[out].sum(dim, keepdim=True)  # noqa: E731
    else:
        derivative, first = (lambda t: t[other]), f"Multiply {other} by d{out} entry by entry. "
        gradient = lambda t, d: (t[other] * d[out]).sum(dim, keepdim=True)  # noqa: E731
    return Gradient(var, shape, (
        _shape(var, shape, unit),
        Step(local, (_local(var, out, derivative),)),
        Step(first + _broadcast(*copies) + keeps, (_gradient(gradient),)),
    ))


def _linear_layer(x: str, W: str, b: str, out: str, x_shape: str, W_shape: str, out_shape: str, unit: str,
                  x_note: str = ".", b_note: str = "") -> tuple[Gradient, Gradient, Gradient]:
    """The three gradients of ``out = x @ W + b`` (the lecture's two linear layers)."""
    line = f"{out} is {x} times {W} (a matrix product) plus {b}"
    b_shape = f"({W_shape.rstrip(')').split(', ')[1]},)"  # b is one row of W's width: (27,), (n_hidden,)
    return (
        Gradient(x, x_shape, (
            _shape(x, x_shape, x_note),
            Step(f"{line}: {x}[i, k] multiplies {W}[k, j] in {out}[i, j] for every {unit} j, so "
                 f"d{x}[i, k] is the sum over j of d{out}[i, j] times {W}[k, j].",
                 (Check(says=lambda t, d: torch.einsum("ij,kj->ik", d[out], t[W]),
                        equals=lambda t, d: d.line(x, out)),)),
            Step(f"That sum over j is a matrix product of d{out} {out_shape} and {W} {W_shape}: only one "
                 f"arrangement (which one is transposed, and on which side) gives the shape {x_shape}.",
                 (_gradient(lambda t, d: d[out] @ t[W].T),)),
        )),
        Gradient(W, W_shape, (
            _shape(W, W_shape, "."),
            Step(f"{line}: {W}[k, j] multiplies {x}[i, k] in {out}[i, j] for every example i, so d{W}[k, j] "
                 f"is the sum over the examples i of {x}[i, k] times d{out}[i, j].",
                 (_gradient(lambda t, d: torch.einsum("ik,ij->kj", t[x], d[out])),)),
            Step(f"That sum over the examples is a matrix product of {x} {x_shape} and d{out} {out_shape}: "
                 f"the shapes tell you which one to transpose to get {W_shape}.",
                 (_gradient(lambda t, d: t[x].T @ d[out]),)),
        )),
        Gradient(b, b_shape, (
            _shape(b, b_shape, f": one dimension only, like {b}."),
            Step(f"{line}, with {b} broadcast over the n examples (added to every row): the local "
                 f"derivative with respect to {b} is 1.",
                 (_local(b, out, _ones(out)),)),
            Step(_broadcast(b, "n examples", f" (the rows of d{out})")
                 + f". The result has {b}'s shape, {b_shape}, with no kept dimension.{b_note}",
                 (_gradient(lambda t, d: d[out].sum(0)),)),
        )),
    )


def _one_hot(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """1 where ``index`` points along ``like``'s last dimension, in ``like``'s dtype."""
    return F.one_hot(index, like.shape[-1]).to(like.dtype)


def _rows_of_C(t: Forward) -> torch.Tensor:
    """(…, vocab_size): 1 at the row of C each entry of Xb picks."""
    return F.one_hot(t.Xb, t.C.shape[0]).to(t.C.dtype)


def _scatter_loop(t: Forward, demb: torch.Tensor) -> torch.Tensor:
    dC = torch.zeros_like(t.C)
    for i in range(t.Xb.shape[0]):
        for j in range(t.Xb.shape[1]):
            dC[t.Xb[i, j]] += demb[i, j]
    return dC


# ----------------------------------------------------------------------------------------
# Exercise 1: the 26 lines, one by one.
# ----------------------------------------------------------------------------------------

_SCALE_SHIFT = ("hpreact is bngain times bnraw plus bnbias, with the rows bngain and bnbias broadcast "
                "over the n examples")

_C_LOCAL = Step(
    "emb is C indexed by Xb: emb[i, j] is a copy of the row of C for character Xb[i, j]. So emb[i, j] "
    "depends on row c of C, with derivative 1, exactly when Xb[i, j] is c, and on no other row.",
    (_gradient(lambda t, d: torch.einsum("ijc,ijk->ck", _rows_of_C(t), d.emb)),))
_C_SCATTER = ("Send each demb[i, j] back to the row of dC for character Xb[i, j], adding: a character used "
              "several times collects all its gradients, an unused one gets zero.")
_C_TRAP = ("Beware of a single in-place addition indexed by all of Xb at once: with repeated characters "
           "only one of the additions survives.")

STEPWISE: dict[str, Gradient] = {g.var: g for g in (
    Gradient("logprobs", "(n, 27)", (
        _shape("logprobs", "(n, 27)", ": one number per example and character."),
        Step("The loss is minus the mean, over the n examples, of logprobs at each example's correct "
             "character (row i, column Yb[i]). So the loss depends on just those n entries, each with "
             "weight −1/n, and not at all on the others: that is the local derivative.",
             (_local("logprobs", "loss", lambda t: -_one_hot(t.Yb, t.logprobs) / t.n),)),
        Step("Nothing is upstream of the loss (the loss's derivative with respect to itself is 1), so "
             "dlogprobs is −1/n at each example's correct character and 0 everywhere else: start from "
             "zeros with logprobs' shape and set those n entries.",
             (_gradient(lambda t, d: -_one_hot(t.Yb, t.logprobs) / t.n),)),
    )),
    Gradient("probs", "(n, 27)", (
        _shape("probs", "(n, 27)", "."),
        Step("logprobs is the log of probs, entry by entry, and the derivative of log x is 1/x: the local "
             "derivative is 1/probs.",
             (_local("probs", "logprobs", lambda t: 1 / t.probs),)),
        Step("Multiply the local derivative entry by entry by dlogprobs (the chain rule). Notice what it "
             "does: a correct character given a low probability gets a large gradient.",
             (_gradient(lambda t, d: d.logprobs / t.probs),)),
    )),
    _broadcast_operand("counts_sum_inv", "probs", "counts", "(n, 1)", ": one number per example, a column.",
                      "probs is counts times counts_sum_inv, and the (n, 1) column counts_sum_inv is "
                      "broadcast across the 27 columns. The local derivative of probs[i, j] with respect "
                      "to counts_sum_inv[i] is counts[i, j].",
                      ("counts_sum_inv[i]", "27 entries of row i"), 1,
                      ", so that the result stays a column of shape (n, 1)."),
    Gradient("counts_sum", "(n, 1)", (
        _shape("counts_sum", "(n, 1)", "."),
        Step("counts_sum_inv is counts_sum to the power −1. The power rule brings the exponent down and "
             "lowers it by one: the local derivative is −1 times counts_sum to the power −2, that is "
             "−1/counts_sum².",
             (_local("counts_sum", "counts_sum_inv", lambda t: -1 / t.counts_sum**2),)),
        Step("Multiply the local derivative entry by entry by dcounts_sum_inv; both are (n, 1).",
             (_gradient(lambda t, d: -d.counts_sum_inv / t.counts_sum**2),)),
    )),
    Gradient("counts", "(n, 27)", (
        _shape("counts", "(n, 27)", ". counts is used twice, in probs and in counts_sum, so its gradient "
               "has two branches."),
        Step("Through probs (counts times counts_sum_inv) the local derivative is counts_sum_inv[i] for "
             "every entry of row i. Through counts_sum (the sum of each row) it is 1 for every entry.",
             (_local("counts", "probs", lambda t: t.counts_sum_inv.expand_as(t.counts)),
              _local("counts", "counts_sum", _ones("counts")))),
        Step("Add the two branches: dprobs times counts_sum_inv, entry by entry, plus dcounts_sum[i] "
             "copied to every entry of row i (a sum hands its gradient unchanged to each of its terms). "
             "Forgetting the second branch is the classic mistake here.",
             (_gradient(lambda t, d: d.probs * t.counts_sum_inv + d.counts_sum),)),
    )),
    Gradient("norm_logits", "(n, 27)", (
        _shape("norm_logits", "(n, 27)", "."),
        Step("counts is the exponential of norm_logits, entry by entry, and the derivative of eˣ is eˣ "
             "itself: the local derivative is counts, which you already have.",
             (_local("norm_logits", "counts", lambda t: t.counts),)),
        Step("Multiply counts by dcounts, entry by entry.",
             (_gradient(lambda t, d: t.counts * d.counts),)),
    )),
    _broadcast_operand("logit_maxes", "norm_logits", None, "(n, 1)", ": one number per example, a column.",
                       "norm_logits is logits minus logit_maxes, with the column logit_maxes broadcast "
                       "across the 27 columns: the local derivative with respect to logit_maxes is −1.",
                       ("logit_maxes[i]", "27 entries of row i"), 1,
                       ", keeping the shape (n, 1). Expect numbers near zero (about 1e-9 in float32): "
                       "shifting a row of logits does not change its softmax, so the loss does not depend "
                       "on logit_maxes."),
    Gradient("logits", "(n, 27)", (
        _shape("logits", "(n, 27)", ". logits is used twice, in norm_logits and in logit_maxes (each "
               "row's maximum), so its gradient has two branches."),
        Step("Through norm_logits (logits minus logit_maxes) the local derivative is 1. Through the row "
             "maximum it is 1 at the position of each row's largest logit and 0 elsewhere: only the "
             "maximum affected it.",
             (_local("logits", "norm_logits", _ones("logits")),
              _local("logits", "logit_maxes", lambda t: _one_hot(t.logits.argmax(1), t.logits)))),
        Step("Add both branches: dnorm_logits, plus dlogit_maxes[i] placed at the position of row i's "
             "maximum and zero elsewhere in the row (a one-hot mask of where the maxima are, times the "
             "column dlogit_maxes).",
             (_gradient(lambda t, d: d.norm_logits
                        + _one_hot(t.logits.argmax(1), t.logits) * d.logit_maxes),)),
    )),
    *_linear_layer("h", "W2", "b2", "logits", "(n, n_hidden)", "(n_hidden, 27)", "(n, 27)", "output"),
    Gradient("hpreact", "(n, n_hidden)", (
        _shape("hpreact", "(n, n_hidden)", "."),
        Step("h is tanh of hpreact, entry by entry, and the derivative of tanh x is 1 − tanh² x. Since tanh "
             "of hpreact is h, which you already have, the local derivative is 1 − h².",
             (_local("hpreact", "h", lambda t: 1 - t.h**2),)),
        Step("Multiply the local derivative entry by entry by dh.",
             (_gradient(lambda t, d: (1 - t.h**2) * d.h),)),
    )),
    Gradient("bngain", "(1, n_hidden)", (
        _shape("bngain", "(1, n_hidden)", ": one row, one number per hidden unit."),
        Step(_SCALE_SHIFT + ": the local derivative with respect to bngain is bnraw.",
             (_local("bngain", "hpreact", lambda t: t.bnraw),)),
        Step("Multiply bnraw by dhpreact entry by entry. " + _broadcast("bngain", "n examples")
             + ", keeping the shape (1, n_hidden).",
             (_gradient(lambda t, d: (t.bnraw * d.hpreact).sum(0, keepdim=True)),)),
    )),
    Gradient("bnbias", "(1, n_hidden)", (
        _shape("bnbias", "(1, n_hidden)", ": one row, one number per hidden unit."),
        Step(_SCALE_SHIFT + ": the local derivative with respect to bnbias is 1.",
             (_local("bnbias", "hpreact", _ones("hpreact")),)),
        Step(_broadcast("bnbias", "n examples", " (the rows of dhpreact)")
             + ", keeping the shape (1, n_hidden).",
             (_gradient(lambda t, d: d.hpreact.sum(0, keepdim=True)),)),
    )),
    Gradient("bnraw", "(n, n_hidden)", (
        _shape("bnraw", "(n, n_hidden)", "."),
        Step(_SCALE_SHIFT + ": the local derivative with respect to bnraw is bngain, the same number "
             "for every entry of a column.",
             (_local("bnraw", "hpreact", lambda t: t.bngain.expand_as(t.bnraw)),)),
        Step("Multiply bngain by dhpreact entry by entry: bngain broadcasts over the examples by itself, "
             "and nothing needs adding up, since bnraw has the full shape (n, n_hidden).",
             (_gradient(lambda t, d: t.bngain * d.hpreact),)),
    )),
    _broadcast_operand("bnvar_inv", "bnraw", "bndiff", "(1, n_hidden)",
                      ": one row, one number per hidden unit.",
                      "bnraw is bndiff times bnvar_inv, with the row bnvar_inv broadcast over the n "
                      "examples: the local derivative with respect to bnvar_inv is bndiff.",
                      ("bnvar_inv", "n examples"), 0, ", keeping the shape (1, n_hidden)."),
    Gradient("bnvar", "(1, n_hidden)", (
        _shape("bnvar", "(1, n_hidden)", ": one row, one number per hidden unit."),
        Step("bnvar_inv is (bnvar + ε) to the power −1/2, with ε the forward pass's 1e-5. The power rule "
             "brings the exponent down and lowers it by one: the local derivative is −1/2 times "
             "(bnvar + ε) to the power −3/2.",
             (_local("bnvar", "bnvar_inv", lambda t: -0.5 * (t.bnvar + model.BN_EPS) ** -1.5),)),
        Step("Multiply the local derivative entry by entry by dbnvar_inv; both are (1, n_hidden).",
             (_gradient(lambda t, d: -0.5 * (t.bnvar + model.BN_EPS) ** -1.5 * d.bnvar_inv),)),
    )),
    Gradient("bndiff2", "(n, n_hidden)", (
        _shape("bndiff2", "(n, n_hidden)", "."),
        Step("bnvar is 1/(n − 1) times the sum of bndiff2 over the examples (Bessel's correction, see "
             "exercise 3), so every entry's local derivative is 1/(n − 1).",
             (_local("bndiff2", "bnvar", lambda t: torch.ones_like(t.bndiff2) / (t.n - 1)),)),
        Step("dbnvar, a (1, n_hidden) row, flows back to every example equally: copy it down the n rows "
             "and multiply by 1/(n − 1).",
             (_gradient(lambda t, d: d.bnvar.expand_as(t.bndiff2) / (t.n - 1)),)),
    )),
    Gradient("bndiff", "(n, n_hidden)", (
        _shape("bndiff", "(n, n_hidden)", ". bndiff is used twice, in bndiff2 and in bnraw, so its gradient "
               "has two branches."),
        Step("Through bndiff2 (bndiff squared) the local derivative is 2 times bndiff. Through bnraw "
             "(bndiff times bnvar_inv) it is bnvar_inv, the same number for every entry of a column.",
             (_local("bndiff", "bndiff2", lambda t: 2 * t.bndiff),
              _local("bndiff", "bnraw", lambda t: t.bnvar_inv.expand_as(t.bndiff)))),
        Step("Multiply each local derivative by the upstream gradient of its own branch (2 times bndiff by "
             "dbndiff2, bnvar_inv by dbnraw) and add the two branches.",
             (_gradient(lambda t, d: 2 * t.bndiff * d.bndiff2 + t.bnvar_inv * d.bnraw),)),
    )),
    _broadcast_operand("bnmeani", "bndiff", None, "(1, n_hidden)", ": one row, one number per hidden unit.",
                       "bndiff is hprebn minus bnmeani, with the row bnmeani broadcast over the n "
                       "examples: the local derivative with respect to bnmeani is −1.",
                       ("bnmeani", "n examples"), 0, ", keeping the shape (1, n_hidden)."),
    Gradient("hprebn", "(n, n_hidden)", (
        _shape("hprebn", "(n, n_hidden)", ". hprebn is used twice, in bndiff and in bnmeani, so its "
               "gradient has two branches."),
        Step("Through bndiff (hprebn minus bnmeani) the local derivative is 1. Through bnmeani (1/n times "
             "the sum of hprebn over the examples) it is 1/n for every example.",
             (_local("hprebn", "bndiff", _ones("hprebn")),
              _local("hprebn", "bnmeani", lambda t: torch.ones_like(t.hprebn) / t.n))),
        Step("Add both branches: dbndiff, plus dbnmeani copied down the n rows and multiplied by 1/n.",
             (_gradient(lambda t, d: d.bndiff + d.bnmeani.expand_as(t.hprebn) / t.n),)),
    )),
    *_linear_layer("embcat", "W1", "b1", "hprebn", "(n, 30)", "(30, n_hidden)", "(n, n_hidden)",
                   "hidden unit",
                   x_note=": 30 is block_size times n_embd, the three context characters' embeddings side "
                   "by side.",
                   b_note=" Expect numbers near zero: BatchNorm subtracts the batch mean, so b1 cannot "
                   "change the loss."),
    Gradient("emb", "(n, 3, 10)", (
        _shape("emb", "(n, 3, 10)", ": (n, block_size, n_embd), one 10-number embedding per example and "
               "context position."),
        Step("embcat is emb seen as (n, 30): each example's three embeddings side by side. Nothing is "
             "computed, the numbers are only rearranged, so each entry's local derivative is 1: entry "
             "[i, j, k] of emb is entry [i, 10j + k] of embcat.",
             (Check(says=lambda t, d: torch.stack([d.embcat[:, 10 * j:10 * j + 10] for j in range(3)], 1),
                    equals=lambda t, d: d.line("emb", "embcat")),)),
        Step("Rearrange dembcat back into emb's shape (n, 3, 10): row i's 30 numbers become three rows of "
             "10, in the same order.",
             (_gradient(lambda t, d: d.embcat.reshape(t.emb.shape)),)),
    )),
    Gradient("C", "(27, 10)", (
        _shape("C", "(27, 10)", ": (vocab_size, n_embd), one row per character."),
        _C_LOCAL,
        Step(_C_SCATTER + " Start from zeros with C's shape and add the rows in one by one, looping over the "
             "examples i and the context positions j (exercise 4 shows a faster way). " + _C_TRAP,
             (_gradient(lambda t, d: _scatter_loop(t, d.emb)),)),
    )),
)}

# ----------------------------------------------------------------------------------------
# Exercises 2 and 3: the fused gradients, derived on paper.
# ----------------------------------------------------------------------------------------


def _softmax_minus_one_hot(t: Forward) -> torch.Tensor:
    return t.probs - _one_hot(t.Yb, t.logits)


def _stable_softmax(logits: torch.Tensor) -> torch.Tensor:
    e = (logits - logits.max(1, keepdim=True).values).exp()
    return e / e.sum(1, keepdim=True)


FUSED_LOGITS = Gradient("logits", "(n, 27)", (
    _shape("logits", "(n, 27)", ". Work on paper, one row (one example) at a time: the batch's loss is the "
           "mean, over the n rows, of each row's loss, which is minus the log of the softmax probability "
           "the row gives its correct character y (its entry of Yb)."),
    Step("Write one row's loss with its 27 logits l_1 … l_27: it is −l_y + log Σ_k e^(l_k). Differentiate "
         "with respect to one logit l_i. The log-sum-exp term gives e^(l_i) / Σ_k e^(l_k), the softmax "
         "probability p_i; the −l_y term adds −1 when i is y and nothing otherwise. So the gradient of one "
         "row's loss is p_i − 1 at the correct character and p_i everywhere else.",
         (Check(says=lambda t, d: _softmax_minus_one_hot(t),
                equals=lambda t, d: t.n * d.logits, scale=lambda t: t.n),)),
    Step("The batch's loss is the mean of the n rows' losses, so divide every row's gradient by n: "
         "dlogits is the softmax of the logits, with 1 taken away at each row's correct character, all "
         "divided by n. Check your answer: every row of dlogits sums to zero (the correct character is "
         "pushed up exactly as much as all the others together are pulled down).",
         (_gradient(lambda t, d: _softmax_minus_one_hot(t) / t.n),)),
    Step("Compute the softmax stably. e^l overflows to infinity for large logits (from about 89 in "
         "float32, 710 in float64), and infinity over infinity is nan; the hidden tests use logits in "
         "the thousands. Subtract each row's largest logit before exponentiating (that does not change "
         "the softmax), as the forward pass does, or use PyTorch's softmax, which does it for you.",
         (_gradient(lambda t, d: (_stable_softmax(t.logits) - _one_hot(t.Yb, t.logits)) / t.n),)),
))


def _bnraw_gradient(t: Forward, d: Autograd) -> torch.Tensor:
    return t.bngain * d.hpreact


def _fused_bn(t: Forward, d: Autograd) -> torch.Tensor:
    """Exercise 3's formula as its last hint words it, in terms of g, the gradient of bnraw."""
    g = _bnraw_gradient(t, d)
    return t.bnvar_inv * (g - g.sum(0, keepdim=True) / t.n
                          - t.bnraw * (g * t.bnraw).sum(0, keepdim=True) / (t.n - 1))


FUSED_BN_STEPS = (
    _shape("hprebn", "(n, n_hidden)", ". Work on paper on one column (one hidden unit): the result then "
           "holds for every column at once. Name the forward pass's pieces: x_i for hprebn in row i, μ for "
           "bnmeani, σ² for bnvar, x̂_i for bnraw, γ for bngain. You are given dhpreact and want the "
           "gradient with respect to every x_i."),
    Step("First undo the scale and shift: hpreact is γ·x̂ plus bnbias, so the gradient reaching x̂_i is "
         "g_i, which is γ times row i of dhpreact. Write the rest in terms of g: it already holds γ, so γ "
         "must not appear again.",
         (Check(says=_bnraw_gradient, equals=lambda t, d: d.bnraw),)),
    Step("x̂_i is (x_i − μ)·(σ² + ε)^(−1/2), and every x_j moves every x̂_i through μ and σ²: the batch "
         "is coupled. The two derivatives you need: ∂μ/∂x_j is 1/n, and ∂σ²/∂x_j is 2·(x_j − μ)/(n − 1), "
         "with Bessel's n − 1 as in the forward pass (the part of σ² that goes through μ adds nothing, "
         "because the deviations x_j − μ sum to zero).",
         (_local("hprebn", "bnmeani", lambda t: torch.ones_like(t.hprebn) / t.n),
          Check(says=lambda t, d: 2 * t.bndiff / (t.n - 1) * d.bnvar,
                equals=lambda t, d: d.path("hprebn", "bnvar")))),
    Step("Add the three paths from x_i to the loss (directly through x̂_i, through μ, through σ²) and write "
         "x_j − μ as x̂_j·(σ² + ε)^(1/2). The gradient with respect to x_i is (σ² + ε)^(−1/2) times "
         "[ g_i − (1/n)·Σ_j g_j − x̂_i·(1/(n − 1))·Σ_j g_j·x̂_j ], the sums running over the examples. "
         "(σ² + ε)^(−1/2) is bnvar_inv, one number per column, and each of the two sums is one row of "
         "column sums, broadcast back over the n examples. Check: every column of dhprebn sums to zero.",
         (_gradient(_fused_bn),)),
)
FUSED_BN = Gradient("hprebn", "(n, n_hidden)", FUSED_BN_STEPS)

# ----------------------------------------------------------------------------------------
# Exercise 4: the seven parameters, through the fused gradients; dC made fast.
# ----------------------------------------------------------------------------------------


def _dC_index_add(t: Forward, d: Autograd) -> torch.Tensor:
    return torch.zeros_like(t.C).index_add_(0, t.Xb.reshape(-1), d.emb.reshape(-1, t.C.shape[1]))


def _dC_one_hot(t: Forward, d: Autograd) -> torch.Tensor:
    return _rows_of_C(t).reshape(-1, t.C.shape[0]).T @ d.emb.reshape(-1, t.C.shape[1])


FULL_C = Gradient("C", "(27, 10)", (
    _shape("C", "(27, 10)", ": (vocab_size, n_embd), one row per character. Its gradient comes back through "
           "the whole network: dlogits (exercise 2), the second linear layer, tanh, dhprebn (exercise 3), "
           "the first linear layer (dembcat), then demb, which is dembcat rearranged into emb's shape "
           "(n, 3, 10)."),
    _C_LOCAL,
    Step(_C_SCATTER + " " + _C_TRAP, (_gradient(lambda t, d: _scatter_loop(t, d.emb)),)),
    Step("Make it fast. A Python loop over the examples and the context positions launches about a hundred "
         "tiny operations per training step, each costing microseconds, and over 200,000 steps that is "
         "minutes. Do the scatter-add in one operation instead: flatten the contexts into one list of 3n "
         "character indices and demb into the matching 3n rows of 10 numbers. Then either PyTorch's "
         "index_add_ method on a zero tensor shaped like C adds each row into the row its index names "
         "(repeated indices accumulate), or a matrix product does it: the transposed one-hot matrix of "
         "those indices (27 by 3n) times those rows (3n by 10), since row c of it marks where character c "
         "occurs.",
         (_gradient(_dC_index_add), _gradient(_dC_one_hot))),
))

FULL_BN = Gradient("hprebn", "(n, n_hidden)", (
    *FUSED_BN_STEPS,
    Step("Reuse what you compute anyway: with g written out as bngain times dhpreact, the two column sums "
         "of the formula are bngain times dbnbias (the sum of dhpreact over the examples) and bngain times "
         "dbngain (the sum of dhpreact times bnraw).",
         (_gradient(lambda t, d: t.bnvar_inv * t.bngain * (d.hpreact - d.bnbias / t.n
                                                            - t.bnraw * d.bngain / (t.n - 1))),)),
))

EXERCISES: dict[int, dict[str, Gradient]] = {
    1: STEPWISE,
    2: {"logits": FUSED_LOGITS},
    3: {"hprebn": FUSED_BN},
    4: {**{p: STEPWISE[p] for p in model.PARAM_NAMES}, "C": FULL_C, "logits": FUSED_LOGITS,
        "hprebn": FULL_BN},
}


def texts() -> dict[str, str]:
    """Every hint a learner can be shown, ``{"exercise N, dX, k/K": text}`` (the leak test reads it)."""
    return {f"exercise {ex}, d{var}, {k}/{len(g.steps)}": step.text
            for ex, table in EXERCISES.items() for var, g in table.items()
            for k, step in enumerate(g.steps, 1)}


# ----------------------------------------------------------------------------------------
# What a notebook calls.
# ----------------------------------------------------------------------------------------


class Hints:
    """``hint = Hints(exercise=N)``; ``hint("dbnvar")`` shows the next hint for that gradient of
    exercise N (``"bnvar"`` works too), and ``hint.reset()`` starts over."""

    def __init__(self, exercise: int):
        if exercise not in EXERCISES:
            raise UserError(f"There is no exercise {exercise!r}: hints exist for exercises 1, 2, 3 and 4.")
        self.exercise = exercise
        self._table = EXERCISES[exercise]
        self._shown: dict[str, int] = {}

    def _key(self, name) -> str:
        """The table's variable for ``name`` ("dbnvar" or "bnvar"), or one sentence saying what exists."""
        var = name.strip() if isinstance(name, str) else ""
        var = var[1:] if var not in self._table and var.startswith("d") else var
        if var in self._table:
            return var
        known = _join([f"d{v}" for v in self._table], "or")
        elsewhere = [ex for ex, table in EXERCISES.items() if var in table]
        where = (f" (d{var} has hints in exercise{'s' if len(elsewhere) > 1 else ''} "
                 f"{_join([str(ex) for ex in elsewhere], 'and')})" if elsewhere else "")
        raise UserError(f"No hints for {name!r} in exercise {self.exercise}: ask for {known}{where}.")

    def __call__(self, name: str | None = None) -> None:
        """Show the next hint for gradient ``name``: shape, local derivative, chaining, ...; after the
        last one, say so and show the last again. Without a name: which names there are."""
        if name is None:
            _show(f"Hints for exercise {self.exercise}", repr(self))
            return
        var = self._key(name)
        steps = self._table[var].steps
        k = self._shown.get(var, 0) + 1
        self._shown[var] = k
        if k <= len(steps):
            _show(f"Hint {k}/{len(steps)} for d{var}", steps[k - 1].text)
        else:
            _show(f"No more hints for d{var}: the last one again ({len(steps)}/{len(steps)})", steps[-1].text)

    def reset(self, name: str | None = None) -> None:
        """Start the hints over: for one gradient, or (no name) for all."""
        if name is None:
            self._shown.clear()
        else:
            self._shown.pop(self._key(name), None)

    def __repr__(self) -> str:
        names = ", ".join(f"d{v}" for v in self._table)
        return f'hint("d<name>") shows the next hint for a gradient of exercise {self.exercise}: {names}.'


def _join(items: list[str], word: str) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {word} {items[-1]}"


_SUBSCRIPT = re.compile(r"(?<![\w])(x̂|[A-Za-zμσΣ])_([0-9]+|[a-z])\b")  # x_i, Σ_j, l_27; not n_hidden
_SUPERSCRIPT = re.compile(r"\^\(([^()]*)\)|\^([a-z])\b")  # (σ² + ε)^(−1/2), e^l


def _maths_html(text: str) -> str:
    """The plain text's maths typeset: subscripts and superscripts."""
    text = _SUBSCRIPT.sub(r"\1<sub>\2</sub>", text)
    return _SUPERSCRIPT.sub(lambda m: f"<sup>{m.group(1) or m.group(2)}</sup>", text)


def _show(title: str, text: str) -> None:
    """In a Jupyter kernel a boxed hint (HTML, with the plain text beside it); elsewhere printed."""
    plain = f"{title}: {text}"
    if not in_notebook():
        print(plain)
        return
    from IPython.display import display

    box = ("<div style=\"border-left: 4px solid #e6a23c; background: #fdf6ec; color: #303133; "
           "padding: 6px 12px; margin: 4px 0; line-height: 1.5; max-width: 60em; white-space: normal\">"
           f"<b>{html.escape(title)}</b><br>{_maths_html(html.escape(text))}</div>")
    display({"text/plain": plain, "text/html": box}, raw=True)
