"""Instructors with a class of thousands: ``autograde --scheduler`` grades on a Dask cluster as
``--jobs`` grades here (tests/test_grading.py: each student scores what their work deserves), loses
nothing when its coordinator or a worker is killed, and refuses a scheduler it cannot reach or a
worker without the sandbox in one sentence.

One real cluster, started as the README starts one by hand (``dask scheduler`` and ``dask worker``
processes on 127.0.0.1), is shared by the tests. It has one worker: the attacker is graded first,
so its classmates are graded after it by the same worker process (with two workers, the other one
could grade them all while the attacker's ran). The class: 6 students, one short notebook each:
right (exercises 2 and 3), wrong, empty, the attacker (it attacks every process and file it can
reach and leaves a process behind) and the unlucky student, whose worker is killed while it grades
them, every time. It is graded once, as an instructor would after a crash: ``backprop-ninja
autograde --scheduler`` is SIGKILLed once two results are journaled, and the same command run again
grades the rest.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest
from browser import free_port
from learner import BN, CE, add_cell, notebook
from test_grading import TOKEN, _processes_with
from test_instructor import WRONG_CE, _alive, _cmdline, _descendants, _start

from backprop_ninja import cli
from backprop_ninja.grading import autograde, course, folders
from backprop_ninja.grading.sandbox import probe

pytestmark = pytest.mark.slow

# Workers whose tasks may start processes; the scheduler gives a dead worker's task one retry
# (so the crashing student costs two deaths) and sends each worker one task at a time (so a
# killed worker takes no queued classmate with it).
DASK_ENV = {"DASK_DISTRIBUTED__WORKER__DAEMON": "False", "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1",
            "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0"}
HOSTILE = f"""\
import glob, os, signal, subprocess
cache = {str(course.cache_dir())!r}
for path in glob.glob('/tmp/**', recursive=True) + glob.glob(cache + '/**/*', recursive=True):
    try:
        open(path, 'a').write('hostile was here')
    except OSError:
        pass
try:
    os.kill(-1, signal.SIGKILL)  # every process it can see
except OSError as exc:
    print(exc)
subprocess.Popen(['sh', '-c', 'sleep {TOKEN}'], start_new_session=True)
"""
LOOP = {"    dlogits = F.softmax(logits, 1)": "    while True:\n        pass"}


def _class(root: Path) -> dict[str, float]:
    """``root/<student>/<notebook>``; the points each deserves."""
    handed_in = {"right": (notebook(CE), 4.0), "wrong": (notebook(CE, replace=WRONG_CE), 0.0),
                 "empty": (notebook(CE, release=True), 0.0), "right-bn": (notebook(BN), 6.0),
                 # Graded in the order of their names: the attacker first, so that its worker goes on to
                 # grade classmates; the unlucky student (whose worker is killed) near the end.
                 "attacker": (notebook(CE, edit=add_cell(HOSTILE, at=3)), 0.0),
                 "unlucky": (notebook(CE, replace=LOOP), 0.0)}
    for student, (nb, _) in handed_in.items():
        (root / student).mkdir(parents=True)
        stem = BN if student == "right-bn" else CE
        nbformat.write(nb, str(root / student / f"{stem}.ipynb"))
    return {student: points for student, (_, points) in handed_in.items()}


@contextlib.contextmanager
def _dask_cluster(root: Path, worker_env: dict | None = None):
    """A ``dask scheduler`` and one ``dask worker ADDRESS`` process on loopback; the address."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{free_port()}"
    dask = str(Path(sys.executable).parent / "dask")
    env = {**os.environ, **DASK_ENV}
    log = open(root / f"dask-{address.rsplit(':', 1)[1]}.log", "w")  # noqa: SIM115 (closed below)
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                               "--no-dashboard"], env=env, stdout=log, stderr=subprocess.STDOUT)]
    procs.append(subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                                   "--no-dashboard"], env={**env, **(worker_env or {})}, stdout=log,
                                  stderr=subprocess.STDOUT))
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if probe() is not None:
        pytest.fail(f"the class must be graded in the sandbox: {probe()} (`make system-deps`)")
    with _dask_cluster(tmp_path_factory.mktemp("cluster")) as address:
        yield address


def _kill_workers_grading(address: str, student: str, times: int, done: threading.Event) -> dict[str, list]:
    """SIGKILL the worker process grading ``student``'s task, ``times`` times (the nanny starts a
    new one each time); for each killed worker's address, what its grading job, kernel and job
    server left alive 60 s later. (The job and kernel die at once; a job server killed while it
    still imports, as on a restarted worker's first task, leaves once its imports are done.)"""
    from distributed import Client

    killed: dict[str, list] = {}
    with Client(address, timeout=60) as client:
        while len(killed) < times and not done.is_set():
            executing = client.run(lambda dask_worker: [str(ts.key) for ts in dask_worker.state.executing])
            busy = [w for w, keys in executing.items()
                    if any(k.startswith(f"grade-{student}/") for k in keys)]
            if busy and busy[0] not in killed:
                time.sleep(3)  # into the grading: its job and sandboxed kernel are starting
                pid = client.run(os.getpid, workers=busy)[busy[0]]
                family = _descendants(pid)
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 60
                while _alive(family) and time.monotonic() < deadline:
                    time.sleep(0.2)
                killed[busy[0]] = [_cmdline(p)[:120] for p in _alive(family)]
            time.sleep(0.5)
    return killed


def _grades(out: Path) -> list[dict]:
    with open(out / "grades.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def graded(cluster, tmp_path_factory):
    """``backprop-ninja autograde class --scheduler ... --out dask``, SIGKILLed once two results are
    journaled, then the same command again; the unlucky student's worker killed twice meanwhile."""
    root = tmp_path_factory.mktemp("class")
    deserved = _class(root / "class")
    args = ("class", "--scheduler", cluster, "--out", "dask")
    done = threading.Event()
    killer = {}
    thread = threading.Thread(target=lambda: killer.setdefault(
        "killed", _kill_workers_grading(cluster, "unlucky", 2, done)))
    thread.start()
    try:
        first = _start(root, *args)
        journal = root / "dask" / folders.JOURNAL
        deadline = time.monotonic() + 300
        while len(list(journal.glob("*/*/result.json"))) < 2:
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.2)
        first.kill()
        first.communicate()
        before = len(list(journal.glob("*/*/result.json")))
        again = _start(root, *args)
        stdout, stderr = again.communicate(timeout=900)
    finally:
        done.set()
        thread.join()
    record = json.loads((root / "dask" / autograde.RECORD).read_text())["notebooks"]
    return {"root": root, "deserved": deserved, "killed": killer["killed"], "before": before,
            "code": again.returncode, "stdout": stdout, "stderr": stderr,
            "record": {n["student"]: n for n in record}}  # the graded notebooks, one per student


def test_a_class_graded_on_the_cluster_gets_what_each_student_deserves(graded):
    rows = {r["student_id"]: r for r in _grades(graded["root"] / "dask")}
    assert {s: float(r["total"]) for s, r in rows.items()} == graded["deserved"]
    assert [s for s, r in rows.items() if r["flags"]] == ["attacker"]
    assert {r["max_score"] for r in rows.values()} == {rows["right"]["max_score"]}
    assert "6 students graded (sandbox on)" in graded["stdout"]


def test_a_worker_that_dies_costs_a_retry_then_its_student_alone_is_not_graded(graded):
    killed = graded["killed"]
    assert len(killed) == 2  # the retry ran on another (or a restarted) worker
    assert killed == dict.fromkeys(killed, [])  # the job, its kernel and the job server died with each
    assert graded["code"] == 1, graded["stderr"]  # a notebook could not be graded
    # every other result was kept
    assert sorted(graded["record"]) == sorted(set(graded["deserved"]) - {"unlucky"})
    feedback = (graded["root"] / "dask" / "feedback" / "unlucky" / f"{CE}.html").read_text()
    assert "could not be graded: its grading worker died 2 times" in feedback


def test_a_hostile_student_on_a_worker_harms_no_other_task_there(graded):
    assert graded["record"]["attacker"]["flags"]
    deadline = time.monotonic() + 10
    while _processes_with(TOKEN) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_with(TOKEN)  # what it left behind died with its sandbox
    assert course.cached_template() is not None  # the template cache is intact
    # classmates graded after it by the same worker process scored what they deserve (first test)
    machines = {s: n["machine"] for s, n in graded["record"].items()}
    assert machines["attacker"].startswith("tcp://127.0.0.1:")
    assert [s for s, m in machines.items() if m == machines["attacker"] and s != "attacker"], machines


def test_a_coordinator_killed_midway_is_resumed_and_grades_every_student_once(graded):
    """The second run grades only what the first did not journal, says how many it skipped, and
    publishes every grade (the first test: each what they deserve)."""
    before, students = graded["before"], len(graded["deserved"])
    assert 2 <= before < students
    assert f"{before} notebook(s) already graded before the interruption were skipped" in graded["stdout"]
    assert f"{students - before} graded in this run" in graded["stdout"]
    db = sqlite3.connect(graded["root"] / "dask" / "course" / "gradebook.db")
    per_student = dict(db.execute("SELECT student_id, COUNT(*) FROM submitted_assignment "
                                  "GROUP BY student_id"))
    assert {s: per_student.get(s) for s in graded["record"]} == dict.fromkeys(graded["record"], 1)  # once
    assert not (graded["root"] / "dask" / folders.JOURNAL).exists()
    assert sorted(p.name for p in graded["root"].iterdir()) == ["class", "dask"]


def test_bad_scheduler_and_a_worker_without_the_sandbox_are_one_sentence(tmp_path, monkeypatch, capsys):
    _class(tmp_path / "class")
    monkeypatch.chdir(tmp_path)
    # a refused connection is retried until the timeout: 2 s make the same sentence as the 10 s default
    monkeypatch.setattr("backprop_ninja.grading.cluster.CONNECT_SECONDS", 2)
    nobody = f"tcp://127.0.0.1:{free_port()}"
    for address, says in ((nobody, f"no Dask scheduler answers at --scheduler {nobody}"),
                          ("not-an-address", "no Dask scheduler answers at --scheduler not-an-address")):
        assert cli.main(["autograde", "class", "--scheduler", address, "--out", "results"]) == 2
        err = capsys.readouterr().err
        assert says in err and "dask scheduler" in err and err.count("\n") == 1 and "Traceback" not in err
    no_bwrap = {"PATH": str(Path(sys.executable).parent)}  # a machine without bubblewrap
    with _dask_cluster(tmp_path, worker_env=no_bwrap) as address:
        assert cli.main(["autograde", "class", "--scheduler", address, "--out", "results"]) == 2
    err = capsys.readouterr().err
    assert "cannot grade: learner code cannot be isolated there: bubblewrap (bwrap) is not installed" in err
    assert "--no-sandbox" in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".log")) == ["class"]
