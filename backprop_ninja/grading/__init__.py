"""The grader's side of the course: what decides a grade, run where learner code cannot reach it.

A learner's notebook runs in a sandboxed kernel (``sandbox``) that only *produces*
gradients: the hidden test cells hand the learner's functions to ``backprop_ninja.handin``,
which calls them on inputs the judge staged and writes plain tensors back. The judge
(``judge``: inputs from a secret seed, autograd's reference, the one tolerance policy of
``backprop_ninja.check``, the source rules of ``rules``) runs in nbgrader's own process,
which never runs learner code, and writes every test cell's verdict (``steps``: the
nbgrader preprocessors). ``course`` knows the course's files and its released template;
``jobs`` runs one notebook's grading, a learner's ``grade`` and a class's ``autograde``.

Nothing in this folder is visible inside the sandbox.
"""
