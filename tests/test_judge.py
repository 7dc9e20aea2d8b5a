"""The judge, without a kernel: each test's inputs are staged in a hand-in box, the learner's
function is handed in exactly as the hidden test cell does it (``handin.hand_in``), and the
verdict comes from autograd on the same secret inputs. Fast, so every class of answer is here:
right on any seed, partial, wrong, the wrong dtype, not a tensor, a lying tensor subclass,
finite differences, answers kept from other inputs, a reused buffer, garbage in the box, and
every honest mistake of tests/submissions/ (the hostile ones, which need the sandbox, are graded
in tests/test_grading.py's class)."""

from __future__ import annotations

import os

import pytest
import torch
from learner import (
    BN,
    CE,
    FULL,
    HOSTILE_SUBMISSIONS,
    STEP,
    SUBMISSIONS,
    solution_function,
    submission_function,
)

from backprop_ninja import handin
from backprop_ninja.grading import judge
from backprop_ninja.grading.sandbox import Box

POINTS = {"test_backward_stepwise": 26.0, "test_cross_entropy_backward": 4.0, "test_batchnorm_backward": 6.0,
          "test_backward_gradients": 6.0, "test_training": 4.0}


def judged(tmp_path, test: str, fn, seed: int = 1234) -> judge.Verdict:
    box = Box(tmp_path / f"box-{test}-{seed}", isolate=False)
    session = judge.Session(box, seed=seed)
    session.stage(test)
    os.environ[handin.HANDIN_ENV] = str(box.root)
    try:
        handin.hand_in(fn)
    finally:
        del os.environ[handin.HANDIN_ENV]
    session.collect(test)
    return session.verdict(test, POINTS[test])


@pytest.mark.parametrize("seed", [1, 2, 987654321])
@pytest.mark.parametrize("test, stem", [("test_backward_stepwise", STEP), ("test_cross_entropy_backward", CE),
                                        ("test_batchnorm_backward", BN), ("test_backward_gradients", FULL)])
def test_the_solutions_get_full_marks_on_any_secret_seed(tmp_path, test, stem, seed):
    verdict = judged(tmp_path, test, solution_function(stem), seed)
    assert verdict.score == POINTS[test], verdict.text


def test_training_with_the_solution_follows_autograd(tmp_path):
    verdict = judged(tmp_path, "test_training", solution_function(FULL))
    assert verdict.score == 4.0 and "step for step the same as autograd" in verdict.text, verdict.text


def test_training_with_a_wrong_backward_scores_zero(tmp_path):
    wrong = solution_function(FULL, ("dW1 = embcat.T @ dhprebn", "dW1 = -(embcat.T @ dhprebn)"))
    verdict = judged(tmp_path, "test_training", wrong)
    assert verdict.score == 0 and "parameters differ" in verdict.text


def test_one_early_mistake_is_charged_once(tmp_path):
    wrong = solution_function(STEP, ("dprobs = (1.0 / probs) * dlogprobs",
                                     "dprobs = (2.0 / probs) * dlogprobs"))
    verdict = judged(tmp_path, "test_backward_stepwise", wrong)
    assert verdict.score == pytest.approx(25.0) and "dprobs is wrong" in verdict.text, verdict.text


def test_a_function_that_raises_midway_keeps_the_gradients_it_computed(tmp_path):
    broken = solution_function(STEP, ("    dh = dlogits @ W2.T", "    dh = dlogits @ W2"))  # shapes fail
    verdict = judged(tmp_path, "test_backward_stepwise", broken)
    assert verdict.score == pytest.approx(26 * 8 / 26) and "raised RuntimeError" in verdict.text, verdict.text


def test_the_release_stub_scores_zero_and_says_why(tmp_path):
    def stub(**_):
        raise NotImplementedError()

    verdict = judged(tmp_path, "test_cross_entropy_backward", stub)
    assert verdict.score == 0 and "raised NotImplementedError" in verdict.text


def test_large_logits_need_a_stable_softmax(tmp_path):
    def naive(*, logits, Yb, n, **_):
        counts = logits.exp()
        d = counts / counts.sum(1, keepdim=True)
        d[range(n), Yb] -= 1
        return d / n

    assert judged(tmp_path, "test_cross_entropy_backward", naive).score == 0
    assert judged(tmp_path, "test_cross_entropy_backward", solution_function(CE)).score == 4


def test_a_float32_answer_to_float64_inputs_is_refused_with_the_reason(tmp_path):
    right = solution_function(CE)
    verdict = judged(tmp_path, "test_cross_entropy_backward", lambda **kw: right(**kw).float())
    assert verdict.score == 0 and "dtype" in verdict.text, verdict.text


def test_not_a_tensor_is_refused_with_the_reason(tmp_path):
    right = solution_function(CE)
    verdict = judged(tmp_path, "test_cross_entropy_backward", lambda **kw: right(**kw).tolist())
    assert verdict.score == 0 and "got list" in verdict.text, verdict.text


def test_a_tensor_subclass_is_refused_not_run(tmp_path):
    """A subclass's methods are the learner's code: one that lies to comparisons, or whose detach() computes
    the answer after the graded call, is refused as not a plain tensor (and never called)."""
    calls = []

    class Liar(torch.Tensor):
        def __eq__(self, other):
            return True

        def detach(self):
            calls.append("detach")
            return super().detach()

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func in (torch.allclose, torch.equal):
                return True
            return super().__torch_function__(func, types, args, kwargs or {})

    verdict = judged(tmp_path, "test_batchnorm_backward", lambda *, dhpreact, **_: dhpreact.as_subclass(Liar))
    assert verdict.score == 0 and "must return dhprebn as a tensor, got Liar" in verdict.text, verdict.text
    assert calls == []


def test_a_dict_subclass_is_refused_not_run(tmp_path):
    class Lazy(dict):
        def items(self):
            raise AssertionError("the grader called the learner's items()")

    verdict = judged(tmp_path, "test_cross_entropy_backward", lambda *, logits, **_: Lazy(dlogits=logits))
    assert verdict.score == 0, verdict.text


def test_finite_differences_do_not_pass(tmp_path):
    """A float64 central difference of the loss is close (1e-9 relative), not a derivation."""
    from backprop_ninja import model

    def finite_differences(*, logits, Yb, **_):
        h, grad = 1e-6, torch.zeros_like(logits)
        for idx in range(logits.numel()):
            up, down = logits.clone(), logits.clone()
            up.view(-1)[idx] += h
            down.view(-1)[idx] -= h
            grad.view(-1)[idx] = (torch.nn.functional.cross_entropy(up, Yb)
                                  - torch.nn.functional.cross_entropy(down, Yb)) / (2 * h)
        return grad

    assert model  # the forward pass the learner would differentiate numerically
    verdict = judged(tmp_path, "test_cross_entropy_backward", finite_differences)
    assert verdict.score == 0 and "dlogits is wrong" in verdict.text, verdict.text


def test_complex_step_made_at_run_time_does_not_pass(tmp_path):
    """Complex-step differentiation gives exact derivatives from the forward code alone. The source rules
    flag complex literals and names; a complex value made at run time (a variable's power) is refused by
    the graded call itself, whatever the function then does with the error."""

    def complex_step(*, logits, Yb, **_):
        root = (-1.0) ** 0.5  # (6e-17+1j)
        i, h, n = root - root.real, 1e-30, logits.shape[0]
        grad, shifted = torch.zeros_like(logits), logits - logits.max(1, keepdim=True).values
        for c in range(logits.shape[1]):
            column = torch.nn.functional.one_hot(torch.full_like(Yb, c), logits.shape[1]).to(logits)
            z = shifted + h * i * column
            rows = torch.log(torch.exp(z).sum(1)) - z[range(n), Yb]
            grad[:, c] = (rows * -i).to(logits.dtype) / h / n
        return grad

    verdict = judged(tmp_path, "test_cross_entropy_backward", complex_step)
    assert verdict.score == 0 and "complex" in verdict.text, verdict.text


def test_a_complex_tensor_made_before_the_call_and_a_python_callback_are_refused(tmp_path):
    """The guard looks at what a torch call is given too (a complex buffer made at the cell's top level,
    written through out=), and refuses the Tensor methods that run Python inside a torch call."""
    buffer = torch.zeros(3, dtype=torch.complex128)

    def with_buffer(*, logits, **_):
        torch.exp(buffer, out=buffer)
        return logits

    def with_callback(*, logits, **_):
        torch.zeros(1).apply_(lambda v: v)
        return logits

    verdict = judged(tmp_path, "test_cross_entropy_backward", with_buffer)
    assert verdict.score == 0 and "exp was given a complex value" in verdict.text, verdict.text
    verdict = judged(tmp_path, "test_cross_entropy_backward", with_callback)
    assert verdict.score == 0 and "apply_ runs a Python function" in verdict.text, verdict.text


def test_answers_kept_from_other_inputs_do_not_pass(tmp_path):
    """The inputs come from a seed drawn when grading starts: a table built on other inputs fails."""
    table = {}

    def remember(**kw):
        key = tuple(kw["logits"].shape)
        table.setdefault(key, solution_function(CE)(**kw))
        return table[key]

    judged(tmp_path, "test_cross_entropy_backward", remember, seed=1)
    assert judged(tmp_path, "test_cross_entropy_backward", remember, seed=2).score == 0


def test_a_right_answer_in_a_reused_buffer_keeps_its_points(tmp_path):
    """Honest but odd: returning a view of one buffer, overwritten by the next call."""
    right, buffer = solution_function(BN), {}

    def reuse(**kw):
        out = right(**kw)
        buf = buffer.setdefault(out.dtype, torch.empty(10_000, dtype=out.dtype))
        buf[: out.numel()] = out.reshape(-1)
        return buf[: out.numel()].view(out.shape)

    assert judged(tmp_path, "test_batchnorm_backward", reuse).score == 6


def test_secret_seeds_differ_between_sessions(tmp_path):
    a = judge.Session(Box(tmp_path / "a", isolate=False))
    b = judge.Session(Box(tmp_path / "b", isolate=False))
    ex = judge.EXERCISES["test_backward_stepwise"]
    assert a.seed != b.seed and a.case_seeds(ex) != b.case_seeds(ex)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file", b"\xff" * 100])
def test_garbage_in_the_box_scores_zero_with_a_sentence(tmp_path, content):
    box = Box(tmp_path / "box", isolate=False)
    session = judge.Session(box, seed=5)
    session.stage("test_batchnorm_backward")
    for path in box.outbox.iterdir():
        path.write_bytes(content)
    session.collect("test_batchnorm_backward")
    verdict = session.verdict("test_batchnorm_backward", 6.0)
    assert verdict.score == 0 and verdict.text.startswith("Score 0: batchnorm_backward: ")


def test_a_link_in_the_box_is_never_followed(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the grader's private file")
    box = Box(tmp_path / "box", isolate=False)
    session = judge.Session(box, seed=5)
    session.stage("test_batchnorm_backward")
    for path in box.outbox.iterdir():
        path.unlink()
        path.symlink_to(secret)
    session.collect("test_batchnorm_backward")
    assert secret.exists() and "nothing was handed in" in session.verdict("test_batchnorm_backward", 6.0).text


def test_without_the_grader_the_hidden_test_fails_closed(monkeypatch):
    monkeypatch.delenv(handin.HANDIN_ENV, raising=False)
    with pytest.raises(handin.NotGrading):
        handin.hand_in(lambda **_: None)


HONEST = sorted(set(SUBMISSIONS) - set(HOSTILE_SUBMISSIONS))


@pytest.mark.parametrize("name", HONEST)
def test_each_honest_mistake_scores_its_points_and_says_why(tmp_path, name):
    """tests/submissions/: a learner's realistic change to a solution, the points of each graded
    cell and a phrase its verdict must hold. tests/test_rules.py checks that the source rules let it
    through; the class in tests/test_grading.py, that the pipeline delivers the judge's verdicts into
    the gradebook and the feedback."""
    sub = SUBMISSIONS[name]
    fn = submission_function(sub)
    verdicts = {test: judged(tmp_path, test, fn) for test in sub["expect"]}
    for test, points in sub["expect"].items():
        assert verdicts[test].score == pytest.approx(points, abs=1e-4), verdicts[test].text
    if "says" in sub:
        assert sub["says"].lower() in " ".join(v.text for v in verdicts.values()).lower()
