"""Exercise 4 (full training): the fast reference backward, the training loop, the CLI."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from backprop_ninja import UserError, cli, data, inference, model, reference, speed
from backprop_ninja import train as T


@pytest.fixture(scope="module")
def lecture(words):
    """(splits, itos) of whatever data/names.txt holds."""
    return data.lecture_data()


@pytest.mark.parametrize("backward", [reference.fused_backward, reference.lecture_backward])
@pytest.mark.parametrize("seed,batch,n_hidden", [(0, 32, 200), (1, 2, 16), (2, 7, 64), (3, 100, 30)])
def test_reference_backward_matches_autograd_on_fresh_inputs(backward, seed, batch, n_hidden):
    tensors, grads = model.fresh_inputs(seed, batch, n_hidden)
    before = {k: v.clone() for k, v in tensors.items()}
    with torch.no_grad():
        got = backward(**tensors)
    assert set(got) == set(model.PARAM_NAMES)
    for name in model.PARAM_NAMES:
        assert got[name].shape == grads[name].shape, name
        assert torch.allclose(got[name], grads[name], rtol=1e-9, atol=1e-12), name
    # the reference works on tensors it created: the forward's tensors are left intact
    assert all(torch.equal(before[k], tensors[k]) for k in before)


def test_fused_backward_gives_the_training_forward_what_autograd_gives(lecture):
    (Xtr, Ytr), _, _ = lecture[0]
    p = model.init_params(model.Config(n_hidden=200), dtype=torch.float64)
    Xb, Yb = Xtr[:32], Ytr[:32]
    _, grads = model.autograd_reference(p, Xb, Yb)
    with torch.no_grad():
        got = reference.fused_backward(**T.forward(p, Xb, Yb))
    for name in model.PARAM_NAMES:
        assert torch.allclose(got[name], grads[name], rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_manual_and_autograd_training_follow_the_same_loss_curve(lecture, dtype, tol):
    splits, itos = lecture
    kw = dict(seed=7, splits=splits, itos=itos, progress=False, dtype=dtype, calibrate_bn=False)
    manual = T.train("manual", 1000, **kw)
    auto = T.train("autograd", 1000, **kw)
    assert len(manual.losses) == len(auto.losses) == 1000
    diff = max(abs(a - b) for a, b in zip(manual.losses, auto.losses))
    assert diff < tol, f"loss curves differ by {diff}"
    assert manual.losses[-1] < manual.losses[0] - 0.5  # it did learn
    for name in model.PARAM_NAMES:
        assert torch.allclose(manual.params[name], auto.params[name], atol=tol * 10), name


def test_the_training_forward_computes_the_lectures_lines_with_the_fused_loss():
    tensors, _ = model.fresh_inputs(4, 9, 20)
    params = {k: tensors[k] for k in model.PARAM_NAMES}
    got = T.forward(params, tensors["Xb"], tensors["Yb"])
    assert list(got) == list(T.FORWARD_KEYWORDS)
    for name in T.TRAINING_LINES:
        assert torch.allclose(got[name], tensors[name], rtol=1e-12, atol=1e-15), name
    assert got["n"] == 9 and torch.allclose(got["loss"], tensors["loss"], rtol=1e-12)


def test_a_backward_without_catch_all_keywords_gets_only_what_it_names(lecture):
    splits, itos = lecture
    def strict(*, Xb, Yb, C, W1, W2, bngain, embcat, bnraw, bnvar_inv, h, logits):
        return reference.fused_backward(Xb=Xb, Yb=Yb, C=C, W1=W1, W2=W2, bngain=bngain, embcat=embcat,
                                        bnraw=bnraw, bnvar_inv=bnvar_inv, h=h, logits=logits)

    r = T.train(strict, 20, splits=splits, itos=itos, progress=False, calibrate_bn=False)
    assert r.losses == T.train("manual", 20, splits=splits, itos=itos, progress=False,
                               calibrate_bn=False).losses


def test_inference_runs_the_forward_lines_with_the_calibrated_statistics(lecture):
    """The lecture's inference: bngain * (hprebn - bnmean) / sqrt(bnvar + eps) + bnbias, tanh, W2."""
    (Xtr, _), (Xdev, _), _ = lecture[0]
    p = model.init_params(model.Config(n_hidden=50), seed=5, dtype=torch.float64)
    bnmean, bnvar = inference.calibrate(p, Xtr[:5000])
    hprebn = p["C"][Xtr[:5000]].view(5000, -1) @ p["W1"] + p["b1"]
    assert torch.allclose(bnmean, hprebn.mean(0, keepdim=True))
    assert torch.allclose(bnvar, hprebn.var(0, keepdim=True))
    X = Xdev[:100]
    h = torch.tanh(p["bngain"] * (p["C"][X].view(100, -1) @ p["W1"] + p["b1"] - bnmean)
                   * (bnvar + model.BN_EPS) ** -0.5 + p["bnbias"])
    assert torch.allclose(inference.logits(p, (bnmean, bnvar), X), h @ p["W2"] + p["b2"], rtol=1e-12)


def test_a_backward_that_calls_autograd_is_stopped(lecture):
    splits, itos = lecture
    seen = {}

    def sneaky(*, loss, logits, W2, **_):
        seen.update(grad_enabled=torch.is_grad_enabled(),
                    requires_grad=logits.requires_grad or W2.requires_grad)
        loss.backward()

    with pytest.raises(T.AutogradUsedError, match="by hand"):
        T.train(sneaky, 5, splits=splits, itos=itos, progress=False)
    assert seen == {"grad_enabled": False, "requires_grad": False}

    def via_grad(*, W2, logits, **_):
        with torch.enable_grad():
            torch.autograd.grad(logits.sum(), [W2])

    with pytest.raises(T.AutogradUsedError):
        T.train(via_grad, 5, splits=splits, itos=itos, progress=False)
    # and autograd works again afterwards
    x = torch.ones(2, requires_grad=True)
    (x * x).sum().backward()
    assert x.grad.tolist() == [2.0, 2.0]


def test_mistakes_in_a_learners_backward_are_one_clear_sentence(lecture):
    splits, itos = lecture

    def wants_probs(*, probs, **_):
        return {}

    with pytest.raises(UserError, match="probs.*does not compute"):
        T.train(wants_probs, 5, splits=splits, itos=itos, progress=False)

    def drops_keepdim(**kw):
        grads = reference.fused_backward(**kw)
        grads["bngain"] = grads["bngain"].squeeze(0)
        return grads

    with pytest.raises(UserError, match=r"dbngain of shape \(200,\); bngain has shape \(1, 200\)"):
        T.train(drops_keepdim, 5, splits=splits, itos=itos, progress=False)

    def explodes(**kw):
        return {k: g * 1e30 for k, g in reference.fused_backward(**kw).items()}

    with pytest.raises(UserError, match="diverged"):
        T.train(explodes, 50, splits=splits, itos=itos, progress=False)


def test_training_result_calibrates_evaluates_and_samples(lecture):
    splits, itos = lecture
    r = T.train("manual", 300, splits=splits, itos=itos, progress=False, live_plot=True)
    assert r.steps == 300 and r.seconds_per_step > 0 and r.backward == "manual"
    assert r.bnmean.shape == r.bnvar.shape == (1, T.N_HIDDEN)
    train_loss, val_loss = r.split_loss("train"), r.split_loss("val")
    assert 2.0 < train_loss < 3.3 and 2.0 < val_loss < 3.3
    names = r.sample(20)
    assert len(names) == 20 and names == r.sample(20)  # seeded
    assert all(set(w) <= set(itos.values()) - {"."} for w in names)
    with pytest.raises(UserError, match="unknown split"):
        r.split_loss("dev")


def test_compare_speed_reports_the_learners_backward_against_autograd(lecture):
    out = speed.compare_speed(reference.fused_backward, steps=20, repeats=2, splits=lecture[0])
    assert set(out) == {"yours_us", "autograd_us", "speedup"}
    assert out["yours_us"] > 0 and out["speedup"] == pytest.approx(out["autograd_us"] / out["yours_us"])


def test_cli_train_prints_losses_time_and_20_samples(words):
    proc = subprocess.run([sys.executable, "-m", "backprop_ninja.cli", "train", "--steps", "200"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "time per step:" in out and "train loss:" in out and "val loss:" in out
    samples = out.split("samples:\n", 1)[1].splitlines()
    assert len(samples) == 20 and all(s.startswith("  ") for s in samples)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("backward", ["lecture", "autograd"])
def test_cli_train_other_backwards(words, backward, capsys):
    assert cli.main(["train", "--steps", "30", "--backward", backward, "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert f"backward: {'the lecture' if backward == 'lecture' else 'autograd'}" in out
    assert "val loss:" in out


@pytest.mark.slow
def test_progress_bar_and_live_plot_inside_a_notebook_kernel(tmp_path, words):
    """Under nbclient (as nbval and nbgrader run it): a live PNG, a widget bar, nothing on stderr."""
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent("""
        from backprop_ninja.train import train
        r = train("manual", 3000, live_plot=True)
        print(f"steps {r.steps}")
    """))]
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outputs = nb.cells[0].outputs
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"], outputs
    assert any(o.output_type == "display_data" and "image/png" in o.data for o in outputs)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    assert any(o.output_type == "stream" and "steps 3000" in o.text for o in outputs)


def test_benchmark_ends_with_one_json_line_of_the_step_costs(words):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
    proc = subprocess.run([sys.executable, str(script), "--runs", "1", "--rounds", "3", "--steps", "5",
                           "--no-memory", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"autograd_us", "lecture_us", "course_us", "speedup"} <= set(result)
    assert result["speedup"] == pytest.approx(result["autograd_us"] / result["course_us"], rel=1e-2)
    assert "(a)/(c)" in proc.stdout and "200k steps" in proc.stdout


def test_cli_train_without_data_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BACKPROP_NINJA_DATA", str(tmp_path))
    assert cli.main(["train", "--steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "names.txt is missing" in err and "backprop-ninja data" in err and "Traceback" not in err



def test_notebook_04_solution_is_the_reference_backward():
    """The solutions train with the course's fast reference backward, not a slower copy."""
    import inspect

    import nbformat

    source = Path(__file__).resolve().parents[1] / "grader/source/backprop/04_full_training.ipynb"
    cell = next(c.source for c in nbformat.read(source, 4).cells if "def backward(" in c.source)
    solution = cell.split("### BEGIN SOLUTION\n")[1].split("    ### END SOLUTION")[0]
    body = inspect.getsource(reference.fused_backward).split("    n = Xb.shape[0]\n")[1]
    assert solution.rstrip() == body.rsplit("\n    return", 1)[0].rstrip()
