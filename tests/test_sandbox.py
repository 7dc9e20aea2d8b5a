"""The box a graded kernel runs in, probed from inside a real sandboxed kernel: its own uid, no
view of the machine beyond what it needs, no network, no other process, its limits, and
nothing it starts outlives it. (The graded pipeline itself is tested in test_grading.py.)"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import os
import platform
import py_compile
import secrets
import socket
import time
from pathlib import Path

import pytest

from backprop_ninja.grading import course, sandbox
from backprop_ninja.grading.sandbox import Box, Limits, probe
from backprop_ninja.grading.steps import BoxedKernelManager, SandboxedExecute

pytestmark = pytest.mark.slow


def _require_sandbox():
    why = probe()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"the grading sandbox must work on CI: {why} "
                        "(`make system-deps` installs bubblewrap)")
        pytest.skip(why)


class Kernel:
    """A kernel in a Box, driven from the test: ``run(code)`` -> (status, stdout, error)."""

    def __init__(self, box: Box):
        self.box, self.loop = box, asyncio.new_event_loop()
        self.km = BoxedKernelManager(transport="ipc", ip=str(box.runtime / "kernel"),
                                     connection_file=str(box.root / "connection.json"))
        self.km.box = box
        self.loop.run_until_complete(self.km.start_kernel())
        self.kc = self.km.client()
        self.kc.start_channels()
        self.loop.run_until_complete(self.kc.wait_for_ready(timeout=60))
        box.lock()

    def run(self, code: str, timeout: float = 60):
        out, err = [], []

        def hook(msg):
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                err.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")

        run = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        reply = self.loop.run_until_complete(run)
        return reply["content"]["status"], "".join(out), "".join(err)

    def value(self, expression: str):
        status, out, err = self.run(f"print(repr({expression}))")
        assert status == "ok", err
        return eval(out)  # noqa: S307 - our own repr of plain values

    def stop(self):
        self.kc.stop_channels()
        self.loop.run_until_complete(self.km.shutdown_kernel(now=True))
        self.loop.close()
        self.box.close()


# the key a grader's session holds in the tests
GRADER_KEY = b"backprop-ninja-test:grader-token"
KEY_SPEC_SESSION_KEYRING = -3


def _grader_holds_a_key() -> bool:
    """Give this (the grader's) process a session keyring holding a key, as a systemd service or a login
    session has; False where keyctl is unknown or refused (then no box can reach keys either)."""
    calls = sandbox.KEYRING_CALLS.get(platform.machine())
    if calls is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(calls.keyctl, sandbox.KEYCTL_JOIN_SESSION_KEYRING, b"backprop-ninja-test") < 0:
        return False
    return libc.syscall(calls.add_key, b"user", GRADER_KEY, b"secret", 6, KEY_SPEC_SESSION_KEYRING) >= 0


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    _require_sandbox()
    root = tmp_path_factory.mktemp("box")
    os.environ["BACKPROP_NINJA_TEST_SECRET"] = "grader-only"
    # the bytecode of the course's answers, as any import of them on this machine leaves it
    reference = Path(sandbox.__file__).parents[1] / "reference.py"
    py_compile.compile(str(reference), cfile=importlib.util.cache_from_source(str(reference)), doraise=True)
    box = Box(root, Limits(home_bytes=8 << 20, file_bytes=4 << 20), isolate=True)
    box.put("task.json", b"{}")
    box.slot("case-0.safetensors")
    grader_key = _grader_holds_a_key()  # before the kernel starts: it would inherit the keyring
    k = Kernel(box)
    k.grader_key = grader_key
    yield k
    k.stop()
    del os.environ["BACKPROP_NINJA_TEST_SECRET"]


def test_it_runs_as_an_unprivileged_uid_of_its_own(kernel):
    uid = kernel.value("__import__('os').getuid()")
    assert uid == kernel.box.uid
    if os.geteuid() == 0:
        assert uid not in (0, os.getuid()) and uid >= 1_000_000
        assert kernel.value("open('/proc/self/status').read().split('CapEff:')[1].split()[0]") == "0" * 16


def test_it_sees_no_course_source_no_other_job_and_no_grader_code(kernel, tmp_path):
    neighbour = kernel.box.root.parent / "another-student"
    neighbour.mkdir(exist_ok=True)
    for path in (course.COURSE / "source", course.SOLUTIONS, Path.home() / ".cache", neighbour,
                 kernel.box.root / "connection.json", course.REPO / ".git"):
        assert not kernel.value(f"__import__('os').path.exists({str(path)!r})"), path
    assert kernel.value(f"sorted(__import__('os').listdir({str(kernel.box.root)!r}))") == ["runtime"]
    status, _, err = kernel.run("import backprop_ninja.grading.judge")
    assert status == "error" and "ModuleNotFoundError" in err
    status, _, err = kernel.run("from backprop_ninja.reference import fused_backward")
    assert status == "error" and "Error" in err  # the course's own answers are not there either
    package = Path(sandbox.__file__).parents[1]
    assert any((package / "__pycache__").glob("reference.*.pyc"))  # the grader's machine has the bytecode
    seen = kernel.value(f"[n for d in ({str(package)!r}, {str(package / '__pycache__')!r}) "
                        "for n in __import__('os').listdir(d)]")
    assert "model.py" in seen and not [n for n in seen if n.startswith(("reference", "grading"))]
    # nor any box's cgroup (every box's memory use and processes, live)
    assert kernel.value("__import__('os').listdir('/sys/fs/cgroup')") == []
    status, _, _ = kernel.run("import torch, backprop_ninja.model, backprop_ninja.handin")
    assert status == "ok"  # what a learner's notebook needs is there


def test_it_inherits_none_of_the_graders_environment(kernel):
    env = kernel.value("dict(__import__('os').environ)")
    assert "BACKPROP_NINJA_TEST_SECRET" not in env and "BACKPROP_NINJA_JUDGE_SEED" not in env
    assert env["HOME"] == "/home/learner"


def test_it_cannot_reach_the_graders_keys(kernel):
    if not kernel.grader_key:
        pytest.skip("keyctl is unknown or refused on this machine: no process here can hold a key")
    keyctl = sandbox.KEYRING_CALLS[platform.machine()].keyctl
    found = kernel.value(f"__import__('ctypes').CDLL(None).syscall({keyctl}, 10, "
                         f"{KEY_SPEC_SESSION_KEYRING}, b'user', {GRADER_KEY!r}, 0)")
    assert found == -1  # KEYCTL_SEARCH of its session keyring: the grader's key is not there


def test_it_cannot_make_a_key_for_another_box(kernel):
    machine = platform.machine()
    if machine not in sandbox.KEYRING_CALLS:
        pytest.skip(f"no seccomp filter is written for {machine}")
    calls = sandbox.KEYRING_CALLS[machine]
    add_key = f"{calls.add_key}, b'user', b'from-a-box', b'x', 1, {KEY_SPEC_SESSION_KEYRING}"
    made = kernel.value(f"(lambda c: (c.CDLL(None, use_errno=True).syscall({add_key}), c.get_errno()))"
                        "(__import__('ctypes'))")
    assert made == (-1, 1)  # add_key: EPERM, refused by the box's seccomp filter


def test_it_has_no_network(kernel):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        connect = f"__import__('socket').create_connection(('127.0.0.1', {port}), timeout=3)"
        status, _, err = kernel.run(connect)
    assert status == "error" and ("refused" in err or "unreachable" in err), err


def test_it_sees_and_signals_no_other_process(kernel):
    pids = kernel.value("sorted(int(p) for p in __import__('os').listdir('/proc') if p.isdigit())")
    assert len(pids) < 10, pids
    status, _, err = kernel.run(f"__import__('os').kill({os.getpid()}, 0)")
    assert status == "error" and ("ProcessLookupError" in err or "PermissionError" in err)


def test_it_writes_only_its_small_home_and_tmp(kernel):
    for path in ("/usr/x", "/etc/x", f"{course.REPO}/backprop_ninja/x", f"{course.REPO}/data/x",
                 f"{kernel.box.runtime}/x", "/handin/in/x", "/handin/out/new"):
        status, _, err = kernel.run(f"open({path!r}, 'w')")
        assert status == "error", path
    assert kernel.run("open('/home/learner/notes.txt', 'w').write('ok')")[0] == "ok"
    status, _, err = kernel.run("open('/tmp/big', 'wb').write(b'x' * (5 << 20))")  # over file_bytes
    assert status == "error" and "File too large" in err, err
    status, _, err = kernel.run("for i in range(4): open(f'/tmp/part{i}', 'wb').write(b'x' * (3 << 20))")
    assert status == "error" and "No space left" in err, err  # over home_bytes (the size of /tmp)


def test_the_grading_step_locks_the_kernels_socket_folder_once_it_is_up(tmp_path_factory):
    """nbgrader's execute step (SandboxedExecute), not only a Box used by hand, takes the runtime
    folder back from the kernel as soon as its sockets exist."""
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import pathlib, sys\nopen(pathlib.Path(sys.argv[sys.argv.index('-f') + 1]).parent / 'x', 'w')")])
    scratch = tmp_path_factory.mktemp("lock")  # short: tmp_path is named after this long test
    SandboxedExecute(scratch=str(scratch), timeout=60).preprocess(nb, {})
    errors = [o for o in nb.cells[0].outputs if o.output_type == "error"]
    assert errors and errors[0].ename == "PermissionError", nb.cells[0].outputs


def test_it_may_fill_the_slots_the_grader_made_and_nothing_else(kernel):
    assert kernel.run("open('/handin/out/case-0.safetensors', 'wb').write(b'x')")[0] == "ok"
    assert kernel.run("open('/handin/in/task.json').read()")[0] == "ok"
    status, _, _ = kernel.run("__import__('os').symlink('/etc/passwd', '/handin/out/link')")
    assert status == "error"


def test_its_limits_are_set(kernel):
    limits = kernel.value("[__import__('resource').getrlimit(getattr(__import__('resource'), n))[0] "
                          "for n in ('RLIMIT_AS', 'RLIMIT_FSIZE', 'RLIMIT_CORE')]")
    assert limits == [Limits.memory, 4 << 20, 0]


# System V shared memory, 768 MiB at a time: each segment is made and touched by a process of its own, which
# then exits; the segment lives on, and no process's address space counts it.
SEGMENT = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
address = libc.shmat(libc.shmget(0, 768 << 20, 0o1600), None, 0)  # IPC_PRIVATE, IPC_CREAT | 0600
ctypes.memset(address, 1, 768 << 20)
"""
SHARED_MEMORY = f"""
import subprocess, sys
codes = [subprocess.run([sys.executable, "-c", {SEGMENT!r}]).returncode for _ in range(3)]
print("survived" if codes == [0, 0, 0] else codes)
"""


def _oom_kills(cgroup: Path) -> int:
    """How many processes the cgroup's memory cap has stopped (v1 memory.oom_control, v2 memory.events)."""
    for name in ("memory.oom_control", "memory.events"):
        if (cgroup / name).exists():
            return int(dict(line.split() for line in (cgroup / name).read_text().splitlines())["oom_kill"])
    raise AssertionError(f"{cgroup} counts no OOM kills")


def test_the_box_and_all_it_starts_share_one_memory_cap(tmp_path):
    """2.25 GiB of shared memory, 768 MiB per process, against a 1.5 GiB cap for the whole box: the cap stops
    it (each process alone is within its address-space limit), and the machine keeps none of it."""
    _require_sandbox()
    box = Box(tmp_path, Limits(memory=3 << 29), isolate=True)
    if box.cgroup is None:
        pytest.skip("this machine lets the grader make no memory cgroup (not root, or /sys/fs/cgroup is "
                    "read-only): only the per-process limits hold")
    k = Kernel(box)
    try:
        try:
            _, out, _ = k.run(SHARED_MEMORY, timeout=30)
        except TimeoutError:  # the kernel itself was stopped mid-cell: no reply comes
            out = ""
        assert "survived" not in out
        assert _oom_kills(box.cgroup) > 0
    finally:
        k.stop()
    assert not box.cgroup.exists()  # closed with the kernel


def test_everything_it_starts_dies_with_it(tmp_path):
    _require_sandbox()
    token = str(100000 + secrets.randbelow(800000))
    k = Kernel(Box(tmp_path, isolate=True))
    status, _, err = k.run(
        "import subprocess\n"
        f"subprocess.Popen(['sh', '-c', 'sleep {token} & sleep {token}'], start_new_session=True)")
    assert status == "ok", err
    time.sleep(1)
    assert _running(token), "the daemon should be running while the kernel is"
    k.stop()
    deadline = time.monotonic() + 10
    while _running(token) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(token)


def _running(token: str) -> bool:
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and token in (proc / "cmdline").read_bytes().decode(errors="replace"):
                return "\nState:\tZ" not in (proc / "status").read_text()
        except OSError:
            continue
    return False


def test_a_scratch_folder_too_deep_for_the_kernels_sockets_is_one_sentence(tmp_path):
    """Refused where the kernel would bind its sockets, before it starts."""
    from backprop_ninja import UserError

    box = Box(tmp_path / ("d" * 120), Limits(), isolate=False)
    with pytest.raises(UserError, match=r"too deep for the kernel's sockets .* set TMPDIR to a short folder"):
        box.socket_base()
    assert len(Box(tmp_path / "box", Limits(), isolate=False).socket_base()) < 100
