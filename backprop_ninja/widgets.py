"""What a learner looks at: the report widget, the computational graph, dlogits, Bessel's correction.

Figures are plain ``matplotlib.figure.Figure`` objects (not pyplot), so a notebook shows each
once and nothing leaks between cells; widgets are ipywidgets, testable without a browser.
"""

from __future__ import annotations

import base64
import functools
import html
import io

import ipywidgets as W
import torch
from matplotlib.figure import Figure

from backprop_ninja import in_notebook, model
from backprop_ninja.check import Diagnosis, Report, diagnose, variable_name

escape = functools.partial(html.escape, quote=False)  # text inside tags: <, > and & only

STATUS_COLOURS = {
    "exact": "#2e7d32",        # green
    "close": "#81c784",        # light green
    "inherited": "#ffb300",    # amber: wrong only because an earlier gradient is
    "wrong": "#d32f2f",        # red
    "wrong shape": "#ef6c00",  # orange
    "not finite": "#7b1fa2",   # purple
    "missing": "#9e9e9e",      # grey
}
NO_GRADIENT = "#eceff1"  # Xb, Yb, loss: nothing to check


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    """A gradient as a matrix for imshow: (k,) -> (1, k); (n, a, b) -> (n, a*b)."""
    t = t.detach().double().cpu()
    if t.dim() == 0:
        return t.view(1, 1)
    if t.dim() == 1:
        return t.view(1, -1)
    return t.reshape(t.shape[0], -1)


def heatmap_figure(d: Diagnosis) -> Figure:
    """Learner's gradient, autograd's and their difference, side by side (same colour scale
    for the first two, so a sign flip or a factor shows at a glance)."""
    fig = Figure(figsize=(6.2, 7.4))
    name = f"d{variable_name(d.name)}"
    exp = _as_2d(d.expected) if d.expected is not None else None
    got = _as_2d(d.got) if d.got is not None else None
    vmax = float(exp.abs().max()) if exp is not None and exp.numel() else 1.0
    vmax = vmax or 1.0
    panels = [(f"your {name}" + (f" {tuple(d.got.shape)}" if d.got is not None else ""), got, vmax),
              (f"autograd {tuple(d.expected.shape)}" if d.expected is not None else "autograd", exp, vmax)]
    if got is not None and exp is not None and got.shape == exp.shape and d.got.shape == d.expected.shape:
        diff = got - exp
        panels.append(("yours - autograd", diff, float(diff.abs().max()) or 1.0))
    else:
        panels.append(("yours - autograd", None, 1.0))
    axes = fig.subplots(3, 1)
    for ax, (title, data, vm) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        if data is None:
            why = "missing" if d.status == "missing" else "shapes differ"
            ax.text(0.5, 0.5, f"({why})", ha="center", va="center", fontsize=10, color="#616161",
                    transform=ax.transAxes)
            continue
        im = ax.imshow(data.numpy(), cmap="RdBu_r", vmin=-vm, vmax=vm, aspect="auto",
                       interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize=8)
    fig.suptitle(f"{name}: {d.status}" + (f" ({d.mistake})" if d.mistake else ""), fontsize=11)
    fig.tight_layout()
    return fig


def graded_line_by_line(report: Report) -> int:
    """The gradients the grader gives a point: it judges each line from the learner's own
    upstream gradients, so one wrong gradient is charged once and the "inherited" ones after it
    (right lines fed a wrong upstream) earn their point."""
    return sum(d.ok or d.status == "inherited" for d in report.rows)


def verdict(report: Report) -> list[str]:
    """The report's verdict, said once: the count (and, for a gradient per line, what the grader
    would give and why it can differ), then which gradient to fix first and the hint."""
    n, total = sum(d.ok for d in report.rows), len(report.rows)
    if total > 1:
        graded = graded_line_by_line(report)
        count = (f"{n}/{total} gradients correct here; the grader, judging line by line, "
                 f"would give {graded}/{total}.")
        if graded > n:
            count += (f" The {graded - n} inherited (amber) ones are wrong only because an earlier "
                      "gradient is: their own lines are right.")
    else:
        count = f"{n}/{total} gradients correct."
    first = report.first_wrong
    return [count] + ([f"Fix d{variable_name(first)} first: {report.hint}"] if first else [])


def _verdict_html(report: Report) -> str:
    head, *fix = verdict(report)
    return _wrapping(f"<b>{escape(head)}</b>" + "".join(f"<br>{escape(line)}" for line in fix))


def _frame(report: Report) -> str:
    return STATUS_COLOURS["wrong"] if report.first_wrong else STATUS_COLOURS["exact"]


class Verdict:
    """The verdict as an output of its own: HTML in Jupyter and in the HTML feedback (where a
    widget does not render), the same lines in plain outputs."""

    def __init__(self, report: Report):
        self.report = report

    def _repr_mimebundle_(self, **kwargs):
        return {"text/plain": "\n".join(verdict(self.report)),
                "text/html": f"<div class='backprop-ninja-verdict' style='padding:4px 8px;margin:0 0 6px 0;"
                             f"border:2px solid {_frame(self.report)}'>{_verdict_html(self.report)}</div>"}


class ReportWidget(W.VBox):
    """The verdict (unless ``show_verdict=False``: ``show_report`` shows it as its own output),
    a coloured row per gradient (backward order) and the heatmaps of the selected row.
    ``select(name)`` is what clicking a row does."""

    def __init__(self, report: Report, show_verdict: bool = True, **kwargs):
        self.report = report
        self.show_verdict = show_verdict
        self.selected: str | None = None
        self.figure: Figure | None = None
        first = report.first_wrong
        self.summary = W.HTML(_verdict_html(report), layout=W.Layout(
            padding="4px 8px", margin="0 0 6px 0", border=f"2px solid {_frame(report)}"))
        self.summary.add_class("backprop-ninja-verdict")
        self.buttons: dict[str, W.Button] = {}
        rows = []
        for d in report.rows:
            b = W.Button(description=d.name, tooltip=d.hint or d.status,
                         layout=W.Layout(width="150px", min_width="150px", height="26px"))
            b.style.button_color = STATUS_COLOURS.get(d.status, "#ffffff")
            b.style.text_color = "white" if d.status in ("exact", "wrong", "not finite") else "black"
            b.on_click(lambda _b, name=d.name: self.select(name))
            self.buttons[d.name] = b
            # The text wraps under its button rather than being cut off.
            text = W.HTML(_row_html(d), layout=W.Layout(flex="1 1 auto", min_width="0", width="auto"))
            row = W.HBox([b, text], layout=W.Layout(min_height="28px", height="auto",
                                                    align_items="center"))
            row.add_class("backprop-ninja-row")
            rows.append(row)
        self.table = W.VBox(rows, layout=W.Layout(width="560px", min_width="420px", flex="0 1 560px"))
        self.caption = W.HTML("")
        self.caption.add_class("backprop-ninja-caption")
        self.detail = W.Output(layout=W.Layout(min_height="240px"))
        right = W.VBox([self.caption, self.detail],
                       layout=W.Layout(min_width="320px", max_width="640px", flex="1 1 320px"))
        body = W.HBox([self.table, right], layout=W.Layout(flex_flow="row wrap"))
        super().__init__([self.summary, body] if show_verdict else [body], **kwargs)
        self.add_class("backprop-ninja-report")
        start = first or (report.rows[0].name if report.rows else None)
        if start is not None:
            self.select(start)

    def select(self, name: str) -> None:
        """Show ``name``'s heatmaps (learner, autograd, difference) in the detail pane."""
        d = self.report[name]
        self.selected = d.name
        for n, b in self.buttons.items():
            b.layout.border = "3px solid #212121" if n == d.name else ""
        self.figure = heatmap_figure(d)
        # The first wrong gradient's hint is already in the verdict above: not said twice.
        hint = d.hint if d.hint and d.name != self.report.first_wrong else ""
        text = (f"<b>d{variable_name(d.name)}</b>: {d.status}"
                + (f", {escape(d.mistake)}" if d.mistake else "")
                + (f"<br>{escape(hint)}" if hint else ""))
        self.caption.value = _wrapping(text)
        png = base64.b64encode(_png(self.figure)).decode("ascii")
        # Set the Output's state directly: works in a kernel, in tests, and without capture.
        self.detail.outputs = ({"output_type": "display_data", "metadata": {},
                                "data": {"image/png": png,
                                         "text/plain": f"heatmaps of d{variable_name(d.name)}"}},)

    def _repr_mimebundle_(self, **kwargs):
        # Plain-text outputs (nbval, nbconvert, a terminal) read the report's table instead of
        # the widget's repr.
        data = super()._repr_mimebundle_(**kwargs)
        if data is not None:
            data["text/plain"] = report_text(self.report, with_verdict=self.show_verdict)
        return data


def report_text(report: Report, with_verdict: bool = True) -> str:
    """The report as plain text: a line per gradient, then the verdict."""
    return "\n".join([d.line() for d in report.rows] + (verdict(report) if with_verdict else []))


def _wrapping(html: str) -> str:
    """Inline HTML that wraps (widgets' HTML keeps a single-line height otherwise)."""
    return f"<div style='white-space:normal;overflow-wrap:anywhere;line-height:1.35'>{html}</div>"


def _row_html(d: Diagnosis) -> str:
    colour = STATUS_COLOURS.get(d.status, "#000")
    diff = "" if d.max_abs_diff != d.max_abs_diff else f"maxdiff {d.max_abs_diff:.1e}"
    label = d.mistake.replace("inherited ", "") if d.status == "inherited" and d.mistake else d.mistake
    mistake = f" &middot; {escape(label)}" if label else ""
    return _wrapping(
        f"<span style='font-family:monospace;color:{colour};font-weight:bold;display:inline-block;"
        f"min-width:11.5ch'>{d.status}</span>"
        f"<span style='font-family:monospace;color:#424242'> {diff}{mistake}</span>")


def report_widget(report: Report, show_verdict: bool = True) -> ReportWidget:
    """The interactive report (see ``ReportWidget``)."""
    return ReportWidget(report, show_verdict=show_verdict)


def show_report(grads: dict, tensors: dict, ref: dict, order=model.BACKWARD_ORDER) -> Report:
    """Diagnose ``grads`` and show the report. In Jupyter: the verdict, once, as an output of its
    own (so the HTML feedback, nbval and plain outputs read it too), then the widget (whose
    plain-text form is the table); anywhere else the table and the verdict printed. Returns the
    ``Report``."""
    report = diagnose(grads, tensors, ref, order=order)
    if in_notebook():
        from IPython.display import display

        display(Verdict(report))
        display(report_widget(report, show_verdict=False))
    else:
        print(report_text(report))
    return report


# --- exercise 1: the computational graph ---------------------------------------------------------

def _layout():
    """Node -> (x, y): the forward chain left to right in two bands, side inputs above it."""
    depth: dict[str, int] = {k: 0 for k in (*model.PARAM_NAMES, *model.NOT_DIFFERENTIABLE)}
    for out, inputs, _ in model.GRAPH:
        depth[out] = 1 + max(depth[i] for i in inputs)
    consumers: dict[str, list[str]] = {}
    for out, inputs, _ in model.GRAPH:
        for i in inputs:
            consumers.setdefault(i, []).append(out)
    for leaf in (*model.PARAM_NAMES, *model.NOT_DIFFERENTIABLE):  # right before their first use
        depth[leaf] = min(depth[c] for c in consumers[leaf]) - 1
    chain = [out for out, _, _ in model.GRAPH]
    split = (max(depth[c] for c in chain) + 1) // 2
    pos: dict[str, tuple[float, float]] = {}
    for name in chain:
        band = 0 if depth[name] <= split else 1
        pos[name] = (depth[name] - band * (split + 1), -3.2 * band)
    taken: dict[tuple, int] = {}
    for leaf in (*model.NOT_DIFFERENTIABLE, *model.PARAM_NAMES):
        x = depth[leaf]
        band = 0 if x <= split else 1
        key = (band, x)
        k = taken.get(key, 0)
        taken[key] = k + 1
        pos[leaf] = (x - band * (split + 1), -3.2 * band + 1.1 + 0.75 * k)
    return pos


def graph_figure(report: Report | None = None) -> Figure:
    """The forward pass of exercise 1 as a graph (from ``model.GRAPH``), each node coloured by
    the status of its gradient in ``report``."""
    status = {variable_name(d.name): d.status for d in report.rows} if report is not None else {}
    pos = _layout()
    fig = Figure(figsize=(15.5, 6.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_axis_off()
    for out, inputs, _ in model.GRAPH:
        for i in inputs:
            (x0, y0), (x1, y1) = pos[i], pos[out]
            skip = y0 == y1 and x1 - x0 > 1  # a variable used again further on: arc over the chain
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=1,
                        arrowprops=dict(arrowstyle="-|>", color="#78909c", lw=1.0, shrinkA=14, shrinkB=14,
                                        connectionstyle="arc3,rad=-0.35" if skip else "arc3,rad=0"))
    for name, (x, y) in pos.items():
        st = status.get(name)
        colour = STATUS_COLOURS.get(st, NO_GRADIENT) if st else NO_GRADIENT
        dark = st in ("exact", "wrong", "not finite")
        ax.text(x, y, name, ha="center", va="center", fontsize=8.5, zorder=3,
                color="white" if dark else "black",
                bbox=dict(boxstyle="round,pad=0.35", fc=colour, ec="#37474f", lw=0.8))
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.6)
    handles = [_patch(c, s) for s, c in STATUS_COLOURS.items()] + [_patch(NO_GRADIENT, "no gradient")]
    ax.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
              bbox_to_anchor=(0.5, -0.08))
    title = "The forward pass; each box coloured by the status of its gradient"
    if report is not None and report.first_wrong:
        title += f" (fix d{variable_name(report.first_wrong)} first)"
    ax.set_title(title, fontsize=11)
    return fig


def _patch(colour, label):
    from matplotlib.patches import Patch

    return Patch(facecolor=colour, edgecolor="#37474f", label=label)


# --- exercise 2: dlogits -------------------------------------------------------------------------

def dlogits_figure(dlogits: torch.Tensor) -> Figure:
    """The lecture's ``plt.imshow(dlogits, cmap='gray')``: (n, 27). Each row sums to zero: the
    correct class (dark) is pulled up as hard as all the others (light) are pushed down."""
    d = dlogits.detach().double().cpu()
    fig = Figure(figsize=(6, min(9.0, 6 * d.shape[0] / max(d.shape[1], 1) + 0.8)))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(d.numpy(), cmap="gray", interpolation="nearest")
    ax.set_xlabel("character (logit)")
    ax.set_ylabel("example in the batch")
    worst = float(d.sum(1).abs().max()) if d.numel() else 0.0
    ax.set_title(f"dlogits {tuple(d.shape)}: every row sums to zero (largest |row sum| {worst:.1e})",
                 fontsize=10)
    return fig


# --- exercise 3: Bessel's correction --------------------------------------------------------------

def bessel_curves(max_n: int = 32, samples: int = 10000, true_var: float = 4.0, seed: int = 0):
    """For sample sizes 2..max_n: the average biased (1/n) and unbiased (1/(n-1)) variance
    estimates over ``samples`` normal samples of variance ``true_var``, plus the raw estimates.
    Returns (ns, biased_mean, unbiased_mean, {n: (biased, unbiased)})."""
    g = torch.Generator().manual_seed(seed)
    ns = list(range(2, max_n + 1))
    biased_mean, unbiased_mean, raw = [], [], {}
    draws = torch.randn(samples, max_n, generator=g, dtype=torch.float64) * true_var**0.5
    for n in ns:
        x = draws[:, :n]  # the first n draws of each sample
        ss = ((x - x.mean(1, keepdim=True)) ** 2).sum(1)
        b, u = ss / n, ss / (n - 1)
        biased_mean.append(float(b.mean()))
        unbiased_mean.append(float(u.mean()))
        raw[n] = (b, u)
    return ns, biased_mean, unbiased_mean, raw


def bessel_figure(n: int, curves, true_var: float = 4.0) -> Figure:
    ns, bm, um, raw = curves
    fig = Figure(figsize=(10, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ns, bm, "o-", ms=3, color="#d32f2f", label="average of 1/n estimates (biased)")
    ax1.plot(ns, um, "o-", ms=3, color="#2e7d32", label="average of 1/(n-1) estimates (Bessel)")
    ax1.axhline(true_var, color="#212121", ls="--", lw=1, label="true variance")
    ax1.axvline(n, color="#78909c", lw=1)
    ax1.set_xlabel("sample size n")
    ax1.set_ylabel("variance")
    ax1.legend(fontsize=8)
    ax1.set_title("Averaged over many samples", fontsize=10)
    b, u = raw[n]
    hi = float(torch.quantile(u, 0.99))
    ax2.hist(b.numpy(), bins=60, range=(0, hi), alpha=0.55, color="#d32f2f", label="1/n")
    ax2.hist(u.numpy(), bins=60, range=(0, hi), alpha=0.55, color="#2e7d32", label="1/(n-1)")
    ax2.set_xlabel("variance estimate (one sample each)")
    ax2.axvline(true_var, color="#212121", ls="--", lw=1)
    ax2.axvline(float(b.mean()), color="#d32f2f", lw=2)
    ax2.axvline(float(u.mean()), color="#2e7d32", lw=2)
    ax2.set_title(f"n = {n}: biased mean {float(b.mean()):.2f}, unbiased mean {float(u.mean()):.2f}",
                  fontsize=10)
    ax2.legend(fontsize=8)
    return fig


class BesselDemo(W.VBox):
    """A sample-size slider; the plots show the biased estimate falling short by (n-1)/n."""

    def __init__(self, max_n: int = 32, samples: int = 10000, true_var: float = 4.0, seed: int = 0):
        self.curves = bessel_curves(max_n, samples, true_var, seed)
        self.true_var = true_var
        self.slider = W.IntSlider(value=4, min=2, max=max_n, description="sample size n",
                                  style={"description_width": "initial"},
                                  layout=W.Layout(width="420px"))
        self.caption = W.HTML("")
        self.plot = W.Output()
        self.figure: Figure | None = None
        self.slider.observe(lambda change: self.update(change["new"]), names="value")
        super().__init__([self.slider, self.caption, self.plot])
        self.update(self.slider.value)

    def update(self, n: int) -> None:
        ns, bm, um, _ = self.curves
        i = ns.index(n)
        self.caption.value = (f"With n = {n}, dividing by n gives on average {bm[i]:.3f}, about "
                              f"(n-1)/n = {(n - 1) / n:.3f} of the true variance {self.true_var:g}; "
                              f"dividing by n-1 gives {um[i]:.3f}.")
        self.figure = bessel_figure(n, self.curves, self.true_var)
        png = base64.b64encode(_png(self.figure)).decode("ascii")
        self.plot.outputs = ({"output_type": "display_data", "metadata": {},
                              "data": {"image/png": png, "text/plain": f"Bessel's correction, n = {n}"}},)


def bessel_demo(max_n: int = 32, samples: int = 10000, seed: int = 0) -> BesselDemo:
    """Interactive demonstration of Bessel's correction (exercise 3)."""
    return BesselDemo(max_n=max_n, samples=samples, seed=seed)
