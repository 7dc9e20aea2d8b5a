"""The course's nbgrader steps: preprocessors that ``harden_nbgrader`` puts into nbgrader's
own pipelines, so ``backprop-ninja grade``/``autograde`` and a plain ``nbgrader autograde``
on grader/ grade the same way.

autograde, sanitize:  ... OverwriteCells -> RestoreCells ...
autograde:            Execute -> SandboxedExecute, then JudgeVerdicts, then nbgrader's
                      LimitOutput, SaveAutoGrades ... (which read the verdicts JudgeVerdicts wrote)
generate_feedback:    GetGrades, HideHiddenTests, CSSHTMLHeaderPreprocessor, FeedbackSummary
                      (HTML sanitized: outputs by nbconvert, markdown by ``feedback_markdown``)

- ``RestoreCells``: edited or deleted test and read-only cells come back from the source.
- ``SandboxedExecute``: each notebook's kernel in its own sandbox (``sandbox.Box``); just
  before a hidden test cell runs, the judge stages that test's inputs, and right after
  it collects what came back; output kept is bounded in bytes; a kernel that dies or
  ignores its time limit fails the cells after it, not the whole notebook.
- ``JudgeVerdicts``: every test cell's outputs become the judge's verdict (its text, and
  the points as nbgrader's partial credit), whatever the kernel printed; learner cells
  that break the source rules zero every test after them.
- ``HideHiddenTests``: feedback shows each test's verdict, never its hidden source.
- ``FeedbackSummary``: feedback opens with the score, the first thing to fix and every verdict.
"""

from __future__ import annotations

import html
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbformat import read as _read
from nbformat.notebooknode import NotebookNode, from_dict
from nbgrader import utils
from nbgrader.api import Gradebook
from nbgrader.preprocessors import ClearHiddenTests, Execute, NbGraderPreprocessor, OverwriteCells
from traitlets import Bool, Integer, Unicode, default

from backprop_ninja.grading import rules
from backprop_ninja.grading.sandbox import Box, Limits, probe

META = "backprop_ninja"              # notebook metadata: what the grader found (flags, sandbox, seed)
MAX_MESSAGE_BYTES = 16 << 20         # a larger kernel message is dropped by ZeroMQ, not buffered


def _error(ename: str, evalue: str) -> NotebookNode:
    return NotebookNode(output_type="error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"])


def read_notebook(path: Path):
    return _read(str(path), as_version=4)


def _grade_id(cell) -> str | None:
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def is_test(cell) -> bool:
    return cell.cell_type == "code" and utils.is_grade(cell) and not utils.is_solution(cell)


@dataclass
class Released:
    """The notebook as nbgrader saved it when it released it (answer cells as released, hidden
    tests included), cell by grade id: what RestoreCells restores and what the rules trust."""

    sources: dict[str, str]
    points: dict[str, float]     # graded cells
    answers: set[str]            # solution cells
    locked: dict[str, bool]
    tasks: set[str]


def released(resources) -> Released:
    nbgrader = resources["nbgrader"]
    with Gradebook(nbgrader["db_url"]) as gb:
        nb = gb.find_notebook(nbgrader["notebook"], nbgrader["assignment"])
        return Released(sources={c.name: c.source for c in nb.source_cells},
                        points={c.name: c.max_score for c in nb.grade_cells},
                        answers={c.name for c in nb.solution_cells},
                        locked={c.name: c.locked for c in nb.source_cells},
                        tasks={c.name for c in nb.task_cells})


# --------------------------------------------------------------------------- sanitize


class RestoreCells(OverwriteCells):
    """nbgrader's OverwriteCells, hardened against a learner who edited or deleted cells.

    A cell carrying a source cell's id first gets that cell's nbgrader flags back
    (grade/solution/locked/points: otherwise an unlocked or un-graded test cell fails
    nbgrader's checksum check and the whole notebook with it); then nbgrader restores
    its source. Every missing graded *or read-only* cell (the set-up cell, the forward
    pass ...) is put back after the nearest source cell still present (nbgrader's own
    placement assumes that neighbour is a graded or answer cell and crashes otherwise).
    """

    source_dir = Unicode("", help="the assignment's source notebooks (for cell order)").tag(config=True)

    def preprocess(self, nb, resources):
        course = released(resources)
        self._grades = course.points
        self._flags = {name: {"grade": name in course.points, "solution": name in course.answers,
                              "locked": course.locked[name], "task": name in course.tasks,
                              **({"points": course.points[name]} if name in course.points else {})}
                       for name in course.sources}
        path = (Path(self.source_dir or Path("source", resources["nbgrader"]["assignment"]))
                / f"{resources['nbgrader']['notebook']}.ipynb")
        order = [_grade_id(c) for c in read_notebook(path).cells] if path.exists() else list(course.sources)
        self._order = [name for name in order if name in course.sources]
        return super().preprocess(nb, resources)

    def preprocess_cell(self, cell, resources, index):
        grade_id = _grade_id(cell)
        if grade_id in self._flags:
            flags = self._flags[grade_id]
            cell.metadata.nbgrader.update(flags)
            if "points" not in flags:
                cell.metadata.nbgrader.pop("points", None)
        return super().preprocess_cell(cell, resources, index)

    def add_missing_grade_cells(self, nb, resources):
        answers = {name for name, flags in self._flags.items() if flags["solution"]}
        for name in self._order:
            present = {_grade_id(c): i for i, c in enumerate(nb.cells) if _grade_id(c)}
            if name in present or not (name in self._grades or self._flags[name]["locked"]):
                continue
            self.log.warning("Missing cell %s: adding it back", name)
            before = self._order[: self._order.index(name)]
            where = next((present[p] + 1 for p in reversed(before) if p in present), 0)
            source = self.gradebook.find_source_cell(name, self.notebook_id, self.assignment_id)
            added = from_dict(self.missing_cell_transform(source, self._grades.get(name, 0),
                                                          is_solution=name in answers))
            if name not in self._grades:  # a read-only cell: not graded, still locked
                added.metadata.nbgrader.update(self._flags[name])
                added.metadata.nbgrader.pop("points", None)
            nb.cells.insert(where, added)
        return nb, resources


# --------------------------------------------------------------------------- execute


class BoxedKernelManager(AsyncKernelManager):
    """A kernel manager whose kernel starts in ``box`` (no kernelspec on disk: the box's
    launcher is the command). Interrupts go by message: a signal would reach the sandbox's
    init, not the kernel."""

    box: Box | None = None

    @property
    def kernel_spec(self):
        return KernelSpec(argv=self.box.kernel_argv(), display_name="Backprop Ninja (grading sandbox)",
                          language="python", interrupt_mode="message", env={})


class SandboxedExecute(Execute):
    """nbgrader's Execute with each notebook's kernel in a sandbox and the judge's hooks.

    - A kernel that dies (``os._exit``, a crash, a limit) or ignores the interrupt sent at a
      cell's time limit fails that cell and every cell after it, instead of the whole
      notebook: earlier tests keep their verdict, later ones score zero.
    - Only ``output_bytes`` of a cell's output and ``notebook_output_bytes`` of the whole
      notebook's are kept (a note says what was dropped), and no message over
      MAX_MESSAGE_BYTES is ever buffered.
    """

    isolate = Bool(True, help="run each kernel in the sandbox (False: resource limits only)").tag(config=True)
    memory = Integer(Limits.memory, help="bytes of address space per kernel process").tag(config=True)
    processes = Integer(Limits.processes, help="processes+threads of the kernel (root only)").tag(config=True)
    file_bytes = Integer(Limits.file_bytes, help="largest file a kernel may write").tag(config=True)
    home_bytes = Integer(Limits.home_bytes, help="size of the kernel's home and /tmp").tag(config=True)
    output_bytes = Integer(Limits.output_bytes, help="output kept per cell").tag(config=True)
    notebook_output_bytes = Integer(Limits.notebook_output_bytes,
                                    help="output kept per notebook").tag(config=True)
    scratch = Unicode("", help="where kernels' boxes are made (default: the temp dir)").tag(config=True)

    @default("shutdown_kernel")
    def _shutdown_now(self):
        return "immediate"  # a graded kernel has nothing to save: the sandbox just goes (saves ~1.4 s)

    def _limits(self) -> Limits:
        return Limits(cell_timeout=self.timeout or Limits.cell_timeout, memory=self.memory,
                      processes=self.processes, file_bytes=self.file_bytes, home_bytes=self.home_bytes,
                      output_bytes=self.output_bytes, notebook_output_bytes=self.notebook_output_bytes)

    def preprocess(self, nb, resources=None, km=None):
        env = {k: v for k, v in os.environ.items() if k.startswith("NBGRADER_")}
        # a short name: the kernel's socket paths lie below it (sandbox.SOCKET_PATH_MAX)
        with tempfile.TemporaryDirectory(prefix="kernel-", dir=self.scratch or None) as tmp:
            self._box = Box(Path(tmp), self._limits(), self.isolate, env)
            # judge (and torch, ~2.7 s of CPU) is imported here, when a notebook is executed, not when
            # this module is: every nbgrader command loads it through nbgrader_config.py, and most
            # (release, collect, export, the formgrader) never execute one.
            from backprop_ninja.grading import judge

            self._session = judge.Session(self._box)
            self._stopped, self._kept, self._cut = None, {}, set()  # bytes kept by cell index
            resources.setdefault(META, {}).update(
                session=self._session,
                sandbox="on" if self._box.isolate else f"off: {probe() or 'not asked for'}")
            try:
                return super().preprocess(nb, resources, km)
            finally:
                self._box.close()

    def create_kernel_manager(self):
        self.km = BoxedKernelManager(config=self.config, transport="ipc",
                                     ip=self._box.socket_base(),
                                     connection_file=str(self._box.root / "connection.json"))
        self.km.box = self._box
        self.km.context.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        return self.km

    async def async_start_new_kernel_client(self):
        kc = await super().async_start_new_kernel_client()
        self._box.lock()  # its sockets exist: from now on it cannot add files there
        return kc

    # nbclient's setup_kernel calls this synchronous alias, which NotebookClient bound to its own
    # coroutine when the class was made: without it, the override above (the lock) never runs.
    start_new_kernel_client = run_sync(async_start_new_kernel_client)

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type != "code":
            return super().preprocess_cell(cell, resources, index)
        if self._stopped is not None:
            cell.outputs = [_error("NotRun", f"not run: {self._stopped}")]
            return cell, resources
        test = _grade_id(cell) if is_test(cell) and self._session.judges(_grade_id(cell)) else None
        if test:
            self._session.stage(test)
        try:
            cell, resources = super().preprocess_cell(cell, resources, index)
        except DeadKernelError:
            self._stopped = f"the kernel died in cell {index}."
            cell.outputs.append(_error(
                "KernelDied", "the kernel died while running this cell (it called os._exit, crashed, or "
                "ran out of its memory, process or CPU limit); nothing after it ran."))
        except CellTimeoutError:
            self._stopped = f"cell {index} could not be stopped at its time limit."
            cell.outputs.append(_error(
                "CellTimeoutError", f"this cell ran longer than its {self.timeout} s limit and ignored the "
                "interrupt; nothing after it ran."))
        if test:
            self._session.collect(test)
        return cell, resources

    def output(self, outs, msg, display_id, cell_index):
        size = _size(msg.get("content", {}))
        kept = self._kept.get(cell_index, 0)
        if kept + size > self.output_bytes or sum(self._kept.values()) + size > self.notebook_output_bytes:
            if cell_index not in self._cut:
                self._cut.add(cell_index)
                outs.append(NotebookNode(output_type="stream", name="stdout", text=(
                    f"\n[output cut: a cell keeps {self.output_bytes >> 10} KB, a notebook "
                    f"{self.notebook_output_bytes >> 10} KB]\n")))
            return None
        self._kept[cell_index] = kept + size
        return super().output(outs, msg, display_id, cell_index)


def _size(content) -> int:
    """Bytes of text and data in an output (or a message's content)."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, dict):
        return sum(_size(v) for v in content.values())
    if isinstance(content, list):
        return sum(_size(v) for v in content)
    return 8


# --------------------------------------------------------------------------- judge


def learner_findings(nb, sources: dict[str, str]) -> list[tuple[int, rules.Finding]]:
    """(cell index, finding) for every learner-written code cell: answer cells and cells the
    learner added (the course's read-only cells were restored from the source already)."""
    course = list(sources.values())
    names = rules.course_names_from(course)
    found = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if _grade_id(cell) in sources and not utils.is_solution(cell):
            continue  # the course's own cell
        found += [(index, f) for f in rules.check_cell(cell.source, names, set(names.values()))]
    return found


def _flag_text(found: list[tuple[int, rules.Finding]]) -> list[str]:
    lines = ["Score 0: code in this notebook breaks the exercise's rules (an instructor may review it):"]
    for index, f in found[:8]:
        lines.append(f"  cell {index}, line {f.line}: {f.what} ({f.rule}): {f.snippet}")
    lines += [f"  {rules.RULES[rule]}" for rule in dict.fromkeys(f.rule for _, f in found)]
    return lines


class JudgeVerdicts(NbGraderPreprocessor):
    """After execution: each test cell's outputs are replaced by the judge's verdict, its text
    on stdout and its points as the cell's result (nbgrader's partial credit), so the
    gradebook, the feedback, the formgrader and ``nbgrader export`` all see the judge's score.
    A learner cell that breaks the source rules zeroes every test after it."""

    def preprocess(self, nb, resources):
        found = learner_findings(nb, released(resources).sources)
        state = resources.setdefault(META, {})
        session = state.get("session")
        for index, cell in enumerate(nb.cells):
            if not is_test(cell):
                continue
            test, points = _grade_id(cell), float(cell.metadata.nbgrader.points)
            earlier = [(i, f) for i, f in found if i < index]
            if session is None or not session.judges(test):
                score, lines = 0.0, [f"Score 0: no judge for test {test!r}: grade this course with "
                                     "backprop-ninja or an nbgrader_config.py that calls harden_nbgrader."]
            elif earlier:
                score, lines = 0.0, _flag_text(earlier)
            else:
                verdict = session.verdict(test, points)
                score, lines = verdict.score, verdict.lines
            if session is not None and _nothing_handed_in(session, test):
                lines = _why_not_run(cell) + lines
            cell.outputs = [
                NotebookNode(output_type="stream", name="stdout", text="\n".join(lines) + "\n"),
                NotebookNode(output_type="execute_result", execution_count=cell.get("execution_count"),
                             metadata={}, data={"text/plain": repr(round(min(max(score, 0.0), points), 6))}),
            ]
        nb.metadata[META] = {"flags": [{"cell": i, "rule": f.rule, "what": f.what, "line": f.line,
                                        "snippet": f.snippet} for i, f in found],
                             "sandbox": state.get("sandbox", "off: not run by SandboxedExecute"),
                             "seed": getattr(session, "seed", None)}
        state.pop("session", None)
        return nb, resources

    def preprocess_cell(self, cell, resources, index):  # everything happens in preprocess
        return cell, resources


def _nothing_handed_in(session, test) -> bool:
    return all(r.problem == "nothing was handed in" for r in session.returned.get(test, [None]) if r)


def _why_not_run(cell) -> list[str]:
    """What stopped the test cell before it could hand the function in (its own error)."""
    errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    if not errors:
        return []
    return [f"This test could not call your function: {errors[0].ename}: {str(errors[0].evalue)[:300]}"]


# --------------------------------------------------------------------------- feedback


def verdict_lines(cell) -> list[str]:
    """A judged test cell's verdict, line by line (what JudgeVerdicts wrote on its stdout)."""
    text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
    return [line for line in text.splitlines() if line.strip()]


def first_problem(nb) -> str | None:
    """The first test short of full marks, in one line: its verdict's first problem, whole."""
    for cell in nb.cells:
        if not is_test(cell):
            continue
        score, max_score = utils.determine_grade(cell)
        if score is None or score >= max_score:
            continue
        lines = verdict_lines(cell)
        line = next((x for x in lines if x.startswith(("Score 0", " ", "This test"))),
                    lines[0] if lines else f"{score:g}/{max_score:g}")
        return f"{_grade_id(cell)}: {' '.join(line.split())}"
    return None


class HideHiddenTests(ClearHiddenTests):
    """Feedback step: test cells keep their verdict, never their hidden source."""

    def preprocess_cell(self, cell, resources, index):
        if is_test(cell) and self._remove_hidden_test_region(cell):
            cell.source = cell.source.rstrip() + "\n# hidden tests ran here (their code is not shown)"
        return cell, resources


# Markdown in feedback, sanitized after it is rendered: nbgrader's feedback template renders
# markdown cells (all of them a learner may have edited) without nbconvert's sanitizer, which
# covers outputs only. What could run or restyle anything (scripts, event handlers, styles,
# frames) goes; the course's own tags (collapsed derivations) stay. The summary is a raw HTML cell.
FEEDBACK_TAGS = {"p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "div", "span", "pre", "code", "em",
                 "strong", "b", "i", "ul", "ol", "li", "blockquote", "details", "summary", "table", "thead",
                 "tbody", "tr", "th", "td", "sub", "sup", "a", "img"}
FEEDBACK_ATTRIBUTES = {"a": ["href", "title"], "img": ["src", "alt", "title"]}  # no class: none poses as ours


def feedback_markdown(source: str) -> str:
    """The ``markdown2html`` filter of feedback pages: nbconvert's renderer, then bleach (nbconvert's
    own sanitizer) with the tags above."""
    import bleach
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    return bleach.clean(markdown2html_mistune(source), tags=FEEDBACK_TAGS, attributes=FEEDBACK_ATTRIBUTES,
                        protocols={"http", "https", "mailto", "data"}, strip=True)


SUMMARY_CSS = """
.bn-feedback-summary { border: 2px solid #1565c0; border-radius: 6px; padding: 0.6em 1em;
                       margin: 0.5em 0 1em; }
.bn-feedback-summary .bn-score { font-size: 1.6em; margin: 0.2em 0 0.4em; }
.bn-feedback-summary li { margin: 0.3em 0; }
.bn-feedback-summary pre { white-space: pre-wrap; word-break: break-word; margin: 0.2em 0; }
div.output_area pre, div.output_text pre { white-space: pre-wrap; word-break: break-word; }
div.output_area img { max-width: 100%; height: auto; }
"""


class FeedbackSummary(NbGraderPreprocessor):
    """Feedback step: a summary first, where the learner looks (the score, the first thing to
    fix, each test's verdict, what the source rules flagged), and long lines wrapped everywhere
    instead of cut, so no reason is cut short. Feedback HTML is sanitized (no learner script
    or style runs in it), so the summary uses only tags the sanitizer keeps, and its style goes
    into the page's own header."""

    def preprocess(self, nb, resources):
        grader = resources.get("nbgrader", {})
        score, max_score = grader.get("score"), grader.get("max_score")
        parts = ['<div class="bn-feedback-summary">']
        if score is not None:
            parts.append(f'<div class="bn-score"><b>Score: {float(score):g} / {float(max_score):g}</b></div>')
        first = first_problem(nb)
        parts.append(f"<div><b>First thing to fix:</b> {html.escape(first)}</div>" if first
                     else "<div>Every test passed.</div>")
        items = []
        for cell in nb.cells:
            if is_test(cell):
                got, out_of = utils.determine_grade(cell)
                verdict = html.escape("\n".join(verdict_lines(cell)))
                items.append(f"<li><b>{html.escape(_grade_id(cell))}</b>: {got or 0:g} / {out_of:g}"
                             f"<pre>{verdict}</pre></li>")
        parts.append(f"<ul>{''.join(items)}</ul>")
        flags = nb.metadata.get(META, {}).get("flags", [])
        if flags:
            found = "; ".join(f"cell {f['cell']}: {f['what']} ({f['rule']})" for f in flags)
            parts.append(f"<div><b>Flagged for an instructor's review:</b> {html.escape(found)}</div>")
        parts.append("</div>")
        nb.cells.insert(0, NotebookNode(cell_type="raw", metadata={"raw_mimetype": "text/html"},
                                        source="\n".join(parts), id="bn-feedback-summary"))
        resources.setdefault("inlining", {}).setdefault("css", []).append(SUMMARY_CSS)
        return nb, resources


# --------------------------------------------------------------------------- config


def harden_nbgrader(c) -> None:
    """Make an nbgrader config (``c`` of an nbgrader_config.py) grade this course safely: the
    steps above in place of nbgrader's Execute and OverwriteCells, the judge right after
    execution, and hidden tests stripped from feedback. grader/nbgrader_config.py calls it,
    so the plain ``nbgrader`` commands grade exactly like ``backprop-ninja``."""
    from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
    from nbgrader.converters import Autograde
    from nbgrader.preprocessors import GetGrades

    def steps(name: str) -> list:
        return list(c.Autograde.get(name) or Autograde.class_traits()[name].make_dynamic_default())

    def named(p) -> str:
        return getattr(p, "__name__", str(p).rsplit(".", 1)[-1])

    run = [p for p in steps("autograde_preprocessors") if named(p) != "JudgeVerdicts"]  # idempotent
    at = next(i for i, p in enumerate(run) if named(p) in ("Execute", "SandboxedExecute"))
    c.Autograde.autograde_preprocessors = run[:at] + [SandboxedExecute, JudgeVerdicts] + run[at + 1:]
    c.Autograde.sanitize_preprocessors = [RestoreCells if named(p) == "OverwriteCells" else p
                                          for p in steps("sanitize_preprocessors")]
    c.OverwriteCells.add_missing_cells = True
    c.GenerateFeedback.preprocessors = [GetGrades, HideHiddenTests, CSSHTMLHeaderPreprocessor,
                                        FeedbackSummary]
    # a learner's HTML or script never runs in feedback: outputs by nbconvert, markdown by us
    c.HTMLExporter.sanitize_html = True
    c.HTMLExporter.filters = {"markdown2html": feedback_markdown}
