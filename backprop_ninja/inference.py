"""The trained network at inference, as the lecture uses it: BatchNorm calibrated over the
training set, the loss of a split, and names sampled one character at a time.

Inference runs the forward pass's own lines (``model.evaluate``) with the calibrated mean
and variance given in place of the batch's, so there is no second copy of the network here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backprop_ninja import model
from backprop_ninja.model import LECTURE_SEED

SPLITS = ("train", "val", "test")


@torch.no_grad()
def calibrate(params: dict[str, torch.Tensor], X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lecture's BatchNorm calibration: mean and (unbiased) variance of hprebn over X.

    Returns (bnmean, bnvar), each (1, H), used instead of batch statistics at inference.
    """
    hprebn = model.evaluate({**params, "Xb": X}, until="hprebn")["hprebn"]
    bnvar, bnmean = torch.var_mean(hprebn, 0, keepdim=True, correction=1)
    return bnmean, bnvar


@torch.no_grad()
def logits(params: dict[str, torch.Tensor], stats: tuple[torch.Tensor, torch.Tensor],
           X: torch.Tensor) -> torch.Tensor:
    """(len(X), vocab) logits with the calibrated BatchNorm ``stats`` = (bnmean, bnvar)."""
    bnmean, bnvar = stats
    return model.evaluate({**params, "Xb": X, "bnmeani": bnmean, "bnvar": bnvar}, until="logits")["logits"]


@torch.no_grad()
def split_loss(params, stats, X: torch.Tensor, Y: torch.Tensor) -> float:
    """The calibrated model's mean cross-entropy on the examples (X, Y)."""
    return F.cross_entropy(logits(params, stats, X), Y).item()


@torch.no_grad()
def sample(params, stats, itos: dict[int, str], block_size: int, n: int = 20,
           seed: int = LECTURE_SEED + 10) -> list[str]:
    """``n`` names drawn from the calibrated model with a generator seeded by ``seed`` (lecture)."""
    g = torch.Generator().manual_seed(seed)
    names = []
    for _ in range(n):
        out, context = [], [0] * block_size
        while True:
            probs = F.softmax(logits(params, stats, torch.tensor([context])), dim=1)
            ix = torch.multinomial(probs, num_samples=1, generator=g).item()
            context = context[1:] + [ix]
            if ix == 0:
                break
            out.append(ix)
        names.append("".join(itos[i] for i in out))
    return names
