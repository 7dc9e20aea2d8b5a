"""Backprop Ninja: write the backward pass of makemore's MLP by hand."""

__version__ = "0.1.0"


class UserError(Exception):
    """Something the user can fix. ``str()`` is one sentence saying what to do;
    the command line prints it (no traceback) and exits non-zero."""
