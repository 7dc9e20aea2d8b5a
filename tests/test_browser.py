"""What a learner sees, proven in a real browser: the learner's JupyterLab (`make lab` on a
scratch folder, loopback, a token) driven by Debian's Chromium headless (Playwright), on
exercise 1's solution with one planted mistake.

- the report widget: coloured rows that are never cut off, its verdict once, the grader's count;
- the HTML feedback of ``backprop-ninja grade``: the verdict at the top, long lines wrapped;
- ``grade_me()`` at the end of the notebook: Run All saves, grades and shows the score inline,
  in a lab without nbgrader's instructor tools or Validate button.

Screenshots (looked at, and checked by the assertions) go to artifacts/browser/."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import urllib.request
import warnings
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from browser import (
    ARTIFACTS,
    chromium,
    chromium_page,
    free_port,
    kept_if_failed,
    kill_leftovers,
    lab_environment,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "01_stepwise_backprop.ipynb"
# The planted mistake: a flipped sign in dh. dW2, db2 and everything before stay right; every
# gradient after dh follows correctly from the wrong dh ("inherited"), so the report counts 11/26
# and the grader, judging line by line, gives 25/26.
RIGHT_LINE, PLANTED_LINE = "    dh = dlogits @ W2.T\n", "    dh = -(dlogits @ W2.T)\n"
REPORT_CELL = """\
from backprop_ninja.widgets import show_report
tensors, ref = model.autograd_reference(params, Xb, Yb)
report = show_report(grads, tensors, ref)"""
# A second report whose dcounts lacks the branch through counts_sum: its row's text is long.
BRANCH_CELL = """\
from backprop_ninja.check import branches
report_branch = show_report(dict(ref, counts=branches(tensors, ref)["counts"]["probs"]), tensors, ref)"""
GRADE_ME_CELL = "from backprop_ninja.selfgrade import grade_me\ngrade_me()"
FALLBACK_CELLS = [
    "import torch\nfrom backprop_ninja import model\nfrom backprop_ninja.widgets import show_report",
    """\
params = model.init_params(model.Config(n_hidden=64))
g = torch.Generator().manual_seed(42)
Xb, Yb = torch.randint(0, 27, (32, 3), generator=g), torch.randint(0, 27, (32,), generator=g)
tensors, ref = model.autograd_reference(params, Xb, Yb)
# every gradient right (autograd's own), except dh: a flipped sign
grads = dict(ref, h=-ref["h"])""",
    "report = show_report(grads, tensors, ref)",
]


def _planted_solution() -> nbformat.NotebookNode | None:
    """Exercise 1's solution with the planted mistake and no outputs, or None if it can't be."""
    if not SOLUTION.exists():
        return None
    nb = nbformat.read(SOLUTION, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and RIGHT_LINE in c.source + "\n"]
    if len(cells) != 1:
        return None
    cells[0].source = (cells[0].source + "\n").replace(RIGHT_LINE, PLANTED_LINE).rstrip("\n")
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    return nb


def _planted_notebook(folder: Path) -> tuple[Path, bool]:
    """(notebook path, from_solution) for the report test: the solution with the planted mistake
    when possible, else a small notebook that plants the same mistake into autograd's gradients.
    Both end with a second report (a missing branch); neither grades itself."""
    nb = _planted_solution()
    from_solution = nb is not None
    if nb is None:
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in FALLBACK_CELLS])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [c for c in nb.cells if not (c.cell_type == "code" and "grade_me(" in c.source)]
    if not any("show_report(" in c.source for c in nb.cells if c.cell_type == "code"):
        nb.cells.append(nbformat.v4.new_code_cell(REPORT_CELL))
    nb.cells.append(nbformat.v4.new_code_cell(BRANCH_CELL))
    path = folder / ("01_stepwise_backprop_planted.ipynb" if from_solution else "planted.ipynb")
    nbformat.write(nb, path)
    return path, from_solution


def _kernel_environments(marker: str) -> list[dict[str, str]]:
    """The environment of every kernel whose command line names ``marker`` (its runtime dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            if proc.name.isdigit() and "ipykernel" in cmdline and marker in cmdline:
                raw = (proc / "environ").read_bytes().decode(errors="replace")
                found.append(dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The learner's lab, shared by this module's tests: `make lab` serving a scratch work folder
    on 127.0.0.1 with a token; always stopped, with its kernels and graders, afterwards."""
    tmp_path = tmp_path_factory.mktemp("lab")
    port, token = free_port(), secrets.token_hex(16)
    env = lab_environment(tmp_path)
    runtime = Path(env["JUPYTER_RUNTIME_DIR"])
    work = tmp_path / "work"
    work.mkdir()
    args = " ".join([
        "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}", "--LabApp.news_url=",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"])
    log = open(tmp_path / "lab.log", "w")
    server = subprocess.Popen(["make", "-C", str(ROOT), "lab", f"LAB_ROOT={work}", f"LAB_ARGS={args}"],
                              cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield SimpleNamespace(work=work, base=base, token=token, runtime=runtime)
    finally:
        try:
            req = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(req, timeout=5)
            server.wait(timeout=15)
        except Exception:  # noqa: BLE001 - whatever happened, the process group goes next
            pass
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)
        kill_leftovers(str(tmp_path))
        log.close()


def _open_and_run_all(page, base: str, token: str, notebook: Path) -> None:
    chromium()  # before any slow work: fails under CI, else skips, without Chromium
    from playwright.sync_api import expect

    # a workspace of its own: the lab is shared, and its default workspace reopens earlier notebooks
    page.goto(f"{base}/lab/workspaces/{notebook.stem}/tree/{notebook.name}?reset&token={token}",
              timeout=60_000)
    page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=60_000)
    # wait until the kernel is up, then Run > Run All Cells
    expect(page.locator(".jp-StatusBar-Widget", has_text="| Idle").first).to_be_visible(timeout=90_000)
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    # the cells are running: the first code cell's prompt shows [*] or its count
    expect(page.locator(".jp-CodeCell .jp-InputPrompt").first).to_have_text(
        re.compile(r"\[(\*|\d+)\]:"), timeout=60_000)


def _clipped(locator) -> list[str]:
    """The elements under ``locator`` whose text is cut off: content wider or taller than their
    box with the overflow hidden (each as tag, text and sizes, for the failure message). A button's
    one centred line is judged by its width only (its line box is taller than the button)."""
    return locator.evaluate("""root => [...root.querySelectorAll('*')].filter(e => {
        const s = getComputedStyle(e);
        const hidden = v => v === 'hidden' || v === 'clip';
        return e.innerText && e.innerText.trim()
            && ((hidden(s.overflowX) && e.scrollWidth > e.clientWidth + 1)
                || (e.tagName !== 'BUTTON' && hidden(s.overflowY) && e.scrollHeight > e.clientHeight + 1));
    }).map(e => `${e.tagName}.${e.className}: ${e.innerText.slice(0, 60)} `
                + `(${e.scrollWidth}x${e.scrollHeight} in ${e.clientWidth}x${e.clientHeight})`)""")


def _images_painted(locator) -> None:
    """Wait until every image under ``locator`` has loaded and decoded (no fixed sleep)."""
    locator.page.wait_for_function(
        "root => [...root.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)",
        arg=locator.element_handle(), timeout=30_000)
    locator.evaluate("root => Promise.all([...root.querySelectorAll('img')].map(i => i.decode()))")


def test_report_widget_renders_in_jupyterlab(lab, tmp_path):
    chromium()  # before any slow work: fails under CI, else skips, without Chromium
    from playwright.sync_api import expect

    notebook, from_solution = _planted_notebook(lab.work)
    with chromium_page("report", {"width": 1500, "height": 1300}) as page:
        _open_and_run_all(page, lab.base, lab.token, notebook)

        reports = page.locator(".backprop-ninja-report")
        expect(reports).to_have_count(2, timeout=120_000)
        report = reports.first
        rows = report.locator(".backprop-ninja-row")
        expect(rows).to_have_count(26, timeout=30_000)
        names = [rows.nth(i).locator("button").inner_text().strip() for i in range(26)]
        statuses = {name: rows.nth(i).locator(".widget-html").inner_text().split()[0]
                    for i, name in enumerate(names)}
        assert statuses["h"] == "wrong"
        for name in ("logprobs", "probs", "counts", "logits", "W2", "b2"):
            assert statuses[name] in ("exact", "close"), (name, statuses)
        after = ("hpreact", "bngain", "bnraw", "bndiff", "hprebn", "W1", "C")
        expected_after = {"inherited"} if from_solution else {"exact", "close"}
        for name in after:
            assert statuses[name] in expected_after, (name, statuses)
        # the verdict, once, with what the grader would give: inherited rows keep their point
        report_cells = page.locator(".jp-CodeCell").filter(has=page.locator(".backprop-ninja-report"))
        cell = report_cells.first
        verdict = cell.locator(".backprop-ninja-verdict")
        expect(verdict).to_have_count(1)
        n_ok = 11 if from_solution else 25
        expect(verdict).to_contain_text(f"{n_ok}/26 gradients correct here; the grader, judging line by "
                                        "line, would give 25/26.")
        expect(verdict).to_contain_text("Fix dh first: dh has the opposite sign")
        if from_solution:
            expect(verdict).to_contain_text("The 14 inherited (amber) ones are wrong only because")
        assert cell.locator(".jp-Cell-outputArea").inner_text().count("gradients correct") == 1
        assert cell.locator("[data-mime-type='application/vnd.jupyter.stdout']").count() == 0
        assert cell.locator(".jp-Cell-outputArea").inner_text().count("opposite sign") == 1  # the hint too
        # inherited is amber, every row's text whole
        amber = rows.nth(names.index("hpreact")).locator("button")
        if from_solution:
            assert amber.evaluate("b => getComputedStyle(b).backgroundColor") == "rgb(255, 179, 0)"
            expect(rows.nth(names.index("hpreact"))).to_contain_text("inherited")
            expect(rows.nth(names.index("hpreact"))).to_contain_text("from dh")
        assert _clipped(verdict) == [] and _clipped(report) == []
        # the first wrong row's heatmaps are shown straight away ...
        caption = report.locator(".backprop-ninja-caption")
        expect(caption).to_contain_text("dh", timeout=30_000)
        expect(report.locator("img").first).to_be_visible(timeout=30_000)
        # ... and clicking another row round-trips through the kernel to show its own
        rows.nth(names.index("W2")).locator("button").click()
        expect(caption).to_contain_text("dW2", timeout=30_000)
        rows.nth(names.index("h")).locator("button").click()
        expect(caption).to_contain_text("sign flipped", timeout=30_000)
        # no cell raised
        assert page.locator("[data-mime-type='application/vnd.jupyter.error']").count() == 0
        report.scroll_into_view_if_needed()
        _images_painted(report)
        # the verdict and the widget (not the graph under them), the window's top at the verdict
        verdict.evaluate("e => e.scrollIntoView({block: 'start'})")
        top, bottom = verdict.bounding_box(), report.bounding_box()
        page.screenshot(path=str(ARTIFACTS / "report.png"), clip={
            "x": bottom["x"], "y": top["y"], "width": bottom["width"],
            "height": bottom["y"] + bottom["height"] - top["y"]})
        if "graph_figure(" in notebook.read_text():  # exercise 1 draws the graph
            graph = cell.locator(".jp-RenderedImage img").last
            expect(graph).to_be_visible(timeout=30_000)
            graph.scroll_into_view_if_needed()
            assert graph.evaluate("img => img.naturalWidth") > 600
            graph.screenshot(path=str(ARTIFACTS / "graph.png"))

        # A long reason wraps under its row instead of losing its end, even in a narrow window.
        page.set_viewport_size({"width": 900, "height": 1000})
        branch = reports.nth(1)
        branch_rows = branch.locator(".backprop-ninja-row")
        counts = branch_rows.filter(has=page.get_by_role("button", name="counts", exact=True))
        expect(counts).to_contain_text("missing branch through counts_sum", timeout=30_000)
        label = counts.locator(".widget-html")
        assert label.evaluate("e => e.getBoundingClientRect().right") <= \
            branch.evaluate("e => e.getBoundingClientRect().right") + 1
        assert _clipped(branch) == []
        branch_cell = report_cells.nth(1)
        top = branch_cell.locator(".backprop-ninja-verdict")
        expect(top).to_contain_text("Fix dcounts first:")
        # the verdict and the rows down to dcounts, the window's top at the verdict
        top.evaluate("e => e.scrollIntoView({block: 'start'})")
        first, last = top.bounding_box(), branch_rows.nth(7).bounding_box()
        page.screenshot(path=str(ARTIFACTS / "report-narrow.png"), clip={
            "x": first["x"], "y": first["y"], "width": first["width"],
            "height": last["y"] + last["height"] - first["y"]})
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
    shutil.copy(notebook, ARTIFACTS / notebook.name)


@pytest.fixture(scope="module")
def graded_in_lab(lab):
    """Exercise 1's solution with the planted mistake, as 01_stepwise_backprop.ipynb in the learner's
    lab: Run All, until grade_me() (its last cell) shows the result. The page stays open for the
    tests below; the grading it did made the feedback page the next test opens."""
    chromium()  # before any slow work: fails under CI, else skips, without Chromium
    from playwright.sync_api import expect

    nb = _planted_solution()
    if nb is None:
        pytest.skip(f"{SOLUTION} has no line {RIGHT_LINE.strip()!r} to plant the mistake in")
    if not any(c.cell_type == "code" and "grade_me()" in c.source for c in nb.cells[-2:]):
        nb.cells.append(nbformat.v4.new_code_cell(GRADE_ME_CELL))  # solutions not rebuilt yet
    notebook = lab.work / "01_stepwise_backprop.ipynb"  # a course notebook's own name: grade accepts it
    nbformat.write(nb, notebook)
    written = notebook.stat().st_mtime_ns
    with chromium_page("grade_me", {"width": 1400, "height": 1000}) as page:
        _open_and_run_all(page, lab.base, lab.token, notebook)
        result = page.locator(".bn-grade-me-result")
        expect(result).to_be_visible(timeout=600_000)  # the whole notebook, then the grading
        yield SimpleNamespace(page=page, result=result, notebook=notebook, written=written)


def test_grade_me_grades_the_notebook_in_the_learners_lab(lab, graded_in_lab):
    from playwright.sync_api import expect

    page, result, notebook = graded_in_lab.page, graded_in_lab.result, graded_in_lab.notebook
    with kept_if_failed(page, "grade_me"):
        # a learner's lab: no instructor tools, no Validate button
        expect(page.locator(".lm-MenuBar-item", has_text="Run").first).to_be_visible()
        assert page.locator(".lm-MenuBar-item", has_text="Nbgrader").count() == 0
        assert page.locator(".lm-MenuBar-item", has_text="Formgrader").count() == 0
        assert page.get_by_role("button", name=re.compile("^Validate$")).count() == 0
        assert page.get_by_text("Create Assignment").count() == 0

        expect(result.locator(".bn-grade-me-score")).to_contain_text(
            "01_stepwise_backprop.ipynb: 25/26 with the hidden tests.")
        expect(result).to_contain_text("First thing to fix: test_backward_stepwise: dh is wrong")
        expect(result).to_contain_text(re.compile(r"Sandbox: (on|off)"))
        assert page.locator("[data-mime-type='application/vnd.jupyter.error']").count() == 0
        # grade_me() found its notebook as JupyterLab told the kernel: JPY_SESSION_NAME, absolute
        sessions = [env["JPY_SESSION_NAME"] for env in _kernel_environments(str(lab.runtime))]
        assert sessions.count(str(notebook)) == 1, sessions
        # saved by the frontend before grading: the file on disk holds this session's outputs
        assert notebook.stat().st_mtime_ns != graded_in_lab.written
        saved = nbformat.read(notebook, as_version=4)
        assert any(c.get("execution_count") for c in saved.cells if c.cell_type == "code")
        assert (lab.work / "grade-feedback" / "01_stepwise_backprop.html").is_file()
        # the feedback, inline, in a frame that wraps its long lines
        frame = page.frame_locator(".bn-grade-me-feedback iframe")
        summary = frame.locator(".bn-feedback-summary")
        verdict = summary if summary.count() else frame.get_by_text(re.compile("dh is wrong")).first
        expect(verdict).to_contain_text("dh is wrong", timeout=30_000)
        box = result.bounding_box()
        assert box["x"] + box["width"] <= 1400 and _clipped(result) == []
        result.scroll_into_view_if_needed()
        result.screenshot(path=str(ARTIFACTS / "grade_me.png"))
    assert (ARTIFACTS / "grade_me.png").stat().st_size > 10_000


def test_feedback_html_opens_with_the_verdict_and_wraps_long_lines(lab, graded_in_lab):
    from playwright.sync_api import expect

    feedback = lab.work / "grade-feedback" / "01_stepwise_backprop.html"  # grade_me's grading made it
    assert feedback.is_file()
    # a second tab of the same browser (Playwright's sync API runs one browser at a time)
    page = graded_in_lab.page.context.browser.new_page(viewport={"width": 1000, "height": 900})
    with kept_if_failed(page, "feedback"):
        page.goto(feedback.as_uri(), timeout=60_000)
        summary = page.locator(".bn-feedback-summary")
        if summary.count():  # the summary the feedback opens with: in the first screenful
            expect(summary).to_be_visible()
            expect(summary).to_contain_text("Score")
            expect(summary).to_contain_text("25 / 26")
            expect(summary).to_contain_text("dh is wrong")
            assert summary.evaluate("e => e.getBoundingClientRect().bottom") <= 900
            verdict = summary
        else:
            verdict = page.get_by_text(re.compile(r"dh is wrong")).first
            verdict.scroll_into_view_if_needed()
        expect(verdict).to_be_visible()
        # the report cell's verdict is in the feedback too (a widget does not render there)
        expect(page.locator(".backprop-ninja-verdict").first).to_contain_text(
            "11/26 gradients correct here; the grader, judging line by line, would give 25/26.")
        # Long lines wrap: no text reaches past the right edge of the window.
        too_wide = page.evaluate("""() => [...document.querySelectorAll('body *')]
            .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
            .map(e => [e.tagName, (e.innerText || '').trim().slice(0, 60)])""")
        text_too_wide = [(tag, t) for tag, t in too_wide if tag != "IMG" and t]
        assert text_too_wide == [], text_too_wide
        if too_wide:  # the graph is an image wider than the window: reported, not a text line
            warnings.warn(f"feedback page overflows horizontally by images: {too_wide[:3]}", stacklevel=1)
        # ... and no reason (an output or the summary) hides its end in a scrolled box; code
        # cells may scroll sideways, as code does.
        hidden = page.evaluate("""() => [...document.querySelectorAll('pre')]
            .filter(e => !e.closest('.input_area, .highlight') && e.scrollWidth > e.clientWidth + 1)
            .map(e => e.innerText.slice(0, 80))""")
        assert hidden == [], hidden
        page.screenshot(path=str(ARTIFACTS / "feedback.png"))
    assert (ARTIFACTS / "feedback.png").stat().st_size > 10_000
