"""cmp: the lecture's output format, plus the shape check the lecture lacks."""

import torch

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
