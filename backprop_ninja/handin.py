"""Hand a learner's function to the grader. The hidden test cells call ``hand_in``, inside
the sandboxed kernel; it decides nothing.

Just before a test cell runs, the grader (outside the sandbox) stages fresh inputs in the
hand-in box (``$BACKPROP_NINJA_HANDIN/in``: ``task.json`` and one safetensors file per
case) and an empty slot per case in ``out/``. ``hand_in(fn)`` calls ``fn`` on each case
(or, for a training task, trains with it) and writes what came back into the slots as
plain tensors (safetensors: data only, no code), with a JSON note of anything that was
not a tensor or raised. After the cell, the grader reads the slots and judges them with
autograd, in its own process. Replacing this module changes only what is handed in,
never how it is judged. Without staged inputs (the notebook run outside the grader)
``hand_in`` raises, so the test fails closed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load, save
from torch.overrides import TorchFunctionMode

from backprop_ninja import accepted, model

HANDIN_ENV = "BACKPROP_NINJA_HANDIN"  # set by the grader's sandbox


class NotGrading(RuntimeError):
    """The hidden tests ran without the course's grader (nothing was staged for them)."""


def _box() -> Path:
    box = os.environ.get(HANDIN_ENV)
    if not box or not (Path(box) / "in" / "task.json").is_file():
        raise NotGrading("these hidden tests only run inside the course's grader "
                         "(backprop-ninja grade, or nbgrader with this course's configuration).")
    return Path(box)


def _plain(value) -> torch.Tensor | None:
    """A dense, contiguous copy with storage of its own (a later call cannot change it); None for
    anything but a plain tensor (a subclass's methods are the learner's code, run after the guard)."""
    if type(value) is not torch.Tensor:
        return None
    try:
        return value.detach().as_subclass(torch.Tensor).to_dense().clone().contiguous()
    except Exception:  # noqa: BLE001 - whatever the object does, it is simply not a plain tensor
        return None


def _pack(result) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors by name, note): a dict's tensor values, or a lone tensor as "result"."""
    if type(result) is dict:  # exactly: a subclass's items() would be the learner's code
        items, note = result.items(), {"returned": "dict"}
    else:
        items, note = [("result", result)], {"returned": type(result).__name__}
    tensors, others = {}, {}
    for key, value in items:
        tensor = _plain(value)
        if tensor is not None and isinstance(key, str):
            tensors[key] = tensor
        else:
            others[str(key)[:40]] = type(value).__name__
    note["not_tensors"] = dict(list(others.items())[:40])
    return tensors, note


def _error(exc: BaseException, fn) -> tuple[dict, dict]:
    """The note for a call that raised, and the d-variables the function had computed by then."""
    code = getattr(fn, "__code__", None)
    tb, partial, where = exc.__traceback__, {}, ""
    while tb is not None:
        if tb.tb_frame.f_code is code:
            partial = {k: v for k, v in tb.tb_frame.f_locals.items() if k.startswith("d")}
            where = f"line {tb.tb_lineno - code.co_firstlineno + 1} of {code.co_name}"
        tb = tb.tb_next
    tensors, _ = _pack(partial)
    return tensors, {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "where": where}


class NotAllowed(RuntimeError):
    """A graded function did what the graded call refuses."""


class ComplexNotAllowed(NotAllowed):
    """A graded function made a complex tensor."""


# Tensor methods that call a Python function from inside a torch call, where this mode is off.
CALLBACKS = {"apply_", "map_", "map2_"}


class _RealOnly(TorchFunctionMode):
    """Refuse any torch call given or returning a complex value, and the Tensor methods that run Python
    inside torch (the mode is off while they do). Complex-step differentiation gives exact derivatives from
    the forward code alone; the source rules flag complex literals and names, and this catches a complex
    value made at run time (``(-1.0) ** 0.5`` in a variable), or before the call. Answer cells cannot
    leave the mode: torch.overrides, torch.utils and underscore names are flagged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in CALLBACKS:
            raise NotAllowed(f"{func.__name__} runs a Python function inside a torch call, out of the graded "
                             "call's checks: write the arithmetic on whole tensors instead.")
        if _complex(args) or _complex(kwargs.values()):  # before the call: an out= or in-place write
            self._refuse(func, "was given")
        out = func(*args, **kwargs)
        if _complex(out if isinstance(out, (tuple, list)) else (out,)):
            self._refuse(func, "made")
        return out

    @staticmethod
    def _refuse(func, did: str):
        raise ComplexNotAllowed(f"{getattr(func, '__name__', 'a torch call')} {did} a complex value: complex "
                                "numbers are not allowed in an answer (complex-step differentiation would "
                                "skip the derivation).")


def _complex(values) -> bool:
    """A complex tensor or number among ``values``, or one level down in a list or tuple."""
    for value in values:
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, complex) or (isinstance(v, torch.Tensor) and v.is_complex()):
                return True
    return False


def _call(fn, kwargs: dict) -> tuple[dict, dict]:
    sink = io.StringIO()  # the learner's prints stay out of the test cell
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), _RealOnly():
        try:
            result = fn(**accepted(fn, kwargs))
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a learner's bug is reported, not raised
            return _error(exc, fn)
    return _pack(result)


def _train(fn, inputs: dict, steps: int) -> tuple[dict, dict]:
    """SGD with ``fn`` as the backward pass: the forward pass of ``model``, ``p -= lr * grad``.

    Returns the final parameters and every step's loss, or where it went wrong."""
    params = {k: inputs[k] for k in model.PARAM_NAMES}
    losses = []
    for step in range(steps):
        Xb, Yb = inputs["Xb"][step], inputs["Yb"][step]
        with torch.no_grad():
            tensors = {**params, "Xb": Xb, "Yb": Yb, **model.forward(params, Xb, Yb)}
        losses.append(float(tensors["loss"]))
        grads, note = _call(fn, {**{k: v.clone() for k, v in tensors.items()}, "n": Xb.shape[0]})
        missing = [k for k in model.PARAM_NAMES if k not in grads or grads[k].shape != params[k].shape]
        if "error" in note or missing:
            return {}, {**note, "step": step, "missing": missing}
        params = {k: params[k] - inputs["lr"][step] * grads[k].to(params[k].dtype) for k in params}
    return {**params, "losses": torch.tensor(losses, dtype=torch.float64)}, {"steps": steps}


def hand_in(fn) -> None:
    """Call ``fn`` on every staged case (or train with it) and hand what it returns to the grader."""
    box = _box()
    task = json.loads((box / "in" / "task.json").read_text())
    for i, case in enumerate(task["cases"]):
        inputs = load((box / "in" / f"case-{i}.safetensors").read_bytes())
        if task["kind"] == "train":
            tensors, note = _train(fn, inputs, case["steps"])
        else:
            tensors, note = _call(fn, {**inputs, **case["scalars"]})
        try:
            data = save(tensors, metadata={"note": json.dumps(note)})
        except Exception as exc:  # noqa: BLE001 - e.g. a dtype safetensors cannot store
            dtypes = {k: str(t.dtype) for k, t in tensors.items()}
            note["not_tensors"] = {**note.get("not_tensors", {}), **dtypes}
            note["unsaved"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            data = save({}, metadata={"note": json.dumps(note)})
        (box / "out" / f"case-{i}.safetensors").write_bytes(data)
    name = getattr(fn, "__name__", "your function")
    print(f"{name} was called on {len(task['cases'])} fresh inputs; the grader judges what it returned.")
