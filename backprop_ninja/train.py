"""Exercise 4: train the lecture's MLP (n_hidden=200) with a hand-written backward pass.

The loop, and only the loop: one serves notebook 04, ``backprop-ninja train``, the
benchmark and ``speed``: minibatch, forward without autograd, the learner's
``backward(**tensors)`` (autograd blocked while it runs), SGD update. What comes after
(calibrated BatchNorm, split losses, samples) is ``inference``; what is drawn while it
runs, ``progress``; how fast it runs, ``speed``.

    r = train(backward, 200_000, live_plot=True)   # or "manual", "lecture", None (= autograd)
    r.split_loss("train"), r.split_loss("val"), r.sample(20), r.seconds_per_step

Why the lecture's manual backward is *slower* than ``loss.backward()`` and the
course's is twice as fast: at batch 32 every tensor is tiny, so a step costs what
its Python-level torch calls cost (a few microseconds each), not arithmetic. The
lecture's dC loop runs 96 iterations of four indexing calls each; ``index_add_`` is
one call. What else the fast step does, each explained where it happens: one torch
thread, ``torch.inference_mode()``, no statistic computed twice, one ``scatter_`` instead
of ``range`` indexing, no Python number in the forward's arithmetic, one ``_foreach_add_``
for the update, indices drawn 1000 steps at a time (``benchmarks/step_ops.py`` counts the
calls that remain).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backprop_ninja import UserError, accepted, inference, model
from backprop_ninja.data import lecture_data
from backprop_ninja.model import BN_EPS, LECTURE_SEED, PARAM_NAMES, Config, init_params
from backprop_ninja.progress import LivePlot, progress_bar

N_HIDDEN = 200
BATCH_SIZE = 32
LECTURE_STEPS = 200_000

# What the training forward hands to a backward function, by keyword: the lecture's names of
# model.GRAPH's lines up to the logits (bnvar's line squares bndiff itself), and the loss.
TRAINING_LINES = tuple(name for name in model.FORWARD_NAMES[:model.FORWARD_NAMES.index("logits") + 1]
                       if name != "bndiff2")
FORWARD_KEYWORDS = ("Xb", "Yb", "n", *PARAM_NAMES, *TRAINING_LINES, "loss")

Backward = Callable[..., dict]


class AutogradUsedError(UserError):
    """The learner's backward called autograd while training was meant to run without it."""


# --------------------------------------------------------------------------- forward


def forward(params: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor) -> dict:
    """Exercise 4's forward pass, the lecture's: every tensor a backward may use, by its lecture name.

    The same numbers as ``model.GRAPH``'s lines up to the logits (to float rounding), then the
    fused ``F.cross_entropy``. Written out rather than run from GRAPH because it is the hot
    path of 200,000 steps: GRAPH keeps the lecture's exercise-1 lines bit for bit (cmp's `exact`
    column depends on them), and those cost a quarter more per call (``benchmarks/forward.py``:
    60 against 48 us, ~10% of a step; each Python-scalar operation there dispatches a conversion a
    tensor operation does not).
    Shapes (n = batch size, d = n_embd, H = n_hidden, V = vocab): Xb (n, block) int,
    Yb (n,) int, emb (n, block, d), embcat (n, block*d), hprebn/bndiff/bnraw/hpreact/h
    (n, H), bnmeani/bnvar/bnvar_inv (1, H), logits (n, V), loss () .
    """
    C, W1, b1, W2, b2 = (params[k] for k in ("C", "W1", "b1", "W2", "b2"))
    n = Xb.shape[0]
    n_t, n_minus_1, eps = _constants(n, C.dtype)
    emb = C[Xb]
    embcat = emb.view(n, -1)
    hprebn = torch.addmm(b1, embcat, W1)  # embcat @ W1 + b1, in one call
    # hprebn.mean(0, keepdim=True) is this sum divided by the Python number n: the same numbers
    bnmeani = hprebn.sum(0, keepdim=True) / n_t
    # The lecture writes hprebn.var(0, unbiased=True): same numbers, but on one thread that
    # reduction over dim 0 costs ~80 us here, more than the rest of this forward together.
    bndiff = hprebn - bnmeani
    bnvar = (bndiff * bndiff).sum(0, keepdim=True) / n_minus_1  # Bessel's correction
    bnvar_inv = (bnvar + eps).rsqrt()
    bnraw = bndiff * bnvar_inv
    hpreact = torch.addcmul(params["bnbias"], params["bngain"], bnraw)  # bngain * bnraw + bnbias
    h = torch.tanh(hpreact)
    logits = torch.addmm(b2, h, W2)  # h @ W2 + b2
    loss = F.cross_entropy(logits, Yb)
    return dict(Xb=Xb, Yb=Yb, n=n, **params, emb=emb, embcat=embcat, hprebn=hprebn,
                bnmeani=bnmeani, bndiff=bndiff, bnvar=bnvar, bnvar_inv=bnvar_inv, bnraw=bnraw,
                hpreact=hpreact, h=h, logits=logits, loss=loss)


@functools.cache
def _constants(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n, n - 1 and BN_EPS as 0-dim tensors of ``dtype``, made once per batch size.

    An operation with a Python number costs ~3 us more than one with a tensor at this size:
    torch wraps the number in a new tensor and converts it to the dtype on every call. Made
    outside inference mode, so that autograd may save them for its backward.
    """
    with torch.inference_mode(False):
        return tuple(torch.tensor(v, dtype=dtype) for v in (n, n - 1, BN_EPS))


# --------------------------------------------------------------------------- backward passes


# The course's reference backward passes, by name (``backprop_ninja.reference``, loaded on use).
BACKWARDS = ("manual", "lecture", "autograd")


def _reference(name: str) -> Backward:
    from backprop_ninja import reference

    return {"manual": reference.fused_backward, "lecture": reference.lecture_backward}[name]


def resolve(backward) -> tuple[str, Backward | None]:
    if backward is None or backward == "autograd":
        return "autograd", None
    if isinstance(backward, str):
        if backward not in BACKWARDS:
            raise UserError(f"unknown backward {backward!r}; choose one of {', '.join(BACKWARDS)}.")
        return backward, _reference(backward)
    if not callable(backward):
        raise UserError(f"backward must be a function (or 'autograd'), got {type(backward).__name__}.")
    _check_signature(backward)
    return getattr(backward, "__name__", "backward"), backward


def _check_signature(backward: Backward) -> None:
    """Refuse, before training starts, a function asking for a tensor the training forward lacks."""
    try:
        sig = inspect.signature(backward)
    except (TypeError, ValueError):
        return
    missing = [p.name for p in sig.parameters.values()
               if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p.name not in FORWARD_KEYWORDS]
    if missing:
        raise UserError(f"{backward.__name__}() asks for {', '.join(missing)}, which exercise 4's forward "
                        f"does not compute; it can use: {', '.join(FORWARD_KEYWORDS)}.")


def _check_grads(grads, params: dict[str, torch.Tensor], name: str) -> None:
    """One clear sentence for a backward that returns the wrong thing (checked on the first step)."""
    if not isinstance(grads, dict):
        raise UserError(f"{name}() must return a dict of the 7 parameter gradients, "
                        f"got {type(grads).__name__}.")
    for k, p in params.items():
        g = grads.get(k)
        if not isinstance(g, torch.Tensor):
            raise UserError(f"{name}() returned no gradient for {k}; it must return all of "
                            f"{', '.join(PARAM_NAMES)}.")
        if g.shape != p.shape:
            raise UserError(f"{name}() returned d{k} of shape {tuple(g.shape)}; {k} has shape "
                            f"{tuple(p.shape)} (keepdim? a transpose?).")


@contextlib.contextmanager
def autograd_blocked():
    """Make ``Tensor.backward``, ``torch.autograd.backward`` and ``torch.autograd.grad`` raise.

    Exercise 4 trains with the learner's gradients only; this makes "it secretly
    called autograd" impossible rather than merely detectable.
    """
    def refuse(*_a, **_k):
        raise AutogradUsedError("your backward called autograd (.backward() or torch.autograd); "
                                "exercise 4 must compute every gradient by hand.")

    saved = (torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad)
    torch.Tensor.backward = refuse
    torch.autograd.backward = refuse
    torch.autograd.grad = refuse
    try:
        yield
    finally:
        torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad = saved


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread: at batch 32 a second thread costs more in hand-offs than it
    saves (and on a shared machine an OpenMP thread waiting for a busy core stalls every op)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- the training step


def make_step(name: str, backward: Backward | None, params: dict[str, torch.Tensor]):
    """A function (Xb, Yb, lr) -> loss tensor doing forward, backward and SGD update in place."""
    plist = [params[k] for k in PARAM_NAMES]
    if backward is None:
        def step(Xb, Yb, lr):
            with torch.enable_grad():
                loss = forward(params, Xb, Yb)["loss"]
                for p in plist:
                    p.grad = None
                loss.backward()
            torch._foreach_add_(plist, [p.grad for p in plist], alpha=-lr)
            return loss
        return step

    checked = False
    # a function without **_ gets only the tensors it names (one that takes **_ gets them all, as is)
    keys = tuple(accepted(backward, dict.fromkeys(FORWARD_KEYWORDS)))
    keys = None if len(keys) == len(FORWARD_KEYWORDS) else keys

    def step(Xb, Yb, lr):
        nonlocal checked
        tensors = forward(params, Xb, Yb)
        grads = backward(**(tensors if keys is None else {k: tensors[k] for k in keys}))
        if not checked:
            _check_grads(grads, params, name)
            checked = True
        # p += -lr * grad for all 7 parameters in one call (what torch.optim.SGD does too)
        torch._foreach_add_(plist, [grads[k] for k in PARAM_NAMES], alpha=-lr)
        return tensors["loss"]
    return step


@contextlib.contextmanager
def training_mode(autograd: bool, params):
    """Autograd variant: leaves require grad. Manual: no graph anywhere, autograd blocked.

    The manual variant runs under ``torch.inference_mode()``, no_grad's stricter sibling:
    besides recording no graph it skips autograd's per-op bookkeeping (version counters,
    view tracking), worth ~15% of a step at this size.
    """
    for p in params.values():
        p.requires_grad_(autograd)
    try:
        with (one_thread(), torch.no_grad() if autograd else torch.inference_mode(),
              contextlib.nullcontext() if autograd else autograd_blocked()):
            yield
    finally:
        for p in params.values():
            p.requires_grad_(False)


# --------------------------------------------------------------------------- data, result


def minibatches(X: torch.Tensor, Y: torch.Tensor, batch_size: int, g: torch.Generator, chunk: int = 1000):
    """Endless minibatches (Xb (batch, block), Yb (batch,)) of rows drawn with ``g``.

    The lecture draws ``ix`` every step; drawing 1000 steps' indices in one call and gathering
    them at once saves three small torch calls per step (~5% of a manual step).
    """
    while True:
        ix = torch.randint(0, X.shape[0], (chunk, batch_size), generator=g)
        yield from zip(X[ix], Y[ix])


@dataclass
class TrainResult:
    """What ``train`` returns. ``losses``: the minibatch loss of every step (floats);
    ``bnmean``/``bnvar`` (1, H): BatchNorm statistics calibrated on the whole training set."""

    params: dict[str, torch.Tensor]
    losses: list[float]
    seconds: float
    seconds_per_step: float
    backward: str
    splits: tuple
    itos: dict[int, str]
    bnmean: torch.Tensor | None = None
    bnvar: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def lossi(self) -> list[float]:
        """log10 of every step's loss, the lecture's ``lossi``."""
        return [math.log10(x) for x in self.losses]

    @property
    def bn_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(bnmean, bnvar), calibrated on the training set when first needed."""
        if self.bnmean is None:
            self.bnmean, self.bnvar = inference.calibrate(self.params, self.splits[0][0])
        return self.bnmean, self.bnvar

    def split_loss(self, split: str) -> float:
        """The calibrated model's mean cross-entropy on 'train', 'val' or 'test'."""
        if split not in inference.SPLITS:
            raise UserError(f"unknown split {split!r}; choose one of {', '.join(inference.SPLITS)}.")
        X, Y = self.splits[inference.SPLITS.index(split)]
        return inference.split_loss(self.params, self.bn_stats, X, Y)

    def sample(self, n: int = 20, seed: int = LECTURE_SEED + 10) -> list[str]:
        """``n`` names drawn from the calibrated model (the lecture's seed by default)."""
        return inference.sample(self.params, self.bn_stats, self.itos, self.splits[0][0].shape[1], n, seed)


# --------------------------------------------------------------------------- train


def train(backward=None, steps: int = LECTURE_STEPS, *, seed: int = LECTURE_SEED,
          n_hidden: int = N_HIDDEN, batch_size: int = BATCH_SIZE, lr: float = 0.1,
          decay_at: int | None = None, progress=True, live_plot: bool = False,
          splits=None, itos=None, dtype: torch.dtype = torch.float32, calibrate_bn: bool = True,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Train exercise 4's network with ``backward`` and return a ``TrainResult``.

    ``backward``: the learner's function (called as ``backward(**tensors)`` with the
    keywords of ``FORWARD_KEYWORDS``, under ``torch.inference_mode()`` (no_grad, stricter),
    with autograd blocked and no input requiring grad),
    a name from ``BACKWARDS`` ("manual", "lecture"), or None/"autograd" for ``loss.backward()``.
    Learning rate: ``lr`` for the first ``decay_at`` steps (default: half, the lecture's
    100k of 200k), then ``lr / 10``. Parameters come from ``init_params(seed)``; minibatches
    from a generator seeded with ``seed``. ``log``: called with a lecture-style line every
    10% of the steps (for output without a progress bar).
    """
    name, fn = resolve(backward)
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}.")
    if splits is None:
        splits, itos = lecture_data()
    (Xtr, Ytr) = splits[0]
    if itos is None:  # the lecture's vocabulary: '.' then a-z
        itos = {0: ".", **{i: chr(ord("a") + i - 1) for i in range(1, 27)}}
    cfg = Config(vocab_size=len(itos), block_size=Xtr.shape[1], n_hidden=n_hidden)
    params = init_params(cfg, seed, dtype)
    decay_at = steps // 2 if decay_at is None else decay_at
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    bar = progress_bar(steps, progress)
    plot = LivePlot(steps) if live_plot else None
    every = max(1, steps // 10)
    step = make_step(name, fn, params)
    batches = minibatches(Xtr, Ytr, batch_size, g)
    t0 = time.perf_counter()
    try:
        with training_mode(fn is None, params):
            for i, (Xb, Yb) in zip(range(steps), batches):
                loss = step(Xb, Yb, lr if i < decay_at else lr / 10).item()
                losses.append(loss)
                if not math.isfinite(loss):
                    raise UserError(f"training diverged: the loss became {loss} at step {i}; "
                                    "check your gradients against autograd with cmp first.")
                if (i + 1) % 100 == 0 or i + 1 == steps:
                    if bar is not None:
                        bar.update(i + 1 - bar.n)
                        if (i + 1) % 1000 == 0:
                            bar.set_postfix(loss=f"{sum(losses[-1000:]) / len(losses[-1000:]):.4f}",
                                            refresh=False)
                    if plot is not None:
                        plot.maybe_update(losses, force=i + 1 == steps)
                if log is not None and (i % every == 0 or i + 1 == steps):
                    log(f"{i:7d}/{steps:7d}: {loss:.4f}")
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0 - (plot.seconds if plot else 0.0)
    result = TrainResult(params=params, losses=losses, seconds=seconds,
                         seconds_per_step=seconds / steps, backward=name, splits=splits, itos=itos)
    if calibrate_bn:
        result.bnmean, result.bnvar = inference.calibrate(params, Xtr)
    return result
