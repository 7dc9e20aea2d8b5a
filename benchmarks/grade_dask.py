"""How many submissions a minute does ``autograde --scheduler`` grade, on 1 and on 2 Dask workers?

In one run: a local Dask cluster (worker processes on 127.0.0.1, one task at a time each, the
sandbox on) grades the same class with 1 worker, then with 2; each count is timed from the
command's start to its published results (the coordinator's gradebook merges included), and the
coordinator's own cost per recorded result is timed apart, since one coordinator records every
result. Then, on paper: the workers needed to grade 10,000 such submissions in an hour.

    .venv/bin/python benchmarks/grade_dask.py [--students 8]

A submission here is one student's notebook 02 (half right, half the untouched release); the
released course is cached and every worker warmed up before timing.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

from grade_class import make_class

from backprop_ninja.grading import autograde, jobs
from backprop_ninja.grading.course import course_notebooks
from backprop_ninja.grading.sandbox import probe

TARGET = 10_000  # submissions in an hour


def timed_merges():
    """Wrap ``jobs.merge_grades`` (the coordinator's per-result gradebook write); its timings."""
    spent: list[float] = []
    merge = jobs.merge_grades

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return merge(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    jobs.merge_grades = timed
    return spent


def main() -> None:
    import dask
    from distributed import Client, LocalCluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=8)
    args = parser.parse_args()
    if probe():
        raise SystemExit(f"the sandbox is unavailable here ({probe()}): grading would be refused")
    stem = list(course_notebooks())[1]
    print(f"class: {args.students} students x {stem}; cores: {os.cpu_count()}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    merges = timed_merges()
    per_minute = {}
    config = {"distributed.worker.daemon": False, "distributed.scheduler.worker-saturation": 1.0}
    with tempfile.TemporaryDirectory(prefix="grade-dask-") as tmp, dask.config.set(config), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address=None) as cluster, Client(cluster) as client:
        root = make_class(Path(tmp) / "class", args.students, [stem])
        warm = make_class(Path(tmp) / "warm", 2, [stem])
        for workers in (1, 2):
            cluster.scale(workers)
            client.wait_for_workers(workers)
            client.run(jobs.warm_up)  # each worker's job server imports nbgrader once
            autograde.autograde_class(warm, out=None, progress=False, scheduler=cluster.scheduler_address)
            merges.clear()
            started = time.perf_counter()
            results = autograde.autograde_class(root, out=Path(tmp) / f"out{workers}", progress=False,
                                                scheduler=cluster.scheduler_address)
            seconds = time.perf_counter() - started
            graded = sum(r.graded for per in results.results.values() for r in per.values() if r.stem == stem)
            assert graded == args.students, f"{args.students - graded} not graded"
            per_minute[workers] = graded / seconds * 60
            print(f"{workers} worker(s): {graded} submissions in {seconds:.1f} s = "
                  f"{per_minute[workers]:.1f} submissions/min; coordinator: "
                  f"{sum(merges) / len(merges):.2f} s per recorded result")
    per_worker = per_minute[2] / 2
    coordinator = sum(merges) / len(merges)
    print(f"speed-up 1 -> 2 workers: {per_minute[2] / per_minute[1]:.2f}x")
    needed = math.ceil(TARGET / 60 / per_worker)
    print(f"10,000 submissions in an hour = {TARGET / 60:.0f}/min: about {needed} workers like these at "
          f"{per_worker:.1f}/min each (one core each), if they scale linearly; "
          f"one coordinator records at most {3600 / coordinator:,.0f} results an hour at "
          f"{coordinator:.2f} s each")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
