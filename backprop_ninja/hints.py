"""Progressive hints for a stuck learner: ``hint("bnvar")`` gives the next one.

Each gradient has three: its shape, then the local derivative of the line that uses the
variable, then how that chains with the upstream gradient. Words and maths, never code.
Exercise 1 uses the lecture's names (``"bnvar"`` or ``"dbnvar"``); ``"dlogits"`` and
``"dhprebn"`` are the fused exercises 2 and 3 (``"logits"``/``"hprebn"`` are exercise 1's lines).
"""

from __future__ import annotations

from backprop_ninja import UserError, model


class Hint(str):
    """A hint is a string that shows as plain text (no quotes) in a notebook."""

    def __repr__(self) -> str:
        return str(self)


def _broadcast_sum(var: str, shape: str, what: str) -> str:
    return (f"{var} {shape} was broadcast (copied) across a dimension of {what}; every copy sends a "
            "gradient back, so add them up along that dimension and keep the shape of the variable.")


# name -> (shape, local derivative, chaining)
STEPWISE: dict[str, tuple[str, str, str]] = {
    "logprobs": (
        "dlogprobs has the shape of logprobs, (n, 27): one number per example and character.",
        "The loss is minus the mean, over the n examples, of logprobs at each example's correct "
        "character (Yb). Only those n entries affect the loss; the other entries do not.",
        "Each picked entry moves the loss by -1/n per unit; every other entry gets zero. Nothing is "
        "upstream of the loss (dloss/dloss = 1).",
    ),
    "probs": (
        "dprobs has the shape of probs, (n, 27).",
        "logprobs = log(probs), element by element, and the derivative of log(x) is 1/x.",
        "Multiply that local derivative element by element by dlogprobs (the chain rule).",
    ),
    "counts_sum_inv": (
        "dcounts_sum_inv has the shape of counts_sum_inv, (n, 1): one number per example.",
        "probs = counts * counts_sum_inv, so the local derivative with respect to counts_sum_inv "
        "is counts.",
        _broadcast_sum("counts_sum_inv", "(n, 1)", "27 columns") + " Multiply by dprobs first.",
    ),
    "counts_sum": (
        "dcounts_sum has the shape of counts_sum, (n, 1).",
        "counts_sum_inv = counts_sum to the power -1; use the power rule.",
        "Multiply the local derivative element by element by dcounts_sum_inv.",
    ),
    "counts": (
        "dcounts has the shape of counts, (n, 27). counts is used TWICE: in probs and in counts_sum.",
        "Through probs = counts * counts_sum_inv the local derivative is counts_sum_inv; through "
        "counts_sum (a sum along each row) it is 1 for every entry of the row.",
        "Add the two branches: dprobs times counts_sum_inv, plus dcounts_sum copied along each row.",
    ),
    "norm_logits": (
        "dnorm_logits has the shape of norm_logits, (n, 27).",
        "counts = exp(norm_logits), and the derivative of exp is exp itself: you already have it.",
        "Multiply element by element by dcounts.",
    ),
    "logit_maxes": (
        "dlogit_maxes has the shape of logit_maxes, (n, 1).",
        "norm_logits = logits - logit_maxes, so the local derivative is -1.",
        _broadcast_sum("logit_maxes", "(n, 1)", "27 columns")
        + " Expect tiny numbers: shifting the logits does not change the softmax, hence the loss.",
    ),
    "logits": (
        "dlogits has the shape of logits, (n, 27). logits is used TWICE: in norm_logits and in "
        "logit_maxes.",
        "Through norm_logits = logits - logit_maxes the local derivative is 1; through the row "
        "maximum it is 1 at the position of each row's maximum and 0 elsewhere.",
        "Add both branches: dnorm_logits, plus dlogit_maxes placed at each row's maximum.",
    ),
    "h": (
        "dh has the shape of h, (n, n_hidden).",
        "logits = h @ W2 + b2: every h[i, k] multiplies W2[k, j] for every output j.",
        "Combine dlogits (n, 27) with W2 (n_hidden, 27) in a matrix product; only one arrangement "
        "(which one is transposed, and on which side) gives the shape (n, n_hidden).",
    ),
    "W2": (
        "dW2 has the shape of W2, (n_hidden, 27).",
        "logits = h @ W2 + b2: every W2[k, j] multiplies h[i, k] for every example i.",
        "Combine h (n, n_hidden) with dlogits (n, 27) in a matrix product that sums over the "
        "examples; the shapes tell you which one to transpose.",
    ),
    "b2": (
        "db2 has the shape of b2, (27,): one dimension only.",
        "logits = h @ W2 + b2: the local derivative with respect to b2 is 1.",
        _broadcast_sum("b2", "(27,)", "the n examples"),
    ),
    "hpreact": (
        "dhpreact has the shape of hpreact, (n, n_hidden).",
        "h = tanh(hpreact); the derivative of tanh(x) is 1 - tanh(x) squared, and tanh(hpreact) is "
        "h, which you already have.",
        "Multiply the local derivative element by element by dh.",
    ),
    "bngain": (
        "dbngain has the shape of bngain, (1, n_hidden).",
        "hpreact = bngain * bnraw + bnbias: the local derivative with respect to bngain is bnraw.",
        _broadcast_sum("bngain", "(1, n_hidden)", "the n examples") + " Multiply by dhpreact first.",
    ),
    "bnbias": (
        "dbnbias has the shape of bnbias, (1, n_hidden).",
        "hpreact = bngain * bnraw + bnbias: the local derivative with respect to bnbias is 1.",
        _broadcast_sum("bnbias", "(1, n_hidden)", "the n examples"),
    ),
    "bnraw": (
        "dbnraw has the shape of bnraw, (n, n_hidden).",
        "hpreact = bngain * bnraw + bnbias: the local derivative with respect to bnraw is bngain.",
        "Multiply element by element by dhpreact (bngain broadcasts over the examples by itself).",
    ),
    "bnvar_inv": (
        "dbnvar_inv has the shape of bnvar_inv, (1, n_hidden).",
        "bnraw = bndiff * bnvar_inv: the local derivative with respect to bnvar_inv is bndiff.",
        _broadcast_sum("bnvar_inv", "(1, n_hidden)", "the n examples") + " Multiply by dbnraw first.",
    ),
    "bnvar": (
        "dbnvar has the shape of bnvar, (1, n_hidden).",
        "bnvar_inv = (bnvar + eps) to the power -0.5; use the power rule (the exponent comes down "
        "and decreases by one).",
        "Multiply the local derivative element by element by dbnvar_inv.",
    ),
    "bndiff2": (
        "dbndiff2 has the shape of bndiff2, (n, n_hidden).",
        "bnvar = 1/(n-1) times the sum of bndiff2 over the examples (Bessel's correction): each "
        "entry's local derivative is 1/(n-1).",
        "dbnvar (1, n_hidden) flows back to every example equally: copy it down the rows and scale "
        "by the local derivative.",
    ),
    "bndiff": (
        "dbndiff has the shape of bndiff, (n, n_hidden). bndiff is used TWICE: in bndiff2 and bnraw.",
        "Through bndiff2 = bndiff squared the local derivative is 2 * bndiff; through "
        "bnraw = bndiff * bnvar_inv it is bnvar_inv.",
        "Multiply each local derivative by its upstream gradient (dbndiff2, dbnraw) and add the two "
        "branches.",
    ),
    "bnmeani": (
        "dbnmeani has the shape of bnmeani, (1, n_hidden).",
        "bndiff = hprebn - bnmeani: the local derivative with respect to bnmeani is -1.",
        _broadcast_sum("bnmeani", "(1, n_hidden)", "the n examples"),
    ),
    "hprebn": (
        "dhprebn has the shape of hprebn, (n, n_hidden). hprebn is used TWICE: in bndiff and in "
        "bnmeani.",
        "Through bndiff = hprebn - bnmeani the local derivative is 1; through the mean "
        "(1/n times a sum over the examples) it is 1/n for every example.",
        "Add both branches: dbndiff, plus dbnmeani copied down the rows and scaled by 1/n.",
    ),
    "embcat": (
        "dembcat has the shape of embcat, (n, block_size * n_embd) = (n, 30).",
        "hprebn = embcat @ W1 + b1: every embcat[i, k] multiplies W1[k, j] for every hidden unit j.",
        "Combine dhprebn with W1 in a matrix product; only one arrangement gives the shape (n, 30).",
    ),
    "W1": (
        "dW1 has the shape of W1, (30, n_hidden).",
        "hprebn = embcat @ W1 + b1: every W1[k, j] multiplies embcat[i, k] for every example i.",
        "Combine embcat and dhprebn in a matrix product that sums over the examples; the shapes "
        "tell you which one to transpose.",
    ),
    "b1": (
        "db1 has the shape of b1, (n_hidden,): one dimension only.",
        "hprebn = embcat @ W1 + b1: the local derivative with respect to b1 is 1.",
        _broadcast_sum("b1", "(n_hidden,)", "the n examples")
        + " Expect tiny numbers: BatchNorm subtracts the mean, so b1 cannot change the loss.",
    ),
    "emb": (
        "demb has the shape of emb, (n, block_size, n_embd) = (n, 3, 10).",
        "embcat is emb viewed as (n, 30): nothing is computed, the numbers are only rearranged, so "
        "the local derivative is 1 for each entry.",
        "Rearrange dembcat back into emb's shape.",
    ),
    "C": (
        "dC has the shape of C, (27, n_embd): one row per character.",
        "emb = C[Xb]: each emb[i, j] is a copy of the row of C for character Xb[i, j].",
        "Send each demb[i, j] back to the row of dC for character Xb[i, j]; a character used several "
        "times accumulates (adds) all its gradients, an unused one gets zero.",
    ),
}

FUSED: dict[str, tuple[str, ...]] = {
    "dlogits": (
        "dlogits has the shape of logits, (n, 27). Work on paper first: the loss of one example is "
        "-log(softmax(logits)[y]), and the batch loss is the mean of those.",
        "Differentiate -log( exp(l_y) / sum_j exp(l_j) ) with respect to one logit l_i. There are two "
        "cases: i is the correct class y, or it is not.",
        "Both cases give the softmax probability of class i, with an extra -1 for the correct class. "
        "The loss is a mean over the n examples. Check: each row of dlogits sums to zero.",
    ),
    "dhprebn": (
        "dhprebn has the shape of hprebn, (n, n_hidden). Start from dhpreact: through bngain you "
        "get the gradient of bnraw, then go back through the normalisation in one step.",
        "bnraw_i = (x_i - mean) / sqrt(var + eps), with the variance using 1/(n-1). Every x_i moves "
        "every bnraw_j, through the mean and the variance: d mean / d x_i = 1/n and "
        "d var / d x_i = 2 (x_i - mean) / (n-1).",
        "Summing over j, the result has three terms: the bnraw gradient itself, minus its mean over "
        "the batch, minus bnraw times the batch mean of (bnraw times its gradient), with Bessel's "
        "factor n/(n-1); all scaled by bngain * bnvar_inv.",
    ),
}

_calls: dict[str, int] = {}


def _key(name: str) -> str:
    if name in FUSED or name in STEPWISE:
        return name
    if name.startswith("d") and name[1:] in STEPWISE:
        return name[1:]
    known = ", ".join(list(model.BACKWARD_ORDER) + list(FUSED))
    raise UserError(f"No hints for {name!r}: use one of the lecture's names ({known}).")


def hint(name: str) -> Hint:
    """The next hint for gradient ``name`` (``"bnvar"``, ``"dbnvar"``, ``"dlogits"`` ...):
    shape, then local derivative, then chaining; after the last, the last again."""
    key = _key(name)
    steps = FUSED.get(key) or STEPWISE[key]
    level = _calls.get(key, 0)
    _calls[key] = level + 1
    if level >= len(steps):
        return Hint(f"(No more hints for {name}.) {steps[-1]}")
    return Hint(f"Hint {level + 1}/{len(steps)} for {name}: {steps[level]}")


def reset(name: str | None = None) -> None:
    """Start the hints over (for one gradient, or all)."""
    if name is None:
        _calls.clear()
    else:
        _calls.pop(_key(name), None)
