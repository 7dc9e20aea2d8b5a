"""What the learner looks at: the report widget, the graph, dlogits, Bessel's demo and hints,
checked without a browser (build the widget, click a row, look at what it shows)."""

import base64

import pytest
import torch
from matplotlib.colors import to_hex
from test_diagnosis import fresh, stepwise

from backprop_ninja import UserError, hints, model, widgets
from backprop_ninja.check import diagnose


@pytest.fixture(scope="module")
def broken():
    """A learner whose dW2 has a flipped sign and whose dbnvar lost its keepdim."""
    tensors, ref = fresh(7, torch.float32, n=16, n_hidden=32)
    g = stepwise(tensors)
    g["W2"] = -g["W2"]
    g["bnvar"] = g["bnvar"].view(-1)
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


def test_plain_text_form_of_the_widget_is_the_report_table(broken):
    w = widgets.report_widget(broken)
    bundle = w._repr_mimebundle_()
    assert bundle["text/plain"] == broken.text()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_show_report_outside_jupyter_prints_the_table(capsys):
    tensors, ref = fresh(8)
    report = widgets.show_report(dict(ref), tensors, ref)
    assert report.first_wrong is None
    assert capsys.readouterr().out.strip().endswith("26/26 gradients correct.")


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


def test_progressive_hints_advance_and_never_show_code():
    hints.reset()
    first, second, third, fourth = (hints.hint("bnvar") for _ in range(4))
    assert first.startswith("Hint 1/3") and "(1, n_hidden)" in first
    assert second.startswith("Hint 2/3") and "power rule" in second
    assert third.startswith("Hint 3/3") and "dbnvar_inv" in third
    assert "No more hints" in fourth
    assert "No more hints" in hints.hint("dbnvar")  # dbnvar and bnvar are the same gradient
    hints.reset("bnvar")
    assert hints.hint("dbnvar").startswith("Hint 1/3")
    assert repr(hints.hint("dlogits")).startswith("Hint 1/3 for dlogits")


def test_every_gradient_has_three_hints_without_code():
    hints.reset()
    for name in (*model.BACKWARD_ORDER, "dlogits", "dhprebn"):
        texts = [hints.hint(name) for _ in range(3)]
        assert [t.split(":")[0] for t in texts] == [f"Hint {k}/3 for {name}" for k in (1, 2, 3)]
        for t in texts:
            assert "torch" not in t and "(0, keepdim" not in t and ".sum(" not in t and "==" not in t


def test_an_unknown_hint_name_is_one_clear_sentence():
    with pytest.raises(UserError, match="No hints for 'dfoo'"):
        hints.hint("dfoo")


def test_show_report_in_jupyter_prints_the_summary_and_displays_the_widget(monkeypatch, capsys):
    import IPython.display

    shown = []
    monkeypatch.setattr(widgets, "_in_notebook", lambda: True)
    monkeypatch.setattr(IPython.display, "display", shown.append)
    tensors, ref = fresh(10)
    grads = dict(ref, b2=-ref["b2"])
    report = widgets.show_report(grads, tensors, ref)
    (w,) = shown
    assert isinstance(w, widgets.ReportWidget) and w.report is report and w.selected == "b2"
    out = capsys.readouterr().out
    assert out.startswith("25/26 gradients correct.\nFix db2 first: db2 has the opposite sign")
