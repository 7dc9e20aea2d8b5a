"""How fast does the grader grade, and what does the sandbox cost? In one run:

- one learner's ``grade`` of the four solution notebooks (sandbox on): the self-grading wait;
- a class graded with ``--jobs 1``, sandbox on and sandbox off, interleaved (on, off, on, off):
  seconds per graded notebook each way, and their difference, the sandbox's cost per notebook;
- the same class with ``--jobs N`` (sandbox on): the parallel speed-up.

    .venv/bin/python benchmarks/grade_class.py [--students 2] [--jobs 2] [--rounds 2]

Half the class hands in the solutions, half the release, so right and failing hidden tests are
both timed. The released course is cached before timing, so every run pays the same costs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from backprop_ninja.grading import autograde
from backprop_ninja.grading.course import ASSIGNMENT, NOTEBOOKS, SOLUTIONS, course_notebooks
from backprop_ninja.grading.sandbox import probe


def make_class(root: Path, students: int, stems=None) -> Path:
    """``root/submitted/<student>/backprop/*.ipynb`` (the notebooks ``stems``, default all): even
    students right, odd ones untouched."""
    for k in range(students):
        folder = root / "submitted" / f"student{k:02d}" / ASSIGNMENT
        folder.mkdir(parents=True)
        for stem in stems or course_notebooks():
            shutil.copy((SOLUTIONS if k % 2 == 0 else NOTEBOOKS) / f"{stem}.ipynb", folder / f"{stem}.ipynb")
    return root


def timed_class(root: Path, jobs: int, isolate: bool) -> tuple[float, int]:
    started = time.perf_counter()
    results = autograde.autograde_class(root, jobs_at_once=jobs, out=None, progress=False, isolate=isolate)
    seconds = time.perf_counter() - started
    for student, per in results.results.items():
        for stem, r in per.items():
            want = results.max_scores[stem] if int(student[-2:]) % 2 == 0 else 0.0
            if r.score != want:
                how = "sandbox" if isolate else "no sandbox"
                print(f"UNEXPECTED ({how}, --jobs {jobs}) {student} {stem}: "
                      f"{r.score:g} != {want:g}: {r.problem}")
    return seconds, sum(r.graded for per in results.results.values() for r in per.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2, help="compared with --jobs 1")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved sandbox on/off rounds")
    args = parser.parse_args()
    if probe():
        raise SystemExit(f"the sandbox is unavailable here ({probe()}); nothing to compare")
    stems = list(course_notebooks())
    print(f"course: {len(stems)} notebooks; class: {args.students} students; cores: {os.cpu_count()}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="grade-class-") as tmp:
        root = make_class(Path(tmp), args.students)
        one = {"learner": {stem: SOLUTIONS / f"{stem}.ipynb" for stem in stems}}
        warm = {"learner": {stems[1]: one["learner"][stems[1]]}}  # the released course, cached
        autograde.autograde_class(None, out=None, progress=False, only=warm)

        started = time.perf_counter()
        solo = autograde.autograde_class(None, jobs_at_once=min(len(stems), os.cpu_count() or 1), out=None,
                                         progress=False, only=one)
        solo_seconds = time.perf_counter() - started
        assert solo.total("learner") == solo.max_score, "the solutions must get full marks"

        per_notebook = {True: [], False: []}
        for _ in range(args.rounds):
            for isolate in (True, False):
                seconds, graded = timed_class(root, 1, isolate)
                per_notebook[isolate].append(seconds / graded)
        tn, nn = timed_class(root, args.jobs, True)

    on, off = statistics.median(per_notebook[True]), statistics.median(per_notebook[False])
    print(f"grade (one learner, {len(stems)} notebooks, {min(len(stems), os.cpu_count() or 1)} at once, "
          f"sandbox on): {solo_seconds:.1f} s")
    print(f"--jobs 1, sandbox on:  {on:.2f} s per graded notebook (rounds: "
          f"{', '.join(f'{x:.2f}' for x in per_notebook[True])})")
    print(f"--jobs 1, sandbox off: {off:.2f} s per graded notebook (rounds: "
          f"{', '.join(f'{x:.2f}' for x in per_notebook[False])})")
    print(f"sandbox cost: {on - off:+.2f} s per notebook ({(on - off) / off:+.1%})")
    print(f"--jobs {args.jobs}, sandbox on: {tn / nn:.2f} s per graded notebook; speed-up over --jobs 1: "
          f"{on / (tn / nn):.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
