"""``autograde --scheduler ADDRESS``: the grading tasks on the workers of a running Dask scheduler.

    Cluster(address, isolate)   connects, and refuses in one sentence a scheduler that does not
                                answer, one without workers, and a worker that cannot grade
                                (``tasks.can_grade``: no sandbox, a daemonic worker process)
    .run(todo)                  each task (``tasks.grade``) sent as a Dask task, each outcome as
                                it arrives

Dask, not this module, schedules, retries and watches the workers: a worker that dies while it
grades (killed, out of memory) costs a retry of that task elsewhere; after the scheduler's
``distributed.scheduler.allowed-failures`` retries the task fails with ``KilledWorker``, and the
notebook is reported as not graded, with the reason. Every other outcome is kept.
"""

from __future__ import annotations

import contextlib
import threading
import uuid

from backprop_ninja import UserError
from backprop_ninja.grading import jobs
from backprop_ninja.grading.jobs import NotebookResult
from backprop_ninja.grading.tasks import Outcome, Refused, Task, can_grade, grade

CONNECT_SECONDS = 10
WORKER_WAIT_SECONDS = 60   # for a first worker to connect


def grade_on_worker(task: Task) -> Outcome:
    """``tasks.grade`` on a Dask worker; the outcome names the worker. Dask cannot stop a running
    task, so a watcher does: once the scheduler cancels it (Ctrl-C, or its coordinator is gone),
    its grading process and sandboxed kernel are killed."""
    from distributed import get_worker

    worker = get_worker()
    key, group, done = worker.get_current_task(), jobs.JobGroup(), threading.Event()

    def watch() -> None:
        while not done.wait(1):
            state = getattr(worker.state.tasks.get(key), "state", None)
            if state in (None, "cancelled", "released", "forgotten"):
                group.stop()
                return

    threading.Thread(target=watch, daemon=True).start()
    try:
        outcome = grade(task, group=group)
    finally:
        done.set()
    outcome.result.machine = worker.address
    return outcome


class Cluster:
    """``with Cluster(address, isolate) as cluster: with cluster.run(todo) as outcomes: ...``"""

    def __init__(self, address: str, isolate: bool):
        self.address, self.isolate = address, isolate
        self.client = None

    def __enter__(self) -> Cluster:
        from distributed import Client
        from distributed.comm import resolve_address

        start = f"`DASK_DISTRIBUTED__WORKER__DAEMON=False dask worker {self.address}`"
        try:
            resolve_address(self.address)  # a bad address before a Client exists (its __del__ would hang)
            self.client = Client(self.address, timeout=CONNECT_SECONDS, set_as_default=False)
        except (OSError, ValueError, TypeError) as exc:
            reason = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
            raise UserError(f"no Dask scheduler answers at --scheduler {self.address} ({reason}): start one "
                            "with `dask scheduler` and pass the address it prints (tcp://HOST:8786).") \
                from None
        try:
            try:
                self.client.wait_for_workers(1, timeout=WORKER_WAIT_SECONDS)
            except TimeoutError:
                raise UserError(f"no Dask worker is connected to the scheduler at {self.address}: start one "
                                f"with {start}.") from None
            for worker, why in sorted(self.client.run(can_grade, self.isolate).items()):
                if why:
                    raise UserError(f"the Dask worker {worker} cannot grade: {why}.")
        except BaseException:
            self.client.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()

    @contextlib.contextmanager
    def run(self, todo: list[Task]):
        """``with cluster.run(todo) as outcomes: for task, outcome in outcomes``; leaving the
        block early cancels the tasks not finished."""
        from distributed import as_completed

        run = uuid.uuid4().hex[:8]  # a task of a stopped run is never mistaken for this run's
        futures = {self.client.submit(grade_on_worker, task, key=f"grade-{task.student}/{task.stem}-{run}"):
                   task for task in todo}
        try:
            arriving = as_completed(futures, loop=self.client.loop)
            yield ((futures[fut], self._outcome(futures[fut], fut)) for fut in arriving)
        finally:
            self.client.cancel([fut for fut in futures if not fut.done()])

    @staticmethod
    def _outcome(task: Task, future) -> Outcome:
        from distributed import KilledWorker

        try:
            return future.result()
        except Refused as exc:
            raise UserError(str(exc)) from None
        except KilledWorker as exc:
            deaths = exc.allowed_failures + 1
            problem = (f"could not be graded: its grading worker died {deaths} time{'s' * (deaths > 1)} "
                       f"(killed, or out of memory) while grading it, the last one "
                       f"{getattr(exc.last_worker, 'address', exc.last_worker)}.")
        except Exception as exc:  # one notebook, not the class
            problem = f"could not be graded: it failed on its worker ({exc.__class__.__name__}: {exc})."
        return Outcome(NotebookResult(task.student, task.stem, problem=problem, sandbox=""))
