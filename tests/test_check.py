"""cmp: the lecture's output format, plus the shape and dtype checks the lecture lacks, judged by
the course's tolerance policy (the one the report and the grader use)."""

import contextlib
import io

import torch
from test_diagnosis import finite_differences, fresh, richardson2, stepwise

from backprop_ninja import model
from backprop_ninja.check import cmp


def _with_grad(grad):
    t = torch.zeros_like(grad, requires_grad=True)
    t.grad = grad.clone()
    return t


def test_cmp_prints_the_lecture_line(capsys):
    g = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    assert cmp("logits", g.clone(), _with_grad(g))
    line = capsys.readouterr().out.strip()
    assert line == f"{'logits':15s} | exact: True  | approximate: True  | maxdiff: 0.0"


def test_cmp_catches_a_broadcasting_shape_mistake(capsys):
    g = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(g.view(64), g)  # what the lecture's cmp would accept
    assert not cmp("bngain", g.view(64), _with_grad(g))
    assert "wrong shape: (64,), expected (1, 64)" in capsys.readouterr().out


def test_cmp_reports_a_wrong_value(capsys):
    g = torch.ones(3)
    assert not cmp("b2", -g, _with_grad(g))
    assert "approximate: False" in capsys.readouterr().out


# --- the course's tolerance policy (check.within_tolerance), not torch.allclose ----------------

def test_cmp_says_approximate_by_the_course_policy_not_allclose(capsys):
    tensors, ref = fresh(21, torch.float64, n=16, n_hidden=24)
    right = stepwise(tensors)["hpreact"]  # computed by hand: equal to autograd up to rounding
    assert not torch.equal(right, ref["hpreact"])
    assert cmp("hpreact", right, _with_grad(ref["hpreact"]), tensors)
    assert "exact: False | approximate: True" in capsys.readouterr().out
    slipped = ref["hpreact"] * (1 + 1e-7)
    assert torch.allclose(slipped, ref["hpreact"])  # the lecture's cmp: approximate True
    assert not cmp("hpreact", slipped, _with_grad(ref["hpreact"]), tensors)
    assert "approximate: False" in capsys.readouterr().out


def test_cmp_with_the_forward_tensors_rejects_a_finite_difference_it_cannot_without():
    """Without the tensors the policy does not know what dh adds up, and has to guess generously;
    with them (the notebooks' ``lecture`` dict, which also holds n) it is exact enough."""
    tensors, ref = fresh(704, torch.float64, n=4, n_hidden=8)
    lecture = {k: tensors[k] for k in ("Xb", "Yb", *model.PARAM_NAMES, *model.FORWARD_NAMES)}
    lecture["n"] = 4
    (fd,) = finite_differences(tensors, "h", [(richardson2, 0.3)]).values()  # the best one for dh
    with contextlib.redirect_stdout(io.StringIO()):
        assert cmp("h", fd, ref["h"])
        assert not cmp("h", fd, ref["h"], lecture)
        assert cmp("h", stepwise(tensors)["h"], ref["h"], lecture)


def test_cmp_flags_a_wrong_dtype_and_says_what_to_do(capsys):
    tensors, ref = fresh(22, torch.float64, n=8, n_hidden=16)
    mine = torch.zeros((8, 27))  # float32 whatever the inputs are
    mine.copy_(ref["logits"])
    assert torch.allclose(mine.double(), ref["logits"])
    assert not cmp("logits", mine, ref["logits"], tensors)
    line = capsys.readouterr().out
    assert line.startswith(f"{'logits':15s} | wrong dtype: float32, expected float64 | ")
    assert "zeros_like" in line and "dtype" in line
    assert not cmp("logprobs", torch.zeros_like(ref["logprobs"], dtype=torch.int64), ref["logprobs"])
    assert "wrong dtype: int64, expected float64" in capsys.readouterr().out
