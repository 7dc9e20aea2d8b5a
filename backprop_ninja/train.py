"""Exercise 4: train the lecture's MLP (n_hidden=200) with a hand-written backward pass.

One loop serves notebook 04, ``backprop-ninja train`` and the benchmark: minibatch,
forward without autograd, the learner's ``backward(**tensors)`` (autograd blocked while
it runs), SGD update. Then, as in the lecture, the BatchNorm statistics are calibrated
over the whole training set, and the model is evaluated (``split_loss``) and sampled
(``sample``).

    r = train(backward, 200_000, live_plot=True)   # or "manual", "lecture", None (= autograd)
    r.split_loss("train"), r.split_loss("val"), r.sample(20), r.seconds_per_step
    compare_speed(backward)                        # µs/step of yours vs loss.backward()

Why the lecture's manual backward is *slower* than ``loss.backward()`` and the
course's is twice as fast: at batch 32 every tensor is tiny, so a step costs what
its Python-level torch calls cost (a few microseconds each), not arithmetic. The
lecture's dC loop runs 96 iterations of four indexing calls each; ``index_add_`` is
one call. What else the fast step does, each explained where it happens: one torch
thread, ``torch.inference_mode()``, no statistic computed twice, one-hot instead of
``range`` indexing, one ``_foreach_add_`` for the update, indices drawn 1000 steps
at a time.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backprop_ninja import UserError, in_notebook
from backprop_ninja.model import BN_EPS, LECTURE_SEED, PARAM_NAMES, Config, init_params

N_HIDDEN = 200
BATCH_SIZE = 32
LECTURE_STEPS = 200_000

# What the training forward hands to a backward function, by keyword (the lecture's names).
FORWARD_KEYWORDS = ("Xb", "Yb", "n", *PARAM_NAMES, "emb", "embcat", "hprebn", "bnmeani", "bndiff",
                    "bnvar", "bnvar_inv", "bnraw", "hpreact", "h", "logits", "loss")

Backward = Callable[..., dict]


class AutogradUsedError(UserError):
    """The learner's backward called autograd while training was meant to run without it."""


# --------------------------------------------------------------------------- forward


def forward(params: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor) -> dict:
    """Exercise 4's forward pass: every tensor a backward may need, by its lecture name.

    Shapes (n = batch size, d = n_embd, H = n_hidden, V = vocab): Xb (n, block) int,
    Yb (n,) int, emb (n, block, d), embcat (n, block*d), hprebn/bndiff/bnraw/hpreact/h
    (n, H), bnmeani/bnvar/bnvar_inv (1, H), logits (n, V), loss () .
    """
    C, W1, b1, W2, b2 = (params[k] for k in ("C", "W1", "b1", "W2", "b2"))
    n = Xb.shape[0]
    emb = C[Xb]
    embcat = emb.view(n, -1)
    hprebn = embcat @ W1 + b1
    bnmeani = hprebn.mean(0, keepdim=True)
    # The lecture writes hprebn.var(0, unbiased=True): same numbers, but on one thread that
    # reduction over dim 0 costs ~80 us here, more than the rest of this forward together.
    bndiff = hprebn - bnmeani
    bnvar = (bndiff * bndiff).sum(0, keepdim=True) / (n - 1)  # Bessel's correction
    bnvar_inv = (bnvar + BN_EPS).rsqrt()
    bnraw = bndiff * bnvar_inv
    hpreact = params["bngain"] * bnraw + params["bnbias"]
    h = torch.tanh(hpreact)
    logits = h @ W2 + b2
    loss = F.cross_entropy(logits, Yb)
    return dict(Xb=Xb, Yb=Yb, n=n, **params, emb=emb, embcat=embcat, hprebn=hprebn,
                bnmeani=bnmeani, bndiff=bndiff, bnvar=bnvar, bnvar_inv=bnvar_inv, bnraw=bnraw,
                hpreact=hpreact, h=h, logits=logits, loss=loss)


# --------------------------------------------------------------------------- backward passes


# The course's reference backward passes, by name (``backprop_ninja.reference``, loaded on use).
BACKWARDS = ("manual", "lecture", "autograd")


def _reference(name: str) -> Backward:
    from backprop_ninja import reference

    return {"manual": reference.fused_backward, "lecture": reference.lecture_backward}[name]


def _resolve(backward) -> tuple[str, Backward | None]:
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


def _make_step(name: str, backward: Backward | None, params: dict[str, torch.Tensor]):
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

    def step(Xb, Yb, lr):
        nonlocal checked
        tensors = forward(params, Xb, Yb)
        grads = backward(**tensors)
        if not checked:
            _check_grads(grads, params, name)
            checked = True
        # p += -lr * grad for all 7 parameters in one call (what torch.optim.SGD does too)
        torch._foreach_add_(plist, [grads[k] for k in PARAM_NAMES], alpha=-lr)
        return tensors["loss"]
    return step


@contextlib.contextmanager
def _training_mode(autograd: bool, params):
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


# --------------------------------------------------------------------------- data, results


def minibatches(X: torch.Tensor, Y: torch.Tensor, batch_size: int, g: torch.Generator, chunk: int = 1000):
    """Endless minibatches (Xb (batch, block), Yb (batch,)) of rows drawn with ``g``.

    The lecture draws ``ix`` every step; drawing 1000 steps' indices in one call and gathering
    them at once saves three small torch calls per step (~5% of a manual step).
    """
    while True:
        ix = torch.randint(0, X.shape[0], (chunk, batch_size), generator=g)
        yield from zip(X[ix], Y[ix])


def lecture_data():
    """(splits, itos): the lecture's Xtr/Ytr, Xdev/Ydev, Xte/Yte and index -> character."""
    from backprop_ninja.data import lecture_splits, load_words, vocabulary

    words = load_words()
    return lecture_splits(words), vocabulary(words)[1]


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

    def split_loss(self, split: str) -> float:
        return split_loss(self, split)

    def sample(self, n: int = 20, seed: int = LECTURE_SEED + 10) -> list[str]:
        return sample(self, n, seed)


def calibrate(params: dict[str, torch.Tensor], X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lecture's BatchNorm calibration: mean and (unbiased) variance of hpreact over X.

    Returns (bnmean, bnvar), each (1, H), used instead of batch statistics at inference.
    """
    with torch.no_grad():
        hpreact = params["C"][X].view(X.shape[0], -1) @ params["W1"] + params["b1"]
        bnvar, bnmean = torch.var_mean(hpreact, 0, keepdim=True, correction=1)
    return bnmean, bnvar


def _logits(result: TrainResult, X: torch.Tensor) -> torch.Tensor:
    if result.bnmean is None:
        result.bnmean, result.bnvar = calibrate(result.params, result.splits[0][0])
    p = result.params
    hpreact = p["C"][X].view(X.shape[0], -1) @ p["W1"] + p["b1"]
    hpreact = p["bngain"] * (hpreact - result.bnmean) * (result.bnvar + BN_EPS) ** -0.5 + p["bnbias"]
    return torch.tanh(hpreact) @ p["W2"] + p["b2"]


@torch.no_grad()
def split_loss(result: TrainResult, split: str) -> float:
    """The calibrated model's mean cross-entropy on 'train', 'val' or 'test'."""
    names = ("train", "val", "test")
    if split not in names:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(names)}.")
    X, Y = result.splits[names.index(split)]
    return F.cross_entropy(_logits(result, X), Y).item()


@torch.no_grad()
def sample(result: TrainResult, n: int = 20, seed: int = LECTURE_SEED + 10) -> list[str]:
    """``n`` names drawn from the calibrated model with a generator seeded by ``seed`` (lecture)."""
    g = torch.Generator().manual_seed(seed)
    block_size = result.splits[0][0].shape[1]
    names = []
    for _ in range(n):
        out, context = [], [0] * block_size
        while True:
            probs = F.softmax(_logits(result, torch.tensor([context])), dim=1)
            ix = torch.multinomial(probs, num_samples=1, generator=g).item()
            context = context[1:] + [ix]
            if ix == 0:
                break
            out.append(ix)
        names.append("".join(result.itos[i] for i in out))
    return names


# --------------------------------------------------------------------------- progress and live plot


class LivePlot:
    """A loss curve redrawn in place (one display handle) every ``every`` seconds in a notebook.

    Draws with a bare ``matplotlib.figure.Figure`` rendered to PNG, so no pyplot figure is
    left for the inline backend to show a second time; outside a kernel it does nothing.
    """

    def __init__(self, steps: int, every: float = 5.0):
        self.steps, self.every = steps, every
        self.chunk = max(1, steps // 200)  # the lecture averages lossi over chunks of 1000 of 200k
        self.curve: list[float] = []  # mean log10 loss of each finished chunk, kept as we go
        self.enabled = in_notebook()
        self.handle = None
        self.last = 0.0
        self.seconds = 0.0  # time spent drawing (not counted as training time)

    def maybe_update(self, losses: list[float], force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < self.every):
            return
        self.last = now
        from IPython.display import Image, display

        png = self._png(losses)
        if self.handle is None:
            self.handle = display(Image(data=png), display_id=True)
        else:
            self.handle.update(Image(data=png))
        self.seconds += time.perf_counter() - now

    def _png(self, losses: list[float]) -> bytes:
        import io

        from matplotlib.figure import Figure

        c = self.chunk
        for i in range(len(self.curve) * c, len(losses) - c + 1, c):
            self.curve.append(sum(math.log10(x) for x in losses[i:i + c]) / c)
        fig = Figure(figsize=(6, 3), dpi=80)
        ax = fig.subplots()
        ax.plot([(i + 0.5) * c for i in range(len(self.curve))], self.curve)
        ax.set_xlim(0, self.steps)
        if losses:
            recent = losses[-c:]
            ax.set_title(f"step {len(losses):,} / {self.steps:,}: loss {sum(recent) / len(recent):.4f} "
                         f"(mean of the last {len(recent)})", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(f"log10 loss (mean of {c} steps)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()


def _progress_bar(steps: int, progress):
    """tqdm in a notebook (widget) or a terminal; None when progress is off."""
    if not progress:
        return None
    if in_notebook():
        try:
            from tqdm.notebook import tqdm as notebook_tqdm
            return notebook_tqdm(total=steps, unit="step", mininterval=0.5)
        except ImportError:  # no ipywidgets: a text bar, on stdout (nbgrader scores stderr as an error)
            from tqdm import tqdm
            return tqdm(total=steps, unit="step", mininterval=0.5, file=sys.stdout)
    from tqdm import tqdm
    return tqdm(total=steps, unit="step", mininterval=0.5, file=sys.stderr, dynamic_ncols=True)


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
    name, fn = _resolve(backward)
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
    bar = _progress_bar(steps, progress)
    plot = LivePlot(steps) if live_plot else None
    every = max(1, steps // 10)
    step = _make_step(name, fn, params)
    batches = minibatches(Xtr, Ytr, batch_size, g)
    t0 = time.perf_counter()
    try:
        with _training_mode(fn is None, params):
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
        result.bnmean, result.bnvar = calibrate(params, Xtr)
    return result


# --------------------------------------------------------------------------- speed


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
        name, fn = _resolve(backward)
        params = init_params(cfg, seed)
        runners[label] = (fn is None, params, _make_step(name, fn, params),
                          minibatches(Xtr, Ytr, batch_size, torch.Generator().manual_seed(seed)))

    def run(label, k):
        autograd, params, step, batches = runners[label]
        with _training_mode(autograd, params):
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


# --------------------------------------------------------------------------- command line


def run_train(steps: int = LECTURE_STEPS, backward: str = "manual", seed: int = LECTURE_SEED) -> int:
    """``backprop-ninja train``: train, then print train/val loss, time per step and 20 samples."""
    from backprop_ninja.data import is_canonical

    splits, itos = lecture_data()
    tty = sys.stderr.isatty()
    label = {"manual": "the course's fused backward", "lecture": "the lecture's backward (loop dC)",
             "autograd": "autograd loss.backward()"}[backward]
    print(f"training n_hidden={N_HIDDEN}, batch {BATCH_SIZE}, {steps:,} steps, seed {seed}, "
          f"backward: {label}", flush=True)
    result = train(backward, steps, seed=seed, splits=splits, itos=itos, progress=tty,
                   log=None if tty else lambda line: print(line, flush=True))
    print(f"time per step: {result.seconds_per_step * 1e3:.3f} ms "
          f"({result.seconds:.1f} s for {steps:,} steps)")
    print(f"train loss: {result.split_loss('train'):.4f}")
    print(f"val loss:   {result.split_loss('val'):.4f}")
    if steps == LECTURE_STEPS and is_canonical():
        print("(the lecture reached train 2.07, val 2.11)")
    print("samples:")
    for word in result.sample(20):
        print(f"  {word}")
    return 0
