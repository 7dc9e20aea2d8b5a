"""Grading one notebook as a pure task: (submission, course) -> (scores, feedback, log).

    Task        what the coordinator sends: the notebook's bytes and timestamp, the digest of
                the released course it must be graded with, the limits, sandbox and due date
    grade       runs anywhere the package is installed (a thread of the coordinator, a Dask
                worker): the released course (cached, refused unless its digest is the task's),
                ``jobs.grade_notebook`` in a scratch folder, and plain data back       -> Outcome
    run_here    the tasks on this machine, N at once, each outcome as it arrives

Nothing here writes the class gradebook or ``--out``: the coordinator does, one outcome at a
time (``autograde``). ``cluster`` sends the same tasks to a Dask scheduler.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import socket
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from backprop_ninja.grading import jobs
from backprop_ninja.grading.course import COURSE, cached_template, keep_template
from backprop_ninja.grading.folders import scratch_folder
from backprop_ninja.grading.jobs import NotebookResult
from backprop_ninja.grading.sandbox import Limits, probe

LOG_TAIL = 4000  # characters of nbgrader's log sent back with an outcome


class Refused(Exception):
    """This machine cannot grade the task (no sandbox, another course, a daemonic worker): one
    sentence; the run stops, since every other task would be refused too."""


@dataclass(frozen=True)
class Task:
    """One (student, notebook) to grade, as plain data."""

    student: str
    stem: str
    notebook: bytes
    timestamp: str | None    # nbgrader collect's timestamp.txt, if the submission had one
    digest: str              # the released course's (``course.digest``)
    limits: Limits
    isolate: bool            # the kernel must run in the sandbox
    due: str | None = None   # naive UTC, ISO format

    @property
    def key(self) -> str:
        """Changes with anything that could change the grade: the bytes, the timestamp, the
        hidden tests (the template's digest) and the due date."""
        h = hashlib.sha256(self.notebook)
        h.update(f"\0{self.timestamp}\0{self.digest}\0{self.due}".encode())
        return h.hexdigest()


@dataclass
class Outcome:
    """What grading a task produced: the result (its paths unset) and the files, as bytes."""

    result: NotebookResult
    gradebook: bytes | None = None      # the job's gradebook.db: this notebook's grades
    autograded: bytes | None = None     # the autograded notebook
    feedback: bytes | None = None       # nbgrader's HTML feedback
    log: str = ""                       # the end of nbgrader's log


def template(scratch: Path, course: Path = COURSE, group: jobs.JobGroup | None = None) -> tuple[Path, str]:
    """(the released course, its digest): cached, else released now into ``scratch``."""
    return cached_template(course) or keep_template(jobs.release(scratch, course, group), course)


def can_grade(isolate: bool) -> str | None:
    """None when this process can grade tasks (sandboxed ones when ``isolate``); else why not."""
    if multiprocessing.current_process().daemon:
        return ("its tasks run in a daemonic process, which cannot start grading processes: start it "
                "with DASK_DISTRIBUTED__WORKER__DAEMON=False")
    if isolate and probe() is not None:
        return (f"learner code cannot be isolated there: {probe()}; install bubblewrap on it, or pass "
                "--no-sandbox (only for submissions you trust)")
    return None


def grade(task: Task, scratch: Path | None = None, group: jobs.JobGroup | None = None,
          released: tuple[Path, str] | None = None) -> Outcome:
    """Grade ``task``; in ``scratch`` (a scratch folder of its own when None, as on a worker),
    with the ``released`` course when the caller has it (else the cached one, verified)."""
    machine = socket.gethostname()
    why = can_grade(task.isolate)
    if why:
        raise Refused(f"{machine} cannot grade: {why}.")
    with contextlib.ExitStack() as stack:
        if scratch is None:
            scratch = stack.enter_context(scratch_folder())
        folder, digest = released or template(scratch, group=group)
        if digest != task.digest:
            raise Refused(f"{machine} has another version of the course (its released course is "
                          f"{digest[:12]}, the run's {task.digest[:12]}): install the same backprop-ninja "
                          "on every machine.")
        name = hashlib.sha256(f"{task.student}\0{task.stem}".encode()).hexdigest()[:8]  # short: socket paths
        handed_in = scratch / f"{name}.in" / f"{task.stem}.ipynb"  # the file as the student left it
        handed_in.parent.mkdir(parents=True)
        handed_in.write_bytes(task.notebook)
        if task.timestamp is not None:
            (handed_in.parent / "timestamp.txt").write_text(task.timestamp)
        res = jobs.grade_notebook(folder, digest, scratch / name, task.student, task.stem, handed_in,
                                  task.limits, task.isolate, group, task.due)
        res.machine = machine
        outcome = Outcome(res)
        job = Path(res.job_dir)
        if res.graded:
            outcome.gradebook = (job / "gradebook.db").read_bytes()
            outcome.autograded = Path(res.autograded).read_bytes()
            outcome.feedback = Path(res.feedback).read_bytes() if res.feedback else None
        log = job / "nbgrader.log"
        outcome.log = log.read_text(errors="replace")[-LOG_TAIL:] if log.exists() else ""
        res.feedback = res.autograded = res.job_dir = None  # paths on this machine mean nothing elsewhere
        return outcome


@contextlib.contextmanager
def run_here(todo: list[Task], at_once: int, scratch: Path, group: jobs.JobGroup, released: tuple[Path, str]):
    """``with run_here(...) as outcomes: for task, outcome in outcomes``: ``at_once`` tasks at a
    time on this machine, each outcome as it arrives. Leaving the block early (Ctrl-C) starts
    no task any more and kills the running ones with their kernels."""
    pool = ThreadPoolExecutor(max_workers=at_once)
    futures = {pool.submit(grade, task, scratch, group, released): task for task in todo}
    try:
        yield ((futures[fut], fut.result()) for fut in as_completed(futures))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # queued tasks never start
        group.stop()                                    # running ones die with their kernels
        raise
    finally:
        pool.shutdown(wait=True)
