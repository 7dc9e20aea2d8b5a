"""Source rules: the judge reads a learner's cells and flags autograd, reaching outside the computation,
the course's internals, the shell and complex numbers, and never flags an honest answer."""

import functools
import json
import statistics
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from learner import HOSTILE_SUBMISSIONS, parse_submission, submitted_answer

from backprop_ninja.grading.rules import RULES, Finding, check_cell, course_names_from

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "grader" / "source" / "backprop"
SUBMISSIONS = Path(__file__).resolve().parent / "submissions"
MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION")


def _code_cells(stem):
    cells = json.loads((SOURCE / f"{stem}.ipynb").read_text())["cells"]
    return [c for c in cells if c["cell_type"] == "code"]


def _without_markers(source):
    return "\n".join(line for line in source.splitlines() if line.strip() not in MARKERS)


def _answers(stem):
    """{grade_id: source} of a notebook's answer cells, the solution markers removed."""
    return {c["metadata"]["nbgrader"]["grade_id"]: _without_markers("".join(c["source"]))
            for c in _code_cells(stem) if c["metadata"].get("nbgrader", {}).get("solution")}


@functools.cache
def _course(stem):
    """What the judge knows of a notebook: the names its own cells import from the course, and the
    course imports a learner's cell may repeat (the ones the course's cells make)."""
    names = course_names_from("".join(c["source"]) for c in _code_cells(stem))
    return names, frozenset(names.values())


def _check(source, stem="01_stepwise_backprop"):
    return check_cell(source, *_course(stem))


def _rules(source, stem="01_stepwise_backprop"):
    return {f.rule for f in _check(source, stem)}


def _submission(path):
    """(notebook stem, the answer cell as submitted, the body alone) of a tests/submissions file."""
    sub = parse_submission(path)
    return sub["notebook"], submitted_answer(sub), sub["body"]


ANSWERS = [(stem, grade_id, source) for stem in sorted(p.stem for p in SOURCE.glob("*.ipynb"))
           for grade_id, source in _answers(stem).items()]
SUBMITTED = sorted(SUBMISSIONS.glob("*.txt"))


def _stem(path):
    return path.stem


# -- the course's own answers and the honest submissions pass


@pytest.mark.parametrize("stem, grade_id, source", ANSWERS, ids=[f"{s}:{g}" for s, g, _ in ANSWERS])
def test_every_solution_follows_the_rules(stem, grade_id, source):
    assert _check(source, stem) == []


@pytest.mark.parametrize("path", [p for p in SUBMITTED if p.stem not in HOSTILE_SUBMISSIONS], ids=_stem)
def test_honest_submissions_follow_the_rules(path):
    stem, cell, body = _submission(path)
    assert _check(cell, stem) == []
    assert _check(body, stem) == []


@pytest.mark.parametrize("path", [p for p in SUBMITTED if p.stem in HOSTILE_SUBMISSIONS], ids=_stem)
def test_hostile_submissions_are_flagged_with_their_rule(path):
    stem, cell, body = _submission(path)
    assert HOSTILE_SUBMISSIONS[path.stem] in _rules(cell, stem)
    assert HOSTILE_SUBMISSIONS[path.stem] in _rules(body, stem)


def test_the_hostile_submissions_name_a_rule_that_exists():
    assert HOSTILE_SUBMISSIONS and set(HOSTILE_SUBMISSIONS.values()) <= set(RULES)


# -- hostile snippets: at least three per rule, several ways each

HOSTILE = {
    "autograd": [
        "loss.backward()",
        "dW1 = W1.grad",
        "torch.autograd.grad(loss, [W1])[0]",
        "from torch.autograd import grad",
        "import torch.autograd as ag",
        "from torch import autograd",
        "from torch.func import jacrev",
        "torch.func.vjp(f, x)",
        "x = logits.clone().requires_grad_(True)",
        "x = torch.zeros(3, requires_grad=True)",
        "p.requires_grad = True",
        "h.retain_grad()",
        "h.register_hook(print)",
        "fn = loss.grad_fn",
        "with torch.enable_grad():\n    pass",
        "torch.set_grad_enabled(True)",
        "torch.batch_norm_backward_elemt(a, b, c, d, e, f, g, h)",
        "torch.mkldnn_linear_backward_weights(a, b, c, d)",
        "F.grad.conv1d_input(a, b, c)",
        "torch.nn.grad.conv1d_weight(a, b, c)",
        "np.gradient(y)",
        "torch.gradient(y)",
        "torch.ops.aten.tanh_backward(g, h)",
        "torch.library.Library('x', 'DEF')",
        "torch.jit.script(f)",
        "torch.compile(f)",
        "torch.fx.symbolic_trace(f)",
        "torch.export.export(m, (x,))",
        "torch.overrides.handle_torch_function",
        "torch.nn.utils.parameters_to_vector(ps)",
        "torch.utils.checkpoint.checkpoint(f, x)",
        "torch.autograd.forward_ad.make_dual(x, t)",
        "torch.autograd.functional.jacobian(f, x)",
        "torch.autograd.functional.hessian(f, x)",
        "print('{0.grad}'.format(x))",
        "match t:\n    case torch.Tensor(grad=g):\n        pass",
        "x.\uff42ackward()",  # a fullwidth b: Python reads the identifier as `backward`
        "torch.cuda.amp.GradScaler()",
        "torch.CompilationUnit(src)",
        "torch.compiler.disable(f)",
        "@dataclasses.dataclass\nclass T(torch.Tensor):\n    backward: object",
        "class T:\n    def backward(self):\n        pass",
        "x = torch.nn.Parameter(t)",
        "torch.optim.SGD([W1], lr=1.0).step()",
        "x = torch.tensor(1.0, **{'requires_' + 'grad': True})",
        "class T(torch.distributions.dirichlet.Function):\n    pass",
        "torch.distributions.ExponentialFamily.entropy(d)",
        "P = torch.nn.UninitializedParameter.cls_to_become",
    ],
    "process, file or introspection": [
        "import os",
        "import sys",
        "import subprocess\nsubprocess.run(['ls'])",
        "from importlib import import_module",
        "import ctypes",
        "import builtins",
        "import inspect",
        "import threading",
        "import multiprocessing",
        "import signal",
        "import pickle",
        "import gc",
        "import types",
        "import io",
        "from pathlib import Path",
        "import shutil",
        "import socket",
        "from . import grading",
        "from math import *",
        "eval('1 + 1')",
        "exec('x = 1')",
        "compile('x', 'cell', 'exec')",
        "__import__('os')",
        "open('/etc/passwd').read()",
        "globals()['torch']",
        "locals()['x'] = 1",
        "class A:\n    locals()['y'] = 1",
        "f = locals",
        "vars(torch)",
        "getattr(x, 'gr' + 'ad')",
        "setattr(torch, 'allclose', f)",
        "delattr(torch, 'allclose')",
        "breakpoint()",
        "input()",
        "memoryview(b'x')",
        "help(torch)",
        "exit()",
        "quit()",
        "get_ipython().user_ns",
        "ip = get_ipython",
        "().__class__.__mro__[1].__subclasses__()",
        "torch._C",
        "f.__globals__",
        "x = __builtins__",
        "g.gi_frame.f_back.f_globals",
        "tb.tb_frame",
        "c = f.__code__.co_consts",
        "code.co_code",
        "torch.save(x, 'x.pt')",
        "torch.load('x.pt')",
        "np.load('x.npy')",
        "np.savez('x.npz', x)",
        "torch.from_file('x')",
        "np.fromfile('x')",
        "np.memmap('x')",
        "np.loadtxt('x')",
        "np.genfromtxt('x')",
        "a.tofile('x')",
        "np.ctypeslib.as_array(p)",
        "np.lib.format.open_memmap('x')",
        "torch.hub.load('a', 'b')",
        "torch.multiprocessing.spawn(f)",
        "torch.distributed.init_process_group()",
        "torch.backends.cudnn.enabled",
        "torch.package.PackageImporter('x')",
        "torch.classes.load_library('x')",
        "torch.serialization.add_safe_globals([])",
        "x.untyped_storage()",
        "x.storage()",
        "x.data_ptr()",
        "x.set_(y)",
        "torch.os.system('ls')",
        "torch.sys.modules",
        "os.getcwd()",  # os bound by a locked cell
        "torch.allclose = lambda *a, **k: True",
        "F.softmax = my_softmax",
        "del torch.allclose",
        "t = torch\nt.allclose = f",
        "type('W', (), {})",
        "string.Formatter().get_field('0.x', [loss], {})",
        "functools.update_wrapper(w, loss, assigned=('x',), updated=())",
        "from functools import singledispatch",
        "typing.get_type_hints(f)",
        "dataclasses.make_dataclass('A', [], namespace=ns)",
        "d = {'__setattr__': f}",
        "def __getattr__(name):\n    return name",
        "plt.savefig('/tmp/x.png')",
        "np.testing.runstring(src, {})",
        "torch.get_file_path('x')",
        "class T:\n    __getattr__ = f",
        "dataclasses.re.enum.bltns.eval('1')",
        "b.getattr(x, 'back' + 'ward')()",
        "b.open('/etc/hostname')",
        "matplotlib.Path('/etc/hostname').read_text()",
        "plt.style.Path('x').write_text('y')",
        "match t:\n    case G(b):\n        b()",
        "s = ('{0.%s}' % 'grad').format(x)",
        "name = '_' + '_import_' + '_'",
        "d = z.view(torch.float64)",
        "d = np.frombuffer(z.tobytes())",
        "class T(torch.Tensor):\n    def pow(self, e):\n        return self",
        "t = x.as_subclass(T)",
        "fmt = str.format\ns = fmt('{0.%s}' % 'grad', x)",
        "plt.rcParams['animation.ffmpeg_path'] = '/bin/sh'",
        "plt.rcParams.update({'figure.hooks': ['os:system']})",
        "plt.style.use('/etc/hostname')",
        "matplotlib.rc_params_from_file('/etc/hostname')",
        "fig.canvas.print_png('x.png')",
        "plt.switch_backend('module://matplotlib.animation')",
        "matplotlib.font_manager.findSystemFonts()",
        "torch.nn.modules.module.register_module_forward_hook(h)",
        "@dataclasses.dataclass(init=False)\n@(lambda c: K)\nclass Z:\n    pass",
        "from torch import Tensor\n\n\ndef unused():\n    class Tensor:\n        pass\n\n\n"
        "class G(Tensor):\n    pass",
        "from dataclasses import dataclass\n\n\n@dataclass(init=False)\n@(lambda c: K)\nclass Z:\n    pass",
        "C = type(x)('C', (), {})",
        "C = dataclasses.dataclass(init=False)(M)",
        "B = torch.Tensor\nclass Lazy(B):\n    pass",
        "class Lazy(dict):\n    def items(self):\n        return []",
        "class X(metaclass=M):\n    pass",
        "f = plt.matplotlib.ticker.StrMethodFormatter(spec)",
        "ax.xaxis.set_major_formatter(spec)",
        "matplotlib.mathtext.math_to_image('$x$', 'x.svg')",
        "plt.style.use('mystyle')",
        "plt.figure().text(0.5, 0.5, 'x', usetex=True)",
        "torch.zeros(1).apply_(f)",
    ],
    "course internals": [
        "model.autograd_reference(params, Xb, Yb)",
        "model.forward(params, Xb, Yb)",
        "data.NAMES_URL",
        "from backprop_ninja.model import autograd_reference",
        "from backprop_ninja import grading",
        "import backprop_ninja.grading.judge",
        "import backprop_ninja",
        "backprop_ninja.model.PARAM_NAMES",
        "m = model\nm.forward(params, Xb, Yb)",
        "def f(m=model):\n    return m.forward",
        "[m.forward for m in [model]]",
        "model.PARAM_NAMES = ()",
        "cmp.x = 1",
        "if False:\n    model = 0\nmodel.forward(params, Xb, Yb)",
        "def f():\n    return model.forward(params, Xb, Yb)\nmodel = 0",
        "def f():\n    global model\n    model = model\n    return model.forward",
        "model = model\nmodel.forward(params, Xb, Yb)",
        "print(model)",
    ],
    "shell or magic": [
        "!ls",
        "!!cat /etc/passwd",
        "files = !ls",
        "%%bash\nls",
        "%%writefile x.py\nimport os",
        "%run x.py",
        "%load x.py",
        "%env A=1",
        "%cd /tmp",
        "%system ls",
        "%sx ls",
        "%store x",
        "%%capture\nprint(1)",
        "%time loss.backward()",
        "%timeit f()",
        "%%script python\nprint(1)",
        "%load_ext autoreload",
        "x?",
        "torch??",
        "?torch",
        "def f():\n    !ls",
        "x = 1\n%%bash\nls",
        "get_ipython().system('ls')",
        "get_ipython().run_cell_magic('bash', '', 'ls')",
        "get_ipython().run_line_magic('matplotlib', x.backward())",
    ],
    "complex numbers": [
        "z = 1j",
        "y = f(x + 1e-20j)",
        "complex(1, 2)",
        "x.to(torch.complex128)",
        "torch.tensor(1.0, dtype=torch.complex64)",
        "x.to(torch.cfloat)",
        "x.type(torch.cdouble)",
        "torch.view_as_complex(x)",
        "torch.view_as_real(z)",
        "d = z.imag",
        "d = z.real",
        "torch.polar(a, b)",
        "np.zeros(3, dtype='D')",
        "a.astype('complex128')",
        "a.view('c16')",
        "np.emath.sqrt(-1)",
        "torch.fft.fft(x)",
        "torch.linalg.eigvals(m)",
        "print('{0.imag}'.format(z))",
        "i = (-1) ** 0.5",
        "i = pow(-1.0, 0.5)",
        "i = (-1) ** 1e400",
        "np.zeros(3, 'D')",
        "np.full(3, -1.0, 'D')",
        "a.view('c' + '16')",
        "torch.view_as_real_copy(z)",
        "np.real_if_close(z)",
        "np.polynomial.polynomial.polyroots([1.0, 0.0, 1.0])",
        "np.ones(3, np.typecodes['Complex'][1])",
        "np.mintypecode('Fd')",
        "unit = (r - r.conjugate()) / 2",
        "z.is_complex()",
    ],
}
HOSTILE_CASES = [(rule, source) for rule, sources in HOSTILE.items() for source in sources]


def test_hostile_snippets_cover_every_rule():
    assert set(HOSTILE) == set(RULES)
    assert all(len(sources) >= 3 for sources in HOSTILE.values())


@pytest.mark.parametrize("rule, source", HOSTILE_CASES, ids=[repr(s) for _, s in HOSTILE_CASES])
def test_hostile_snippet_is_flagged_with_its_rule(rule, source):
    assert rule in _rules(source)


# One-line snippets mean the same inside the answer function (locals() there is the function's own copy).
INSIDE = [(rule, s) for rule, s in HOSTILE_CASES
          if "\n" not in s and not s.startswith(("locals()", "f = locals"))]


@pytest.mark.parametrize("rule, source", INSIDE, ids=[repr(s) for _, s in INSIDE])
def test_hostile_snippet_inside_an_answer_function_is_flagged_too(rule, source):
    cell = "def backward(*, logits, Yb, n, **_):\n    " + source + "\n    return logits"
    assert rule in _rules(cell)


# -- honest but unusual: never flagged

HONEST = [
    "for k in range(Xb.shape[0]):\n    for j in range(Xb.shape[1]):\n        dC[Xb[k, j]] += demb[k, j]",
    "dlogprobs = torch.zeros_like(logprobs)",
    "dC = F.one_hot(Xb.view(-1), 27).T.float() @ demb.view(-1, 10)",
    "ix = logits.max(1).indices",
    "demb = dembcat.view(emb.shape)",
    "dW2 = h.T @ dlogits",
    "dh = dlogits @ W2.T",
    "grads = {'h': dh}\nprint(grads['h'])",
    "data = torch.randn(3)\nprint(data.sum())",
    "def f(data):\n    return data.mean()",
    "def f():\n    data = torch.ones(2)\n    return data.sum()",
    "[data.sum() for data in (dh, dW2)]",
    "print(len(words), list(zip(Xb, Yb))[:2])",
    "for i, w in enumerate(words[:3]):\n    print(i, w)",
    "import math\nmath.sqrt(2.0)",
    "hint('bnvar')",
    "cmp('h', dh, h)",
    "plt.imshow(dlogits.detach(), cmap='gray')\nplt.show()",
    "import numpy as np\nnp.mean([1.0, 2.0])",
    "import matplotlib.pyplot as plt\nplt.plot([1, 2])",
    "%matplotlib inline",
    "%matplotlib inline\nimport torch",
    "def helper(t):\n    return t * 2\n\nhelper(dh)",
    "square = lambda t: t * t",
    "[d.shape for d in (dh, dW2)]",
    "t = torch.tensor([1.0, 2.0])",
    "dbnbias = dhpreact.sum(0, keepdim=True)",
    "dhprebn = torch.addcmul(a, bnraw, dbngain, value=-1 / (n - 1))",
    "dC.index_add_(0, Xb.view(-1), demb.view(-1, 10))",
    "dC.scatter_add_(0, idx, src)",
    "torch.einsum('ij,jk->ik', a, b)",
    "with torch.no_grad():\n    out = h * 2",
    "def backward(*, Xb, **_):\n    return {}",
    "def cross_entropy_backward(*, logits, **_):\n    return logits",
    "def batchnorm_backward(*, dhpreact, **_):\n    return dhpreact",
    "def backward_stepwise(**_):\n    dh = 1\n    return collect_gradients(locals())",
    "cfg = model.Config(vocab_size=27, block_size=3, n_embd=10, n_hidden=64)\n"
    "params = model.init_params(cfg)",
    "for name in model.BACKWARD_ORDER:\n    print(name, model.PARAM_NAMES)",
    "words = data.load_words()",
    "print(f'{loss.item():.4f}', '{:.2f}'.format(1.0))",
    "counts = norm_logits.exp()\ncounts_sum = counts.sum(1, keepdim=True)",
    "dlogits = F.softmax(logits, 1)\ndlogits[range(n), Yb] -= 1\ndlogits /= n",
    "import itertools, functools, collections\nfunctools.reduce(lambda a, b: a + b, [1, 2])",
    "def f():\n    '''Like loss.backward(), by hand: {x.grad}, see __init__.'''\n    return 1",
    "# loss.backward() would do this for us\nx = 1",
    "def f(input):\n    return input * 2",
    "dx = -(1.0 - h**2) * dh",
    "torch.manual_seed(0)",
    "x = dh.T.contiguous().reshape(-1)",
    "x = dh.data.clone()",
    "value = dh.sum().item()",
    "from backprop_ninja.check import cmp",
    "for _ in range(3):\n    pass",
    "import time\nt0 = time.perf_counter()",
    "x = torch.linalg.norm(dh)",
    "x = 2 ** 0.5",
    "x = dh.to(torch.float64)",
    "x = a.astype('d')",
    "class Box:\n    size = 3\n\n    def area(self):\n        return self.size ** 2",
    "@dataclasses.dataclass\nclass Step:\n    name: str\n    loss: float = 0.0",
    "match shape:\n    case (a, b):\n        pass\n    case int(k) | [k]:\n        pass",
    "x = (-1) ** 2 + 2 ** -0.5 + bnvar ** -0.5 + pow(2, 0.5) + (-1) ** 2.0",
    "x = dh.view(n, -1) + dh.view(emb.shape[0], -1) + dh.view(-1)",
    "print('{:.3f} {}'.format(1.0, 'a' + 'b'))",
    "x = np.zeros(3, 'f')",
    "plt.rcParams['figure.figsize'] = (8, 4)\nplt.rcParams.update({'font.size': 12, 'axes.grid': True})",
    "plt.style.use('ggplot')\nwith plt.style.context('seaborn-v0_8'):\n"
    "    fig, ax = plt.subplots()\n    ax.plot([1, 2])",
    "class Err(Exception):\n    pass\n\n\nclass Sub(Err):\n    pass",
    "print(type(dh), isinstance(dh, type(dlogits)))",
    "from dataclasses import dataclass\n\n\n@dataclass\nclass Step:\n    loss: float = 0.0",
    "plt.style.use('seaborn-v0_8-whitegrid')",
    "plt.style.use(style='ggplot')\nplt.rcParams['figure.autolayout'] = True",
    "print([type(v) for v in grads.values()])\nassert type(grads) == dict, type(grads)\nM = type(grads)",
    "@dataclasses.dataclass\nclass Config:\n    print_every: int = 100\n\n\nprint(Config().print_every)",
    "class MyErr(KeyError):\n    pass",
]


@pytest.mark.parametrize("source", HONEST, ids=repr)
def test_honest_snippet_is_not_flagged(source):
    assert _check(source) == []


# -- findings a learner can act on


def test_findings_point_at_the_line_the_learner_wrote():
    source = "\n  \nx = 1\n!ls \\\n  -la\ny = eval('1')\n%%bash\n"
    found = check_cell(source)
    assert [(f.rule, f.what, f.line, f.snippet) for f in found] == [
        ("shell or magic", "!ls", 4, "!ls \\"),
        ("process, file or introspection", "eval()", 6, "y = eval('1')"),
        ("shell or magic", "%%bash", 7, "%%bash"),
    ]


def test_a_cell_magic_is_reported_on_its_first_line():
    assert check_cell("%%bash\nls\nrm -rf x\n") == [Finding("shell or magic", "%%bash", 1, "%%bash")]


def test_each_construct_is_reported_once_per_line():
    found = check_cell("a.backward(); b.backward()\nc.backward()")
    assert [(f.what, f.line) for f in found] == [(".backward", 1), (".backward", 2)]


def test_a_line_can_break_several_rules():
    found = check_cell("z = model.autograd_reference(params, Xb, Yb)", {"model": "backprop_ninja.model"})
    assert {(f.rule, f.what) for f in found} == {("autograd", "model.autograd_reference"),
                                                 ("course internals", "model.autograd_reference")}


def test_the_snippet_is_cut_to_80_characters():
    (finding,) = check_cell("y = x.backward()  # " + "a very long comment " * 10)
    assert len(finding.snippet) == 80 and finding.snippet.startswith("y = x.backward()")


def test_every_rule_has_a_sentence_for_the_learner():
    assert set(RULES) == {"autograd", "process, file or introspection", "course internals",
                          "shell or magic", "complex numbers"}
    assert all(text.endswith(".") and text.count(". ") == 0 for text in RULES.values())


def test_a_cell_that_does_not_parse_has_no_findings():
    assert check_cell("import os\nx = (") == []


def test_a_top_level_await_still_parses_as_ipython_runs_it():
    assert {f.what for f in check_cell("await pause()\nimport os")} == {"import os"}


def test_a_deeply_nested_cell_does_not_crash_the_judge():
    found = check_cell("x = " + "-" * 2000 + "y.backward()")  # Python runs it: 2000 nested minus signs
    assert [f.what for f in found] == [".backward"]


def test_a_cell_too_deep_to_parse_here_fails_closed():
    # the parser's depth limit follows the recursion limit, which a kernel could have raised
    (finding,) = check_cell("x = " + "-" * 5000 + "y")
    assert finding.rule == "process, file or introspection" and finding.line == 1


# -- torch itself: every name that computes a derivative is caught


def _derivative_names():
    names = set()
    for namespace in (torch, torch.Tensor, F, torch.nn, torch.autograd, torch.func):
        names |= {n for n in dir(namespace) if not n.startswith("_") and any(
            part in n.lower() for part in ("grad", "backward", "jac", "hess", "jvp", "vjp"))}
    return sorted(names - {"no_grad"})


@pytest.mark.parametrize("name", _derivative_names())
def test_torch_names_that_differentiate_are_autograd(name):
    assert _rules(f"torch.{name}") == {"autograd"}
    assert "autograd" in _rules(f"from torch import {name}")


def _forbidden():
    """What no answer cell may reach, by id: the builtins and modules the process rule names (and their
    code-running and file functions, pathlib's classes), and autograd's and torch's internal doors."""
    import builtins
    import importlib
    import os
    import pathlib
    import subprocess
    import sys

    import torch.autograd.functional

    modules = [builtins, os, sys, subprocess, importlib, pathlib, torch.autograd, torch.func, torch._C]
    things = {id(m): m.__name__ for m in modules} | {id(torch.ops): "torch.ops"}
    names = ("eval", "exec", "open", "getattr", "setattr", "compile", "globals", "vars", "__import__")
    things |= {id(getattr(builtins, n)): n for n in names}
    things |= {id(c): c.__name__ for c in (pathlib.Path, pathlib.PurePath, torch.autograd.grad,
                                           torch.autograd.Function, torch.autograd.functional.jacobian)}
    return things


def test_no_unflagged_attribute_chain_reaches_the_forbidden():
    """Follow every attribute an answer cell may name (those no rule flags) from what it may import, four
    links deep, through modules, classes and tensors: none may lead to builtins, a process or file
    module, or autograd, nor to a function whose own code calls autograd (torch.distributions'
    entropy differentiates what it is given). Libraries re-export modules under new names (enum's
    `bltns` is builtins, matplotlib's `Path` is pathlib's), so this walks the libraries installed."""
    import collections
    import dataclasses
    import inspect
    import itertools
    import math
    import random
    import string
    import types
    import typing

    import matplotlib
    import matplotlib.pyplot as plt
    import numpy as np

    from backprop_ninja.grading.rules import _attribute_rule

    roots = dict(torch=torch, F=F, nn=torch.nn, np=np, math=math, plt=plt, matplotlib=matplotlib,
                 itertools=itertools, functools=functools, collections=collections, time=time, random=random,
                 statistics=statistics, string=string, typing=typing, dataclasses=dataclasses,
                 x=torch.zeros(1), a=np.zeros(1))
    forbidden, reached, seen = _forbidden(), {}, set()
    todo = collections.deque((value, name, 0) for name, value in roots.items())
    while todo:
        value, path, depth = todo.popleft()
        if id(value) in forbidden and depth:
            reached.setdefault(forbidden[id(value)], path)
        code = getattr(getattr(value, "__func__", value), "__code__", None)
        if isinstance(code, types.CodeType) and "autograd" in code.co_names and (
                {"grad", "backward"} & set(code.co_names)):
            reached.setdefault(f"{code.co_name}, which calls autograd", path)
        if id(value) in seen or depth == 4:
            continue
        seen.add(id(value))
        if isinstance(value, types.ModuleType):
            items = list(vars(value).items())
        elif isinstance(value, (type, torch.Tensor, np.ndarray)):
            kind = value if isinstance(value, type) else type(value)
            items = [(k, inspect.getattr_static(kind, k, None)) for k in dir(kind)]
        else:
            continue
        for name, attr in items:
            if isinstance(name, str) and _attribute_rule(name) is None:
                attr = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
                todo.append((attr, f"{path}.{name}", depth + 1))
    assert reached == {}


def test_no_grad_is_allowed_because_it_only_switches_autograd_off():
    assert check_cell("with torch.no_grad():\n    y = x * 2") == []


# -- course names


def test_course_names_come_from_the_course_imports():
    sources = ["import torch\nfrom backprop_ninja import data, model\n%matplotlib inline",
               "from backprop_ninja.check import cmp\nimport backprop_ninja.widgets as w",
               "import backprop_ninja.grading\nimport numpy as np",
               "x = ("]
    assert course_names_from(sources) == {
        "data": "backprop_ninja.data", "model": "backprop_ninja.model", "cmp": "backprop_ninja.check.cmp",
        "w": "backprop_ninja.widgets", "backprop_ninja": "backprop_ninja"}


def test_course_names_of_the_first_notebook():
    names, _ = _course("01_stepwise_backprop")
    assert names["data"] == "backprop_ninja.data" and names["model"] == "backprop_ninja.model"
    assert names["cmp"] == "backprop_ninja.check.cmp" and names["Hints"] == "backprop_ninja.hints.Hints"


def test_course_functions_may_be_called_but_not_opened():
    names = {"cmp": "backprop_ninja.check.cmp", "model": "backprop_ninja.model"}
    assert check_cell("f = cmp\nf('h', dh, h)", names) == []
    assert [f.rule for f in check_cell("cmp.x", names)] == ["course internals"]


def test_a_course_import_is_allowed_only_when_the_released_cell_makes_it():
    source = "from backprop_ninja.check import collect_gradients"
    assert check_cell(source, allowed_imports={"backprop_ninja.check.collect_gradients"}) == []
    assert [f.rule for f in check_cell(source)] == ["course internals"]


# -- speed: the judge checks every learner cell of a class


def test_checking_the_largest_solution_takes_milliseconds():
    stem, _, source = max(ANSWERS, key=lambda a: len(a[2]))
    names, allowed = _course(stem)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        check_cell(source, names, allowed)
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.05, f"{statistics.median(times) * 1e3:.1f} ms"
