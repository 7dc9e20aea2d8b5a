# nbgrader course "backprop-ninja": one assignment, `backprop`, four notebooks in source/backprop/.
# Run nbgrader from this directory (or from a scratch copy of it: nothing here names a path).
c = get_config()  # noqa: F821  (nbgrader injects get_config)

c.CourseDirectory.course_id = "backprop-ninja"

# The exchange (release_assignment, fetch_assignment, submit, collect) is this course's own
# exchange/ folder, made here on first use, so nothing needs /usr/local/share or root. A graded
# copy of a course (autograde's --out DIR/course) returns feedback through the exchange its
# submissions were collected from, which autograde names in exchange.txt beside this file;
# otherwise it has its own. World-writable and sticky like /tmp, as nbgrader's exchange must be
# for students on the same machine.
import os  # noqa: E402

_here = os.path.dirname(os.path.abspath(__file__))
_named = os.path.join(_here, "exchange.txt")
if os.path.isfile(_named):
    with open(_named, encoding="utf-8") as _f:
        c.Exchange.root = _f.read().strip()
else:
    c.Exchange.root = os.path.join(_here, "exchange")
if not os.path.isdir(c.Exchange.root):
    os.makedirs(c.Exchange.root, exist_ok=True)
    os.chmod(c.Exchange.root, 0o1777)

# A learner's solution cell becomes this stub in the released notebooks.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}

# Per-cell time limits when validating and autograding. Notebook 04 trains for a bounded
# number of steps under nbgrader (NBGRADER_EXECUTION is set), so no cell needs long; the limit
# catches a submission that loops forever.
c.Execute.timeout = 180
c.ExecutePreprocessor.timeout = 180
c.Execute.interrupt_on_timeout = True

# A learner who deleted a graded cell gets it back (and scores what it scores) instead of an
# autograde crash.
c.OverwriteCells.add_missing_cells = True

# The hidden tests print a short explanation; keep it readable in the feedback.
c.LimitOutput.max_lines = 200

# The plain `nbgrader autograde` / `generate_feedback` on this course grade exactly like
# `backprop-ninja autograde`: each kernel in its sandbox, the judge outside it writing every
# test's verdict, edited or deleted test cells restored, no hidden-test source in the feedback.
from backprop_ninja.grading.steps import harden_nbgrader  # noqa: E402

harden_nbgrader(c)
