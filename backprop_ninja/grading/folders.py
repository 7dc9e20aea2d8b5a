"""The folders a grading run owns: its scratch folder, and the ``--out`` folder of ``autograde``.

    scratch     <tmp>/backprop-ninja-<pid>-XXXX, flock-ed while the run lives and
                removed when it ends; one left by a killed run (its pid gone, its lock free)
                is removed by the next run                                    scratch_folder
    --out       checked before anything is written: never the submissions folder, inside it
                or around it, never a file, never a folder holding files no run of this
                command wrote (each run leaves a marker listing what it wrote);
                locked (flock on the folder itself) for the whole run: a second run refuses;
                built in .<name>.staging-<pid>-XXXX beside it and published by exchanging the two
                folders in one rename, so readers see the old results or the new, never a mix;
                a staging folder left by a killed run is removed by the next run   Publication

flock, not a lock file: the lock dies with its process (nothing to go stale), it works on a
folder, and it lets a run tell a live run's folder from an abandoned one across PID namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from backprop_ninja import UserError

SCRATCH_PREFIX = "backprop-ninja-"  # + pid: short, a kernel's socket path must fit in 107 bytes
MARKER = ".backprop-ninja-autograde"     # in --out: what the run that wrote it published
JOURNAL = ".backprop-ninja-journal"      # in --out: what the running (or a stopped) run graded (journal.py)
WRITTEN = ("grades.csv", "feedback", "course")


# --------------------------------------------------------------------------- owned folders


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path`` (a folder), or None when another holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def remove_abandoned(parent: Path, prefix: str) -> list[Path]:
    """Remove the folders ``<prefix><pid>...`` in ``parent`` whose process is gone and whose
    lock nobody holds (a run killed before it could clean up); the removed paths."""
    removed = []
    pattern = re.compile(re.escape(prefix) + r"(\d+)(?:-|$)")
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for path in entries:
        match = pattern.match(path.name)
        if not match or _pid_alive(int(match.group(1))) or path.is_symlink() or not path.is_dir():
            continue
        try:
            fd = _try_lock(path)
        except OSError:
            continue
        if fd is None:  # a live run in another PID namespace
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(path)
    return removed


@contextlib.contextmanager
def scratch_folder():
    """A scratch folder for one run, locked while it lives, removed when it ends (also on
    Ctrl-C); scratch folders that killed runs left behind are removed first."""
    parent = Path(tempfile.gettempdir())
    remove_abandoned(parent, SCRATCH_PREFIX)
    path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=parent))
    fd = _try_lock(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if fd is not None:
            os.close(fd)


# --------------------------------------------------------------------------- --out


def _relation(out: Path, submissions: Path) -> str | None:
    target, subs = out.resolve(), submissions.resolve()
    if target == subs:
        return "is"
    if subs in target.parents:
        return "sits inside"
    if target in subs.parents:
        return "contains"
    return None


def _foreign(out: Path) -> list[str]:
    """Entries of an existing ``out`` that no run of this command wrote."""
    names = sorted(p.name for p in out.iterdir())
    if not names or names == [JOURNAL]:  # a run stopped before it ever published
        return []
    try:
        written = set(json.loads((out / MARKER).read_text())["written"])
    except (OSError, ValueError, KeyError, TypeError):
        return names
    return [n for n in names if n not in (MARKER, JOURNAL) and n not in written]


def check_out(out: Path, submissions: Path | None) -> None:
    """Refuse, in one sentence and before anything is written, an ``--out`` that could lose or
    mix someone's files."""
    out = Path(out)
    if submissions is not None and (relation := _relation(out, Path(submissions))):
        raise UserError(f"--out {out} {relation} the submissions folder {submissions}: results written "
                        "there could replace a student's work; choose a folder outside it.")
    target, cwd = out.resolve(), Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        where = "the current folder" if target == cwd else "around the current folder"
        raise UserError(f"--out {out} is {where}: autograde replaces --out as a whole; choose a "
                        "folder for the results alone, e.g. --out results.")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"--out {out} is an existing file, not a folder; choose a new or empty folder "
                            "(or one an earlier autograde wrote) for the results.")
        foreign = _foreign(out)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise UserError(f"--out {out} holds files autograde did not write ({shown}); choose a new or "
                            "empty folder for the results, or move those files away first.")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic rename (Linux renameat2 RENAME_EXCHANGE); False when the
    system or the filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(a))


class Publication:
    """``with Publication(out, submissions) as pub:`` write into ``pub.staging``, then
    ``pub.publish()``; leaving the block without publishing leaves ``out`` as it was.

    The whole block holds the lock on ``out``."""

    def __init__(self, out: Path, submissions: Path | None = None):
        self.shown = Path(out)
        self.out = Path(out).resolve()
        self.submissions = submissions
        self.staging: Path | None = None  # made on entry
        self.published = False
        self._fd: int | None = None
        self._created = self._staged = False

    def __enter__(self) -> Publication:
        check_out(self.shown, self.submissions)
        try:
            self._lock()
            check_out(self.shown, self.submissions)  # a run that just published changed it
            remove_abandoned(self.out.parent, f".{self.out.name}.staging-")
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.staging-{os.getpid()}-",
                                                 dir=self.out.parent))
            self._staged = True
            umask = os.umask(0)
            os.umask(umask)
            self.staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become --out's mode
        except BaseException:
            self._release()
            raise
        return self

    def _lock(self) -> None:
        for _ in range(5):
            try:
                self._created = not self.out.exists()
                self.out.mkdir(parents=True, exist_ok=True)
                fd = _try_lock(self.out)
            except OSError as exc:
                raise UserError(f"--out {self.shown} cannot be used: {exc.strerror.lower()}.") from None
            if fd is None:
                raise UserError(f"another `backprop-ninja autograde`{self._holder()} is writing to --out "
                                f"{self.shown} right now; wait for it to finish, or choose another --out.")
            if os.path.samestat(os.fstat(fd), os.stat(self.out)):
                self._fd = fd
                return
            os.close(fd)  # a run published while we opened it: lock the folder it published
        raise UserError(f"--out {self.shown} keeps being replaced by other runs; try again.")

    def _holder(self) -> str:
        pids = [m.group(1) for p in self.out.parent.glob(f".{self.out.name}.staging-*")
                if (m := re.search(r"staging-(\d+)-", p.name)) and _pid_alive(int(m.group(1)))]
        return f" (pid {pids[0]})" if pids else ""

    def final(self, path: str | Path) -> Path:
        """Where a path inside the staging folder is once published."""
        return self.out / Path(path).resolve().relative_to(self.staging)

    def publish(self) -> None:
        """Replace ``out`` with the staging folder in one rename; delete the old results."""
        (self.staging / MARKER).write_text(json.dumps({
            "written_by": "backprop-ninja autograde; the next run replaces this folder",
            "written": sorted(p.name for p in self.staging.iterdir() if p.name != MARKER)}) + "\n")
        if not _exchange(self.staging, self.out):
            old = self.staging.with_name(self.staging.name + "-old")
            os.rename(self.out, old)
            os.rename(self.staging, self.out)
            os.rename(old, self.staging)
        self.published = True  # the old results are in self.staging now

    def _release(self) -> None:
        if self._staged:
            shutil.rmtree(self.staging, ignore_errors=True)
        if self._created and not self.published:
            with contextlib.suppress(OSError):
                self.out.rmdir()  # made by this run and never published: leave no empty folder
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __exit__(self, *exc) -> None:
        self._release()
