"""What each mistake the diagnosis recognises means, as one sentence a learner can act on.

A table of sentences (``{d}`` is the gradient's name, ``{var}`` its variable's), read by
``check``: the diagnosis decides *which* mistake it is, this module only says it in words.
"""

from __future__ import annotations

SENTENCES = {
    "missing": "{d} is missing: return a gradient (a tensor shaped like {var}) for every variable.",
    "not finite": ("{d} contains NaN or inf: something overflowed or divided by zero. Exponentiate "
                   "logits only after subtracting each row's maximum, as the forward pass does, and "
                   "never divide by a value that can be zero."),
    "wrong dtype": ("{d} {kind} but {var} is {expected}: a gradient must have its variable's dtype. "
                    "Create new tensors with zeros_like or ones_like of a tensor you were given (they "
                    "copy its dtype), or pass dtype={var}.dtype to zeros, ones or tensor.{right}"),
    "wrong shape": ("{d} has shape {got} but {var} has shape {expected}: a gradient always has its "
                    "variable's shape."),
    "missing keepdim": ("{d} lost a dimension that {var} has. A gradient always has its variable's shape: "
                        "keep the summed dimension (keepdim) so it broadcasts the way the forward pass did."),
    "missing .view": ("{d} holds the right number of entries in the wrong shape. A gradient always has "
                      "its variable's shape: reshape it (.view) to the shape of {var}."),
    "not summed over the broadcast dimension": (
        "In the forward pass {var} was broadcast (copied) along dimension {dims}, so every copy sends a "
        "gradient back: add them up along that dimension so {d} has {var}'s shape."),
    "transposed": ("{d} looks like the transpose of the right gradient. Check the order of the matrix "
                   "product and which operand is transposed, so that the shapes line up with {var}'s."),
    "all zeros": "{d} is all zeros: the placeholder was not replaced, or no gradient reaches {var}.",
    "sign flipped": ("{d} has the opposite sign to the right gradient. Check the sign of the local "
                     "derivative: a subtraction, a negative power, or the minus in front of the mean."),
    "Bessel's correction": ("{d} matches BatchNorm with the biased variance (1/n). The forward pass divides "
                            "by n-1 (Bessel's correction); the backward pass must use the same factor."),
    "missing branch": ("{d} holds only the gradient that flows back through {used}. {var} is also used by "
                       "{other}, and a variable used twice receives the sum of both branches' gradients."),
    "factor": "{d} is {sign}{label} times the right gradient: {reason}",
    "inherited": ("{d} follows correctly from your d{up}; it is wrong only because an earlier gradient "
                  "is. Fix the first wrong gradient and this one will follow."),
    "wrong": ("{d} does not match autograd. Work out the local derivative of the line that uses {var}, "
              "multiply it by the upstream gradient, and add up every branch; hint(\"{d}\") gives "
              "step-by-step help."),
}

# Why a gradient is off by a constant factor, by the factor found.
FACTORS = {
    "n": "a division by the batch size is missing (the loss is a mean over the batch).",
    "1/n": "the gradient was divided by the batch size once too often.",
    "n-1": "a 1/(n-1) from the variance is missing.",
    "1/(n-1)": "the 1/(n-1) of the variance was applied once too often.",
    "2": "check the derivative of a square (the power rule) and any factor applied twice.",
    "1/2": "check the derivative of a square or of a power (the power rule brings the exponent down).",
    "Bessel": ("the variance uses Bessel's correction, 1/(n-1), not 1/n: use the same factor as the "
               "forward pass."),
    "other": "a constant is missing or extra in the local derivative.",
}


def _key(mistake: str | None) -> str:
    """The table row of a mistake label ("missing branch through h", "sign flipped and factor 2")."""
    if not mistake:
        return "wrong"
    for prefix in ("missing branch", "inherited"):
        if mistake.startswith(prefix):
            return prefix
    return "factor" if "factor" in mistake else mistake if mistake in SENTENCES else "wrong"


def sentence(var: str, mistake: str | None = None, **detail) -> str:
    """The sentence for gradient ``d{var}`` and the diagnosed ``mistake`` (a label of ``check``'s,
    or a status: "missing", "not finite", "wrong shape", "wrong dtype"), filled with ``detail``."""
    key = _key(mistake)
    if key == "factor":
        label = mistake.split("factor ", 1)[1].split(" or ")[0]
        detail = {"sign": "with the opposite sign and " if mistake.startswith("sign flipped and") else "",
                  "label": label,
                  "reason": FACTORS["Bessel" if "Bessel" in label else label if label in FACTORS
                                    else "other"]}
    return SENTENCES[key].format(d=f"d{var}", var=var, **detail)
