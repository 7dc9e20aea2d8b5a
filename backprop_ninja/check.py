"""Compare a learner's gradient with autograd's: the lecture's ``cmp``, made shape-aware."""

from __future__ import annotations

import torch


def _reference(t: torch.Tensor) -> torch.Tensor:
    """Accept either a tensor whose ``.grad`` autograd filled (lecture style) or a gradient."""
    if isinstance(t, torch.Tensor) and t.grad is not None:
        return t.grad
    return t


def cmp(s: str, dt, t) -> bool:
    """Print the lecture's line ``name | exact | approximate | maxdiff``; return approximate.

    Unlike the lecture's version it checks the shape first: ``torch.allclose``
    broadcasts, so a (64,) gradient against a (1, 64) one would pass silently.
    """
    ref = _reference(t)
    if not isinstance(dt, torch.Tensor):
        print(f"{s:15s} | not a tensor: got {type(dt).__name__}, expected shape "
              f"{tuple(ref.shape)}")
        return False
    if dt.shape != ref.shape:
        print(f"{s:15s} | wrong shape: {tuple(dt.shape)}, expected {tuple(ref.shape)}")
        return False
    dt = dt.to(ref.dtype)
    ex = torch.all(dt == ref).item()
    app = torch.allclose(dt, ref)
    maxdiff = (dt - ref).abs().max().item()
    print(f"{s:15s} | exact: {str(ex):5s} | approximate: {str(app):5s} | maxdiff: {maxdiff}")
    return bool(app)
