"""Source rules for the learner's cells, judged on their text by the grader (never inside the kernel).

A cell is first transformed the way IPython runs it, so `!ls`, `%%bash` and `x?` become visible
`get_ipython()` calls, then parsed and walked once. Each construct that breaks a rule is a Finding.
The rules are classes of behaviour, each a few tables of names below: autograd, reaching outside the
computation (processes, files, introspection), the course's own modules, the shell, complex numbers.
Names are checked where they are attributes (`x.backward`), imported names, keyword names and format
fields (`"{0.grad}"`); a bare local name (`grads`, a function `backward`) is the learner's own. A string
joined with + is checked as the string it makes. What turns a string made at run time into an attribute
lookup (getattr, a format string built at run time, a class pattern's __match_args__) is flagged itself,
and `tests/test_rules.py` walks the installed libraries to prove no unflagged chain of names leads out.
"""

import ast
import difflib
import re
import warnings
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from IPython.core.inputtransformer2 import TransformerManager

AUTOGRAD = "autograd"
PROCESS = "process, file or introspection"
COURSE = "course internals"
SHELL = "shell or magic"
COMPLEX = "complex numbers"

RULES = {
    AUTOGRAD: "Autograd in any form (.backward(), .grad, requires_grad, torch.autograd, torch.func, "
              "torch's backward kernels) is off limits: the exercise is to derive every gradient yourself.",
    PROCESS: "Answer cells compute with torch, math and a few harmless modules only: no other imports, "
             "files, processes, eval/exec, getattr-style introspection, underscore names or patching "
             "existing objects, because these reach around the exercise instead of solving it.",
    COURSE: "Use only the course helpers the notebook gives you (cmp, hint, the model's constants): "
            "the course's own modules hold the reference gradients and the grader, not your work.",
    SHELL: "Shell commands (!cmd) and IPython magics (%cmd, %%cmd, x?) are not allowed (only %matplotlib): "
           "they run code that these checks cannot read.",
    COMPLEX: "Complex numbers are not allowed: complex-step differentiation gives exact derivatives from "
             "the forward code alone, without deriving anything.",
}

# -- autograd: attribute or imported names, plus any name matching AUTOGRAD_PATTERN (torch ships public
# backward kernels such as torch.batch_norm_backward_elemt; np/torch.gradient differentiate numerically).
# The last lines are torch's doors to its other differentiation and dispatch machinery, and to code
# compiled from a string (TorchScript can call torch.autograd.grad where no check reads it).
AUTOGRAD_NAMES = {"autograd", "func", "forward_ad", "functional_call", "jacrev", "jacfwd", "hvp", "vhp",
                  "linearize", "make_dual", "unpack_dual", "dual_level", "register_hook",
                  "ops", "library", "jit", "compile", "compiler", "fx", "export", "overrides", "utils",
                  "CompilationUnit", "import_ir_module", "import_ir_module_from_buffer",
                  "optim", "Function", "cls_to_become",  # read .grad, define a backward, make a Parameter
                  "distributions",  # entropy and kl_divergence call torch.autograd.grad on what they hold
                  "make_graphed_callables"}  # calls torch.autograd.grad on the callables it is given
AUTOGRAD_PATTERN = re.compile(r"(?i:grad(?!e|ing)|backward|jacobian|hessian|jvp|vjp)|Parameter")
NOT_AUTOGRAD = {"no_grad"}  # it can only switch autograd off

# -- complex numbers: complex-step needs a complex value in, and its imaginary part out.
COMPLEX_NAMES = {"cfloat", "cdouble", "chalf", "csingle", "clongdouble", "polar",
                 "conj", "conj_physical", "resolve_conj", "conjugate", "angle",
                 "fft", "stft", "istft", "eig", "eigvals", "emath", "roots"}  # these make complex values too
COMPLEX_PARTS = re.compile(r"(?:^|_)(?:real|imag)(?:_|$)|roots|typecode|sctype")  # np.real_if_close,
# polyroots, np.typecodes["Complex"], np.mintypecode, np.sctypeDict: complex values or their dtype codes
# numpy's complex dtypes by string: "complex64", "D", "c16", "cdouble" ...
COMPLEX_DTYPE = re.compile(r"(?i:complex)"
                           r"|^[<>=|]?(?:[FDG]|c(?:8|16|32)|c(?:float|double|single|longdouble|half))$")
# Calls that take a dtype as a positional argument (np.zeros(3, "D"), a.view("c16")).
DTYPE_CALLS = {"astype", "view", "type", "to", "dtype", "array", "asarray", "asanyarray", "ascontiguousarray",
               "zeros", "ones", "empty", "full", "arange", "eye", "identity", "ndarray", "frombuffer",
               "fromiter", "zeros_like", "ones_like", "empty_like", "full_like"}
# What a dtype is called as an attribute or a builtin (torch.float64, np.float32, float): `t.view(dtype)`
# reads a tensor's bytes as another type, the way a complex result's imaginary part is read out.
DTYPE_NAME = re.compile(r"^(?:u?int\d*|b?float\d*|float_|double|half|single|long(?:double)?|short|bool_?|"
                        r"complex\w*|c(?:float|double|half))$")

# -- process, file or introspection. Modules an answer cell may import:
ALLOWED_IMPORTS = {"torch", "torch.nn", "torch.nn.functional", "math", "numpy", "matplotlib",
                   "matplotlib.pyplot", "itertools", "functools", "collections", "time", "random",
                   "statistics", "string", "typing", "dataclasses"}
# Builtins that run code, touch files or the namespace, or look attributes up by a string; flagged
# as attributes too (the builtins module is re-exported under other names: enum's `bltns`).
BUILTINS = {"eval", "exec", "compile", "__import__", "open", "globals", "locals", "vars", "getattr",
            "setattr", "delattr", "breakpoint", "input", "memoryview", "help", "exit", "quit", "get_ipython"}
# Modules outside the allowlist that torch, numpy and matplotlib re-export as attributes (torch.os,
# np.ctypeslib ...) or that a locked cell may have imported (`import os`): flagged as names too.
MODULES = {"os", "sys", "subprocess", "importlib", "ctypes", "builtins", "inspect", "io", "pickle",
           "pickletools", "marshal", "shutil", "tempfile", "glob", "gzip", "tarfile", "zipfile", "pathlib",
           "socket", "threading", "multiprocessing", "mp", "reduction", "reducer", "concurrent", "asyncio",
           "signal", "atexit", "gc", "types", "copyreg", "weakref", "traceback", "linecache", "dis", "ast",
           "operator", "logging", "platform", "runpy", "code", "codeop", "pdb", "site", "sysconfig",
           "pkgutil", "urllib", "http", "posix", "mmap", "resource", "faulthandler", "Image",
           "bltns", "enum"}  # enum imports builtins as bltns (matplotlib.re.enum.bltns.eval)
# Attributes that read or write files and memory, or reach processes and other machines.
FILES = {"load", "save", "savez", "savez_compressed", "fromfile", "tofile", "from_file", "memmap", "loadtxt",
         "savetxt", "genfromtxt", "fromregex", "dump", "DataSource", "imread", "imsave", "savefig",
         "ctypeslib", "lib", "f2py", "distutils", "distributed", "hub", "backends", "package", "classes",
         "serialization", "storage", "untyped_storage", "data_ptr", "set_", "onnx", "profiler",
         "get_file_path", "PyTorchFileReader", "PyTorchFileWriter", "rc_file", "cbook",
         "Path", "PurePath", "PosixPath", "frombuffer", "tobytes", "tostring",  # matplotlib.Path is pathlib's
         # matplotlib's settings name files and programs (animation.ffmpeg_path runs any program), its
         # canvas and image modules write files, its font and TeX modules run fc-list, latex, kpsewhich
         "rcParams", "rc", "rc_context", "rcdefaults", "rc_params_from_file", "style", "use",
         "switch_backend",
         "animation", "image", "canvas", "print_figure", "thumbnail", "font_manager", "texmanager", "dviread",
         "ft2font", "sphinxext", "mathtext", "math_to_image", "usetex",
         "as_subclass",  # library code then calls the learner's methods
         "apply_", "map_", "map2_"}  # run a Python function from inside a torch call, where no guard is
# matplotlib settings a plot may change (rcParams["figure.figsize"] = ..., rcParams.update({...})), and a
# style by its name (plt.style.use("ggplot")): other settings and style files name files and programs.
SAFE_SETTINGS = re.compile(r"(figure\.(figsize|dpi|facecolor|autolayout|titlesize|titleweight)|"
                           r"font\.(size|family|weight|sans-serif|serif|monospace)|"
                           r"image\.(cmap|interpolation|aspect|origin)|"
                           r"(axes|lines|xtick|ytick|legend|grid|scatter|patch|errorbar)\.[\w.]+|hist\.bins)$")
# matplotlib's own styles (any other name is read as a file from the working folder)
STYLES = {"default", "Solarize_Light2", "bmh", "classic", "dark_background", "fast", "fivethirtyeight",
          "ggplot", "grayscale", "petroff10", "petroff6", "petroff8", "tableau-colorblind10", "seaborn-v0_8",
          *(f"seaborn-v0_8-{k}" for k in ("bright", "colorblind", "dark", "dark-palette", "darkgrid", "deep",
                                           "muted", "notebook", "paper", "pastel", "poster", "talk", "ticks",
                                           "white", "whitegrid"))}
# Builtin classes a learner's class may derive from (besides the cell's own): a library's class would
# call the learner's methods from library code (a Tensor's detach, a dict's items).
OWN_BASES = {"object", "Exception", "ValueError", "TypeError", "RuntimeError", "ArithmeticError",
             "AssertionError", "KeyError", "IndexError", "LookupError", "NotImplementedError",
             "ZeroDivisionError"}

# Allowed modules' tools that turn a string into an attribute lookup or code (string.Formatter fetches
# "{0.backward}", functools.update_wrapper copies named attributes, get_type_hints evals annotations,
# np.testing.runstring execs and its extbuild compiles C).
STRING_DOORS = {"Formatter", "update_wrapper", "wraps", "singledispatch", "singledispatchmethod",
                "get_type_hints", "make_dataclass", "attrgetter", "methodcaller", "setp", "getp",
                "testing", "runstring", "rundocs", "extbuild",
                # matplotlib formats "{x.attr}" strings: StrMethodFormatter, and a string given as a formatter
                "ticker", "StrMethodFormatter", "set_major_formatter", "set_minor_formatter", "bar_label"}
FRAME_PREFIXES = ("f_", "gi_", "cr_", "ag_", "tb_", "co_")  # frames, code objects, tracebacks
DUNDER = re.compile(r"__\w+__")

# -- course internals: what the notebooks' own cells use from the course's modules.
SAFE_COURSE = {f"backprop_ninja.model.{name}" for name in ("PARAM_NAMES", "FORWARD_NAMES", "BACKWARD_ORDER",
                                                            "Config", "LECTURE_SEED", "BN_EPS", "init_params",
                                                            "sample_batch")}
SAFE_COURSE |= {f"backprop_ninja.data.{name}" for name in ("load_words", "vocabulary", "lecture_splits")}

# -- shell or magic: what get_ipython() turns !cmd, %magic, %%magic and x? into.
IPYTHON_ESCAPES = {"system", "getoutput", "run_line_magic", "run_cell_magic"}
ALLOWED_MAGICS = {"matplotlib"}

# Names shown with their module in a finding ("torch.autograd" rather than ".autograd").
MODULE_ALIASES = {"torch", "F", "nn", "np", "numpy", "math", "plt", "matplotlib"} | MODULES


@dataclass(frozen=True)
class Finding:
    rule: str     # one of RULES' keys
    what: str     # the construct, short: "torch.autograd", ".backward", "import os", "getattr()", "!ls", "1j"
    line: int     # 1-based line in the cell as the learner wrote it
    snippet: str  # that line, stripped, at most 80 characters


def check_cell(source: str, course_names: Mapping[str, str] = {},
               allowed_imports: Collection[str] = ()) -> list[Finding]:
    """Findings for one learner-written code cell (answer cell or a cell the learner added).

    course_names: names the course's locked cells bound (course_names_from); allowed_imports: dotted
    backprop_ninja names the released cell itself imports ("backprop_ninja.check.collect_gradients").
    A cell that does not parse has no findings: it cannot run.
    """
    try:
        parsed = _parse(source)
    except (RecursionError, MemoryError):  # fail closed: a kernel with a higher limit might run it
        return [Finding(PROCESS, "nested too deeply to check", 1, source.strip()[:80])]
    if parsed is None:
        return []
    tree, line_of = parsed
    return _Check(source, line_of, course_names, allowed_imports, tree).findings()


def course_names_from(sources: Iterable[str]) -> dict[str, str]:
    """Names that the course's own (locked, read-only) cells bind to course objects, from their imports:
    `from backprop_ninja import data` -> {"data": "backprop_ninja.data"}, `from backprop_ninja.check import
    cmp` -> {"cmp": "backprop_ninja.check.cmp"}, `import backprop_ninja.x as y` -> {"y": "backprop_ninja.x"}.
    Only imports of backprop_ninja are recorded (a star import of it binds names we cannot know)."""
    names = {}
    for source in sources:
        try:
            parsed = _parse(source)
        except (RecursionError, MemoryError):
            continue
        if parsed is not None:
            names.update(_course_imports(ast.walk(parsed[0])))
    return names


_transformer = TransformerManager()


def _parse(source):
    """(tree, line_of) for the cell as IPython runs it, or None. line_of maps a line of the transformed
    code to the learner's line: IPython drops leading blank lines and folds continued escapes and cell
    magics into one line."""
    try:
        code = _transformer.transform_cell(source)
        with warnings.catch_warnings():  # the learner's SyntaxWarnings are not the judge's to print
            warnings.simplefilter("ignore")
            # IPython runs a cell with a top-level `await` too, so it must parse here
            tree = compile(code, "<cell>", "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, True)
    except (SyntaxError, ValueError):
        return None
    before, after = source.splitlines(), code.splitlines()
    blank = next((i for i, text in enumerate(before) if text.strip()), 0)
    line_of = [blank + j + 1 for j in range(len(after))]
    if before[blank:] != after:
        matcher = difflib.SequenceMatcher(None, before[blank:], after, autojunk=False)
        for _, i1, i2, j1, j2 in matcher.get_opcodes():
            for j in range(j1, j2):  # a folded block maps to its first line
                line_of[j] = blank + 1 + min(i1 + j - j1, max(i1, i2 - 1))
    return tree, line_of


def _is_course(module):
    return module == "backprop_ninja" or module.startswith("backprop_ninja.")


def _course_imports(nodes):
    names = {}
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_course(alias.name):  # `import a.b` binds a, `import a.b as c` binds c
                    names[alias.asname or "backprop_ninja"] = alias.name if alias.asname else "backprop_ninja"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_course(node.module or ""):
            names.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names if a.name != "*"})
    return names


def _is_module(dotted):
    # "backprop_ninja" and "backprop_ninja.model" are modules, "backprop_ninja.check.cmp" is what a module
    # holds: the course's modules sit at the package's top level, and telling them apart by importing
    # would run the module (and torch) inside the judge.
    return dotted.count(".") <= 1


def _attribute_rule(name):
    """The rule an attribute or imported name breaks, if any."""
    if name.startswith("_"):
        return PROCESS
    if name in AUTOGRAD_NAMES or (AUTOGRAD_PATTERN.search(name) and name not in NOT_AUTOGRAD):
        return AUTOGRAD
    if name in COMPLEX_NAMES or "complex" in name.lower() or COMPLEX_PARTS.search(name):
        return COMPLEX
    if (name in MODULES or name in FILES or name in STRING_DOORS or name in BUILTINS
            or name.startswith(FRAME_PREFIXES) or "hook" in name.lower()):
        # a module hook patches every module of the process
        return PROCESS
    return None


def _last_name(node):
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)


def _is_dtype(node):
    """A dtype written out: a string, torch.float64 / np.float32 ..., or a builtin such as float."""
    if _text(node) is not None:
        return True
    name = _last_name(node)
    return bool(name and DTYPE_NAME.match(name) and (isinstance(node, ast.Attribute) or name in
                                                     ("float", "int", "bool", "complex")))


def _private(name):
    return name.startswith("_") and name != "_"  # `**_` is the answer cells' own catch-all


def _bound_names(targets):
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name) and not _loads(n)}


def _loads(node):
    return isinstance(node.ctx, ast.Load)


def _text(node):
    """The string a node certainly is: a literal, or literals joined by + (`"back" + "ward"`), else None."""
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text(node.left), _text(node.right)
        return None if left is None or right is None else left + right
    if isinstance(node, ast.JoinedStr):
        parts = [_text(v) for v in node.values]
        return None if None in parts else "".join(parts)
    return None


def _number(node):
    """The int or float a node certainly is (a literal, or one with a sign), else None."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _number(node.operand)
        return None if value is None else (-value if isinstance(node.op, ast.USub) else value)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    return None


def _makes_complex(base, exponent):
    """`(-1) ** 0.5`, pow(-1, 0.5): Python answers a negative number's fractional power with a complex."""
    b, e = _number(base), _number(exponent)
    return b is not None and e is not None and b < 0 and not float(e).is_integer()


# Builtin types whose class pattern matches the subject itself (`case int(x)`); any other class pattern
# with positional parts reads attributes named by strings (the class's __match_args__).
SELF_MATCHING = {"bool", "bytearray", "bytes", "dict", "float", "frozenset", "int", "list", "set", "str",
                 "tuple"}


def _import_binds(node):
    """Names an import binds to something that is not the course's (those stay course names)."""
    if isinstance(node, ast.ImportFrom) and _is_course(node.module or ""):
        return set()
    return {(a.asname or a.name).split(".")[0] for a in node.names if not _is_course(a.name)}


def _function_locals(fn):
    """The names bound in a function's own scope: parameters and assignments, not nested scopes'."""
    a = fn.args
    names = {arg.arg for arg in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if arg}
    declared, todo = set(), list(fn.body) if isinstance(fn.body, list) else [fn.body]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Name) and not _loads(node):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        elif isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= _import_binds(node)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            declared.update(node.names)
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            names.add(node.name)
        todo.extend(ast.iter_child_nodes(node))
    return names - declared


def _definite_binds(stmt):
    """Names a top-level statement certainly binds once it has run (a later use is the learner's value)."""
    if isinstance(stmt, ast.Assign):
        return _bound_names(stmt.targets)
    if isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
        return _bound_names([stmt.target])
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {stmt.name}
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return _import_binds(stmt)
    return set()


@dataclass(frozen=True)
class _Scope:
    own: frozenset  # names that are the learner's own here (bound in this or an enclosing function)
    kind: str       # "module", "class" or "function"
    in_def: bool    # inside a def or lambda: module-level names may be rebound before it is called


class _Check:
    def __init__(self, source, line_of, course_names, allowed_imports, tree):
        self.lines, self.line_of = source.splitlines(), line_of
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        # the package itself is always the course's, whoever imported it (a test cell, say)
        self.course = {"backprop_ninja": "backprop_ninja", **course_names, **_course_imports(imports)}
        self.allowed = set(allowed_imports)
        self.modules = MODULE_ALIASES | set(self.course) | {m for n in imports for m in _import_binds(n)}
        self.found = {}
        self.decorated = set()
        self.harmless = {}  # id of an attribute chain -> its links used only in the harmless ways above
        # the cell's own classes: class statements at its top level, by names no import rebinds
        self.classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)} - self.modules
        # dataclass only as a class statement's one decorator: stacked over another, or called on a value,
        # it compiles the field names of a class made another way into code (exec)
        for node in ast.walk(tree):
            decorators = node.decorator_list if isinstance(node, ast.ClassDef) else []
            if len(decorators) == 1:
                target = decorators[0].func if isinstance(decorators[0], ast.Call) else decorators[0]
                if _last_name(target) == "dataclass":
                    self.decorated.add(id(target))
        # Top-level statements run in order: a name the cell has certainly bound is its own from then on.
        # Inside a def it never is (the def may be called after the name is rebound), unless local there.
        own = set()
        for stmt in tree.body:
            self.walk(stmt, _Scope(frozenset(own), "module", False))
            own |= _definite_binds(stmt)

    def findings(self):
        return [f for _, f in sorted(self.found.values(), key=lambda cf: (cf[1].line, cf[0]))]

    def flag(self, rule, what, line, col=0):
        """Record a finding once per construct and line (the first column it appears at)."""
        line = self.line_of[min(line, len(self.line_of)) - 1]
        snippet = self.lines[line - 1].strip()[:80] if line <= len(self.lines) else ""
        key = (rule, what, line)
        if key not in self.found or col < self.found[key][0]:
            self.found[key] = (col, Finding(rule, what, line, snippet))

    def walk(self, root, scope):
        # an explicit stack, not recursion: a deeply nested expression must not crash the judge
        todo = [(root, scope, getattr(root, "lineno", 1))]
        while todo:
            node, scope, line = todo.pop()
            line = getattr(node, "lineno", line)
            visit = getattr(self, "visit_" + type(node).__name__, None)
            children = visit(node, scope, line) if visit else [(c, scope) for c in ast.iter_child_nodes(node)]
            todo.extend((child, s, line) for child, s in children)

    # -- scopes
    def visit_FunctionDef(self, node, scope, line):
        if _private(getattr(node, "name", "")):
            self.flag(PROCESS, f"def {node.name}", line)
        a = node.args
        params = [p for p in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if p]
        for p in params:
            if _private(p.arg):
                self.flag(PROCESS, p.arg, p.lineno)
        # decorators, defaults and annotations run in the enclosing scope, the body in its own
        outside = getattr(node, "decorator_list", []) + a.defaults + [d for d in a.kw_defaults if d]
        outside += [p.annotation for p in params if p.annotation] + [getattr(node, "returns", None)]
        enclosing = scope.own if scope.in_def else frozenset()
        inner = _Scope(enclosing | _function_locals(node), "function", True)
        body = node.body if isinstance(node.body, list) else [node.body]
        return [(n, scope) for n in outside if n] + [(n, inner) for n in body]

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_ClassDef(self, node, scope, line):
        if _private(node.name):
            self.flag(PROCESS, f"class {node.name}", line)
        # what a class body binds are attributes (a dataclass field `grad` is read by dataclasses.asdict)
        for stmt in node.body:
            targets = [*getattr(stmt, "targets", []), getattr(stmt, "target", None)]
            names = _bound_names(t for t in targets if t)
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(stmt.name)
            for name in names:
                rule = None if _private(name) else _attribute_rule(name)  # private ones are flagged anyway
                if rule:
                    self.flag(rule, f".{name}", stmt.lineno)
        for base in node.bases:  # only the cell's own classes and a few builtin ones
            if not (isinstance(base, ast.Name) and base.id in self.classes | OWN_BASES
                    and base.id not in self.modules):
                self.flag(PROCESS, f"class {node.name}(a class not the cell's own)", line)
        for keyword in node.keywords:  # metaclass=...
            self.flag(PROCESS, f"class {node.name}({keyword.arg}=...)", line)
        # a class body looks names up in itself, then in the globals: its own bindings prove nothing
        body = _Scope(scope.own, "class", scope.in_def)
        outside = node.decorator_list + node.bases + node.keywords
        return [(n, scope) for n in outside] + [(n, body) for n in node.body]

    def visit_ListComp(self, node, scope, line):
        # the first iterable runs in the enclosing scope, the rest in the comprehension's own
        first, *rest = node.generators
        inner = _Scope(scope.own | _bound_names(g.target for g in node.generators), "function", scope.in_def)
        parts = [first.target, *first.ifs, *rest] + [getattr(node, k, None) for k in ("elt", "key", "value")]
        return [(first.iter, scope)] + [(n, inner) for n in parts if n]

    visit_SetComp = visit_DictComp = visit_GeneratorExp = visit_ListComp

    # -- names
    def visit_Name(self, node, scope, line):
        name = node.id
        if (name == "dataclass" and _loads(node) and id(node) not in self.decorated
                and (name in self.modules or name not in scope.own)):  # imported, it is not the learner's own
            self.flag(PROCESS, "dataclass (other than a class's one decorator)", line, node.col_offset)
        if _private(name):
            self.flag(PROCESS, name, line, node.col_offset)
        elif _loads(node) and name not in scope.own:
            if name in BUILTINS:
                self.flag(PROCESS, f"{name}()", line, node.col_offset)
            elif name == "complex":
                self.flag(COMPLEX, "complex()", line, node.col_offset)
            elif name in MODULES:
                self.flag(PROCESS, name, line, node.col_offset)
            elif name in self.course and _is_module(self.course[name]):
                self.flag(COURSE, name, line, node.col_offset)  # a course module passed around or aliased
        return []

    def visit_Attribute(self, node, scope, line):
        # a chain a.b.c at once: each rule once, at the first link that breaks it
        chain, root = [], node
        while isinstance(root, ast.Attribute):
            chain.insert(0, root.attr)
            root = root.value
        named = isinstance(root, ast.Name) and root.id in self.modules
        show = (lambda k: ".".join([root.id, *chain[:k + 1]])) if named else (lambda k: "." + chain[k])
        is_course = isinstance(root, ast.Name) and root.id in self.course and root.id not in scope.own
        dotted = self.course[root.id] if is_course else ""
        safe = _is_module(dotted) and f"{dotted}.{chain[0]}" in SAFE_COURSE  # model.BACKWARD_ORDER
        if is_course and not safe:
            self.flag(COURSE, f"{root.id}.{chain[0]}", line, node.col_offset)
        seen = set()
        harmless = self.harmless.get(id(node), ())
        if chain[-1] == "dataclass" and id(node) not in self.decorated:
            # called on a class made another way, it compiles the field names into code (exec)
            self.flag(PROCESS, "dataclass (other than a class's one decorator)", line, node.col_offset)
        for k, attr in enumerate(chain[1:] if safe else chain, start=int(safe)):
            rule = None if attr in harmless else _attribute_rule(attr)
            if rule and rule not in seen:
                seen.add(rule)
                self.flag(rule, show(k), line, node.col_offset)
        if chain[-1] in ("format", "format_map") and _text(node.value) is None:
            # str.format of a string made at run time (or str.format itself, passed around): its fields
            # look attributes up by name, unchecked here
            self.flag(PROCESS, f".{chain[-1]} of a string built at run time", line, node.col_offset)
        # a course root's bare use is judged here, with its attribute
        children = [] if is_course else [(root, scope)]
        if not _loads(node):  # x.attr = ..., del x.attr: patching an object
            whole = show(len(chain) - 1)
            what = f"del {whole}" if isinstance(node.ctx, ast.Del) else f"{whole} ="
            self.flag(COURSE if is_course else PROCESS, what, line, node.col_offset)
        return children

    def visit_Import(self, node, scope, line):
        for alias in node.names:
            if isinstance(node, ast.Import):
                module = dotted = alias.name
                what, parts = f"import {module}", module.split(".")
            else:
                module = "." * node.level + (node.module or "")
                dotted, what = f"{module}.{alias.name}", f"from {module} import {alias.name}"
                parts = module.split(".") + [alias.name]
            if _is_course(module):
                if dotted not in self.allowed:
                    self.flag(COURSE, what, line)
                continue
            rule = next((r for r in map(_attribute_rule, parts) if r), None)
            if rule or alias.name == "*" or module not in ALLOWED_IMPORTS:
                self.flag(rule or PROCESS, what, line)
        return []

    visit_ImportFrom = visit_Import

    def visit_Subscript(self, node, scope, line):
        if _last_name(node.value) == "rcParams" and SAFE_SETTINGS.match(_text(node.slice) or ""):
            self.harmless[id(node.value)] = {"rcParams"}
        return [(c, scope) for c in ast.iter_child_nodes(node)]

    def visit_keyword(self, node, scope, line):
        if node.arg:
            self.check_keyword(node.arg, node.value, line)
        elif isinstance(node.value, ast.Dict):  # f(**{"requires_grad": True}) names its keywords too
            for key, value in zip(node.value.keys, node.value.values):
                if _text(key) is not None:
                    self.check_keyword(_text(key), value, line)
        return [(node.value, scope)]

    def check_keyword(self, name, value, line):
        if _private(name):
            self.flag(PROCESS, f"{name}=", line)
        elif AUTOGRAD_PATTERN.search(name):  # requires_grad=True
            self.flag(AUTOGRAD, f"{name}=", line)
        elif name == "usetex":  # text drawn by running latex
            self.flag(PROCESS, f"{name}=", line)
        elif name == "dtype" and COMPLEX_DTYPE.search(_text(value) or "_"):
            self.flag(COMPLEX, f"dtype={_text(value)!r}", line)

    def visit_MatchClass(self, node, scope, line):
        for attr in node.kwd_attrs:  # `case object(grad=g)` reads the attribute `grad`
            rule = _attribute_rule(attr)
            if rule:
                self.flag(rule, f".{attr}", line)
        if node.patterns and not (isinstance(node.cls, ast.Name) and node.cls.id in SELF_MATCHING):
            self.flag(PROCESS, "case C(x): attributes named by __match_args__", line)
        return [(c, scope) for c in ast.iter_child_nodes(node)]

    # -- values
    def visit_Constant(self, node, scope, line):
        value = node.value
        if isinstance(value, complex):
            self.flag(COMPLEX, repr(value), line, node.col_offset)
        elif isinstance(value, str):
            self.check_text(value, line, node.col_offset)
        return []

    def check_text(self, text, line, col):
        for dunder in DUNDER.findall(text):  # for APIs that take attribute names as strings
            self.flag(PROCESS, repr(dunder), line, col)
        for field in re.findall(r"\{([^{}!:]*)", text):  # "{0.grad}".format(x) reads x.grad
            rule = next((r for r in map(_attribute_rule, re.findall(r"\.(\w+)", field)) if r), None)
            if rule:
                self.flag(rule, repr("{" + field + "}"), line, col)

    def visit_BinOp(self, node, scope, line):
        text = _text(node)
        if text is not None:  # "_" + "_import_" + "_" is checked as the string it makes
            self.check_text(text, line, node.col_offset)
        if isinstance(node.op, ast.Pow) and _makes_complex(node.left, node.right):
            self.flag(COMPLEX, "a negative number ** a fraction", line, node.col_offset)
        return [(c, scope) for c in ast.iter_child_nodes(node)]

    def visit_Expr(self, node, scope, line):
        if isinstance(node.value, ast.Constant):  # a docstring or a bare string: it does nothing
            return []
        return [(node.value, scope)]

    def visit_Call(self, node, scope, line):
        func = node.func
        escape = self.ipython_escape(node)
        if escape is not None:
            if escape:
                self.flag(SHELL, escape, line)
            return []
        children = [(c, scope) for c in ast.iter_child_nodes(node)]
        if isinstance(func, ast.Name) and func.id not in scope.own:
            if func.id == "locals" and not node.args and not node.keywords and scope.kind == "function":
                # a function's locals() is a copy of its own variables (collect_gradients(locals()));
                # at the top level or in a class body it is the live namespace, and stays flagged
                children = children[1:]
            elif func.id == "type" and (len(node.args) > 1 or node.keywords or any(
                    isinstance(a, ast.Starred) for a in node.args)):
                self.flag(PROCESS, "type(name, bases, dict)", line)  # a class from strings, dunders included
        if isinstance(func, ast.Call) and getattr(func.func, "id", None) == "type":
            self.flag(PROCESS, "type(x)(...): a class made from x's", line)  # type(int)("C", (), {...})
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        given = [*node.args, *(k.value for k in node.keywords if k.arg == "style")]
        if isinstance(func, ast.Attribute) and len(given) == 1 and len(node.args) + len(node.keywords) == 1:
            arg, owner = given[0], func.value
            if (name == "update" and _last_name(owner) == "rcParams" and isinstance(arg, ast.Dict)
                    and all(SAFE_SETTINGS.match(_text(k) or "") for k in arg.keys)):
                self.harmless[id(func)] = {"rcParams"}
            elif (name in ("use", "context") and _last_name(owner) == "style"
                  and _text(arg) in STYLES):
                self.harmless[id(func)] = {"style", name}
        if name in DTYPE_CALLS:
            for text in filter(None, map(_text, node.args)):
                if COMPLEX_DTYPE.search(text):
                    self.flag(COMPLEX, f"{name}({text!r})", line)
        if name == "pow" and len(node.args) >= 2 and _makes_complex(*node.args[:2]):
            self.flag(COMPLEX, "pow(a negative number, a fraction)", line)
        if isinstance(func, ast.Attribute) and name == "view" and any(map(_is_dtype, node.args)):
            self.flag(PROCESS, ".view(dtype)", line)  # a tensor's bytes read as another type
        return children

    def ipython_escape(self, node):
        """For get_ipython().system/getoutput/run_*_magic(...): "" when allowed, else the escape as the
        learner typed it ("!ls", "%run", "%%bash", "x?"). None for any other call."""
        func = node.func
        shell = getattr(func, "value", None)
        if not (isinstance(func, ast.Attribute) and func.attr in IPYTHON_ESCAPES
                and isinstance(shell, ast.Call) and getattr(shell.func, "id", None) == "get_ipython"):
            return None
        texts = [_text(a) for a in node.args]
        args = [t or "" for t in texts] + ["", ""]
        if func.attr in ("system", "getoutput"):
            return "!" + (args[0].split() or [""])[0]
        if func.attr == "run_cell_magic":
            return f"%%{args[0]}"
        if args[0] in ALLOWED_MAGICS and len(texts) == 2 and None not in texts and not node.keywords:
            return ""  # exactly what `%matplotlib inline` becomes: two strings
        if args[0] in ("pinfo", "pinfo2"):
            return f"{args[1]}{'?' if args[0] == 'pinfo' else '??'}"
        return f"%{args[0]}"
