"""Grading with nbgrader, for one learner (``grade``) or a whole class (``autograde``).

Every step is nbgrader's own; this module lays out scratch course directories,
boxes the untrusted code in, runs notebooks in parallel and collects the grades::

    released course     grader/nbgrader_config.py + grader/source after ``nbgrader
                        generate_assignment`` (its gradebook keeps every test cell,
                        hidden tests included); cached by content in
                        ~/.cache/backprop-ninja/courses/                          prepare_course
    scratch/jobs/<k>/   one per (student, notebook): a copy of that gradebook, the
                        submission copied in as submitted, then ``autograde`` (own
                        kernel, time + memory limits, test and read-only cells
                        restored) and ``generate_feedback`` (hidden-test source
                        stripped)                                                  grade_notebook
    out/course/         the class gradebook: each job's grades merged serially     merge_grades

A job runs in its own process, forked from a server that has nbgrader imported
already (importing it costs seconds; the calling process never imports it), so
N jobs really are N notebooks executing at once, and a job that outlives its
wall-clock limit is killed with its kernel. SQLite is only ever written by one
process at a time: each job has its own gradebook and the parent merges them
one by one. Like any multiprocessing program, a script that calls
``autograde_class`` needs an ``if __name__ == "__main__":`` guard.

The nbgrader steps are hardened by three preprocessors (``harden_nbgrader``):
RestoreCells, SandboxedExecute and HideHiddenTests.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from backprop_ninja import UserError

REPO = Path(__file__).resolve().parents[1]
COURSE = REPO / "grader"
ASSIGNMENT = "backprop"
LEARNER = "learner"                     # student id used by ``grade``
FEEDBACK_DIR = Path("grade-feedback")   # ``grade`` writes <cwd>/grade-feedback/<stem>.html
KERNEL_NAME = "backprop-ninja-sandbox"
PID_DIR_ENV = "BACKPROP_NINJA_KERNEL_PIDS"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class Limits:
    """What one notebook may use. ``cell_timeout``: seconds per cell (nbgrader's
    Execute.timeout); ``notebook_timeout``: wall-clock seconds for the whole job
    (kernel start, every cell, feedback); ``memory``: bytes of address space of
    the kernel (RLIMIT_AS; torch needs about 1.5 GB of it just to import)."""

    cell_timeout: int = 180
    notebook_timeout: int = 900
    memory: int = 4 << 30


@dataclass
class NotebookResult:
    """One (student, notebook): nbgrader's score and the first problem found in it."""

    student: str
    stem: str
    score: float = 0.0
    max_score: float = 0.0
    problem: str | None = None          # one sentence, None when full marks
    feedback: str | None = None         # HTML feedback path (inside the job dir until copied)
    autograded: str | None = None       # the autograded notebook (inside the job dir)
    graded: bool = False                # nbgrader autograded it (False: missing/unreadable/killed)
    seconds: float = 0.0                # wall-clock time of its grading job
    job_dir: str | None = None          # where nbgrader ran (inside the scratch dir)


@dataclass
class ClassResults:
    """Every student's results, by notebook stem, and where the class gradebook is."""

    stems: list[str]
    max_scores: dict[str, float]
    results: dict[str, dict[str, NotebookResult]] = field(default_factory=dict)
    gradebook: Path | None = None

    def total(self, student: str) -> float:
        return sum(r.score for r in self.results[student].values())

    @property
    def max_score(self) -> float:
        return sum(self.max_scores.values())


# --------------------------------------------------------------------------- the course


def course_notebooks(course: Path = COURSE) -> dict[str, Path]:
    """The course's notebooks by file stem (``01_stepwise_backprop`` ...), in order."""
    source = Path(course) / "source" / ASSIGNMENT
    found = sorted(source.glob("*.ipynb"))
    if not found:
        raise UserError(f"no course notebooks in {source}; run this from the Backprop Ninja checkout.")
    return {p.stem: p for p in found}


def _read_notebook(path: Path):
    """The notebook at ``path`` or a ``UserError`` naming what is wrong with it."""
    import nbformat

    try:
        return nbformat.read(str(path), as_version=4)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} cannot be read ({exc.__class__.__name__}).") from None
    except Exception as exc:  # nbformat raises bare JSON/validation errors
        raise UserError(f"{path} is not a valid notebook (malformed JSON or not nbformat 4): "
                        f"{str(exc).splitlines()[0][:120]}.") from None


# --------------------------------------------------------------------------- the box


def _sandboxed_kernel() -> None:
    """Kernel entry point (argv of the sandbox kernelspec): limits first, then ipykernel.

    ``argv``: memory bytes, CPU seconds, then ipykernel's own arguments. The limits
    are inherited by anything the learner's code starts. RLIMIT_CPU is a backstop
    behind the wall-clock kill in case the parent could not kill the kernel.
    """
    memory, cpu = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    pid_dir = os.environ.get(PID_DIR_ENV)
    if pid_dir:  # so the parent can kill this kernel (it runs in its own session)
        Path(pid_dir, str(os.getpid())).touch()
    sys.argv = ["ipykernel_launcher", *sys.argv[3:]]
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()


def _write_kernelspec(jupyter_dir: Path, limits: Limits) -> None:
    """A kernelspec whose kernel runs under ``limits``, single-threaded (fair sharing of cores)."""
    spec = jupyter_dir / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True, exist_ok=True)
    cpu = 2 * limits.notebook_timeout
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-c", "from backprop_ninja.autograde import _sandboxed_kernel; "
                 "_sandboxed_kernel()", str(limits.memory), str(cpu), "-f", "{connection_file}"],
        "display_name": "Backprop Ninja (grading sandbox)",
        "language": "python",
        "env": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"},
    }, indent=1))


def _kill_kernels(pid_dir: Path) -> None:
    for entry in pid_dir.glob("*") if pid_dir.is_dir() else ():
        with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
            os.killpg(int(entry.name), signal.SIGKILL)  # kernel = session leader: its group
        with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
            os.kill(int(entry.name), signal.SIGKILL)


# --------------------------------------------------------------------------- nbgrader steps


@functools.cache
def _nbgrader_classes():
    """Preprocessor classes defined lazily: importing nbgrader takes seconds."""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from nbformat.notebooknode import NotebookNode, from_dict
    from nbgrader import utils
    from nbgrader.preprocessors import ClearHiddenTests, Execute, OverwriteCells
    from traitlets import Unicode

    def error(ename: str, evalue: str) -> NotebookNode:
        return NotebookNode(output_type="error", ename=ename, evalue=evalue,
                            traceback=[f"{ename}: {evalue}"])

    class SandboxedExecute(Execute):
        """nbgrader's Execute, made fair to (and safe from) the code it runs.

        - A kernel that dies (``os._exit``, a crash, the CPU limit) or that ignores the
          interrupt sent at a cell's time limit fails that cell and every cell after it,
          instead of failing the whole notebook: earlier tests keep their credit, later
          ones score zero (an unexecuted test cell would otherwise count as passed).
        - What the learner's code writes to stderr inside a test cell (the visible check
          calls their function) is kept but shown as stdout: nbgrader zeroes a test
          cell with any stderr, and this course's tests never use stderr to fail.
        """

        _stopped: str | None = None

        def preprocess_cell(self, cell, resources, index):
            if cell.cell_type != "code":
                return super().preprocess_cell(cell, resources, index)
            if self._stopped is not None:
                cell.outputs = [error("NotRun", f"not run: {self._stopped}")]
                return cell, resources
            try:
                cell, resources = super().preprocess_cell(cell, resources, index)
            except DeadKernelError:
                self._stopped = f"the kernel died in cell {index}."
                cell.outputs.append(error(
                    "KernelDied", "the kernel died while running this cell (it called os._exit, "
                    "crashed, or ran out of its memory or CPU limit); nothing after it ran."))
            except CellTimeoutError:
                self._stopped = f"cell {index} could not be stopped at its time limit."
                cell.outputs.append(error(
                    "CellTimeoutError", f"this cell ran longer than its {self.timeout} s limit and "
                    "ignored the interrupt; nothing after it ran."))
            if utils.is_grade(cell) and not utils.is_solution(cell):
                for out in cell.get("outputs", []):
                    if out.output_type == "stream" and out.name == "stderr":
                        out.name = "stdout"
                        out.text = "[your code wrote to stderr; it costs no points]\n" + out.text
            return cell, resources

    class RestoreCells(OverwriteCells):
        """nbgrader's OverwriteCells, hardened against a learner who edited or deleted cells.

        A cell carrying a source cell's id first gets that cell's nbgrader flags back
        (grade/solution/locked/points: otherwise an unlocked or un-graded test cell fails
        nbgrader's checksum check and the whole notebook with it); then nbgrader restores
        its source. Every missing graded *or read-only* cell (the set-up cell that imports
        the grading helpers first, the forward pass ...) is put back after the nearest
        source cell still present (nbgrader's own placement assumes that neighbour is a
        graded or answer cell and crashes otherwise).
        """

        source_dir = Unicode("", help="the assignment's source notebooks (for cell order)").tag(
            config=True)

        def _source(self):
            if not hasattr(self, "_cells"):
                nb = self.gradebook.find_notebook(self.notebook_id, self.assignment_id)
                grades = {c.name: c.max_score for c in nb.grade_cells}
                answers = {c.name for c in nb.solution_cells}
                tasks = {c.name for c in nb.task_cells}
                self._cells = {c.name: c for c in nb.source_cells}
                self._flags = {name: {"grade": name in grades, "solution": name in answers,
                                      "locked": cell.locked, "task": name in tasks,
                                      **({"points": grades[name]} if name in grades else {})}
                               for name, cell in self._cells.items()}
                self._grades = grades
                path = Path(self.source_dir or Path("source", ASSIGNMENT)) / f"{self.notebook_id}.ipynb"
                order = [c.metadata.get("nbgrader", {}).get("grade_id")
                         for c in nbformat_read(path).cells] if path.exists() else list(self._cells)
                self._order = [name for name in order if name in self._cells]
            return self._cells

        def preprocess_cell(self, cell, resources, index):
            grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
            if grade_id in self._source():
                flags = self._flags[grade_id]
                cell.metadata.nbgrader.update(flags)
                if "points" not in flags:
                    cell.metadata.nbgrader.pop("points", None)
            return super().preprocess_cell(cell, resources, index)

        def add_missing_grade_cells(self, nb, resources):
            cells = self._source()
            answers = {name for name, flags in self._flags.items() if flags["solution"]}
            for name in self._order:
                present = {c.metadata.get("nbgrader", {}).get("grade_id"): i for i, c in enumerate(nb.cells)
                           if c.metadata.get("nbgrader", {}).get("grade_id")}
                if name in present or not (name in self._grades or cells[name].locked):
                    continue
                self.log.warning("Missing cell %s: adding it back", name)
                before = self._order[: self._order.index(name)]
                where = next((present[p] + 1 for p in reversed(before) if p in present), 0)
                added = from_dict(self.missing_cell_transform(cells[name], self._grades.get(name, 0),
                                                              is_solution=name in answers))
                if name not in self._grades:  # a read-only cell: not graded, still locked
                    added.metadata.nbgrader.update(self._flags[name])
                    added.metadata.nbgrader.pop("points", None)
                nb.cells.insert(where, added)
            return nb, resources

    class HideHiddenTests(ClearHiddenTests):
        """Feedback step: test cells keep their verdict and the reason, never their
        hidden source. Removes the ``BEGIN/END HIDDEN TESTS`` region (nbgrader's own
        remover) and cuts, from tracebacks, the frames of the test cell itself, whose
        code context would quote hidden lines."""

        def preprocess_cell(self, cell, resources, index):
            if cell.cell_type != "code" or not utils.is_grade(cell) or utils.is_solution(cell):
                return cell, resources
            if self._remove_hidden_test_region(cell):
                cell.source = cell.source.rstrip() + "\n# hidden tests ran here (their code is not shown)"
            for out in cell.get("outputs", []):
                if out.output_type == "error":
                    out.traceback = _strip_cell_frames(out, cell.get("execution_count"))
            return cell, resources

    return SandboxedExecute, HideHiddenTests, RestoreCells


def nbformat_read(path: Path):
    import nbformat

    return nbformat.read(str(path), as_version=4)


def _strip_cell_frames(out, execution_count) -> list[str]:
    """Traceback entries minus the test cell's own frames (they quote its source)."""
    marks = [f"In[{execution_count}]", f"In [{execution_count}]"] if execution_count else []
    kept = [entry for entry in out.get("traceback", [])[1:-1]
            if not any(m in entry for m in marks) and "BEGIN HIDDEN TESTS" not in entry]
    # Frames of the test cell are hidden; learner's and package frames stay: they teach.
    return [*kept, f"{out.get('ename', 'Error')}: {out.get('evalue', '')}"] if marks else \
        [f"{out.get('ename', 'Error')}: {out.get('evalue', '')}"]


def harden_nbgrader(c) -> None:
    """Make an nbgrader config (``c`` of an nbgrader_config.py) grade this course safely:
    RestoreCells for OverwriteCells (edited/deleted test and read-only cells come back),
    SandboxedExecute for Execute (dead or deaf kernels, learner stderr) and HideHiddenTests
    in generate_feedback (no hidden-test source in feedback). grader/nbgrader_config.py
    can call it so that the plain ``nbgrader`` commands get the same treatment."""
    from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
    from nbgrader.converters import Autograde
    from nbgrader.preprocessors import GetGrades

    sandboxed_execute, hide_hidden_tests, restore_cells = _nbgrader_classes()

    def swap(steps_name: str, old: str, new):
        steps = (c.Autograde.get(steps_name)
                 or Autograde.class_traits()[steps_name].make_dynamic_default())
        return [new if getattr(p, "__name__", str(p).rsplit(".", 1)[-1]) == old else p for p in steps]

    c.Autograde.autograde_preprocessors = swap("autograde_preprocessors", "Execute", sandboxed_execute)
    c.Autograde.sanitize_preprocessors = swap("sanitize_preprocessors", "OverwriteCells", restore_cells)
    c.OverwriteCells.add_missing_cells = True
    c.GenerateFeedback.preprocessors = [GetGrades, hide_hidden_tests, CSSHTMLHeaderPreprocessor]


def _job_config(root: Path, limits: Limits):
    """grader/nbgrader_config.py (copied into ``root``), hardened, plus the box around the kernel."""
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader

    config = Config()
    if (root / "nbgrader_config.py").exists():
        config.merge(PyFileConfigLoader("nbgrader_config.py", path=str(root)).load_config())
    harden_nbgrader(config)
    c = Config()
    c.CourseDirectory.root = str(root)
    c.CourseDirectory.db_url = f"sqlite:///{root / 'gradebook.db'}"
    for name in ("Execute", "ExecutePreprocessor", "NotebookClient"):
        c[name].timeout = limits.cell_timeout
        c[name].kernel_name = KERNEL_NAME
        c[name].error_on_timeout = {
            "ename": "CellTimeoutError",
            "evalue": f"this cell ran longer than its {limits.cell_timeout} s limit and was stopped",
            "traceback": [f"CellTimeoutError: this cell ran longer than its {limits.cell_timeout} s "
                          "limit and was stopped"]}
    c.Execute.startup_timeout = max(60, limits.cell_timeout)
    c.GenerateAssignment.create_assignment = True
    c.RestoreCells.source_dir = str(root / "source" / ASSIGNMENT)
    config.merge(c)
    return config


def _coursedir(root: Path, config, student: str = ".", notebook: str = "*"):
    from nbgrader.coursedir import CourseDirectory

    coursedir = CourseDirectory(config=config)
    coursedir.root = str(root)
    coursedir.assignment_id = ASSIGNMENT
    coursedir.student_id = student
    coursedir.notebook_id = notebook
    return coursedir


def _enter_job(root: Path) -> None:
    """Inside a job process: work in ``root``; nbgrader's log and the kernel's stderr go to a
    file there, not the terminal; nbgrader finds ``alembic`` (it runs it) even when the
    virtual environment is not activated."""
    import logging

    os.chdir(root)
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

    log = open(root / "nbgrader.log", "a")  # noqa: SIM115 (lives as long as the process)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s] %(message)s"))
    root_logger = logging.getLogger()  # traitlets' and nbgrader's loggers propagate here
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.INFO)


def _generate_assignment_job(root: str, limits: dict) -> None:
    """Job process: ``nbgrader generate_assignment`` in the template course."""
    from nbgrader.converters import GenerateAssignment

    root_path = Path(root)
    _enter_job(root_path)
    config = _job_config(root_path, Limits(**limits))
    app = GenerateAssignment(coursedir=_coursedir(root_path, config), config=config)
    app.force = True
    app.start()
    from nbgrader.api import Gradebook

    with Gradebook(config.CourseDirectory.db_url) as gb:
        max_scores = {nb.name: float(nb.max_score) for nb in gb.find_assignment(ASSIGNMENT).notebooks}
    (root_path / "max_scores.json").write_text(json.dumps(max_scores))


def _autograde_job(root: str, jupyter_dir: str, student: str, stem: str, limits: dict) -> None:
    """Job process: ``nbgrader autograde`` then ``generate_feedback`` for one notebook;
    writes ``result.json`` (score, max_score, problem, paths) in ``root``."""
    from nbgrader.converters import Autograde, GenerateFeedback

    root_path = Path(root)
    _enter_job(root_path)
    os.environ["JUPYTER_PATH"] = jupyter_dir
    os.environ[PID_DIR_ENV] = str(root_path / "kernel-pids")
    (root_path / "kernel-pids").mkdir(exist_ok=True)
    config = _job_config(root_path, Limits(**limits))
    coursedir = _coursedir(root_path, config, student, stem)
    app = Autograde(coursedir=coursedir, config=config)
    app.force = True
    app.create_student = True
    app.start()
    feedback = GenerateFeedback(coursedir=coursedir, config=config)
    feedback.force = True
    feedback.start()
    autograded = root_path / "autograded" / student / ASSIGNMENT / f"{stem}.ipynb"
    html = root_path / "feedback" / student / ASSIGNMENT / f"{stem}.html"
    score, max_score = _gradebook_score(root_path / "gradebook.db", student, stem)
    (root_path / "result.json").write_text(json.dumps({
        "score": score, "max_score": max_score, "problem": first_problem(autograded),
        "autograded": str(autograded), "feedback": str(html) if html.exists() else None}))


def _gradebook_score(db: Path, student: str, stem: str) -> tuple[float, float]:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{db}") as gb:
        nb = gb.find_submission_notebook(stem, ASSIGNMENT, student)
        return float(nb.score), float(nb.max_score)


def first_problem(autograded: Path) -> str | None:
    """The first test cell that did not get full marks, in one line, from its own output:
    the error it raised, else what it wrote to stderr, else the last line it printed.
    When an earlier cell of the learner's failed (a timeout, an exception, a dead kernel),
    that error is the real first problem and is named instead."""
    import nbformat
    from nbgrader import utils

    nb = nbformat.read(str(autograded), as_version=4)
    earlier = None
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.get("outputs", []) if o.output_type == "error"]
        is_test = utils.is_grade(cell) and not utils.is_solution(cell)
        if not is_test:
            if errors and earlier is None:
                earlier = f"cell {index} raised {errors[0].ename}: {errors[0].evalue}"
            continue
        score, max_score = utils.determine_grade(cell)
        if score is None or score >= max_score:
            continue
        grade_id = cell.metadata["nbgrader"]["grade_id"]
        stderr = [o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stderr"]
        stdout = [o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout"]
        if earlier is not None and errors and errors[0].ename in ("NameError", "NotRun"):
            text = earlier
        elif errors:
            text = f"{errors[0].ename}: {errors[0].evalue}"
        elif stderr:
            text = "wrote to stderr (nbgrader fails such a test): " + "".join(stderr)
        elif stdout:  # grading.py prints a summary, then one line per problem
            lines = [line for line in "".join(stdout).splitlines() if line.strip()]
            text = next((line for line in lines if line.startswith(("Score 0", " "))), lines[0])
        else:
            text = f"partial credit {score:g}/{max_score:g}"
        return f"{grade_id}: {_one_line(text)}"
    return None


def _one_line(text: str, width: int = 160) -> str:
    text = " ".join(_ANSI.sub("", text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


# --------------------------------------------------------------------------- running jobs


def _context():
    """Jobs fork from a server that has already imported nbgrader (seconds saved per job)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["backprop_ninja.autograde", "nbgrader.converters", "nbgrader.api",
                                "nbgrader.preprocessors", "nbclient", "nbconvert"])
    return ctx


def _run_process(target, args: tuple, timeout: float, pid_dir: Path | None = None) -> int | None:
    """Run ``target(*args)`` in a job process; exit code, or None when it was killed at ``timeout``."""
    proc = _context().Process(target=target, args=args, daemon=True)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        if pid_dir is not None:
            _kill_kernels(pid_dir)
        proc.kill()
        proc.join()
        if pid_dir is not None:
            _kill_kernels(pid_dir)
        return None
    if pid_dir is not None:  # a kernel the learner's code kept alive past its notebook
        _kill_kernels(pid_dir)
    return proc.exitcode


def _cache_key(course: Path) -> str:
    """Changes whenever the course's config or source or nbgrader's version does."""
    import hashlib
    from importlib.metadata import version

    h = hashlib.sha256(f"nbgrader {version('nbgrader')} python {sys.version_info[:2]}".encode())
    files = [course / "nbgrader_config.py", *sorted((course / "source" / ASSIGNMENT).rglob("*"))]
    for path in files:
        if path.is_file() and ".ipynb_checkpoints" not in path.parts and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(course)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "backprop-ninja" / "courses"


def prepare_course(scratch: Path, course: Path = COURSE, limits: Limits = Limits()) -> Path:
    """A released copy of the course: grader's config and source, after ``nbgrader
    generate_assignment`` (its gradebook holds every test cell, hidden tests included) and
    ``max_scores.json``. Read-only once made; cached by content (``~/.cache/backprop-ninja``),
    since making it costs seconds; the sandbox kernelspec goes to ``scratch/jupyter``."""
    course = Path(course)
    _write_kernelspec(Path(scratch) / "jupyter", limits)
    key = _cache_key(course)
    cached = _cache_dir() / key
    if (cached / "max_scores.json").exists():
        return cached
    template = Path(scratch) / "template"
    template.mkdir(parents=True)
    if (course / "nbgrader_config.py").exists():
        shutil.copy2(course / "nbgrader_config.py", template / "nbgrader_config.py")
    shutil.copytree(course / "source" / ASSIGNMENT, template / "source" / ASSIGNMENT,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    code = _run_process(_generate_assignment_job, (str(template), asdict(limits)), timeout=300)
    if code != 0 or not (template / "max_scores.json").exists():
        log = (template / "nbgrader.log").read_text() if (template / "nbgrader.log").exists() else ""
        raise UserError(f"nbgrader generate_assignment failed on {course} (see its log: "
                        f"{_one_line(log[-300:])}).")
    with contextlib.suppress(OSError):  # no cache (read-only home, a concurrent run won): fine
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = cached.parent / f".{key}.{os.getpid()}"
        shutil.copytree(template, staging)
        try:
            os.rename(staging, cached)
            return cached
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if (cached / "max_scores.json").exists():
                return cached
    return template


def grade_notebook(template: Path, jupyter_dir: Path, job_dir: Path, student: str, stem: str,
                   notebook: Path, limits: Limits) -> NotebookResult:
    """Autograde one submitted notebook in ``job_dir`` (a copy of the released course).

    A job that fails without reaching its wall-clock limit (nbgrader raised, e.g. a
    kernel that could not start because two kernels raced for a port) is run once
    more in a fresh directory before the notebook is declared ungradable.
    """
    result = NotebookResult(student=student, stem=stem)
    started = time.perf_counter()
    for attempt in range(2):
        run_dir = job_dir if attempt == 0 else job_dir.with_name(job_dir.name + "-retry")
        run_dir.mkdir(parents=True)
        shutil.copy2(template / "gradebook.db", run_dir / "gradebook.db")
        if (template / "nbgrader_config.py").exists():
            shutil.copy2(template / "nbgrader_config.py", run_dir / "nbgrader_config.py")
        shutil.copytree(template / "source", run_dir / "source")
        submitted = run_dir / "submitted" / student / ASSIGNMENT
        submitted.mkdir(parents=True)
        shutil.copyfile(notebook, submitted / f"{stem}.ipynb")  # a copy: the learner's file stays as is
        code = _run_process(_autograde_job, (str(run_dir), str(jupyter_dir), student, stem,
                                             asdict(limits)),
                            timeout=max(1.0, limits.notebook_timeout - (time.perf_counter() - started)),
                            pid_dir=run_dir / "kernel-pids")
        result.job_dir = str(run_dir)
        if code is None or (code == 0 and (run_dir / "result.json").exists()):
            break
    result.seconds = time.perf_counter() - started
    if code is None:
        result.problem = (f"grading was stopped after {limits.notebook_timeout} s (the notebook's "
                          "wall-clock limit); nothing it computed counts.")
    elif code != 0 or not (run_dir / "result.json").exists():
        result.problem = "nbgrader could not grade this notebook: " + _log_reason(run_dir / "nbgrader.log")
    else:
        data = json.loads((run_dir / "result.json").read_text())
        result.score, result.max_score = data["score"], data["max_score"]
        result.problem, result.feedback, result.autograded = (data["problem"], data["feedback"],
                                                              data["autograded"])
        result.graded = True
    return result


def _log_reason(log: Path) -> str:
    """The last exception line of a job's log (``KeyError: 'x'``), else its last ERROR line."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = ([line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)
               and "NbGraderException" not in line]
              or [line for line in lines if "ERROR" in line])
    return _one_line(errors[-1] if errors else "no log was written") + "."


# --------------------------------------------------------------------------- a class


def find_submissions(submissions: Path, stems) -> dict[str, dict[str, Path]]:
    """{student: {stem: notebook}} from one folder per student, or nbgrader's
    ``submitted/<student>/backprop/`` layout (given the course or its submitted/ dir)."""
    root = Path(submissions)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder of student submissions.")
    if (root / "submitted").is_dir():
        root = root / "submitted"
    found: dict[str, dict[str, Path]] = {}
    for student_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        folder = student_dir / ASSIGNMENT if (student_dir / ASSIGNMENT).is_dir() else student_dir
        notebooks = {}
        for path in sorted(folder.rglob("*.ipynb")):
            if path.stem in stems and ".ipynb_checkpoints" not in path.parts:
                notebooks.setdefault(path.stem, path)
        found[student_dir.name] = notebooks
    if not found:
        raise UserError(f"{root} holds no student folders (expected one folder per student).")
    return found


def _merge_job(gradebook: str, job_dir: str, student: str, stem: str) -> None:
    """Job process: copy one job's grades into the class gradebook (the caller serialises)."""
    import warnings

    from nbgrader.api import Gradebook, MissingEntry

    job_dir, gradebook = Path(job_dir), Path(gradebook)
    _enter_job(job_dir)
    warnings.simplefilter("ignore")  # SQLAlchemy's autoflush notices from nbgrader's add_submission
    with Gradebook(f"sqlite:///{job_dir / 'gradebook.db'}") as job, \
            Gradebook(f"sqlite:///{gradebook}") as main:
        main.update_or_create_student(student)
        try:
            main.find_submission(ASSIGNMENT, student)
        except MissingEntry:
            main.add_submission(ASSIGNMENT, student)
        for grade in job.find_submission_notebook(stem, ASSIGNMENT, student).grades:
            target = main.find_grade(grade.name, stem, ASSIGNMENT, student)
            target.auto_score = grade.auto_score
            target.manual_score = grade.manual_score
            target.needs_manual_grade = grade.needs_manual_grade
        main.db.commit()


def merge_grades(gradebook: Path, job_dir: Path, student: str, stem: str) -> None:
    """Merge one job's grades into the class gradebook, in a job process (the parent never
    imports nbgrader: it costs seconds). Call it from one thread at a time."""
    code = _run_process(_merge_job, (str(gradebook), str(job_dir), student, stem), timeout=300)
    if code != 0:
        raise RuntimeError(f"merging {student}/{stem} into {gradebook} failed: "
                           + _log_reason(job_dir / "nbgrader.log"))


def autograde_class(submissions: Path, jobs: int = 1, out: Path | None = Path("autograde-out"),
                    limits: Limits = Limits(), course: Path = COURSE, progress: bool = True,
                    only: dict[str, dict[str, Path]] | None = None,
                    feedback_to=None) -> ClassResults:
    """Autograde every student's notebooks, ``jobs`` notebooks executing at once.

    With ``out``: ``out/grades.csv``, ``out/feedback/<student>/<stem>.html`` and
    ``out/course/`` (an nbgrader course: gradebook.db with every grade, autograded/,
    so ``nbgrader export`` and the formgrader work on it). ``only`` replaces the
    folder scan (``grade`` passes the learner's files); ``feedback_to(student, stem)``
    replaces where each HTML feedback is kept (the scratch directory is deleted).
    """
    from tqdm import tqdm

    stems = list(course_notebooks(course))
    students = only if only is not None else find_submissions(submissions, stems)
    with tempfile.TemporaryDirectory(prefix="backprop-ninja-grading-") as tmp:
        scratch = Path(tmp)
        template = prepare_course(scratch, course, limits)
        results = ClassResults(stems=stems,
                               max_scores=json.loads((template / "max_scores.json").read_text()))
        main_course = None
        if feedback_to is None and out is not None:
            feedback_to = lambda student, stem: Path(out) / "feedback" / student / f"{stem}.html"  # noqa: E731
        if out is not None:
            out = Path(out)
            main_course = out / "course"
            for stale in (main_course, out / "feedback"):  # this run's results only
                if stale.exists():
                    shutil.rmtree(stale)
            main_course.mkdir(parents=True)
            for name in ("nbgrader_config.py", "gradebook.db", "source", "release"):
                src = template / name
                if src.is_dir():
                    shutil.copytree(src, main_course / name)
                elif src.exists():
                    shutil.copy2(src, main_course / name)
            results.gradebook = main_course / "gradebook.db"
        todo = []
        for student, notebooks in students.items():
            results.results[student] = {}
            for stem in stems:
                res = NotebookResult(student, stem, max_score=results.max_scores[stem])
                results.results[student][stem] = res
                if stem not in notebooks:
                    res.problem = "not submitted."
                    continue
                try:
                    _read_notebook(notebooks[stem])
                except UserError as exc:
                    res.problem = str(exc)
                    continue
                todo.append((student, stem, notebooks[stem]))

        bar = tqdm(total=len(todo), desc="autograding", unit="notebook", disable=not progress or None)
        lock = threading.Lock()
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(grade_notebook, template, scratch / "jupyter",
                                   scratch / "jobs" / f"{k:04d}", student, stem, path, limits):
                       (k, student, stem)
                       for k, (student, stem, path) in enumerate(todo)}
            for fut in as_completed(futures):
                k, student, stem = futures[fut]
                res = fut.result()
                res.max_score = res.max_score or results.max_scores[stem]
                with lock:  # one writer to the class gradebook, ever
                    if main_course is not None and res.graded:
                        try:
                            merge_grades(main_course / "gradebook.db", Path(res.job_dir), student, stem)
                        except RuntimeError as exc:  # keep grading the class; say what is missing
                            print(f"warning: {exc}", file=sys.stderr)
                        dest = main_course / "autograded" / student / ASSIGNMENT
                        dest.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(res.autograded, dest / f"{stem}.ipynb")
                    if feedback_to is not None:
                        res.feedback = _save_feedback(res, feedback_to(student, stem))
                results.results[student][stem] = res
                bar.update(1)
        bar.close()
        if feedback_to is not None:  # the notebooks that were never run get a note too
            for student, per_stem in results.results.items():
                for stem, res in per_stem.items():
                    if res.feedback is None and (only is None or stem in students[student]):
                        res.feedback = _save_feedback(res, feedback_to(student, stem))
        if out is not None:
            write_grades_csv(results, out / "grades.csv")
        return results


def _save_feedback(res: NotebookResult, dest: Path) -> str:
    """nbgrader's HTML feedback, or (not graded) a one-page note saying why."""
    import html

    dest.parent.mkdir(parents=True, exist_ok=True)
    if res.feedback and Path(res.feedback).exists():
        shutil.copy2(res.feedback, dest)
    else:
        dest.write_text(
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(res.stem)}"
            f"</title></head><body><h1>{html.escape(res.stem)}: {res.score:g} / {res.max_score:g}</h1>"
            f"<p>{html.escape(res.problem or '')}</p></body></html>\n")
    return str(dest.resolve())


def write_grades_csv(results: ClassResults, path: Path) -> None:
    """One row per student: student_id, one column per notebook stem, total, max_score."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student_id", *results.stems, "total", "max_score"])
        for student in sorted(results.results):
            per = results.results[student]
            writer.writerow([student, *(f"{per[s].score:g}" for s in results.stems),
                             f"{results.total(student):g}", f"{results.max_score:g}"])


def run_autograde(submissions: str, jobs: int = 1, out: str = "autograde-out") -> int:
    """``backprop-ninja autograde``: grade a class, print where the results are."""
    results = autograde_class(Path(submissions), jobs=jobs, out=Path(out))
    print(f"{len(results.results)} students graded: {Path(out) / 'grades.csv'}, "
          f"{Path(out) / 'feedback'}/<student>/<notebook>.html, nbgrader course in {Path(out) / 'course'}")
    return 0


# --------------------------------------------------------------------------- one learner


def _learner_notebooks(paths: list[str], stems) -> dict[str, Path]:
    if not paths:
        paths = [str(REPO / "notebooks" / f"{stem}.ipynb") for stem in stems]
    chosen: dict[str, Path] = {}
    for text in paths:
        path = Path(text)
        if not path.exists():
            raise UserError(f"{path} does not exist.")
        if path.is_dir() or path.suffix != ".ipynb":
            raise UserError(f"{path} is not a notebook (.ipynb file).")
        if path.stem not in stems:
            raise UserError(f"{path.name} is not one of the course's notebooks "
                            f"({', '.join(s + '.ipynb' for s in stems)}).")
        _read_notebook(path)
        chosen[path.stem] = path
    return chosen


def run_grade(paths: list[str], as_json: bool = False, limits: Limits = Limits(),
              course: Path = COURSE) -> int:
    """``backprop-ninja grade``: the hidden tests on the learner's notebooks, offline.

    The files are copied into a scratch nbgrader course; feedback lands in
    ``./grade-feedback/<stem>.html``.
    """
    stems = list(course_notebooks(course))
    chosen = _learner_notebooks(paths, stems)
    jobs = max(1, min(len(chosen), os.cpu_count() or 1))
    results = autograde_class(Path("."), jobs=jobs, out=None, limits=limits, course=course,
                              progress=not as_json, only={LEARNER: chosen},
                              feedback_to=lambda _student, stem: FEEDBACK_DIR / f"{stem}.html")
    mine = {stem: res for stem, res in results.results[LEARNER].items() if stem in chosen}
    score = sum(r.score for r in mine.values())
    max_score = sum(r.max_score for r in mine.values())
    if as_json:
        print(json.dumps({"score": score, "max_score": max_score, "notebooks": {
            stem: {"score": r.score, "max_score": r.max_score, "feedback": r.feedback}
            for stem, r in mine.items()}}))
        return 0
    width = max(len(s) for s in mine)
    print(f"{'notebook':{width}s}  {'score':>6s}  {'max':>5s}  first problem")
    for stem, r in mine.items():
        print(f"{stem:{width}s}  {r.score:6g}  {r.max_score:5g}  {r.problem or '-'}")
    print(f"{'total':{width}s}  {score:6g}  {max_score:5g}")
    print("feedback:")
    for r in mine.values():
        print(f"  {r.feedback}")
    return 0

