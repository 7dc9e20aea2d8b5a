"""The lecture's model: seeded parameters, chunkated forward, autograd reference."""

import torch
import torch.nn.functional as F

from backprop_ninja import model


def test_every_parameter_comes_from_the_seeded_generator():
    torch.manual_seed(0)
    a = model.init_params()
    torch.manual_seed(1)  # the global RNG must not matter (the lecture's bngain/bnbias did)
    b = model.init_params()
    assert all(torch.equal(a[k], b[k]) for k in model.PARAM_NAMES)
    c = model.init_params(seed=1)
    assert not torch.equal(a["bngain"], c["bngain"])


def test_parameter_shapes():
    p = model.init_params(model.Config(n_hidden=64))
    shapes = {k: tuple(v.shape) for k, v in p.items()}
    assert shapes == {"C": (27, 10), "W1": (30, 64), "b1": (64,), "W2": (64, 27), "b2": (27,),
                      "bngain": (1, 64), "bnbias": (1, 64)}


def test_chunkated_loss_equals_cross_entropy():
    p = model.init_params()
    g = torch.Generator().manual_seed(0)
    Xb = torch.randint(0, 27, (32, 3), generator=g)
    Yb = torch.randint(0, 27, (32,), generator=g)
    out = model.forward(p, Xb, Yb)
    assert torch.allclose(out["loss"], F.cross_entropy(out["logits"], Yb))
    assert set(model.FORWARD_NAMES) <= set(out)


def test_autograd_reference_has_every_gradient_with_its_shape():
    p = model.init_params(dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    Xb = torch.randint(0, 27, (8, 3), generator=g)
    Yb = torch.randint(0, 27, (8,), generator=g)
    tensors, grads = model.autograd_reference(p, Xb, Yb)
    assert set(grads) == set(model.BACKWARD_ORDER)
    for name, grad in grads.items():
        assert grad.shape == tensors[name].shape and grad.dtype == torch.float64
        assert not grad.requires_grad
    assert not any(v.requires_grad for v in p.values())


def test_local_gradients_fed_true_upstream_give_autograd():
    p = model.init_params(model.Config(n_hidden=16), seed=3, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    Xb, Yb = torch.randint(0, 27, (5, 3), generator=g), torch.randint(0, 27, (5,), generator=g)
    tensors, grads = model.autograd_reference(p, Xb, Yb)
    local = model.local_gradients(tensors, grads)
    assert set(local) == set(model.BACKWARD_ORDER)
    for name in model.BACKWARD_ORDER:
        assert torch.allclose(local[name], grads[name], atol=1e-12), name


def test_local_gradients_charge_a_mistake_once():
    p = model.init_params(model.Config(n_hidden=16), seed=4, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    Xb, Yb = torch.randint(0, 27, (6, 3), generator=g), torch.randint(0, 27, (6,), generator=g)
    tensors, grads = model.autograd_reference(p, Xb, Yb)
    wrong = dict(grads, h=-grads["h"])  # a sign error in dh ...
    local = model.local_gradients(tensors, wrong)
    # ... makes the true dhpreact differ from what dh's backward step gives
    assert not torch.allclose(local["hpreact"], grads["hpreact"])
    # while dh itself is judged against its own line, fed the (correct) dlogits
    assert torch.allclose(local["h"], grads["h"])
