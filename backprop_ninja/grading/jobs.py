"""Grading jobs: each runs nbgrader for one notebook in a process of its own.

    template            the released course (``course``), verified by its digest
    job_dir/            a copy of it, the submission copied in, then ``nbgrader autograde``
                        (the ``steps``: sandboxed kernel, judge) and ``generate_feedback``;
                        writes result.json                                       grade_notebook
    class course        the assignment released, every submission recorded       record_class
    class gradebook     each job's grades merged one at a time                   merge_grades

A job runs in a process forked from a server that has nbgrader imported already (importing
it costs seconds; the calling process never imports it), so N jobs are N notebooks executing
at once, and a job that outlives its wall-clock limit is killed; its kernel dies with it
(the sandbox's ``--die-with-parent``). A run's jobs form a ``JobGroup``: on Ctrl-C it kills
the running ones and starts no other; a job dies with the process that started it (a run or
a Dask worker, even one killed outright), and its job server follows once no job is left.
SQLite is only written by one process at a time: each job has its own gradebook and the
caller merges them one by one.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import select
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from backprop_ninja import UserError
from backprop_ninja.grading.course import ASSIGNMENT, copy_submission_files, copy_template
from backprop_ninja.grading.sandbox import Limits

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# nbformat's jsonschema checks the "iri" format with rfc3987-syntax when it is installed (Jupyter's
# event schemas pull it in), and that package compiles a grammar on import: 2.5 s in every grading
# process, for a format no notebook schema uses. Grading processes, which import this module
# before nbgrader, do without it.
sys.modules.setdefault("rfc3987_syntax", None)


@dataclass
class NotebookResult:
    """One (student, notebook): the judge's score and the first problem found in it."""

    student: str
    stem: str
    score: float = 0.0
    max_score: float = 0.0
    problem: str | None = None          # one sentence, None when full marks
    flags: list[dict] = field(default_factory=list)  # source-rule findings, for an instructor
    sandbox: str = ""                   # "on" or "off: why"
    feedback: str | None = None         # HTML feedback path (inside the job dir until copied)
    autograded: str | None = None       # the autograded notebook (inside the job dir)
    graded: bool = False                # nbgrader autograded it (False: missing/unreadable/killed)
    seconds: float = 0.0                # wall-clock time of its grading job
    job_dir: str | None = None          # where nbgrader ran (inside the scratch dir)
    kept: bool = False                  # unchanged since the last run: its grade was kept
    seconds_late: float = 0.0           # handed in after the due date (nbgrader's total_seconds_late)
    late_penalty: float = 0.0           # what nbgrader's LateSubmissionPlugin took off (0: none)
    machine: str = ""                   # where it was graded: this host, or a Dask worker's address


# --------------------------------------------------------------------------- inside a job process


def _die_with(owner: int) -> None:
    """Inside a job process: SIGKILL it (and so its sandboxed kernel) once ``owner``, the process
    that started the job (a run, or a Dask worker), is gone, even killed outright: no job grades
    on for nobody. The parent-death signal alone does not do it: the parent is the job server,
    which a killed Dask worker left running with its job and kernel (tests/test_cluster.py)."""
    try:
        pidfd = os.pidfd_open(owner)
    except ProcessLookupError:  # gone already
        os.kill(os.getpid(), signal.SIGKILL)
    except (AttributeError, OSError):  # not Linux >= 5.3: the job's wall-clock limit still ends it
        return

    def watch():
        select.select([pidfd], [], [])  # readable once the owner has exited
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="die-with-owner").start()


def _job(owner: int, target, args: tuple) -> None:
    _die_with(owner)
    target(*args)


def _enter_job(root: Path) -> None:
    """Inside a job process: die with the job server too; work in ``root``; nbgrader's log and
    stray output go to a file there; nbgrader finds ``alembic`` (it runs it) even when the venv
    is not activated."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    try:
        os.chdir(root)
    except FileNotFoundError:  # the run was stopped (Ctrl-C) and removed its scratch as this job started
        os._exit(1)
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    log = open(root / "nbgrader.log", "a")  # noqa: SIM115 (lives as long as the process)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s] %(message)s"))
    root_logger = logging.getLogger()  # traitlets' and nbgrader's loggers propagate here
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.INFO)
    warnings.simplefilter("ignore")  # SQLAlchemy's and traitlets' notices belong to nobody's grade


def job_config(root: Path, limits: Limits, isolate: bool):
    """grader/nbgrader_config.py (copied into ``root``), hardened, plus this job's limits."""
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader

    from backprop_ninja.grading.steps import harden_nbgrader

    config = Config()
    if (root / "nbgrader_config.py").exists():
        config.merge(PyFileConfigLoader("nbgrader_config.py", path=str(root)).load_config())
    harden_nbgrader(config)
    c = Config()
    c.CourseDirectory.root = str(root)
    c.CourseDirectory.db_url = f"sqlite:///{root / 'gradebook.db'}"
    for name in ("Execute", "ExecutePreprocessor", "NotebookClient"):
        c[name].timeout = limits.cell_timeout
        c[name].error_on_timeout = {
            "ename": "CellTimeoutError",
            "evalue": f"this cell ran longer than its {limits.cell_timeout} s limit and was stopped",
            "traceback": [f"CellTimeoutError: this cell ran longer than its {limits.cell_timeout} s limit "
                          "and was stopped"]}
    c.Execute.startup_timeout = max(60, limits.cell_timeout)
    box = c.SandboxedExecute
    box.isolate, box.scratch = isolate, str(root)
    box.memory, box.processes, box.file_bytes = limits.memory, limits.processes, limits.file_bytes
    box.home_bytes, box.output_bytes = limits.home_bytes, limits.output_bytes
    box.notebook_output_bytes = limits.notebook_output_bytes
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


def generate_job(root: str) -> None:
    """Job process: ``nbgrader generate_assignment`` in a copy of the course; max_scores.json."""
    from nbgrader.api import Gradebook
    from nbgrader.converters import GenerateAssignment

    root_path = Path(root)
    _enter_job(root_path)
    config = job_config(root_path, Limits(), isolate=False)
    app = GenerateAssignment(coursedir=_coursedir(root_path, config), config=config)
    app.force = True
    app.start()
    with Gradebook(config.CourseDirectory.db_url) as gb:
        max_scores = {nb.name: float(nb.max_score) for nb in gb.find_assignment(ASSIGNMENT).notebooks}
    (root_path / "max_scores.json").write_text(json.dumps(max_scores))


def _set_due(db_url: str, due: str | None) -> None:
    """The assignment's ``duedate`` (naive UTC, as nbgrader keeps it), which nbgrader compares
    with a submission's timestamp (``timestamp.txt``) to find it late."""
    from datetime import datetime

    from nbgrader.api import Gradebook

    with Gradebook(db_url) as gb:
        gb.update_or_create_assignment(ASSIGNMENT, duedate=datetime.fromisoformat(due) if due else None)


def autograde_job(root: str, student: str, stem: str, limits: dict, isolate: bool,
                  due: str | None = None) -> None:
    """Job process: ``nbgrader autograde`` (its late penalty too, against ``due``) then
    ``generate_feedback`` for one notebook; writes ``result.json`` (score, max_score, problem,
    flags, sandbox, lateness, paths) in ``root``."""
    import nbformat
    from nbgrader.api import Gradebook
    from nbgrader.converters import Autograde, GenerateFeedback

    from backprop_ninja.grading.steps import first_problem

    root_path = Path(root)
    _enter_job(root_path)
    config = job_config(root_path, Limits(**limits), isolate)
    coursedir = _coursedir(root_path, config, student, stem)
    _set_due(config.CourseDirectory.db_url, due)
    app = Autograde(coursedir=coursedir, config=config)
    app.force = True
    app.create_student = True
    app.start()
    feedback = GenerateFeedback(coursedir=coursedir, config=config)
    feedback.force = True
    feedback.start()
    autograded = root_path / "autograded" / student / ASSIGNMENT / f"{stem}.ipynb"
    html = root_path / "feedback" / student / ASSIGNMENT / f"{stem}.html"
    with Gradebook(config.CourseDirectory.db_url) as gb:
        nb = gb.find_submission_notebook(stem, ASSIGNMENT, student)
        score, max_score = float(nb.score), float(nb.max_score)
        penalty = float(nb.late_submission_penalty or 0)
        seconds_late = float(gb.find_submission(ASSIGNMENT, student).total_seconds_late)
    found = nbformat.read(str(autograded), as_version=4).metadata.get("backprop_ninja", {})
    (root_path / "result.json").write_text(json.dumps({
        "score": score, "max_score": max_score,
        "problem": first_problem(nbformat.read(str(autograded), as_version=4)),
        "flags": found.get("flags", []), "sandbox": found.get("sandbox", ""),
        "seconds_late": seconds_late, "late_penalty": penalty,
        "autograded": str(autograded), "feedback": str(html) if html.exists() else None}))


def one_line(text: str, width: int = 300) -> str:
    """A log line for a sentence: whitespace collapsed, at most ``width`` characters."""
    text = " ".join(_ANSI.sub("", text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _exchange_of(course: Path) -> str:
    """The exchange an nbgrader course releases into and collects from: its config's
    ``Exchange.root``, else nbgrader's default."""
    from nbgrader.exchange.default.exchange import Exchange
    from traitlets.config.loader import PyFileConfigLoader

    config = PyFileConfigLoader("nbgrader_config.py", path=str(course)).load_config()
    return str(config.Exchange.root) if "root" in config.Exchange else Exchange.root.default_value


def record_job(course: str, log_dir: str, students: list[str], due: str | None = None,
               collected_from: str | None = None) -> None:
    """Job process: the class course as nbgrader's own apps leave it: the assignment released
    with its due date, every student and their submission, with the timestamp of
    ``submitted/<student>/backprop/timestamp.txt`` where the submission had one. Its exchange is
    that of ``collected_from`` (the course whose ``submitted/`` is graded: feedback released from
    the formgrader reaches the learners who submitted there; the assignment is released there
    already), else its own."""
    from nbgrader.api import Gradebook
    from nbgrader.apps import NbGraderAPI

    course_path = Path(course)
    _enter_job(Path(log_dir))
    if collected_from:  # read by the course's nbgrader_config.py
        (course_path / "exchange.txt").write_text(_exchange_of(Path(collected_from)) + "\n")
    config = job_config(course_path, Limits(), isolate=False)
    coursedir = _coursedir(course_path, config)
    api = NbGraderAPI(coursedir=coursedir, config=config)
    if ASSIGNMENT not in api.get_released_assignments():
        released = api.release_assignment(ASSIGNMENT)
        if not released["success"]:
            why = released.get("log") or released.get("error") or ""
            raise RuntimeError(f"ReleaseError: {one_line(why)}")
    _set_due(config.CourseDirectory.db_url, due)
    with Gradebook(config.CourseDirectory.db_url) as gb:
        for student in students:
            gb.update_or_create_student(student)
            submitted = course_path / "submitted" / student / ASSIGNMENT
            timestamp = coursedir.get_existing_timestamp(str(submitted)) if submitted.is_dir() else None
            gb.update_or_create_submission(ASSIGNMENT, student, timestamp=timestamp)


def merge_job(gradebook: str, job_dir: str, student: str, stem: str, source: str | None = None) -> None:
    """Job process: copy one job's grades (or those of ``source``, an earlier run's gradebook:
    manual scores and comments too) into the class gradebook (the caller serialises)."""
    from nbgrader.api import Gradebook, MissingEntry

    job_path, gradebook_path = Path(job_dir), Path(gradebook).resolve()
    _enter_job(job_path)
    with Gradebook(f"sqlite:///{source or job_path / 'gradebook.db'}") as job, \
            Gradebook(f"sqlite:///{gradebook_path}") as main:
        main.update_or_create_student(student)
        try:
            main.find_submission(ASSIGNMENT, student)
        except MissingEntry:
            main.add_submission(ASSIGNMENT, student)
        timestamp = job.find_submission(ASSIGNMENT, student).timestamp
        if timestamp is not None:
            main.update_or_create_submission(ASSIGNMENT, student, timestamp=timestamp)
        for grade in job.find_submission_notebook(stem, ASSIGNMENT, student).grades:
            target = main.find_grade(grade.name, stem, ASSIGNMENT, student)
            target.auto_score = grade.auto_score
            target.manual_score = grade.manual_score
            target.needs_manual_grade = grade.needs_manual_grade
        main.find_submission_notebook(stem, ASSIGNMENT, student).late_submission_penalty = \
            job.find_submission_notebook(stem, ASSIGNMENT, student).late_submission_penalty
        for comment in job.find_submission_notebook(stem, ASSIGNMENT, student).comments:
            target = main.find_comment(comment.name, stem, ASSIGNMENT, student)
            target.auto_comment, target.manual_comment = comment.auto_comment, comment.manual_comment
        main.db.commit()
        score = float(main.find_submission_notebook(stem, ASSIGNMENT, student).score)
    (job_path / "merged.json").write_text(json.dumps({"score": score}))


# --------------------------------------------------------------------------- from the caller


# What the job server imports before it forks any job: what every job needs (nbgrader, the
# feedback's caches) and, where notebooks are graded, the judge (which imports torch: ~2.7 s of CPU).
_SERVER_PRELOAD = ["backprop_ninja.grading.jobs", "backprop_ninja.grading.steps", "nbgrader.converters",
                   "nbgrader.api", "nbgrader.preprocessors", "nbclient", "nbconvert",
                   "backprop_ninja.grading.warm"]
_GRADING_PRELOAD = ["backprop_ninja.grading.judge"]


def _context(grading: bool = True):
    """Jobs fork from a server that has already imported nbgrader (seconds saved per job) and
    filled the caches every job would fill again (``warm``: about a second of CPU per job).
    The preload counts only when the server starts, so ``warm_up``'s choice stands for the run."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_SERVER_PRELOAD + _GRADING_PRELOAD if grading else _SERVER_PRELOAD)
    return ctx


def warm_up(grading: bool = True) -> None:
    """Start the job server now, so that its imports (seconds) overlap with the caller's set-up.
    ``grading=False``: no notebook is graded here (a Dask run's coordinator only releases the
    template and records results), so the server does not import the judge and torch."""
    import multiprocessing.forkserver

    _context(grading)
    multiprocessing.forkserver.ensure_running()


class Stopped(Exception):
    """The run was stopped (Ctrl-C): no job process starts any more."""


class JobGroup:
    """The job processes of one run. ``stop()`` kills those running (their sandboxed kernels
    die with them) and refuses to start any other, so Ctrl-C takes effect at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: set = set()
        self.stopped = False

    def start(self, proc) -> None:
        with self._lock:
            if self.stopped:
                raise Stopped
            proc.start()
            self._running.add(proc)

    def done(self, proc) -> None:
        with self._lock:
            self._running.discard(proc)

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            for proc in self._running:
                proc.kill()


def run_process(target, args: tuple, timeout: float, group: JobGroup | None = None) -> int | None:
    """Run ``target(*args)`` in a job process; exit code, or None when it was killed at ``timeout``
    (its sandboxed kernel dies with it). Raises ``Stopped`` once ``group`` is stopped."""
    group = group or JobGroup()
    proc = _context().Process(target=_job, args=(os.getpid(), target, args), daemon=True)
    group.start(proc)
    try:
        proc.join(timeout)
    finally:  # Ctrl-C while waiting: the job dies, and the interrupt goes on
        killed = proc.is_alive()
        if killed:
            proc.kill()
            proc.join()
        group.done(proc)
    if group.stopped:
        raise Stopped
    return None if killed else proc.exitcode


def grade_notebook(template: Path, digest: str, job_dir: Path, student: str, stem: str, notebook: Path,
                   limits: Limits, isolate: bool, group: JobGroup | None = None,
                   due: str | None = None) -> NotebookResult:
    """Autograde one submitted notebook in ``job_dir`` (a verified copy of the template).

    A job that fails without reaching its wall-clock limit (nbgrader raised, e.g. a kernel
    that could not start) is run once more in a fresh directory before the notebook is
    declared ungradable.
    """
    result = NotebookResult(student=student, stem=stem)
    started = time.perf_counter()
    for attempt in range(2):
        run_dir = job_dir if attempt == 0 else job_dir.with_name(job_dir.name + "-retry")
        copy_template(template, digest, run_dir)
        submitted = run_dir / "submitted" / student / ASSIGNMENT
        submitted.mkdir(parents=True)
        shutil.copyfile(notebook, submitted / f"{stem}.ipynb")  # a copy: the learner's file stays as is
        copy_submission_files(Path(notebook).parent, submitted)  # nbgrader collect's, if any
        code = run_process(autograde_job, (str(run_dir), student, stem, asdict(limits), isolate, due),
                           timeout=max(1.0, limits.notebook_timeout - (time.perf_counter() - started)),
                           group=group)
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
        result.problem, result.flags, result.sandbox = data["problem"], data["flags"], data["sandbox"]
        result.feedback, result.autograded = data["feedback"], data["autograded"]
        result.seconds_late, result.late_penalty = data["seconds_late"], data["late_penalty"]
        result.graded = True
    return result


def _log_reason(log: Path) -> str:
    """The last exception line of a job's log (``KeyError: 'x'``), else its last ERROR line."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = ([line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)
               and "NbGraderException" not in line]
              or [line for line in lines if "ERROR" in line])
    return one_line(errors[-1] if errors else "no log was written") + "."


def record_class(course: Path, log_dir: Path, students: list[str], group: JobGroup | None = None,
                 due: str | None = None, collected_from: Path | None = None) -> None:
    """Release the assignment (due ``due``) in the class course and record every student's
    submission; with ``collected_from``, through that course's exchange (``record_job``)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    code = run_process(record_job, (str(Path(course).resolve()), str(log_dir), students, due,
                                    collected_from and str(Path(collected_from).resolve())),
                       timeout=300, group=group)
    if code != 0:
        raise UserError(f"recording the class in {course} failed: " + _log_reason(log_dir / "nbgrader.log"))


def merge_grades(gradebook: Path, job_dir: Path, student: str, stem: str,
                 group: JobGroup | None = None, source: Path | None = None) -> float:
    """Merge one job's grades (or ``source``'s) into the class gradebook, in a job process;
    the notebook's score there. One caller at a time."""
    job_dir.mkdir(parents=True, exist_ok=True)
    code = run_process(merge_job, (str(Path(gradebook).resolve()), str(job_dir), student, stem,
                                   source and str(Path(source).resolve())), timeout=300, group=group)
    if code != 0 or not (job_dir / "merged.json").is_file():
        raise UserError(f"recording {student}/{stem} in {gradebook} failed: "
                        + _log_reason(job_dir / "nbgrader.log"))
    return json.loads((job_dir / "merged.json").read_text())["score"]


def release(scratch: Path, course: Path, group: JobGroup | None = None) -> Path:
    """``nbgrader generate_assignment`` on a copy of ``course`` in ``scratch``; the released template."""
    template = scratch / "template"
    template.mkdir(parents=True)
    if (course / "nbgrader_config.py").exists():
        shutil.copy2(course / "nbgrader_config.py", template / "nbgrader_config.py")
    shutil.copytree(course / "source" / ASSIGNMENT, template / "source" / ASSIGNMENT,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    code = run_process(generate_job, (str(template),), timeout=300, group=group)
    if code != 0 or not (template / "max_scores.json").exists():
        log = (template / "nbgrader.log").read_text() if (template / "nbgrader.log").exists() else ""
        raise UserError(f"nbgrader generate_assignment failed on {course} "
                        f"(see its log: {one_line(log[-300:])}).")
    return template
