"""What the learner looks at: the report widget, the graph, dlogits and Bessel's demo, checked
without a browser (build the widget, click a row, look at what it shows). Hints: test_hints.py."""

import base64

import pytest
import torch
from matplotlib.colors import to_hex
from test_diagnosis import fresh, stepwise

from backprop_ninja import model, widgets
from backprop_ninja.check import diagnose


@pytest.fixture(scope="module")
def broken():
    """A learner whose dW2 has a flipped sign and whose dbnvar lost its keepdim."""
    tensors, ref = fresh(7, torch.float32, n=16, n_hidden=32)
    g = stepwise(tensors)
    g["W2"] = -g["W2"]
    g["bnvar"] = g["bnvar"].view(-1)
    return diagnose(g, tensors, ref)


@pytest.fixture(scope="module")
def inherited():
    """A learner whose dh is doubled and whose dhpreact follows correctly from it ("inherited")."""
    tensors, ref = fresh(111, torch.float64, n=12, n_hidden=20)
    g = stepwise(tensors)
    g["h"] = g["h"] * 2
    g["hpreact"] = (1.0 - tensors["h"] ** 2) * g["h"]
    return diagnose(g, tensors, ref)


def _png_of(output_widget):
    (out,) = output_widget.outputs
    return base64.b64decode(out["data"]["image/png"])


def test_report_widget_has_a_coloured_row_per_gradient_and_opens_on_the_first_wrong(broken):
    w = widgets.report_widget(broken)
    assert list(w.buttons) == list(model.BACKWARD_ORDER)
    assert w.buttons["W2"].style.button_color == widgets.STATUS_COLOURS["wrong"]
    assert w.buttons["bnvar"].style.button_color == widgets.STATUS_COLOURS["wrong shape"]
    assert w.buttons["logprobs"].style.button_color == widgets.STATUS_COLOURS["exact"]
    assert "Fix dW2 first:" in w.summary.value and "opposite sign" in w.summary.value
    assert w.selected == "W2"
    assert _png_of(w.detail).startswith(b"\x89PNG")
    assert "sign flipped" in w.caption.value


def test_clicking_a_row_shows_learner_autograd_and_difference(broken):
    w = widgets.report_widget(broken)
    w.buttons["W2"].click()
    titles = [ax.get_title() for ax in w.figure.axes if ax.get_title()]
    assert titles == ["your dW2 (32, 27)", "autograd (32, 27)",
                      "yours - autograd"]
    images = [ax.images[0].get_array() for ax in w.figure.axes if ax.images]
    yours, autograd, diff = (torch.tensor(a.data) for a in images)
    assert torch.allclose(yours, -autograd) and torch.allclose(diff, yours - autograd)
    assert w.buttons["W2"].layout.border and not w.buttons["h"].layout.border

    w.buttons["bnvar"].click()  # a wrong shape: no difference panel, and the fix in the caption
    assert w.selected == "bnvar"
    assert any(t.get_text() == "(shapes differ)" for ax in w.figure.axes for t in ax.texts)
    assert "keepdim" in w.caption.value
    assert not w.buttons["W2"].layout.border


def test_plain_text_form_of_the_widget_is_the_report_table_and_its_verdict(broken):
    w = widgets.report_widget(broken)
    bundle = w._repr_mimebundle_()
    table = "\n".join(d.line() for d in broken.rows)
    assert bundle["text/plain"] == table + "\n" + "\n".join(widgets.verdict(broken))
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_the_verdict_is_said_once_with_the_count_the_grader_would_give(inherited):
    w = widgets.report_widget(inherited)
    assert inherited["hpreact"].status == "inherited" and inherited.first_wrong == "h"
    assert widgets.graded_line_by_line(inherited) == 25  # dh loses its point, dhpreact keeps it
    head, fix = widgets.verdict(inherited)
    assert head.startswith("24/26 gradients correct here; the grader, judging line by line, "
                           "would give 25/26.")
    assert "1 inherited (amber)" in head and fix.startswith("Fix dh first: ")
    assert w.summary.value.count("gradients correct") == 1 and "would give 25/26" in w.summary.value
    # the first wrong gradient's hint is in the verdict, not repeated under the heatmaps
    assert w.selected == "h" and inherited.hint not in w.caption.value
    w.select("hpreact")
    assert "inherited" in w.caption.value and inherited["hpreact"].hint[:40] in w.caption.value
    assert w.buttons["hpreact"].style.button_color == widgets.STATUS_COLOURS["inherited"] == "#ffb300"
    assert widgets.STATUS_COLOURS["missing"] == "#9e9e9e"  # grey


def test_all_right_the_grader_agrees_and_one_gradient_has_no_grader_count():
    tensors, ref = fresh(8)
    report = diagnose(dict(ref), tensors, ref)
    assert widgets.verdict(report) == ["26/26 gradients correct here; the grader, judging line by line, "
                                       "would give 26/26."]
    one = diagnose({"logits": ref["logits"]}, tensors, ref, order=("logits",))
    assert widgets.verdict(one) == ["1/1 gradients correct."]  # exercises 2 and 3 score per test


def test_rows_wrap_instead_of_cutting_their_text_off():
    tensors, ref = fresh(9)
    from backprop_ninja.check import branches

    g = dict(ref, counts=branches(tensors, ref)["counts"]["probs"])  # the counts_sum branch left out
    w = widgets.report_widget(diagnose(g, tensors, ref))
    row = next(r for r in w.table.children if r.children[0].description == "counts")
    button, text = row.children
    assert "missing branch through counts_sum" in text.value
    assert "white-space:normal" in text.value  # wraps (the widget's HTML is single-line otherwise)
    assert row.layout.height == "auto" and text.layout.min_width == "0"


def test_show_report_outside_jupyter_prints_the_table(capsys):
    tensors, ref = fresh(8)
    report = widgets.show_report(dict(ref), tensors, ref)
    assert report.first_wrong is None
    assert capsys.readouterr().out.strip().endswith("26/26 gradients correct here; the grader, judging "
                                                    "line by line, would give 26/26.")


def test_graph_colours_each_node_by_its_gradient_status(broken):
    fig = widgets.graph_figure(broken)
    boxes = {t.get_text(): t.get_bbox_patch() for t in fig.axes[0].texts}
    assert set(model.FORWARD_NAMES) | set(model.PARAM_NAMES) <= set(boxes)
    assert to_hex(boxes["W2"].get_facecolor()) == widgets.STATUS_COLOURS["wrong"]
    assert to_hex(boxes["bnvar"].get_facecolor()) == widgets.STATUS_COLOURS["wrong shape"]
    assert to_hex(boxes["h"].get_facecolor()) == widgets.STATUS_COLOURS["exact"]
    assert to_hex(boxes["Xb"].get_facecolor()) == widgets.NO_GRADIENT
    # every edge of the forward pass is drawn
    n_edges = sum(len(inputs) for _, inputs, _ in model.GRAPH)
    assert sum(1 for c in fig.axes[0].texts if c.get_text() == "") == n_edges


def test_dlogits_figure_is_the_lecture_imshow():
    tensors, ref = fresh(9)
    fig = widgets.dlogits_figure(ref["logits"])
    (img,) = fig.axes[0].images
    assert img.get_array().shape == (32, 27) and img.get_cmap().name == "gray"
    assert "every row sums to zero" in fig.axes[0].get_title()


def test_bessel_demo_slider_shows_the_biased_estimate_falling_short():
    demo = widgets.bessel_demo(max_n=12, samples=4000)
    ns, biased, unbiased, _ = demo.curves
    for n, b, u in zip(ns, biased, unbiased):  # E[1/n estimate] = (n-1)/n * true variance
        assert b == pytest.approx(4.0 * (n - 1) / n, rel=0.08)
        assert u == pytest.approx(4.0, rel=0.08)
    demo.slider.value = 3
    assert "n = 3" in demo.caption.value and "0.667" in demo.caption.value
    assert "n = 3" in demo.figure.axes[1].get_title()
    again = widgets.bessel_demo(max_n=12, samples=4000)  # seeded: the same numbers every time
    assert again.curves[1] == biased


def test_show_report_in_jupyter_shows_the_verdict_once_then_the_widget(monkeypatch, capsys):
    import IPython.display

    shown = []
    monkeypatch.setattr(widgets, "in_notebook", lambda: True)
    monkeypatch.setattr(IPython.display, "display", shown.append)
    tensors, ref = fresh(10)
    grads = dict(ref, b2=-ref["b2"])
    report = widgets.show_report(grads, tensors, ref)
    verdict, w = shown
    assert capsys.readouterr().out == ""
    # the verdict as its own output: HTML (JupyterLab and the HTML feedback, where a widget does
    # not render) and text (nbval, plain outputs) ...
    bundle = verdict._repr_mimebundle_()
    assert bundle["text/plain"].startswith("25/26 gradients correct here; the grader, judging line by line, "
                                           "would give 25/26.\nFix db2 first: db2 has the opposite sign")
    assert "Fix db2 first:" in bundle["text/html"] and "backprop-ninja-verdict" in bundle["text/html"]
    # ... and not again in the widget: rows and heatmaps only
    assert isinstance(w, widgets.ReportWidget) and w.report is report and w.selected == "b2"
    assert w.summary not in w.children
    plain = w._repr_mimebundle_()["text/plain"]
    assert plain == "\n".join(d.line() for d in report.rows) and "gradients correct" not in plain
