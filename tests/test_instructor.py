"""Instructors: ``autograde --out`` loses nothing and mixes nothing, and every bad input gets one
sentence. An ``--out`` that is, holds or sits inside the submissions folder is refused before any
file is touched; only what an earlier run marked as its own is replaced; a second run on the same
``--out`` refuses while the first holds its lock; results are built beside ``--out`` and published
in one rename; Ctrl-C stops every job and kernel within seconds and leaves no scratch folder; what
a run killed outright left behind is removed by the next run.

Most tests grade nothing (they are refused first); one small class (2 students x 1 notebook) is
graded for real, after a run on it was killed, and is then interrupted with Ctrl-C.
"""

from __future__ import annotations

import codecs
import csv
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest
from learner import CE, notebook

from backprop_ninja import cli, data
from backprop_ninja.grading import course, folders, formgrader
from backprop_ninja.grading.course import SOLUTIONS
from backprop_ninja.grading.sandbox import probe

WRONG_CE = {"dlogits[range(n), Yb] -= 1": "dlogits[range(n), Yb] += 1"}
BOM = codecs.BOM_UTF8


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root``: file bytes, None for a folder."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(Path(root).rglob("*"))}


def _class(root: Path, students=("ada", "feedback")) -> Path:
    """A class folder; a student named ``feedback`` is what an ``--out`` inside it would clobber."""
    for student in students:
        (root / "class" / student).mkdir(parents=True)
        shutil.copy(SOLUTIONS / f"{CE}.ipynb", root / "class" / student)
    return root / "class"


def _refused(capsys, *args: str) -> str:
    code = cli.main(["autograde", *args, "--no-sandbox"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


# --- refused before anything is written ----------------------------------------------------------


@pytest.mark.parametrize("out, says", [
    ("class", "is the submissions folder"),
    ("class/feedback", "sits inside the submissions folder"),
    ("class/ada/results", "sits inside the submissions folder"),
    (".", "contains the submissions folder"),
])
def test_an_out_that_is_holds_or_sits_inside_the_submissions_is_refused_untouched(
        tmp_path, monkeypatch, capsys, out, says):
    _class(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    err = _refused(capsys, "class", "--out", out)
    assert says in err and "choose a folder outside it" in err
    assert _tree(tmp_path) == before  # the student named "feedback" keeps their work


def test_an_out_naming_an_existing_file_is_refused_in_one_sentence(tmp_path, monkeypatch, capsys):
    _class(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("my notes")
    before = _tree(tmp_path)
    err = _refused(capsys, "class", "--out", "notes.txt")
    assert "--out notes.txt is an existing file, not a folder" in err
    assert _tree(tmp_path) == before


def test_an_out_holding_files_autograde_did_not_write_is_refused_untouched(tmp_path, monkeypatch, capsys):
    _class(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "course").mkdir(parents=True)
    (tmp_path / "results" / "grades.csv").write_text("my own spreadsheet")
    (tmp_path / "results" / "course" / "gradebook.db").write_text("someone's gradebook")
    before = _tree(tmp_path)
    err = _refused(capsys, "class", "--out", "results")
    assert "holds files autograde did not write (course, grades.csv)" in err
    assert _tree(tmp_path) == before
    # a marker lists what a run wrote: anything else is still someone else's
    (tmp_path / "results" / folders.MARKER).write_text('{"written": ["course", "grades.csv"]}')
    (tmp_path / "results" / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    assert "did not write (notes.txt)" in _refused(capsys, "class", "--out", "results")
    assert _tree(tmp_path) == before


def test_a_second_run_on_a_locked_out_refuses_in_one_sentence(tmp_path, monkeypatch, capsys):
    _class(tmp_path)
    monkeypatch.chdir(tmp_path)
    with folders.Publication(Path("results")) as running:
        before = _tree(tmp_path)
        err = _refused(capsys, "class", "--out", "results")
        assert f"(pid {os.getpid()}) is writing to --out results right now" in err
        assert _tree(tmp_path) == before
        (running.staging / "grades.csv").write_text("the first run's grades\n")
        running.publish()
    assert (tmp_path / "results" / "grades.csv").read_text() == "the first run's grades\n"


# --- staged, published in one rename; litter of killed runs removed --------------------------------


def test_results_are_published_whole_or_not_at_all(tmp_path):
    out = tmp_path / "results"
    with folders.Publication(out) as first:
        (first.staging / "grades.csv").write_text("run 1\n")
        (first.staging / "feedback").mkdir()
        first.publish()
    published = _tree(out)
    with pytest.raises(KeyboardInterrupt), folders.Publication(out) as second:
        (second.staging / "grades.csv").write_text("run 2, half done\n")
        assert _tree(out) == published  # nothing of a run shows before it publishes
        raise KeyboardInterrupt
    assert _tree(out) == published
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no staging folder left
    with folders.Publication(out) as third:
        (third.staging / "grades.csv").write_text("run 3\n")
        third.publish()
    assert (out / "grades.csv").read_text() == "run 3\n" and not (out / "feedback").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_folders_left_by_killed_runs_are_removed_and_nothing_else(tmp_path):
    dead = _dead_pid()
    made = {name: tmp_path / name for name in (
        f"backprop-ninja-{dead}-abc",           # a killed run's: removed
        f"backprop-ninja-{os.getpid()}-abc",    # a live run's
        f"backprop-ninja-{dead}-held",          # a run in another PID namespace: its lock is held
        "backprop-ninja-grading-x1234",         # no pid in the name: not ours to judge
        f"backprop-ninjax-{dead}")}             # another name
    for path in made.values():
        (path / "job").mkdir(parents=True)
    held = folders._try_lock(made[f"backprop-ninja-{dead}-held"])
    try:
        removed = folders.remove_abandoned(tmp_path, folders.SCRATCH_PREFIX)
    finally:
        os.close(held)
    assert removed == [made[f"backprop-ninja-{dead}-abc"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(made) - {removed[0].name})


def test_ctrl_c_while_waiting_for_a_job_kills_it_and_is_not_swallowed():
    import threading

    from backprop_ninja.grading import jobs

    jobs.warm_up()  # the job server is up, so the signal lands while the caller waits on the job
    group = jobs.JobGroup()
    # Ctrl-C as the terminal sends it: a real SIGINT, which interrupts the wait (_thread.interrupt_main
    # only sets a flag that a blocked wait does not look at)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        jobs.run_process(time.sleep, (60,), timeout=120, group=group)
    assert time.monotonic() - started < 30 and not group._running
    group.stop()
    with pytest.raises(jobs.Stopped):  # a stopped run starts no job
        jobs.run_process(time.sleep, (0,), timeout=10, group=group)


@pytest.mark.parametrize("grading", [True, False])
def test_the_job_server_imports_torch_only_where_notebooks_are_graded(grading):
    """A Dask run's coordinator (``warm_up(grading=False)``) only releases and records: its jobs
    fork from a server without the judge and torch. A fresh process, as this one's server may be up."""
    ask = "import sys; sys.exit(3 if 'torch' in sys.modules else 0)"  # run by a job: its exit code
    script = ("from backprop_ninja.grading import jobs\n"
              "if __name__ == '__main__':\n"
              f"    jobs.warm_up(grading={grading})\n"
              f"    raise SystemExit(jobs.run_process(exec, ({ask!r},), timeout=120))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert proc.returncode == (3 if grading else 0), proc.stderr


# --- one small class graded for real ---------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                stat = (proc / "stat").read_text()
                tree.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(proc.name))
        except (OSError, ValueError):
            continue
    return tree


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pids) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            if "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text():
                alive.add(pid)
        except OSError:
            continue
    return alive


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _start(root: Path, *args: str) -> subprocess.Popen:
    """``backprop-ninja autograde ARGS`` in the class's folder."""
    return subprocess.Popen([sys.executable, "-m", "backprop_ninja.cli", "autograde", *args], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _scratch(pid: int) -> list[Path]:
    """The scratch folders of the run with this pid."""
    return sorted(Path(tempfile.gettempdir()).glob(f"{folders.SCRATCH_PREFIX}{pid}-*"))


def _wait_for_a_kernel(run: subprocess.Popen, timeout: float = 180) -> set[int]:
    """The run's processes once one of its kernels runs in its sandbox."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        family = _descendants(run.pid)
        if any("ipykernel" in _cmdline(p) for p in family):  # not bwrap: the sandbox probe runs it too
            return family
        assert run.poll() is None, run.communicate()
        time.sleep(0.2)
    raise AssertionError("no kernel started")


def _gone_within(pids: set[int], seconds: float) -> float:
    started = time.monotonic()
    while _alive(pids) and time.monotonic() - started < seconds:
        time.sleep(0.05)
    assert not _alive(pids), [_cmdline(p)[:120] for p in _alive(pids)]
    return time.monotonic() - started


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """A run killed outright (SIGKILL) mid-grading, then the same class graded to the end
    with a relative ``--out``: ada is right (and half an hour late), bob has the sign wrong."""
    if probe() is not None:
        pytest.skip(f"learner code cannot be isolated here: {probe()}")
    root = tmp_path_factory.mktemp("instructor")
    graded = {"root": root, "due": ["--due", "2026-11-29T09:30"]}  # ada hands in at 10:00: late
    for student, nb in {"ada": notebook(CE), "bob": notebook(CE, replace=WRONG_CE)}.items():
        (root / "class" / student).mkdir(parents=True)
        nbformat.write(nb, str(root / "class" / student / f"{CE}.ipynb"))
    # as nbgrader collect leaves it
    (root / "class" / "ada" / "timestamp.txt").write_text("2026-11-29 10:00:00.000000 UTC\n")
    killed = _start(root, "class", "--out", "results")
    family = _wait_for_a_kernel(killed)
    graded["litter"] = _scratch(killed.pid) + list(root.glob(".results.staging-*"))
    killed.kill()
    killed.communicate()
    graded["killed_seconds"] = _gone_within(family, 10)  # its job server, jobs and kernels die with it
    run = _start(root, "class", "--jobs", "2", "--out", "results", *graded["due"])
    graded["stdout"], graded["stderr"] = run.communicate(timeout=600)
    graded["code"], graded["pid"] = run.returncode, run.pid
    return graded


def test_a_relative_out_gets_every_grade_in_grades_csv_and_the_gradebook(graded):
    root = graded["root"]
    assert graded["code"] == 0, graded["stderr"]
    with open(root / "results" / "grades.csv") as f:
        csv_scores = {r["student_id"]: float(r[CE]) for r in csv.DictReader(f)}
    assert csv_scores == {"ada": 4.0, "bob": 0.0}
    db = sqlite3.connect(root / "results" / "course" / "gradebook.db")
    rows = db.execute("SELECT student.id, SUM(grade.auto_score) FROM grade "
                      "JOIN submitted_notebook ON grade.notebook_id = submitted_notebook.id "
                      "JOIN submitted_assignment AS sa ON submitted_notebook.assignment_id = sa.id "
                      "JOIN student ON sa.student_id = student.id GROUP BY student.id").fetchall()
    assert {s: score or 0.0 for s, score in rows} == csv_scores
    timestamps = dict(db.execute("SELECT student_id, timestamp FROM submitted_assignment").fetchall())
    assert timestamps == {"ada": "2026-11-29 10:00:00.000000", "bob": None}
    submitted = root / "results" / "course" / "submitted"
    assert sorted(p.relative_to(submitted).as_posix() for p in submitted.rglob("*.*")) == [
        f"ada/backprop/{CE}.ipynb", "ada/backprop/timestamp.txt", f"bob/backprop/{CE}.ipynb"]
    assert sorted(p.name for p in (root / "results").iterdir()) == [folders.MARKER, "course", "feedback",
                                                                    "grades.csv", "notebooks.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert (root / "results").stat().st_mode & 0o777 == 0o777 & ~umask  # a folder like any other


def test_late_work_is_graded_and_marked_late_in_grades_csv_and_the_gradebook(graded):
    """``--due``: ada's timestamp.txt (10:00 UTC) is half an hour late; bob's submission has no
    timestamp, so nbgrader counts it on time. The course's LateSubmissionPlugin takes nothing off."""
    from datetime import datetime

    from nbgrader.api import Gradebook

    root = graded["root"]
    assert "2 students graded (sandbox on); 0 flagged for review, 1 late:" in graded["stdout"]
    with open(root / "results" / "grades.csv") as f:
        late = {r["student_id"]: (r[CE], r["late"], r["late_penalty"]) for r in csv.DictReader(f)}
    assert late == {"ada": ("4", "0:30:00", "0"), "bob": ("0", "", "0")}
    with Gradebook(f"sqlite:///{root / 'results' / 'course' / 'gradebook.db'}") as gb:
        assert gb.find_assignment("backprop").duedate == datetime(2026, 11, 29, 9, 30)
        assert gb.find_submission("backprop", "ada").total_seconds_late == 1800
        assert gb.find_submission("backprop", "bob").total_seconds_late == 0


def test_what_a_killed_run_left_is_removed_by_the_next_run(graded):
    root = graded["root"]
    assert graded["killed_seconds"] < 10
    # killed while a kernel ran: with its scratch and staging folders, which the next run removed
    assert [p.name.split("-")[0] for p in graded["litter"]] == ["backprop", ".results.staging"]
    assert not [p for p in graded["litter"] if p.exists()]
    assert _scratch(graded["pid"]) == []
    assert sorted(p.name for p in root.iterdir()) == ["class", "results"]


def test_ctrl_c_stops_jobs_and_kernels_within_seconds_and_changes_nothing(graded):
    root = graded["root"]
    published = _tree(root / "results")
    (root / "more" / "cy").mkdir(parents=True)  # a class with a notebook the last run did not grade
    shutil.copy(root / "class" / "ada" / f"{CE}.ipynb", root / "more" / "cy")
    run = _start(root, "more", "--jobs", "1", "--out", "results")
    family = _wait_for_a_kernel(run)
    second = _start(root, "class", "--out", "results")
    _, refused = second.communicate(timeout=120)
    assert second.returncode == 2 and refused.count("\n") == 1, refused
    assert f"(pid {run.pid}) is writing to --out results right now" in refused
    started = time.monotonic()
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=30)
    exited = time.monotonic() - started
    gone = exited + _gone_within(family, 10)
    print(f"Ctrl-C: the run exited after {exited:.2f} s, its last process was gone after {gone:.2f} s")
    assert run.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert gone < 10
    assert _tree(root / "results") == published  # the interrupted run published nothing
    assert _scratch(run.pid) == []
    assert sorted(p.name for p in root.iterdir()) == ["class", "more", "results"]


# --- every bad input: one sentence, a non-zero exit, no litter ------------------------------------


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKPROP_NINJA_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("BACKPROP_NINJA_NAMES", raising=False)
    return tmp_path / "data"


def _one_sentence(capsys, argv: list[str]) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_data_names_txt_being_a_directory_is_one_sentence_and_no_litter(data_dir, capsys):
    (data_dir / "names.txt").mkdir(parents=True)
    (data_dir / "names.txt" / "mine.txt").write_text("a learner's file")
    before = _tree(data_dir)
    err = _one_sentence(capsys, ["data", "--from", str(SOLUTIONS / f"{CE}.ipynb")])
    assert "names.txt is a directory, not a file" in err and "move it away" in err
    assert _tree(data_dir) == before  # no names.txt.<pid>.tmp, nothing moved or deleted


@pytest.mark.parametrize("make, says", [
    (lambda d: d, "is a directory, not a file; pass the path of the file itself"),
    (lambda d: (d / "loop").symlink_to("loop") or d / "loop", "is a symbolic link that loops back on itself"),
    (lambda d: (d / "dangling").symlink_to("gone.txt") or d / "dangling", "is a broken symbolic link"),
    (lambda d: d / "absent.txt", "does not exist"),
])
def test_data_from_says_what_the_path_is(tmp_path, data_dir, capsys, make, says):
    (tmp_path / "from").mkdir()
    err = _one_sentence(capsys, ["data", "--from", str(make(tmp_path / "from"))])
    assert says in err
    assert not data_dir.exists() or list(data_dir.iterdir()) == []


@pytest.mark.parametrize("bom, newline", [(b"", b"\r\n"), (BOM, b"\n"), (BOM, b"\r\n")])
def test_a_crlf_or_bom_copy_of_names_txt_is_converted_and_verified(tmp_path, data_dir, capsys, bom, newline):
    canonical = data.REPO_ROOT / "data" / "names.txt"
    if not data.is_canonical(canonical):
        pytest.skip("needs the canonical names.txt to copy from")
    copy = tmp_path / "names-from-windows.txt"
    copy.write_bytes(bom + canonical.read_bytes().replace(b"\n", newline))
    assert cli.main(["data", "--from", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "converted" in out and ("byte-order mark" in out) == bool(bom)
    assert ("CRLF" in out) == (b"\r" in newline)
    assert data.is_canonical(data_dir / "names.txt")
    assert sorted(p.name for p in data_dir.iterdir()) == ["names.txt"]


def test_a_different_file_is_still_refused_and_says_what_it_has(tmp_path, data_dir, capsys):
    other = tmp_path / "other.txt"
    other.write_bytes(b"emma\r\nolivia\r\n")
    err = _one_sentence(capsys, ["data", "--from", str(other)])
    assert "is not the course's names.txt" in err and "Windows (CRLF) line endings" in err


@pytest.mark.parametrize("argv, says", [
    (["train", "--steps", "abc"], "argument --steps: must be a positive whole number, got 'abc'"),
    (["train", "--steps", "0"], "argument --steps: must be a positive whole number, got '0'"),
    (["train", "--seed", "x"], "argument --seed: must be a whole number, got 'x'"),
    (["autograde", "class", "--jobs", "two"], "argument --jobs: must be a positive whole number, got 'two'"),
    (["autograde", "class", "--due", "friday"], "argument --due: must be a date and time like 2026-12-01"),
])
def test_a_bad_number_says_what_it_must_be(capsys, argv, says):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and "invalid" not in err and "Traceback" not in err


def test_the_readmes_results_folder_is_git_ignored():
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/grades.csv"], cwd=SOLUTIONS.parent)
    assert ignored.returncode == 0


# --- the formgrader on what autograde wrote ---------------------------------------------------------


def test_formgrader_without_an_autograded_course_is_one_sentence(tmp_path, capsys):
    err = _one_sentence(capsys, ["formgrader", str(tmp_path / "nowhere")])
    assert "holds no autograded course" in err and "backprop-ninja autograde SUBMISSIONS --out" in err


def test_formgrader_serves_the_course_on_loopback_and_as_root_too(tmp_path):
    argv = formgrader.lab_command(tmp_path, 8123)
    assert argv[1] == "lab" and f"--ServerApp.root_dir={tmp_path}" in argv
    assert "--ServerApp.ip=127.0.0.1" in argv and "--ServerApp.port=8123" in argv
    assert ("--allow-root" in argv) == (os.geteuid() == 0)
    assert not [a for a in argv if "token" in a.lower()]  # the token is not shown to `ps`


def test_the_course_config_makes_a_course_local_exchange(tmp_path):
    from traitlets.config.loader import PyFileConfigLoader

    shutil.copy(course.COURSE / "nbgrader_config.py", tmp_path)
    config = PyFileConfigLoader("nbgrader_config.py", path=str(tmp_path)).load_config()
    assert config.Exchange.root == str(tmp_path / "exchange")
    assert (tmp_path / "exchange").is_dir() and (tmp_path / "exchange").stat().st_mode & 0o1777 == 0o1777


def _get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback)
            return response.status, response.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return getattr(exc, "code", 0), ""


def test_formgrader_shows_the_assignment_released_every_submission_and_opens_one(graded):
    import json
    import re

    lab = subprocess.Popen([sys.executable, "-m", "backprop_ninja.cli", "formgrader", "results"],
                           cwd=graded["root"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        printed, printed_url = "", r"(http://127\.0\.0\.1:(\d+)/lab/workspaces/formgrader\?reset&formgrader=true&token=(\w+))"
        while not (url := re.search(printed_url, printed)):
            line = lab.stdout.readline()
            assert line, printed  # printed once the server answers
            printed += line
        base, token = f"http://127.0.0.1:{url.group(2)}", url.group(3)
        status = _get(f"{base}/formgrader/api/assignments?token={token}")
        assert status[0] == 200, status
        (assignment,) = json.loads(status[1])
        assert assignment["name"] == "backprop" and assignment["releaseable"]  # the exchange exists
        assert assignment["status"] == "released" and assignment["num_submissions"] == 2
        assert _get(url.group(1))[0] == 200
        def api(path):
            return json.loads(_get(f"{base}/formgrader/api/{path}?token={token}")[1])

        assert {s["id"]: s["score"] for s in api("students")} == {"ada": 4.0, "bob": 0.0}
        ada = next(s["id"] for s in api(f"submitted_notebooks/backprop/{CE}") if s["student"] == "ada")
        code, page = _get(f"{base}/formgrader/submissions/{ada}/?token={token}")  # open it for review
        assert code == 200 and "dlogits" in page
    finally:
        lab.terminate()
        lab.wait(timeout=30)


# --- a grade that cannot be recorded, a notebook that cannot be graded --------------------------------


def test_a_grade_that_cannot_be_recorded_exits_non_zero_and_publishes_nothing(graded, monkeypatch, capsys):
    """The real merge job, pointed (for bob only) at a gradebook it cannot open, as a relative
    ``--out`` once made it: one sentence, exit 2, and ``--out`` holds the last run whole."""
    from backprop_ninja.grading import jobs

    root = graded["root"]
    published, beside = _tree(root / "results"), sorted(p.name for p in root.iterdir())
    merge = jobs.merge_grades

    def unopenable_for_bob(gradebook, job_dir, student, stem, group=None, source=None):
        if student == "bob":
            gradebook = Path(gradebook).parent / "nowhere" / "gradebook.db"
        return merge(gradebook, job_dir, student, stem, group, source)

    monkeypatch.setattr(jobs, "merge_grades", unopenable_for_bob)
    monkeypatch.chdir(root)
    code = cli.main(["autograde", "class", "--out", "results", *graded["due"]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "1 grade(s) could not be recorded in the class gradebook, so nothing was published" in err
    assert f"recording bob/{CE}" in err and "unable to open database file" in err
    after = _tree(root / "results")
    journaled = {path for path in after if path.split("/")[0] == folders.JOURNAL}
    assert {k: v for k, v in after.items() if k not in journaled} == published  # the last run's, whole
    assert f"{folders.JOURNAL}/bob/{CE}/result.json" in journaled  # bob's, for a rerun
    assert sorted(p.name for p in root.iterdir()) == beside  # no staging folder left


def test_a_notebook_nbgrader_cannot_grade_is_published_as_0_named_and_exits_1(tmp_path, monkeypatch, capsys):
    """Exit 1: the results are published, but a 0 may not be the learner's doing (a kernel that
    would not start scores 0 too), so a script that returns grades stops for a person to look."""
    (tmp_path / "class" / "cy").mkdir(parents=True)
    (tmp_path / "class" / "cy" / f"{CE}.ipynb").write_text("{ not a notebook")
    monkeypatch.chdir(tmp_path)
    code = cli.main(["autograde", "class", "--out", "results", "--no-sandbox"])
    out, err = capsys.readouterr()
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"1 notebook(s) could not be graded and score 0 until you look at them: cy/{CE} (" in err
    assert "1 students graded" in out
    with open(tmp_path / "results" / "grades.csv") as f:
        assert [(r["student_id"], r[CE]) for r in csv.DictReader(f)] == [("cy", "0")]


# --- re-grading: a grade is replaced only when its submission changed --------------------------------


def _gradebook_scores(db_path: Path) -> dict[str, float]:
    db = sqlite3.connect(db_path)
    rows = db.execute("SELECT student.id, SUM(COALESCE(grade.manual_score, grade.auto_score, 0)) FROM grade "
                      "JOIN submitted_notebook ON grade.notebook_id = submitted_notebook.id "
                      "JOIN submitted_assignment AS sa ON submitted_notebook.assignment_id = sa.id "
                      "JOIN student ON sa.student_id = student.id GROUP BY student.id").fetchall()
    db.close()
    return dict(rows)


def test_a_second_run_regrades_only_what_changed_and_keeps_manual_grades(graded):
    """Runs last: it changes the class's results (bob hands in a fixed notebook)."""
    root = graded["root"]
    course = root / "results" / "course"
    ada_autograded = (course / "autograded" / "ada" / "backprop" / f"{CE}.ipynb").read_bytes()
    db = sqlite3.connect(course / "gradebook.db")  # the instructor takes a point off ada by hand
    (cell_id, points), = db.execute(
        "SELECT grade.id, grade_cells.max_score FROM grade "
        "JOIN grade_cells ON grade.cell_id = grade_cells.id "
        "JOIN submitted_notebook ON grade.notebook_id = submitted_notebook.id "
        "JOIN notebook ON submitted_notebook.notebook_id = notebook.id "
        "JOIN submitted_assignment AS sa ON submitted_notebook.assignment_id = sa.id "
        "WHERE sa.student_id = 'ada' AND notebook.name = ? AND grade_cells.max_score > 0 LIMIT 1",
        (CE,)).fetchall()
    db.execute("UPDATE grade SET manual_score = ? WHERE id = ?", (points - 1, cell_id))
    db.commit()
    db.close()
    nbformat.write(notebook(CE), str(root / "class" / "bob" / f"{CE}.ipynb"))  # bob fixes his sign
    run = _start(root, "class", "--out", "results", *graded["due"])
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr
    assert (f"1 notebook(s) unchanged since the last run in results kept their grades; "
            f"1 changed and graded again: bob/{CE}.") in stdout
    with open(root / "results" / "grades.csv") as f:
        totals = {r["student_id"]: float(r["total"]) for r in csv.DictReader(f)}
    assert totals == {"ada": 3.0, "bob": 4.0} == _gradebook_scores(course / "gradebook.db")
    assert (course / "autograded" / "ada" / "backprop" / f"{CE}.ipynb").read_bytes() == ada_autograded
