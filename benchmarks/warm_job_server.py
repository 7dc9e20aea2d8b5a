"""What the job server's warm-up (``backprop_ninja.grading.warm``) saves: a class graded with
``autograde --out`` (merges included), with and without it, alternated in fresh processes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/warm_job_server.py [--students 2] [--jobs 1] [--rounds 2]

Prints wall-clock and CPU seconds per graded notebook. On a machine shared with other work the
wall clock says little; the CPU seconds are those of every process of the run that was waited for
(the job server, its jobs and merges; a kernel is killed before it is reaped, so most of its CPU is
not in them), which is what the warm-up changes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36  # the job server outlives the run's process: it comes back to us, reaped


def run_class(warm: bool, students: int, jobs_at_once: int) -> None:
    """In a child process: grade the class; print {"wall", "graded", "unexpected"} as JSON."""
    import multiprocessing.forkserver

    from grade_class import make_class

    from backprop_ninja.grading import autograde, jobs

    if not warm:
        context = jobs._context

        def cold_context():
            ctx = context()
            server = multiprocessing.forkserver._forkserver
            server._preload_modules = [m for m in server._preload_modules if not m.endswith(".warm")]
            return ctx

        jobs._context = cold_context
    with tempfile.TemporaryDirectory(prefix="warm-job-server-") as tmp:
        root = make_class(Path(tmp) / "class", students)
        started = time.perf_counter()
        results = autograde.autograde_class(root, jobs_at_once=jobs_at_once, out=Path(tmp) / "out",
                                            progress=False)
        wall = time.perf_counter() - started
    unexpected = [f"{student}/{stem}: {r.score:g}" for student, per in results.results.items()
                  for stem, r in per.items()
                  if r.score != (results.max_scores[stem] if int(student[-2:]) % 2 == 0 else 0.0)]
    print(json.dumps({"wall": wall, "graded": sum(r.graded for per in results.results.values()
                                                  for r in per.values()), "unexpected": unexpected}))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _reap() -> None:
    while True:
        try:
            if os.waitpid(-1, 0)[0] == 0:
                return
        except ChildProcessError:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1)
    seen: dict[str, list[tuple[float, float]]] = {"cold": [], "warm": []}
    for _ in range(args.rounds):
        for name in seen:
            before = _cpu()
            command = [sys.executable, __file__, "--child", name, str(args.students), str(args.jobs)]
            child = subprocess.run(command, capture_output=True, text=True, check=True)
            _reap()
            data = json.loads(child.stdout.splitlines()[-1])
            wall, cpu = data["wall"] / data["graded"], (_cpu() - before) / data["graded"]
            seen[name].append((wall, cpu))
            print(f"{name}: {wall:.2f} s wall, {cpu:.2f} s CPU per notebook (load {os.getloadavg()[0]:.1f})"
                  + (f"; UNEXPECTED {data['unexpected']}" if data["unexpected"] else ""), flush=True)
    for name, runs in seen.items():
        print(f"{name} (median of {len(runs)}): {statistics.median(w for w, _ in runs):.2f} s wall, "
              f"{statistics.median(c for _, c in runs):.2f} s CPU per graded notebook")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        run_class(sys.argv[2] == "warm", int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
