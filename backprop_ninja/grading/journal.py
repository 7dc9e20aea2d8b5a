"""The coordinator's record of every graded notebook, written as each outcome arrives.

    <root>/<student>/<stem>/    result.json (the task's key and the result), gradebook.db,
                                autograded.ipynb, feedback.html, nbgrader.log

``autograde --out`` keeps it in ``out/.backprop-ninja-journal`` (``folders.JOURNAL``), which
only the run holding ``out``'s lock writes; it is replaced with ``out`` when the run publishes.
A run that crashed or was stopped before publishing leaves it behind, and the next run takes
every entry whose key is its task's (same bytes, timestamp, hidden tests and due date) instead
of grading that notebook again. An entry appears whole or not at all (one rename).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from backprop_ninja.grading.jobs import NotebookResult
from backprop_ninja.grading.tasks import Outcome, Task

FILES = {"gradebook": "gradebook.db", "autograded": "autograded.ipynb", "feedback": "feedback.html"}


class Journal:
    def __init__(self, root: Path):
        self.root = Path(root)

    def write(self, task: Task, outcome: Outcome) -> NotebookResult:
        """Keep ``outcome`` for ``task``; its result, with paths into the entry."""
        entry = self.root / task.student / task.stem
        partial = entry.with_name(f".{entry.name}.{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for attr, name in FILES.items():
            if getattr(outcome, attr) is not None:
                (partial / name).write_bytes(getattr(outcome, attr))
        (partial / "nbgrader.log").write_text(outcome.log)
        (partial / "result.json").write_text(json.dumps({"key": task.key, "result": asdict(outcome.result)}))
        shutil.rmtree(entry, ignore_errors=True)
        os.rename(partial, entry)
        return self._result(entry, asdict(outcome.result))

    def finished(self, task: Task) -> NotebookResult | None:
        """The result kept for this very task, when nbgrader graded it; else None."""
        entry = self.root / task.student / task.stem
        try:
            kept = json.loads((entry / "result.json").read_text())
        except (OSError, ValueError):
            return None
        if kept.get("key") != task.key or not kept["result"].get("graded"):
            return None
        return self._result(entry, kept["result"])

    @staticmethod
    def _result(entry: Path, fields: dict) -> NotebookResult:
        res = NotebookResult(**fields)
        res.job_dir = str(entry)  # its gradebook.db holds the notebook's grades
        res.autograded = str(entry / FILES["autograded"]) if (entry / FILES["autograded"]).exists() else None
        res.feedback = str(entry / FILES["feedback"]) if (entry / FILES["feedback"]).exists() else None
        return res
