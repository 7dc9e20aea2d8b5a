"""The course's files: where the nbgrader course lives, its notebooks, and its released template.

The template is the course after ``nbgrader generate_assignment``: its gradebook knows
every cell (hidden tests included), so each grading job starts from a copy of it. Making
it costs seconds, so it is cached by the content of grader/ (~/.cache/backprop-ninja),
read-only, with the SHA-256 of its files kept beside it; every job checks its copy against
that digest before use, so a template changed after it was made (a poisoned hidden test)
is never graded with. No kernel can see the cache: it is outside every sandbox.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from backprop_ninja import UserError

REPO = Path(__file__).resolve().parents[2]
COURSE = REPO / "grader"
ASSIGNMENT = "backprop"
NOTEBOOKS = REPO / "notebooks"
SOLUTIONS = REPO / "solutions"
TEMPLATE_FILES = ("nbgrader_config.py", "gradebook.db", "source", "max_scores.json")
# What nbgrader's submit and collect leave beside a submission's notebooks: when it was handed in
# (lateness) and the secret that names its returned feedback (release_feedback, fetch_feedback).
SUBMISSION_FILES = ("timestamp.txt", "submission_secret.txt")


def source_dir(course: Path = COURSE) -> Path:
    return Path(course) / "source" / ASSIGNMENT


def course_notebooks(course: Path = COURSE) -> dict[str, Path]:
    """The course's notebooks by file stem (``01_stepwise_backprop`` ...), in order."""
    found = sorted(source_dir(course).glob("*.ipynb"))
    if not found:
        raise UserError(f"no course notebooks in {source_dir(course)}; "
                        "run this from the Backprop Ninja checkout.")
    return {p.stem: p for p in found}


def read_notebook(path: Path) -> dict:
    """The notebook at ``path`` as JSON, or a ``UserError`` naming what is wrong with it.

    A structural check only (JSON, nbformat 4, a list of cells): nbgrader validates it fully in
    the grading job. Importing nbformat here would cost the command seconds before any job starts
    (its jsonschema compiles a URI grammar on import)."""
    try:
        nb = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} cannot be read ({exc.__class__.__name__}).") from None
    except ValueError as exc:
        raise UserError(f"{path} is not a valid notebook (malformed JSON or not nbformat 4): "
                        f"{str(exc).splitlines()[0][:120]}.") from None
    if not isinstance(nb, dict) or nb.get("nbformat") != 4 or not isinstance(nb.get("cells"), list):
        raise UserError(f"{path} is not a valid notebook (malformed JSON or not nbformat 4): "
                        "it has no nbformat 4 cells.")
    return nb


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and ".ipynb_checkpoints" not in p.parts
                  and "__pycache__" not in p.parts)


def digest(root: Path, names=TEMPLATE_FILES) -> str:
    """SHA-256 over the relative paths and bytes of the files ``names`` under ``root``."""
    h = hashlib.sha256()
    for name in names:
        path = Path(root) / name
        for f in ([path] if path.is_file() else _files(path) if path.is_dir() else []):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def cache_key(course: Path = COURSE) -> str:
    """Changes whenever the course's config or source, nbgrader's version or Python's does."""
    from importlib.metadata import version

    h = hashlib.sha256(f"nbgrader {version('nbgrader')} python {sys.version_info[:2]}".encode())
    h.update(digest(Path(course), ("nbgrader_config.py", f"source/{ASSIGNMENT}")).encode())
    return h.hexdigest()[:20]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "backprop-ninja" / "courses"


def cached_template(course: Path = COURSE) -> tuple[Path, str] | None:
    """(template, its digest) from the cache, when present and intact."""
    key = cache_key(course)
    template, sums = cache_dir() / key, cache_dir() / f"{key}.sha256"
    if (template / "max_scores.json").exists() and sums.exists():
        expected = sums.read_text().strip()
        if digest(template) == expected:
            return template, expected
        shutil.rmtree(template, ignore_errors=True)  # changed after it was made: make it again
    return None


def keep_template(made: Path, course: Path = COURSE) -> tuple[Path, str]:
    """Store a freshly released template in the cache (read-only) and return (path, digest);
    without a usable cache, the template stays where it was made."""
    key = cache_key(course)
    expected = digest(made)
    target, sums = cache_dir() / key, cache_dir() / f"{key}.sha256"
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        staging = cache_dir() / f".{key}.{os.getpid()}"
        shutil.copytree(made, staging)
        for f in _files(staging):
            f.chmod(0o444)
        sums.write_text(expected + "\n")
        os.rename(staging, target)
        return target, expected
    except OSError:  # a read-only home, or a concurrent run made it first: both fine
        shutil.rmtree(cache_dir() / f".{key}.{os.getpid()}", ignore_errors=True)
        found = cached_template(course)
        return found if found else (made, expected)


def copy_submission_files(source: Path, dest: Path) -> None:
    """The ``SUBMISSION_FILES`` of the submission folder ``source`` that exist, into ``dest``."""
    for name in SUBMISSION_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(dest) / name)


def copy_template(template: Path, expected: str, dest: Path) -> None:
    """A job's own copy of the template, refused unless its digest is the one recorded."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in TEMPLATE_FILES:
        src = template / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        elif src.exists():
            shutil.copyfile(src, dest / name)
    for f in _files(dest):
        f.chmod(0o644)
    if digest(dest) != expected:
        raise UserError(f"the released course template in {template} changed after it was made; "
                        "delete that folder and grade again.")
