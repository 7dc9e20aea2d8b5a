"""How fast does nbgrader grade a class? Seconds per graded notebook and the speed-up
of ``--jobs 2`` over ``--jobs 1`` on the same class of 8 students, in one run; and the
time ``backprop-ninja grade`` takes for one learner's full submission.

    .venv/bin/python benchmarks/grade_class.py [--students 8] [--jobs 2]

Half the class hands in the solutions, half the release (every notebook each), so
right and failing hidden tests are both timed. The released course is cached
(~/.cache/backprop-ninja) before timing, so every measurement pays the same costs:
the job server's start, each notebook's kernel, nbgrader's autograde and feedback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from backprop_ninja import autograde

REPO = Path(__file__).resolve().parents[1]


def make_class(root: Path, students: int) -> Path:
    """``root/submitted/<student>/backprop/*.ipynb``: even students right, odd ones untouched."""
    for k in range(students):
        source = REPO / ("solutions" if k % 2 == 0 else "notebooks")
        folder = root / "submitted" / f"student{k:02d}" / autograde.ASSIGNMENT
        folder.mkdir(parents=True)
        for stem in autograde.course_notebooks():
            shutil.copy(source / f"{stem}.ipynb", folder / f"{stem}.ipynb")
    return root


def timed_class(root: Path, jobs: int) -> tuple[float, int, autograde.ClassResults]:
    started = time.perf_counter()
    results = autograde.autograde_class(root, jobs=jobs, out=root / f"out-jobs{jobs}", progress=True)
    seconds = time.perf_counter() - started
    graded = sum(r.graded for per in results.results.values() for r in per.values())
    return seconds, graded, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2, help="compared with --jobs 1")
    args = parser.parse_args()
    stems = list(autograde.course_notebooks())
    print(f"course: {len(stems)} notebooks; class: {args.students} students; cores: {os.cpu_count()}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="grade-class-") as tmp:
        root = make_class(Path(tmp), args.students)
        with tempfile.TemporaryDirectory() as warm:  # fill the course cache outside the timings
            autograde.prepare_course(Path(warm))

        one = {"learner": {stem: REPO / "solutions" / f"{stem}.ipynb" for stem in stems}}
        started = time.perf_counter()
        solo = autograde.autograde_class(None, jobs=min(len(stems), os.cpu_count() or 1), out=None,
                                         progress=False, only=one)
        solo_seconds = time.perf_counter() - started
        assert solo.total("learner") == solo.max_score, "the solutions must get full marks"

        t1, n1, r1 = timed_class(root, 1)
        tn, nn, rn = timed_class(root, args.jobs)
        for results, jobs in ((r1, 1), (rn, args.jobs)):  # solutions: full marks; release: 0
            for student, per in results.results.items():
                for stem, r in per.items():
                    want = results.max_scores[stem] if int(student[-2:]) % 2 == 0 else 0.0
                    if r.score != want:
                        print(f"UNEXPECTED (--jobs {jobs}) {student} {stem}: {r.score:g} != {want:g}: "
                              f"{r.problem}")
        per_job = [r.seconds for per in r1.results.values() for r in per.values()]

    print(f"grade (one learner, {len(stems)} notebooks, {min(len(stems), os.cpu_count() or 1)} at once): "
          f"{solo_seconds:.1f} s")
    print(f"--jobs 1: {t1:.1f} s for {n1} notebooks = {t1 / n1:.2f} s per graded notebook "
          f"(one notebook's job alone: median {sorted(per_job)[len(per_job) // 2]:.2f} s)")
    print(f"--jobs {args.jobs}: {tn:.1f} s for {nn} notebooks = {tn / nn:.2f} s per graded notebook")
    print(f"speed-up of --jobs {args.jobs} over --jobs 1: {t1 / tn:.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
