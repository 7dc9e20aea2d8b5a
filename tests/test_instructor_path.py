"""The instructor's path, end to end, as an instructor walks it: nbgrader's formgrader in a real
JupyterLab (``backprop-ninja formgrader``, loopback, a token) driven by Debian's Chromium headless,
and the README's commands pasted into that lab's terminal.

1. release the assignment (formgrader: Release);
2. three students fetch and submit through the course's exchange (nbgrader's CLI, each in a
   folder of their own): ada right, bob with the biased variance, cy right but after the due date;
3. collect (nbgrader's CLI: as root every submission is root's, so the owner check is off);
4. ``backprop-ninja autograde submitted --out results`` (a relative ``--out``) with ``--due``;
5. ``backprop-ninja formgrader results``: the assignment released, 3 submissions;
6. Manage Students: each student's score;
7. Manual Grading: bob's batchnorm notebook opened for review, with the judge's reason;
8. Generate Feedback and Release Feedback, then each student's ``nbgrader fetch_feedback``
   gets it back through the exchange they submitted to (without the hidden tests);
9. ``nbgrader export``: nbgrader's own grades.csv.

A screenshot per step: artifacts/browser/instructor-<step>-<what>.png (``failed-instructor.png``
when a step fails).
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nbformat
import pytest
from browser import ARTIFACTS, chromium, chromium_page, kept_if_failed, kill_leftovers, lab_environment
from learner import BN, notebook

from backprop_ninja.grading import course
from backprop_ninja.grading.sandbox import probe

pytestmark = [pytest.mark.browser, pytest.mark.slow]

VENV_BIN = Path(sys.executable).parent
# Each student's nbgrader options, run in their own folder: as root they share one user, so each
# keeps nbgrader's submission cache in their folder, as a user of their own would in their home.
EXCHANGE = "--course backprop-ninja --Exchange.root=$EX --Exchange.cache=$PWD/.cache"
STUDENTS = ("ada", "bob", "cy")
BIASED_BN = {"n / (n - 1) * bnraw": "bnraw"}  # bob: exercise 3 with the biased variance


class Terminal:
    """A JupyterLab terminal (File > New > Terminal) in ``page``: ``run`` pastes a command, as the
    instructor would, waits until it exits, and returns its exit status and what it printed."""

    def __init__(self, page, status: Path):
        self.page, self.status, self.count = page, status, 0
        status.mkdir(exist_ok=True)
        page.locator(".lm-MenuBar-item", has_text="File").first.click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile("^New$")).first.click()
        page.get_by_role("menuitem", name="Terminal", exact=True).click()
        self.xterm = page.locator(".jp-Terminal").last
        self.xterm.wait_for(timeout=60_000)
        self.run(f"export ST={status}", shell=True)  # where each command's status and output go

    def run(self, command: str, timeout: float = 300, shell: bool = False) -> tuple[int, str]:
        """``shell``: a command that changes the shell itself (export, activate), whose output is
        not kept (a pipe would run it in a subshell)."""
        self.count += 1
        done, log = self.status / str(self.count), self.status / f"{self.count}.log"
        self.xterm.click()
        status = f"echo $? > {self.status}/{self.count}" if shell else \
            f"2>&1 | tee $ST/{self.count}.log; echo ${{PIPESTATUS[0]}} > $ST/{self.count}"
        joined = " " if not shell or command.rstrip().endswith("&") else "; "
        # pasted, as a command copied from the README is: typed key by key, headless Chromium
        # repaints the terminal for each one (4-6 CPU-s for a 300-character line, 0.2-0.5 pasted)
        self.page.keyboard.insert_text(f"{command}{joined}{status}")
        self.page.keyboard.press("Enter")
        deadline = time.monotonic() + timeout
        while not (done.is_file() and done.read_text().strip()):
            assert time.monotonic() < deadline, f"{command!r} did not finish in {timeout} s"
            time.sleep(0.2)
        self.page.wait_for_timeout(300)  # the last lines reach the screen
        return int(done.read_text()), log.read_text() if log.is_file() else ""

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(ARTIFACTS / f"instructor-{name}.png"))


def _each(students, command: str) -> str:
    """``command`` for each student at once (``$s`` names them), in ../students; fails if one fails."""
    return (f"(cd ../students && for s in {' '.join(students)}; do ({command}) & p=\"$p $!\"; done; "
            "for j in $p; do wait $j || exit 1; done)")


def _formgrader(page):
    return page.frame_locator("iframe[src*='/formgrader']")


def _open_formgrader(page, url: str):
    """The URL ``backprop-ninja formgrader`` printed: JupyterLab, its Formgrader tab open."""
    from playwright.sync_api import expect

    page.goto(url, timeout=90_000)
    frame = _formgrader(page)
    expect(frame.get_by_role("heading", name="Manage Assignments")).to_be_visible(timeout=90_000)
    return frame


def _click_and_confirm(frame, row, column: str, says: str) -> None:
    """Click the icon in ``row``'s ``column`` (Release, Generate Feedback ...), wait for nbgrader's
    success dialog, close it."""
    from playwright.sync_api import expect

    row.locator(f"td.{column} a").click()
    dialog = frame.locator(".modal-dialog")
    expect(dialog).to_contain_text(says, timeout=300_000)
    dialog.get_by_role("button", name="OK").click()
    expect(dialog).to_have_count(0)


def _url(log: Path, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while not (found := re.search(r"http://127\.0\.0\.1:\d+/lab/workspaces/formgrader\?reset&formgrader=true&token=\w+",
                                  log.read_text() if log.is_file() else "")):
        assert time.monotonic() < deadline, f"no formgrader URL in {log}"
        time.sleep(0.2)
    return found.group(0)


def test_the_instructors_path_release_submit_collect_autograde_review_feedback_export(tmp_path):
    chromium()  # before any slow work: fails under CI, else skips, without Chromium
    if probe() is not None:
        pytest.skip(f"learner code cannot be isolated here: {probe()}")
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)  # the formgrader's tables load after its page, slowly on busy cores
    # The instructor's course: notebook 03 (6 points), generated (nbgrader's CLI).
    home = tmp_path / "course"
    (home / "source" / "backprop").mkdir(parents=True)
    shutil.copy(course.COURSE / "nbgrader_config.py", home)
    shutil.copy(course.source_dir() / f"{BN}.ipynb", home / "source" / "backprop")
    env = lab_environment(tmp_path) | {"SHELL": "/bin/bash", "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    generated = subprocess.run([str(VENV_BIN / "nbgrader"), "generate_assignment", "backprop"],
                               cwd=home, env=env | {"PATH": f"{VENV_BIN}:{env['PATH']}"},
                               capture_output=True, text=True)
    assert generated.returncode == 0, generated.stdout[-2000:]
    log = open(tmp_path / "formgrader.log", "w")  # noqa: SIM115 (closed at the end)
    server = subprocess.Popen([str(VENV_BIN / "backprop-ninja"), "formgrader", str(home)], cwd=tmp_path,
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with chromium_page("instructor", {"width": 1400, "height": 900}) as page:
            # 1. release, in the formgrader the printed URL opens
            frame = _open_formgrader(page, _url(tmp_path / "formgrader.log"))
            row = frame.locator("tr", has=frame.get_by_role("link", name="backprop", exact=True))
            expect(row.locator("td.status")).to_have_text("draft")
            _click_and_confirm(frame, row, "release", "Successfully released 'backprop'")
            expect(row.locator("td.status")).to_have_text("released")
            page.screenshot(path=str(ARTIFACTS / "instructor-1-release.png"))
            assert (home / "exchange" / "backprop-ninja" / "outbound" / "backprop").is_dir()

            # 2. the students fetch, work, and submit; cy after the due date
            term = Terminal(page, tmp_path / "status")
            assert term.run(f". {VENV_BIN}/activate && export EX=$PWD/exchange && mkdir ../students",
                            timeout=30, shell=True)[0] == 0
            fetch = f"mkdir $s && cd $s && nbgrader fetch_assignment backprop {EXCHANGE}"
            code, out = term.run(_each(STUDENTS, fetch))
            assert code == 0, out
            answers = {"ada": notebook(BN), "bob": notebook(BN, replace=BIASED_BN), "cy": notebook(BN)}
            for student, nb in answers.items():
                fetched = tmp_path / "students" / student / "backprop" / f"{BN}.ipynb"
                assert "YOUR CODE HERE" in fetched.read_text()  # the released stub, then the answer
                nbformat.write(nb, str(fetched))

            submit = f"cd $s && nbgrader submit backprop --student=$s {EXCHANGE}"
            code, out = term.run(_each(("ada", "bob"), submit))
            assert code == 0, out
            # due: the whole second (what --due takes) after ada's and bob's submissions, and cy's
            # after it. "Now" cut down to its second could fall before theirs, by milliseconds.
            due_at = (datetime.now(UTC) + timedelta(seconds=1)).replace(tzinfo=None, microsecond=0)
            time.sleep((due_at - datetime.now(UTC).replace(tzinfo=None)).total_seconds() + 0.1)
            due = due_at.isoformat(timespec="seconds")
            code, out = term.run(_each(("cy",), submit))
            assert code == 0, out
            term.shot("2-submit")

            # 3. collect (as root, every submission is root's: the owner check is off)
            code, out = term.run("nbgrader collect backprop --ExchangeCollect.check_owner=False")
            assert code == 0, out
            assert sorted(p.name for p in (home / "submitted").iterdir()) == list(STUDENTS)
            page.get_by_role("tab", name="Formgrader").click()
            frame.get_by_role("link", name="Manage Assignments").click()
            expect(row.locator("td.num-submissions")).to_have_text("3")
            page.screenshot(path=str(ARTIFACTS / "instructor-3-collect.png"))

            # 4. autograde, with a relative --out
            page.get_by_role("tab", name="Terminal 1", exact=True).click()
            code, out = term.run(f"backprop-ninja autograde submitted --jobs 2 --out results --due {due}",
                                 timeout=900)
            assert code == 0, out
            assert "3 students graded (sandbox on); 0 flagged for review, 1 late:" in out
            with open(home / "results" / "grades.csv") as f:
                rows = list(csv.DictReader(f))
            assert {r["student_id"]: (r["total"], bool(r["late"])) for r in rows} == \
                {"ada": ("6", False), "bob": ("0", False), "cy": ("6", True)}
            max_score = rows[0]["max_score"]  # the course's four notebooks: 01, 02 and 04 not handed in
            term.shot("4-autograde")

            # 5. the formgrader on what autograde wrote
            term.run("(backprop-ninja formgrader results 2>$ST/results-lab.log | tee $ST/results.url) &",
                     timeout=10, shell=True)
            results = page.context.browser.new_page(viewport={"width": 1400, "height": 900})
            with kept_if_failed(results, "instructor-results"):
                graded = _open_formgrader(results, _url(tmp_path / "status" / "results.url"))
                graded_row = graded.locator("tr", has=graded.get_by_role("link", name="backprop", exact=True))
                expect(graded_row.locator("td.status")).to_have_text("released")
                expect(graded_row.locator("td.num-submissions")).to_have_text("3")
                results.screenshot(path=str(ARTIFACTS / "instructor-5-formgrader.png"))

                # 6. each student's score
                graded.get_by_role("link", name="Manage Students").click()
                for student, score in {"ada": "6", "bob": "0", "cy": "6"}.items():
                    expect(graded.locator(f"tr:has(td.id[data-order='{student}']) td.score")).to_have_text(
                        f"{score} / {max_score}")
                results.screenshot(path=str(ARTIFACTS / "instructor-6-students.png"))

                # 7. bob's batchnorm notebook, opened for review
                graded.get_by_role("link", name="Manual Grading").click()
                graded.get_by_role("link", name="backprop", exact=True).click()
                graded.get_by_role("link", name=BN, exact=True).click()
                graded.locator("tr", has_text="bob").get_by_role("link").first.click()
                verdict = graded.get_by_text(re.compile("dhprebn is wrong")).first
                expect(verdict).to_be_visible(timeout=60_000)
                verdict.scroll_into_view_if_needed()
                results.screenshot(path=str(ARTIFACTS / "instructor-7-review.png"))

                # 8. feedback: generated, released, and fetched by each student
                graded.get_by_role("link", name="Manual Grading").click()  # the review page's breadcrumb
                graded.get_by_role("link", name="Manage Assignments").click()
                _click_and_confirm(graded, graded_row, "generate-feedback", "Successfully generated feedback")
                _click_and_confirm(graded, graded_row, "release-feedback", "Successfully released feedback")
            fetch = f"cd $s && nbgrader fetch_feedback backprop --student=$s {EXCHANGE}"
            code, out = term.run(_each(STUDENTS, fetch))
            assert code == 0, out
            fetched = {s: sorted((tmp_path / "students" / s / "backprop" / "feedback").rglob("*.html"))
                       for s in STUDENTS}
            assert {s: sorted(p.name for p in f) for s, f in fetched.items()} == \
                {s: [f"{BN}.html"] for s in STUDENTS}
            bob = fetched["bob"][0]
            assert "hand_in(" not in bob.read_text() and "HIDDEN TESTS" not in bob.read_text()
            feedback = page.context.browser.new_page(viewport={"width": 1000, "height": 900})
            with kept_if_failed(feedback, "instructor-feedback"):
                feedback.goto(bob.as_uri())
                expect(feedback.get_by_text(re.compile("dhprebn is wrong")).first).to_be_visible()
                feedback.screenshot(path=str(ARTIFACTS / "instructor-8-feedback.png"))

            # 9. nbgrader's own export
            page.bring_to_front()
            code, out = term.run("(cd results/course && nbgrader export)")
            assert code == 0, out
            with open(home / "results" / "course" / "grades.csv") as f:
                exported = {r["student_id"]: r for r in csv.DictReader(f)}
            assert {s: float(r["raw_score"]) for s, r in exported.items()} == {"ada": 6, "bob": 0, "cy": 6}
            assert [s for s, r in exported.items() if float(r["late_submission_penalty"] or 0) == 0] \
                == list(STUDENTS)  # the course takes nothing off late work
            term.shot("9-export")
    finally:
        expect.set_options(timeout=5_000)  # Playwright's default, for the tests after this one
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        kill_leftovers(str(tmp_path))
        log.close()
