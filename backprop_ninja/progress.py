"""What a learner watches while training runs: a progress bar and a live loss curve.

Both adapt to where they run: a widget bar and an in-place PNG in a notebook, a text bar
on the terminal, and nothing at all where nobody looks (``progress=False``, no kernel).
"""

from __future__ import annotations

import io
import math
import sys
import time

from backprop_ninja import in_notebook


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


def progress_bar(steps: int, progress):
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
