"""The course's own answers to exercise 4: the reference backward passes.

``fused_backward`` is the fast one (exercise 4's solution; a test keeps them the same);
``lecture_backward`` is the lecture's, with its Python loop for dC. ``backprop-ninja train``
and the benchmarks use them. A learner's notebook never imports this module, and a graded
kernel cannot even see it (the sandbox hides it with the grader's code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_backward(*, Xb, Yb, C, W1, W2, bngain, embcat, bnraw, bnvar_inv, h, logits, **_) -> dict:
    """The course's reference backward for exercise 4: the 7 parameter gradients.

    Inputs are the forward's tensors (see ``forward`` for shapes); returns
    {"C": (V, d), "W1": (block*d, H), "b1": (H,), "W2": (H, V), "b2": (V,),
    "bngain": (1, H), "bnbias": (1, H)}. Every line is one or two torch calls on the
    whole batch: no Python loop, no statistic computed twice, and in-place updates
    only on tensors created here (the inputs are never modified).
    """
    n = Xb.shape[0]
    # cross-entropy (exercise 2): softmax minus the one-hot of the targets, averaged over n
    dlogits = F.softmax(logits, 1)
    # dlogits[i, Yb[i]] -= 1 in every row i, in one call: scatter_ adds -1 at column Yb[i] of row i.
    # (The lecture's dlogits[range(n), Yb] -= 1 costs ~12x this: range(n) becomes a tensor element
    # by element, then indexing takes three calls. dlogits -= F.one_hot(Yb, V) costs ~2x: it
    # checks Yb, fills a new (n, V) integer tensor, then converts it to subtract it.)
    dlogits.scatter_(1, Yb.view(-1, 1), -1.0, reduce="add")
    dlogits /= n
    # second linear layer
    dh = dlogits @ W2.T
    dW2 = h.T @ dlogits
    db2 = dlogits.sum(0)
    # tanh: h is already tanh(hpreact), so its derivative is 1 - h**2
    dhpreact = dh - dh * h * h
    # BatchNorm (exercise 3); its two sums are dbnbias and dbngain, so reuse them
    dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
    dbnbias = dhpreact.sum(0, keepdim=True)
    # dhprebn = bngain * bnvar_inv * (dhpreact - dbnbias / n - bnraw * dbngain / (n - 1)), with the
    # last product and difference in one call: torch.addcmul(a, b, c, value=v) is a + v * b * c
    dhprebn = bngain * bnvar_inv * torch.addcmul(dhpreact - dbnbias / n, bnraw, dbngain, value=-1 / (n - 1))
    # first linear layer
    dembcat = dhprebn @ W1.T
    dW1 = embcat.T @ dhprebn
    db1 = dhprebn.sum(0)  # ~0: BatchNorm subtracts the batch mean, so b1 cannot change the loss
    # embedding: row C[i] collects the gradient of every position of the batch that looked it up
    dC = torch.zeros_like(C).index_add_(0, Xb.reshape(-1), dembcat.reshape(-1, C.shape[1]))
    return {"C": dC, "W1": dW1, "b1": db1, "W2": dW2, "b2": db2, "bngain": dbngain, "bnbias": dbnbias}


def lecture_backward(*, Xb, Yb, C, W1, W2, bngain, emb, embcat, bnraw, bnvar_inv, h, logits, **_) -> dict:
    """The lecture's exercise-4 backward as written, with its Python double loop for dC.

    Kept for the benchmark and ``backprop-ninja train --backward lecture``: it is
    correct but makes ~100 small torch calls per step for dC alone.
    """
    n = Xb.shape[0]
    dlogits = F.softmax(logits, 1)
    dlogits[range(n), Yb] -= 1
    dlogits /= n
    dh = dlogits @ W2.T
    dW2 = h.T @ dlogits
    db2 = dlogits.sum(0)
    dhpreact = (1.0 - h**2) * dh
    dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
    dbnbias = dhpreact.sum(0, keepdim=True)
    dhprebn = bngain * bnvar_inv / n * (n * dhpreact - dhpreact.sum(0)
                                        - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0))
    dembcat = dhprebn @ W1.T
    dW1 = embcat.T @ dhprebn
    db1 = dhprebn.sum(0)
    demb = dembcat.view(emb.shape)
    dC = torch.zeros_like(C)
    for k in range(Xb.shape[0]):
        for j in range(Xb.shape[1]):
            ix = Xb[k, j]
            dC[ix] += demb[k, j]
    return {"C": dC, "W1": dW1, "b1": db1, "W2": dW2, "b2": db2, "bngain": dbngain, "bnbias": dbnbias}
