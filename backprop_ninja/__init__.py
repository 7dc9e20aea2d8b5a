"""Backprop Ninja: write the backward pass of makemore's MLP by hand."""

__version__ = "0.1.0"


class UserError(Exception):
    """Something the user can fix. ``str()`` is one sentence saying what to do;
    the command line prints it (no traceback) and exits non-zero."""


def in_notebook() -> bool:
    """True inside a Jupyter kernel (also when nbclient, nbval or nbgrader runs the notebook)."""
    import sys

    ipython = sys.modules.get("IPython")  # never imported here: a kernel has it already
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


def accepted(fn, kwargs: dict) -> dict:
    """Only the keywords ``fn`` declares, unless it takes ``**_`` (the contract asks for it;
    a learner who forgot it should be graded, not get a TypeError)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in kwargs.items() if k in names}
