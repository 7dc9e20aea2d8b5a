"""Hints you can trust: ``hint()`` answers for the notebook it is called in, every call shows its
hint, no hint reads as code, and every formula a hint states is checked against autograd on
fresh inputs (the course's tolerance), so a hint that misleads fails here, not in a learner's cell."""

import re

import pytest
import torch

from backprop_ninja import UserError, check, hints, mistakes, model
from backprop_ninja.hints import EXERCISES, Check, Hints


def fresh(seed, n, n_hidden, dtype=torch.float64, logit_scale=1.0):
    """(tensors, grads) as the grader makes them: fresh parameters and batch, autograd's gradients."""
    return model.fresh_inputs(seed, n, n_hidden, dtype, logit_scale)


# batch sizes 2..64 (2: BatchNorm's gradients are a millionth of their terms), widths 16..200
INPUTS = [(11, 2, 16), (12, 3, 64), (13, 7, 40), (14, 32, 64), (15, 64, 200)]


@pytest.fixture(scope="module")
def inputs():
    """(tensors, grads, terms) for each of INPUTS; terms: the course's tolerance context."""
    return [(*ti, check.gradient_terms(ti[0])) for ti in (fresh(seed, n, h) for seed, n, h in INPUTS)]


def shown(capsys, call) -> list[str]:
    """What ``call()`` printed, one hint a line (outside a kernel hints are printed)."""
    call()
    return capsys.readouterr().out.splitlines()


# -- what a hint's words say is what autograd computes


def every_check():
    seen = set()
    for ex, table in EXERCISES.items():
        for var, grad in table.items():
            for k, step in enumerate(grad.steps, 1):
                for j, c in enumerate(step.checks):
                    if id(c) not in seen:  # exercise 4 shares exercise 1's and 3's steps
                        seen.add(id(c))
                        yield pytest.param(var, c, id=f"ex{ex}-d{var}-hint{k}-{j}")


def agrees(c: Check, var: str, tensors, grads, terms) -> tuple[bool, float]:
    """Does the check's formula give autograd's value, to the course's tolerance? (verdict, ratio)"""
    says, equals = c.run(var, tensors, grads)
    terms = terms[var]
    if c.scale is not None:
        terms = terms * c.scale(hints.Forward(tensors, n=int(tensors["Xb"].shape[0])))
    assert says.shape == equals.shape, (tuple(says.shape), tuple(equals.shape))
    return check.within_tolerance(says, equals, terms), check.tolerance_ratio(says, equals, terms)


@pytest.mark.parametrize(("var", "c"), list(every_check()))
def test_every_formula_a_hint_states_matches_autograd(var, c, inputs):
    for (_, n, h), (tensors, grads, terms) in zip(INPUTS, inputs):
        ok, ratio = agrees(c, var, tensors, grads, terms)
        assert ok, f"d{var}: the hint's formula misses autograd by {ratio:.3g}x the tolerance (n={n}, H={h})"


def test_the_formula_check_rejects_the_old_misleading_dhprebn_hint(inputs):
    """The old third hint for dhprebn scaled the bnraw gradient (which holds bngain) by bngain again: 8.4%
    off on the lecture batch. The same check must reject it, and the Bessel-less variant too."""

    def old(t, d):
        g = t.bngain * d.hpreact
        return t.bngain * t.bnvar_inv * (g - g.mean(0, keepdim=True)
                                         - t.n / (t.n - 1) * t.bnraw * (t.bnraw * g).mean(0, keepdim=True))

    def biased(t, d):
        g = t.bngain * d.hpreact
        return t.bnvar_inv * (g - g.mean(0, keepdim=True) - t.bnraw * (t.bnraw * g).mean(0, keepdim=True))

    for wrong in (old, biased):
        assert not any(agrees(Check(wrong), "hprebn", *ti)[0] for ti in inputs[1:]), wrong.__name__


def test_every_hint_after_the_shape_states_a_checked_formula():
    for ex, table in EXERCISES.items():
        for var, grad in table.items():
            unchecked = [k for k, step in enumerate(grad.steps[1:], 2) if not step.checks]
            assert not unchecked, f"exercise {ex}, d{var}: hints {unchecked} have no check"


def test_each_first_hint_states_the_gradients_real_shape(inputs):
    for (_, n, h), (tensors, _, _) in zip(INPUTS, inputs):
        sizes = {"n": n, "n_hidden": h}
        for ex, table in EXERCISES.items():
            for var, grad in table.items():
                assert grad.steps[0].text.startswith(f"d{var} has the shape of {var}, {grad.shape}")
                dims = tuple(sizes.get(s, None) or int(s) for s in re.findall(r"\w+", grad.shape))
                assert dims == tuple(tensors[var].shape), (ex, var, grad.shape)


def test_the_stable_softmax_hint_holds_for_logits_in_the_thousands():
    """Exercise 2's last hint: against F.cross_entropy's gradient, where the chunked forward overflows."""
    last = EXERCISES[2]["logits"].steps[-1].checks[0]
    for seed, n in ((21, 3), (22, 32)):
        tensors, grads = fresh(seed, n, 64, logit_scale=3000.0)
        assert tensors["logits"].abs().max() > 1000
        logits = tensors["logits"].clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(logits, tensors["Yb"]).backward()
        says, _ = last.run("logits", tensors, grads)
        assert check.within_tolerance(says, logits.grad), check.tolerance_ratio(says, logits.grad)


# -- no hint reads as code

CODE = re.compile(
    r"=|@|\*\*|\btorch\b|\bF\.|\bnn\.|[A-Za-z_]\(|\[\s*:|:\s*\]|\brange\b|\bkeepdim\b|\bdim\b|"
    r"\b(zeros_like|ones_like|one_hot|softmax|cross_entropy)\b\s*\(|"
    r"\.(sum|mean|max|min|view|reshape|T|shape|exp|log|clone|indices|values|item|float|double|to|"
    r"unsqueeze|squeeze|expand|repeat|index_add_?|scatter_add_?|grad|backward)\b")


def test_no_hint_contains_code():
    texts = hints.texts()
    assert len(texts) == sum(len(g.steps) for table in EXERCISES.values() for g in table.values())
    code = {where: CODE.findall(text) for where, text in texts.items() if CODE.search(text)}
    assert not code, code


def test_the_code_detector_catches_code():
    for line in ("dlogits = F.softmax(logits, 1)", "dh = dlogits @ W2.T", "x.sum(0, keepdim=True)",
                 "torch.zeros_like(logprobs)", "(bnvar + 1e-5)**-1.5", "demb[:, 0]", "dC[Xb] += demb",
                 "logits.max(1).indices", "dembcat.view(emb.shape)"):
        assert CODE.search(line), line


# -- routing: a hint answers for its own exercise


def test_exercise_1s_dlogits_and_dhprebn_are_its_own_stepwise_lines(capsys):
    one, two, three = Hints(exercise=1), Hints(exercise=2), Hints(exercise=3)
    (a,) = shown(capsys, lambda: one("dlogits"))
    (b,) = shown(capsys, lambda: two("dlogits"))
    assert a.startswith("Hint 1/3 for dlogits") and "two branches" in a
    assert b.startswith("Hint 1/4 for dlogits") and "Work on paper" in b
    (a,) = shown(capsys, lambda: one("hprebn"))
    (b,) = shown(capsys, lambda: three("hprebn"))
    assert a.startswith("Hint 1/3 for dhprebn") and "two branches" in a
    assert b.startswith("Hint 1/4 for dhprebn") and "one column" in b
    assert a != b


def test_each_exercise_knows_its_own_gradients():
    assert list(EXERCISES[1]) == list(model.BACKWARD_ORDER)
    assert list(EXERCISES[2]) == ["logits"] and list(EXERCISES[3]) == ["hprebn"]
    assert set(EXERCISES[4]) == {*model.PARAM_NAMES, "logits", "hprebn"}
    assert EXERCISES[4]["logits"] is EXERCISES[2]["logits"]  # fused, as in exercise 2
    assert EXERCISES[4]["hprebn"].steps[:4] == EXERCISES[3]["hprebn"].steps  # plus one: reuse the sums
    assert EXERCISES[4]["W2"] is EXERCISES[1]["W2"]


def test_exercise_4_says_how_to_make_dC_fast(capsys):
    hint = Hints(exercise=4)
    lines = shown(capsys, lambda: [hint("dC") for _ in range(4)])
    assert lines[-1].startswith("Hint 4/4 for dC: Make it fast") and "scatter-add" in lines[-1]
    assert "index_add_" in lines[-1] and "one-hot" in lines[-1]


# -- every call shows its hint; progression; reset


def test_two_calls_in_one_cell_show_two_hints(capsys):
    hint = Hints(exercise=1)
    assert hint("counts") is None
    assert hint("dcounts") is None  # with or without the d: the same gradient
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("Hint 1/3 for dcounts: ") and second.startswith("Hint 2/3 for dcounts: ")


def test_in_a_kernel_every_call_is_displayed_as_html_with_its_plain_text(monkeypatch, capsys):
    import IPython.display

    displayed = []
    monkeypatch.setattr(hints, "in_notebook", lambda: True)
    monkeypatch.setattr(IPython.display, "display", lambda data, raw: displayed.append((data, raw)))
    hint = Hints(exercise=3)
    hint("dhprebn")
    hint("dhprebn")
    assert capsys.readouterr().out == ""
    assert [raw for _, raw in displayed] == [True, True]
    (first, _), (second, _) = displayed
    assert first["text/plain"].startswith("Hint 1/4 for dhprebn: ")
    assert second["text/plain"].startswith("Hint 2/4 for dhprebn: ")
    assert "<b>Hint 2/4 for dhprebn</b>" in second["text/html"]
    assert "γ" in second["text/html"] and "x̂<sub>i</sub>" in second["text/html"]  # the maths typeset


def test_the_hints_progress_then_repeat_the_last_and_reset_starts_over(capsys):
    hint = Hints(exercise=1)
    lines = shown(capsys, lambda: [hint("bnvar") for _ in range(4)])
    steps = [s.text for s in EXERCISES[1]["bnvar"].steps]
    assert lines[:3] == [f"Hint {k}/3 for dbnvar: {steps[k - 1]}" for k in (1, 2, 3)]
    assert lines[3] == f"No more hints for dbnvar: the last one again (3/3): {steps[2]}"
    assert "power rule" in lines[1] and "dbnvar_inv" in lines[2]
    hint("dh")
    hint.reset("dbnvar")
    capsys.readouterr()
    assert shown(capsys, lambda: hint("bnvar"))[0].startswith("Hint 1/3 for dbnvar")
    assert shown(capsys, lambda: hint("h"))[0].startswith("Hint 2/3 for dh")  # untouched by reset("dbnvar")
    hint.reset()
    assert shown(capsys, lambda: hint("h"))[0].startswith("Hint 1/3 for dh")
    assert shown(capsys, lambda: Hints(exercise=1)("bnvar"))[0].startswith("Hint 1/3")  # its own count


def test_an_unknown_name_is_one_sentence_listing_the_exercises_names():
    with pytest.raises(UserError) as e:
        Hints(exercise=1)("dfoo")
    message = str(e.value)
    assert message.startswith("No hints for 'dfoo' in exercise 1: ask for dlogprobs, dprobs, ")
    assert message.endswith(", demb or dC.") and "\n" not in message
    with pytest.raises(UserError, match=r"^No hints for 'dhprebn' in exercise 2: ask for dlogits "
                                        r"\(dhprebn has hints in exercises 1, 3 and 4\)\.$"):
        Hints(exercise=2)("dhprebn")
    with pytest.raises(UserError, match=r"in exercise 4: ask for dC, dW1, db1, dW2, db2, dbngain, dbnbias, "
                                        r"dlogits or dhprebn \(dh has hints in exercise 1\)"):
        Hints(exercise=4)("dh")
    with pytest.raises(UserError, match="No hints for 'dfoo'"):
        Hints(exercise=4).reset("dfoo")
    with pytest.raises(UserError, match="There is no exercise 5"):
        Hints(exercise=5)


def test_the_hint_object_says_how_to_use_it(capsys):
    usage = 'hint("d<name>") shows the next hint for a gradient of exercise 2: dlogits.'
    assert repr(Hints(exercise=2)) == usage
    assert shown(capsys, lambda: Hints(exercise=2)()) == [f"Hints for exercise 2: {usage}"]


# -- the report and the grader name a hint that exists in their own exercise

FEEDBACK = {1: model.BACKWARD_ORDER, 2: ("logits",), 3: ("hprebn",), 4: model.PARAM_NAMES}


@pytest.mark.parametrize("exercise", FEEDBACK)
def test_the_feedbacks_hint_call_resolves_in_its_own_exercise(exercise, capsys):
    hint = Hints(exercise=exercise)
    for var in FEEDBACK[exercise]:
        for name in (var, f"d{var}"):  # the judge passes "logits", a report may pass "dlogits"
            sentence = mistakes.sentence(check.variable_name(name))
            (called,) = re.findall(r'hint\("([^"]*)"\)', sentence)
            assert called == f"d{var}"
            hint(called)
            assert capsys.readouterr().out.startswith(f"Hint 1/{len(EXERCISES[exercise][var].steps)} "
                                                      f"for d{var}: ")
            hint.reset()


def test_a_wrong_dlogits_in_exercise_2_is_sent_to_exercise_2s_hint(inputs, capsys):
    tensors, grads, _ = inputs[3]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(grads["logits"].shape, generator=g, dtype=torch.float64)
    d = check.diagnose_one("logits", grads["logits"] + noise, grads["logits"], tensors)
    assert d.status == "wrong" and d.mistake is None
    assert 'hint("dlogits")' in d.hint
    Hints(exercise=2)("dlogits")
    assert "Work on paper" in capsys.readouterr().out


# -- in a real kernel


@pytest.mark.slow
def test_two_hint_calls_in_one_notebook_cell_show_both():
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from backprop_ninja.hints import Hints\nhint = Hints(exercise=1)"),
                nbformat.v4.new_code_cell('hint("counts")\nhint("counts")')]
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outputs = nb.cells[1].outputs
    assert [o.output_type for o in outputs] == ["display_data", "display_data"], outputs
    assert "<b>Hint 1/3 for dcounts</b>" in outputs[0].data["text/html"]
    assert outputs[1].data["text/plain"].startswith("Hint 2/3 for dcounts: ")
