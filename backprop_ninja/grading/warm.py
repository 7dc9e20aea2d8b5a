"""Imported by the job server only (``jobs._context`` preloads it): fills, once, the caches that
every grading job forked from it would otherwise fill on its own, about a second of CPU each.

They are compiled, not data: nbformat's schema validator, the regular expressions of Jinja's
lexer, mistune, bleach, pygments and soupsieve (nbconvert's HTML export), SQLAlchemy's mappers,
and the sandbox's probe (one bwrap run, which each job made again). The warm-up exports a notebook
made here with the feedback's own configuration (``harden_nbgrader``); no file, gradebook, kernel
or thread is opened, so a job forked afterwards holds nothing of it but the caches.
"""

from __future__ import annotations


def _sample_notebook():
    """What feedback pages hold: markdown (headings, code, maths, a collapsed derivation, a link),
    highlighted code, a stream, a result and a picture."""
    from nbformat import v4

    picture = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5"
               "ErkJggg==")
    return v4.new_notebook(metadata={"language_info": {"name": "python"}}, cells=[
        v4.new_markdown_cell("# Exercise\n\nThe *chain rule*, `dlogits`, $\\frac{dL}{dx}$ and "
                             "[a link](https://example.org).\n\n<details><summary>Derivation</summary>\n\n"
                             "- a line\n</details>"),
        v4.new_code_cell("import torch\nprint(torch.zeros(2))  # a comment", execution_count=1, outputs=[
            v4.new_output("stream", name="stdout", text="tensor([0., 0.])\n"),
            v4.new_output("display_data", data={"image/png": picture, "text/plain": "<Figure>"}),
            v4.new_output("execute_result", data={"text/plain": "4.0"}, execution_count=1)]),
        v4.new_raw_cell("<div><b>Score</b></div>", metadata={"raw_mimetype": "text/html"}),
    ])


def warm() -> None:
    import nbformat
    from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
    from nbgrader.converters import GenerateFeedback
    from sqlalchemy.orm import configure_mappers
    from traitlets.config import Config

    from backprop_ninja.grading.sandbox import probe
    from backprop_ninja.grading.steps import harden_nbgrader

    nb = _sample_notebook()
    nbformat.validate(nbformat.reads(nbformat.writes(nb), as_version=4))
    config = Config()
    harden_nbgrader(config)
    app = GenerateFeedback(config=config)  # its exporter, as GenerateFeedback.start makes it
    exporter = app.exporter_class(parent=app, config=app.config)
    exporter.register_preprocessor(CSSHTMLHeaderPreprocessor)
    grades = {"notebook": "warm-up", "score": 1.0, "max_score": 1.0, "late_penalty": 0.0}  # GetGrades' keys
    exporter.from_notebook_node(nb, resources={"nbgrader": grades})
    configure_mappers()
    probe()


try:
    warm()
except Exception:  # noqa: BLE001 (a warm-up that fails costs time, never a job: each job fills its own caches)
    pass
