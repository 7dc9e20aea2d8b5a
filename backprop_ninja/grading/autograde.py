"""``backprop-ninja grade`` (one learner, offline) and ``autograde`` (a class, in parallel).

Both lay out a scratch folder, run one grading job per (student, notebook) (``jobs``:
nbgrader with the course's steps, each kernel in its own sandbox), and collect the judge's
scores, feedback and flags. ``autograde`` also keeps a class gradebook (an nbgrader course
in ``out/course``) and ``grades.csv``; it refuses to grade a class where learner code cannot
be isolated, unless told ``--no-sandbox``. ``grade`` always grades (the judge is outside
the kernel either way) and says whether the sandbox was on.

Like any multiprocessing program, a script that calls ``autograde_class`` needs an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import html
import json
import os
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from backprop_ninja import UserError
from backprop_ninja.grading import jobs
from backprop_ninja.grading.course import (
    ASSIGNMENT,
    COURSE,
    NOTEBOOKS,
    copy_submission_files,
    course_notebooks,
    read_notebook,
)
from backprop_ninja.grading.folders import JOURNAL, Publication, scratch_folder
from backprop_ninja.grading.jobs import NotebookResult
from backprop_ninja.grading.journal import Journal
from backprop_ninja.grading.sandbox import Limits, probe
from backprop_ninja.grading.tasks import Task, run_here
from backprop_ninja.grading.tasks import template as released_course

LEARNER = "learner"                     # student id used by ``grade``
RECORD = "notebooks.json"               # in --out: each graded notebook's SHA-256 and result
FEEDBACK_DIR = Path("grade-feedback")   # ``grade`` writes <cwd>/grade-feedback/<stem>.html
NOT_SUBMITTED = "not submitted."


@dataclass
class ClassResults:
    """Every student's results, by notebook stem, and where the class gradebook is."""

    stems: list[str]
    max_scores: dict[str, float]
    results: dict[str, dict[str, NotebookResult]] = field(default_factory=dict)
    gradebook: Path | None = None
    sandbox: str = "on"
    earlier: bool = False                # --out held an earlier run's results
    kept: int = 0                        # notebooks unchanged since then: their grades kept
    resumed: int = 0                     # graded by a run stopped before it published: taken from its journal
    graded_now: int = 0                  # notebooks sent to grading in this run
    changed: list[str] = field(default_factory=list)  # student/stem changed since then: graded again

    def total(self, student: str) -> float:
        return sum(r.score for r in self.results[student].values())

    @property
    def max_score(self) -> float:
        return sum(self.max_scores.values())

    def ungraded(self) -> list[NotebookResult]:
        """Handed-in notebooks nbgrader could not grade (unreadable, crashed, stopped): each scores 0."""
        return [r for per_stem in self.results.values() for r in per_stem.values()
                if not r.graded and r.problem != NOT_SUBMITTED]

    def seconds_late(self, student: str) -> float:
        return max((r.seconds_late for r in self.results[student].values()), default=0.0)

    def late_penalty(self, student: str) -> float:
        return sum(r.late_penalty for r in self.results[student].values())

    def flags(self, student: str) -> list[str]:
        """``stem: what (rule)`` for every source-rule finding of the student's notebooks."""
        return [f"{stem}: {f['what']} ({f['rule']})" for stem, r in self.results[student].items()
                for f in r.flags]


def submissions_root(submissions: Path) -> Path:
    """The folder that holds the student folders: ``submitted/`` when given an nbgrader course."""
    return submissions / "submitted" if (submissions / "submitted").is_dir() else submissions


def collected_course(submissions: Path) -> Path | None:
    """The nbgrader course whose ``submitted/`` folder ``submissions`` is (or holds), if any."""
    root = submissions_root(Path(submissions)).resolve()
    course = root.parent
    return course if root.name == "submitted" and (course / "nbgrader_config.py").is_file() else None


def find_submissions(submissions: Path, stems) -> dict[str, dict[str, Path]]:
    """{student: {stem: notebook}} from one folder per student, or nbgrader's
    ``submitted/<student>/backprop/`` layout (given the course or its submitted/ dir)."""
    root = Path(submissions)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder of student submissions.")
    root = submissions_root(root)
    found: dict[str, dict[str, Path]] = {}
    for student_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        folder = student_dir / ASSIGNMENT if (student_dir / ASSIGNMENT).is_dir() else student_dir
        notebooks = {}
        for path in sorted(folder.rglob("*.ipynb")):
            if path.stem in stems and ".ipynb_checkpoints" not in path.parts and not path.is_symlink():
                notebooks.setdefault(path.stem, path)
        found[student_dir.name] = notebooks
    if not found:
        raise UserError(f"{root} holds no student folders (expected one folder per student).")
    return found


def autograde_class(submissions: Path | None, jobs_at_once: int = 1, out: Path | None = Path("autograde-out"),
                    limits: Limits | None = None, course: Path = COURSE, progress: bool = True,
                    only: dict[str, dict[str, Path]] | None = None, feedback_to=None,
                    isolate: bool = True, due: datetime.datetime | None = None,
                    scheduler: str | None = None) -> ClassResults:
    """Autograde every student's notebooks, ``jobs_at_once`` notebooks executing at once, or
    on the workers of the Dask ``scheduler`` (an address) when given.

    With ``out``: ``out/grades.csv``, ``out/feedback/<student>/<stem>.html`` and ``out/course/``
    (an nbgrader course: gradebook.db with every grade, autograded/, so ``nbgrader export``
    and the formgrader work on it), built beside ``out`` and published at the end in one
    rename (``folders.Publication``: ``out`` is checked and locked first). ``only`` replaces
    the folder scan (``grade`` passes the learner's files); ``feedback_to(student, stem)``
    replaces where each HTML feedback is kept (the scratch directory is deleted). ``isolate``:
    sandbox every kernel where ``sandbox.probe()`` allows it. ``due`` (naive UTC): the
    assignment's due date; a submission whose ``timestamp.txt`` is later is late (nbgrader's
    ``LateSubmissionPlugin`` decides the penalty). On Ctrl-C no job starts any more, running
    ones are killed with their kernels, and the scratch folder is removed. Every outcome is
    journaled in ``out`` as it arrives (``journal``): a run stopped before it published leaves
    them for the next run, which does not grade those notebooks again.

    With ``scheduler`` every grading task (``tasks.grade``) runs on a Dask worker, which
    refuses it where it cannot sandbox the kernel (unless ``isolate`` is False); the gradebook
    and ``out`` are still written here alone, one outcome at a time.
    """
    stems = list(course_notebooks(course))
    students = only if only is not None else find_submissions(submissions, stems)
    with contextlib.ExitStack() as stack:
        publication = None if out is None else \
            stack.enter_context(Publication(out, submissions and submissions_root(Path(submissions))))
        cluster = None
        if scheduler is not None:
            from backprop_ninja.grading.cluster import Cluster

            cluster = stack.enter_context(Cluster(scheduler, isolate))
        jobs.warm_up(grading=cluster is None)
        scratch = stack.enter_context(scratch_folder())
        group = jobs.JobGroup()
        stack.callback(group.stop)  # whatever ends the run (Ctrl-C too) ends its jobs first
        if scheduler is None:  # here, a kernel runs in the sandbox where this machine has one
            isolate = isolate and probe() is None
        results = _grade_class(students, stems, scratch, group, publication, jobs_at_once, limits or Limits(),
                               course, progress, only, feedback_to, isolate, due and due.isoformat(), cluster)
        if publication is not None:
            publication.publish()
            results.gradebook = publication.out / "course" / "gradebook.db"
            for per_stem in results.results.values():
                for res in per_stem.values():
                    if res.feedback and Path(res.feedback).is_relative_to(publication.staging):
                        res.feedback = str(publication.final(res.feedback))
        return results


def _grade_class(students, stems, scratch: Path, group: jobs.JobGroup, publication: Publication | None,
                 jobs_at_once: int, limits: Limits, course: Path, progress: bool, only, feedback_to,
                 isolate: bool, due: str | None = None, cluster=None) -> ClassResults:
    """Grade into ``scratch``; the class's results (with ``publication``) into its staging folder."""
    from tqdm import tqdm

    template, digest = released_course(scratch, course, group)
    results = ClassResults(stems=stems, max_scores=json.loads((template / "max_scores.json").read_text()),
                           sandbox="on" if isolate else
                           f"off ({'not asked for' if cluster else probe() or 'not asked for'})")
    main_course = None
    if publication is not None:
        staged = publication.staging
        if feedback_to is None:
            feedback_to = lambda student, stem: staged / "feedback" / student / f"{stem}.html"  # noqa: E731
        main_course = staged / "course"
        main_course.mkdir()
        for name in ("nbgrader_config.py", "gradebook.db", "source", "release"):
            src = template / name
            if src.is_dir():
                shutil.copytree(src, main_course / name)
            elif src.exists():
                shutil.copyfile(src, main_course / name)
        for student, notebooks in students.items():  # what each student handed in, as nbgrader keeps it
            folder = main_course / "submitted" / student / ASSIGNMENT
            folder.mkdir(parents=True)
            for stem, path in notebooks.items():
                shutil.copyfile(path, folder / f"{stem}.ipynb")
                copy_submission_files(path.parent, folder)
        jobs.record_class(main_course, scratch / "record", list(students), group, due,
                          publication.submissions and collected_course(publication.submissions))
    todo = []
    for student, notebooks in students.items():
        results.results[student] = {}
        for stem in stems:
            res = NotebookResult(student, stem, max_score=results.max_scores[stem])
            results.results[student][stem] = res
            if stem not in notebooks:
                res.problem = NOT_SUBMITTED
                continue
            try:
                read_notebook(notebooks[stem])
            except UserError as exc:
                res.problem = str(exc)
                continue
            todo.append((student, stem, notebooks[stem]))

    unrecorded: list[str] = []
    shas = {(student, stem): hashlib.sha256(path.read_bytes()).hexdigest() for student, stem, path in todo}
    earlier = _earlier(publication, digest, due)
    if earlier is not None:  # a notebook unchanged since the run in --out keeps its grade
        results.earlier = True
        for student, stem, path in list(todo):
            res = _kept(earlier.get((student, stem)), shas[(student, stem)], path.parent, publication,
                        scratch, group)
            if res is None:
                results.changed += [f"{student}/{stem}"] if (student, stem) in earlier else []
                continue
            todo.remove((student, stem, path))
            results.kept += 1
            if feedback_to is not None:
                res.feedback = _save_feedback(res, feedback_to(student, stem))
            results.results[student][stem] = res

    def record(res: NotebookResult) -> None:
        """One graded notebook into the class's results (this thread alone writes them)."""
        res.max_score = res.max_score or results.max_scores[res.stem]
        if main_course is not None and res.graded:
            try:
                res.score = jobs.merge_grades(main_course / "gradebook.db", scratch / "merges" / res.student /
                                              res.stem, res.student, res.stem, group,
                                              source=Path(res.job_dir) / "gradebook.db")
            except UserError as exc:  # keep grading the class; fail at the end
                unrecorded.append(str(exc))
            _keep_autograded(Path(res.autograded), main_course, res.student, res.stem,
                             students[res.student][res.stem].parent)
        if feedback_to is not None:
            res.feedback = _save_feedback(res, feedback_to(res.student, res.stem))
        results.results[res.student][res.stem] = res

    # every outcome is journaled as it arrives: in --out, where a run after a crash finds it
    journal = Journal(publication.out / JOURNAL if publication is not None else scratch / "journal")
    tasks_todo = []
    for student, stem, path in todo:
        stamp = path.parent / "timestamp.txt"
        task = Task(student, stem, path.read_bytes(), stamp.read_text() if stamp.is_file() else None, digest,
                    limits, isolate, due)
        if (res := journal.finished(task)) is not None:
            results.resumed += 1
            record(res)
        else:
            tasks_todo.append(task)

    results.graded_now = len(tasks_todo)
    bar = tqdm(total=len(tasks_todo), desc="autograding", unit="notebook", disable=not progress or None)
    outcomes = run_here(tasks_todo, jobs_at_once, scratch / "jobs", group, (template, digest)) \
        if cluster is None else cluster.run(tasks_todo)
    try:
        with outcomes as arriving:
            for task, outcome in arriving:
                record(journal.write(task, outcome))
                bar.update(1)
    finally:
        bar.close()
    if feedback_to is not None:  # the notebooks that were never run get a note too
        for student, per_stem in results.results.items():
            for stem, res in per_stem.items():
                if res.feedback is None and (only is None or stem in students[student]):
                    res.feedback = _save_feedback(res, feedback_to(student, stem))
    if publication is not None:
        write_grades_csv(results, publication.staging / "grades.csv")
        (publication.staging / RECORD).write_text(json.dumps({"template": digest, "due": due, "notebooks": [
            {"student": r.student, "stem": r.stem, "sha256": shas[(r.student, r.stem)], "score": r.score,
             "max_score": r.max_score, "problem": r.problem, "flags": r.flags, "sandbox": r.sandbox,
             "seconds_late": r.seconds_late, "late_penalty": r.late_penalty, "machine": r.machine}
            for per_stem in results.results.values() for r in per_stem.values() if r.graded]}, indent=1))
    if unrecorded:
        raise UserError(f"{len(unrecorded)} grade(s) could not be recorded in the class gradebook, so "
                        f"nothing was published (--out is as it was): {unrecorded[0]}")
    return results


def _earlier(publication: Publication | None, digest: str, due: str | None) -> dict | None:
    """{(student, stem): what it scored} of the run published in --out, when that run graded
    with this very template and due date (hidden tests or the due date changed: everything is
    graded again); else None."""
    if publication is None:
        return None
    try:
        record = json.loads((publication.out / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if record.get("template") != digest or record.get("due") != due:
        return None
    return {(n["student"], n["stem"]): n for n in record["notebooks"]}


def _kept(entry: dict | None, sha: str, submission: Path, publication: Publication, scratch: Path,
          group: jobs.JobGroup) -> NotebookResult | None:
    """The earlier run's result for a notebook whose bytes did not change, its grades (manual
    ones and comments too) copied into this run's gradebook; None when it must be graded."""
    if entry is None or entry["sha256"] != sha:
        return None
    student, stem = entry["student"], entry["stem"]
    before = publication.out / "course"
    autograded = before / "autograded" / student / ASSIGNMENT / f"{stem}.ipynb"
    if not autograded.is_file() or not (before / "gradebook.db").is_file():
        return None
    course = publication.staging / "course"
    res = NotebookResult(student, stem, max_score=entry["max_score"], problem=entry["problem"],
                         flags=entry["flags"], sandbox=entry["sandbox"], graded=True, kept=True,
                         seconds_late=entry["seconds_late"], late_penalty=entry["late_penalty"],
                         machine=entry.get("machine", ""))  # where it was graded (an older record has none)
    try:
        res.score = jobs.merge_grades(course / "gradebook.db", scratch / "kept" / f"{student}-{stem}",
                                      student, stem, group, source=before / "gradebook.db")
    except UserError:  # the earlier gradebook does not have it after all: grade it again
        return None
    _keep_autograded(autograded, course, student, stem, submission)
    feedback = publication.out / "feedback" / student / f"{stem}.html"
    res.feedback = str(feedback) if feedback.is_file() else None
    return res


def _keep_autograded(notebook: Path, course: Path, student: str, stem: str, submission: Path) -> None:
    """An autograded notebook into the class course as ``<stem>.ipynb``, with the files nbgrader's
    submit left beside it in the folder ``submission`` (autograde keeps them there;
    ``generate_feedback`` copies them to the feedback, and ``release_feedback`` needs them)."""
    dest = course / "autograded" / student / ASSIGNMENT
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(notebook, dest / f"{stem}.ipynb")
    copy_submission_files(submission, dest)


def _save_feedback(res: NotebookResult, dest: Path) -> str:
    """nbgrader's HTML feedback, or (not graded) a one-page note saying why."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if res.feedback and Path(res.feedback).exists():
        shutil.copyfile(res.feedback, dest)
    else:
        dest.write_text(
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(res.stem)}"
            f"</title></head><body><h1>{html.escape(res.stem)}: {res.score:g} / {res.max_score:g}</h1>"
            f"<p>{html.escape(res.problem or '')}</p></body></html>\n")
    return str(dest.resolve())


def write_grades_csv(results: ClassResults, path: Path) -> None:
    """One row per student: student_id, one column per notebook, total, max_score, flags
    (source-rule findings an instructor may want to review; empty when none), late (how long
    after the due date, ``1 day, 2:00:00``; empty when on time) and late_penalty (what nbgrader's
    late-penalty plug-in takes off the total, as ``nbgrader export`` lists it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student_id", *results.stems, "total", "max_score", "flags", "late", "late_penalty"])
        for student in sorted(results.results):
            per = results.results[student]
            writer.writerow([student, *(f"{per[s].score:g}" for s in results.stems),
                             f"{results.total(student):g}", f"{results.max_score:g}",
                             "; ".join(results.flags(student)), _late(results.seconds_late(student)),
                             f"{results.late_penalty(student):g}"])


def _late(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds))) if seconds > 0 else ""


def parse_due(text: str) -> datetime.datetime:
    """``2026-12-01T12:00`` (UTC) or with an offset (``...+01:00``): naive UTC, as nbgrader keeps it."""
    due = datetime.datetime.fromisoformat(text)
    return due.astimezone(datetime.UTC).replace(tzinfo=None) if due.tzinfo else due


def run_autograde(submissions: str, jobs_at_once: int = 1, out: str = "autograde-out",
                  no_sandbox: bool = False, due: datetime.datetime | None = None,
                  scheduler: str | None = None) -> int:
    """``backprop-ninja autograde``: grade a class (here or on a Dask cluster); say where the results are."""
    why = probe()
    if why and not no_sandbox and scheduler is None:  # on a cluster, each worker checks its own
        raise UserError(f"learner code cannot be isolated here: {why}. Install bubblewrap, or pass "
                        "--no-sandbox to grade without isolation (only for submissions you trust).")
    results = autograde_class(Path(submissions), jobs_at_once=jobs_at_once, out=Path(out),
                              isolate=not no_sandbox, due=due, scheduler=scheduler)
    if results.resumed:
        print(f"{results.resumed} notebook(s) already graded before the interruption were skipped (their "
              f"results were kept in {out}); {results.graded_now} graded in this run.")
    if results.earlier:
        changed = ", ".join(results.changed[:5]) + (" ..." if len(results.changed) > 5 else "")
        print(f"{results.kept} notebook(s) unchanged since the last run in {out} kept their grades; "
              f"{len(results.changed)} changed and graded again{': ' + changed if changed else ''}.")
    flagged = sum(bool(results.flags(s)) for s in results.results)
    late = sum(results.seconds_late(s) > 0 for s in results.results)
    print(f"{len(results.results)} students graded (sandbox {results.sandbox}); "
          f"{flagged} flagged for review{f', {late} late' if due else ''}: "
          f"{Path(out) / 'grades.csv'}, {Path(out) / 'feedback'}/<student>/<notebook>.html, "
          f"nbgrader course in {Path(out) / 'course'}")
    ungraded = results.ungraded()
    if ungraded:  # published, but a 0 that may not be the learner's doing: a person must look
        listed = "; ".join(f"{r.student}/{r.stem} ({r.problem.rstrip('.')})" for r in ungraded[:3])
        print(f"backprop-ninja autograde: {len(ungraded)} notebook(s) could not be graded and score 0 "
              f"until you look at them: {listed}{' ...' if len(ungraded) > 3 else ''}.", file=sys.stderr)
        return 1
    return 0


def _learner_notebooks(paths: list[str], stems) -> dict[str, Path]:
    if not paths:
        paths = [str(NOTEBOOKS / f"{stem}.ipynb") for stem in stems]
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
        read_notebook(path)
        chosen[path.stem] = path
    return chosen


def run_grade(paths: list[str], as_json: bool = False, limits: Limits | None = None,
              course: Path = COURSE) -> int:
    """``backprop-ninja grade``: the hidden tests on the learner's notebooks, offline.

    The files are copied into a scratch nbgrader course; feedback lands in
    ``./grade-feedback/<stem>.html``.
    """
    stems = list(course_notebooks(course))
    chosen = _learner_notebooks(paths, stems)
    at_once = max(1, min(len(chosen), os.cpu_count() or 1))
    results = autograde_class(None, jobs_at_once=at_once, out=None, limits=limits, course=course,
                              progress=not as_json, only={LEARNER: chosen},
                              feedback_to=lambda _student, stem: FEEDBACK_DIR / f"{stem}.html")
    mine = {stem: res for stem, res in results.results[LEARNER].items() if stem in chosen}
    score = sum(r.score for r in mine.values())
    max_score = sum(r.max_score for r in mine.values())
    if as_json:
        print(json.dumps({"score": score, "max_score": max_score, "sandbox": results.sandbox, "notebooks": {
            stem: {"score": r.score, "max_score": r.max_score, "problem": r.problem, "flags": r.flags,
                   "feedback": r.feedback} for stem, r in mine.items()}}))
        return 0
    width = max(len(s) for s in mine)
    indent = width + 17  # where the "first problem" column starts; long reasons wrap under it
    wrap = max(40, shutil.get_terminal_size().columns - indent)
    print(f"{'notebook':{width}s}  {'score':>6s}  {'max':>5s}  first problem")
    for stem, r in mine.items():
        first, *rest = textwrap.wrap(r.problem or "-", wrap)
        print(f"{stem:{width}s}  {r.score:6g}  {r.max_score:5g}  {first}")
        for line in rest:
            print(" " * indent + line)
    print(f"{'total':{width}s}  {score:6g}  {max_score:5g}")
    if results.sandbox != "on":
        print(f"sandbox {results.sandbox}: your code ran without isolation; the judge still ran outside it.")
    print("feedback:")
    for r in mine.values():
        print(f"  {r.feedback}")
    return 0
