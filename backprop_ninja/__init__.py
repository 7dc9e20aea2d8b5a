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
