"""The box a learner's kernel runs in: bubblewrap namespaces, its own uid, resource limits.

Grading runs untrusted code (the learner's notebook), so its kernel starts inside a
bubblewrap sandbox (``bwrap``, a Debian package):

- its own uid: a fresh unprivileged one when the grader is root, else the grader's own
  mapped in a user namespace; no capabilities, no new privileges;
- its own mount namespace: /usr, /etc and the Python environment read-only, the course
  package read-only *without* its ``grading/`` folder (what decides a grade is not even
  visible) and its ``reference`` module (the course's own answers), source and bytecode
  alike, the data folder read-only, and small in-memory /tmp and home folders.
  Nothing else of the machine: no other submission, no output folder, no course template;
- no network (its own network namespace): the grader reaches it over Unix sockets
  (ZeroMQ's ``ipc`` transport) in a folder it can no longer write to once it is up;
- its own PID namespace: it cannot see or signal any other process, and everything it
  starts dies with it (``--die-with-parent``; the namespace ends with its init);
- limits inherited by everything it starts: address space, CPU seconds, processes
  (root only: the count is per uid), file size, no core dumps; plus the wall-clock
  limit of the job that runs it;
- no kernel keyring: keys are not namespaced, so the grader's session keys (a systemd service
  or a login session has some) would be the box's to read, and one box could leave a key for
  another. A seccomp filter refuses the keyring's system calls (and any other machine's system
  call ABI, such as 32-bit calls from a 64-bit process); the kernel also starts in a session
  keyring of its own, in case the filter is unknown for this machine;
- where the grader may make one (root, cgroup v1 or a v2 that delegates memory), a memory
  cgroup of its own: the kernel and everything it starts share ``memory`` bytes, shared
  memory and in-memory files included, which the per-process address-space limit does not
  count (System V segments and memfds outlive their mappings). ``Box.close`` kills what is
  left in it and removes it.

Its only way back to the grader is the hand-in box: ``in/`` (read-only) holds what the
grader put there, ``out/`` holds files the grader created, which the kernel may fill up
to the file-size limit but never add to. Where bubblewrap is missing or cannot make
namespaces (macOS, some containers), ``probe()`` says why and the kernel runs with the
resource limits only: the sandbox is off.

The grader starts a kernel with ``Box.kernel_argv()``: this module's ``main`` (run as
the grader, outside the box) sets the limits, points the kernel's output at
``kernel.log`` and replaces itself with ``bwrap``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from backprop_ninja import UserError

HOME = "/home/learner"     # the kernel's home and working folder, inside the box
HANDIN = "/handin"         # the hand-in box, inside the box
HANDIN_ENV = "BACKPROP_NINJA_HANDIN"
MPL_DIR = "/tmp/matplotlib"  # matplotlib's config and cache folder, inside the box (its font cache bound in)


@dataclass(frozen=True)
class Limits:
    """What one notebook may use. ``cell_timeout``: seconds per cell; ``notebook_timeout``:
    wall-clock seconds for the whole grading job; ``memory``: bytes of address space per
    process (torch needs ~1.5 GB of it just to import), and of memory for the whole box where
    it has a memory cgroup; ``processes``: processes and threads
    of the kernel's uid (ipykernel and torch start ~10); ``file_bytes``: the largest file
    it may write; ``home_bytes``: its in-memory home and /tmp, each; ``output_bytes``: what
    the grader keeps of a cell's output, ``notebook_output_bytes`` of the whole notebook's."""

    cell_timeout: int = 180
    notebook_timeout: int = 900
    memory: int = 4 << 30
    processes: int = 32
    file_bytes: int = 64 << 20
    home_bytes: int = 128 << 20
    output_bytes: int = 256 << 10
    notebook_output_bytes: int = 2 << 20


def _bwrap() -> str | None:
    return shutil.which("bwrap")


@functools.cache
def probe() -> str | None:
    """None when kernels can be isolated here; else one sentence saying why not."""
    if not sys.platform.startswith("linux"):
        return f"bubblewrap needs Linux; this is {sys.platform}"
    if _bwrap() is None:
        return "bubblewrap (bwrap) is not installed (Debian: apt-get install bubblewrap)"
    probe_box = [*_namespaces(), *_system_binds(), "--", "/bin/true"]
    if os.geteuid() == 0:
        probe_box[-1:] = ["setpriv", *_drop_privileges(_fresh_uid()), "/bin/true"]
    try:
        run = subprocess.run([_bwrap(), *probe_box], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap could not run ({exc})"
    if run.returncode != 0:
        return f"bubblewrap cannot create namespaces here ({run.stderr.strip()[:200]})"
    return None


def _namespaces() -> list[str]:
    """Every namespace but the user one for root (it keeps the host's uids, so the kernel can
    get a fresh one); all of them, user namespace included, for anyone else."""
    common = ["--die-with-parent", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
              "--unshare-cgroup-try"]
    return common if os.geteuid() == 0 else [*common, "--unshare-user", "--disable-userns"]


def _system_binds() -> list[str]:
    """/usr and /etc read-only, the top-level links of a merged-/usr system, /proc, /dev, and /sys without
    its cgroups (there every box's memory use and processes could be read by every other box)."""
    args = ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc", "--ro-bind-try", "/sys", "/sys"]
    if os.path.isdir("/sys/fs/cgroup"):
        args += ["--tmpfs", "/sys/fs/cgroup"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return [*args, "--proc", "/proc", "--dev", "/dev"]


def _drop_privileges(uid: int) -> list[str]:
    """setpriv's arguments that turn root into ``uid`` with no capability left."""
    return [f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--"]


def _fresh_uid() -> int:
    """An unprivileged uid no running process has (so its process limit is this kernel's alone)."""
    taken = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            taken |= {int(f) for line in status.read_text().splitlines()
                      if line.startswith("Uid:") for f in line.split()[1:]}
        except (OSError, ValueError):
            continue
    while (uid := 2_000_000 + secrets.randbelow(1 << 24)) in taken:
        pass
    return uid


def _parents(path: str) -> list[str]:
    """``--dir`` for every parent of ``path`` (bwrap would make them 0700: unreadable for the uid)."""
    args, parts = [], Path(path).parts
    for i in range(2, len(parts)):
        args += ["--perms", "0755", "--dir", str(Path(*parts[:i]))]
    return args


def _read_only(*paths: str) -> list[str]:
    args: list[str] = []
    for p in dict.fromkeys(str(Path(p)) for p in paths):
        args += [*_parents(p), "--ro-bind", p, p]
    return args


# The course package's modules a kernel may not see: what decides a grade, and the course's own answers.
HIDDEN_MODULES = ("grading", "reference")


def _package_view(package: Path) -> list[str]:
    """The course package as the kernel sees it: an empty in-memory folder with each of the package's
    modules and folders bound back in read-only, but not the hidden ones, neither their source nor their
    bytecode (``__pycache__/reference.cpython-311.pyc`` holds the answers as surely as ``reference.py``).
    A file the grader's machine adds to the package later never appears in the box."""
    args = [*_parents(str(package)), "--perms", "0755", "--size", "1048576", "--tmpfs", str(package)]
    for entry in sorted(package.iterdir()):
        if entry.name == "__pycache__":
            args += ["--perms", "0755", "--dir", str(entry)]
            args += [a for pyc in sorted(entry.glob("*.pyc")) if pyc.name.split(".")[0] not in HIDDEN_MODULES
                     for a in ("--ro-bind", str(pyc), str(pyc))]
        elif (entry.is_dir() or entry.suffix == ".py") and entry.stem not in HIDDEN_MODULES:
            args += ["--ro-bind", str(entry), str(entry)]
    return args


class KeyringCalls(NamedTuple):
    """A machine's system call ABI (AUDIT_ARCH_*) and the kernel keyring's system call numbers there
    (Python has no binding for them)."""

    arch: int
    add_key: int
    request_key: int
    keyctl: int


KEYRING_CALLS = {"x86_64": KeyringCalls(0xC000003E, 248, 249, 250),
                 "aarch64": KeyringCalls(0xC00000B7, 217, 218, 219),
                 "riscv64": KeyringCalls(0xC00000F3, 217, 218, 219)}
KEYCTL_JOIN_SESSION_KEYRING = 1


def _own_session_keyring() -> None:
    """Join a new, anonymous session keyring, which the kernel inherits instead of the grader's: the
    kernel keyring is not namespaced, so any key a grader's session holds would be the box's to read,
    change and pass to another student's kernel. Where keyctl is unknown or refused (a seccomp
    profile), the box cannot reach keys either, so there is nothing to do."""
    calls = KEYRING_CALLS.get(platform.machine())
    if calls is not None:
        ctypes.CDLL(None, use_errno=True).syscall(calls.keyctl, KEYCTL_JOIN_SESSION_KEYRING, None)


def _memory_cgroups() -> tuple[Path, str] | None:
    """(the folder in which this process may make memory cgroups, the file that caps one), or None.

    cgroup v1: the memory controller's folder of this process's cgroup. cgroup v2: its cgroup, if
    that lets its children use the memory controller (v2 allows this only where no process sits
    in the cgroup itself, or at the root: a container's, say). None where neither is writable (not
    root, a read-only /sys/fs/cgroup, macOS): then only the per-process limits hold."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        version = 2 if controllers == "" else 1 if "memory" in controllers.split(",") else None
        if version is None:
            continue
        for mount in mounts:  # "... mount-point ... - cgroup|cgroup2 source super-options"
            fields, tail = mount.split(" - ", 1)
            kind, _, options = tail.split(" ", 2)
            if (kind, version) not in (("cgroup2", 2), ("cgroup", 1)):
                continue
            if version == 2 or "memory" in options.split(","):
                folder = Path(fields.split()[4]) / path.lstrip("/")
                if version == 1 and os.access(folder, os.W_OK):
                    return folder, "memory.limit_in_bytes"
                if version == 2 and _delegates_memory(folder):
                    return folder, "memory.max"
    return None


def _delegates_memory(folder: Path) -> bool:
    try:
        if "memory" not in (folder / "cgroup.subtree_control").read_text().split():
            (folder / "cgroup.subtree_control").write_text("+memory")
        return True
    except OSError:
        return False


def _memory_cgroup(name: str, limit: int) -> Path | None:
    """A new memory cgroup capped at ``limit`` bytes (swap included where v1 counts it), or None."""
    found = _memory_cgroups()
    if found is None:
        return None
    parent, cap = found
    for stale in parent.glob("backprop-ninja-*-*"):  # a grader killed before it closed its box
        owner = stale.name.split("-")[2]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            _remove_cgroup(stale)
    folder = parent / f"backprop-ninja-{name}"
    try:
        folder.mkdir()
    except OSError:
        return None
    try:
        (folder / cap).write_text(str(limit))
    except OSError:
        _remove_cgroup(folder)
        return None
    try:  # v1 counts swap apart: without this a kernel over its cap would swap instead of stopping
        (folder / "memory.memsw.limit_in_bytes").write_text(str(limit))
    except OSError:
        pass
    return folder


def _remove_cgroup(folder: Path) -> None:
    """Kill whatever still runs in the cgroup, then remove it (once its processes are gone)."""
    for _ in range(100):
        try:
            pids = [int(p) for p in (folder / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            pids = []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            folder.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # busy until the killed processes are reaped
            time.sleep(0.02)


# The seccomp filter refuses the keyring's calls (KEYRING_CALLS). A classic BPF program of eleven
# instructions, written out here: libseccomp's own Python bindings are not on PyPI (pyseccomp, a ctypes
# wrapper of them, was last released in January 2021), and this one rule needs no more.
X32_SYSCALL_BIT = 0x40000000  # x86_64's x32 ABI: the same calls under other numbers


def _seccomp_filter() -> bytes | None:
    """The filter bwrap loads (``--seccomp FD``): struct sock_filter {u16 code; u8 jt, jf; u32 k}[]."""
    if platform.machine() not in KEYRING_CALLS:
        return None
    arch, add_key, request_key, keyctl = KEYRING_CALLS[platform.machine()]
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    refuse, allow = 0x00050000 | errno.EPERM, 0x7FFF0000  # SECCOMP_RET_ERRNO | EPERM, SECCOMP_RET_ALLOW
    program = [(load, 0, 0, 4),                # seccomp_data.arch
               (jeq, 1, 0, arch), (ret, 0, 0, refuse),
               (load, 0, 0, 0),                # seccomp_data.nr
               (jge, 0, 1, X32_SYSCALL_BIT), (ret, 0, 0, refuse),
               (jeq, 3, 0, add_key), (jeq, 2, 0, request_key), (jeq, 1, 0, keyctl),
               (ret, 0, 0, allow), (ret, 0, 0, refuse)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


# sun_path of a Unix socket is 108 bytes on Linux, one of them the terminating NUL.
SOCKET_PATH_MAX = 107


class Box:
    """One kernel's sandbox: the folder ``root`` (made by the grader, never visible whole to
    the kernel) with ``runtime/`` (its sockets), ``in/`` and ``out/`` (the hand-in box) and
    ``kernel.log`` (what the kernel process itself writes to stdout/stderr)."""

    def __init__(self, root: Path, limits: Limits = Limits(), isolate: bool = True,
                 env: dict[str, str] | None = None):
        self.root = Path(root)
        self.limits = limits
        self.isolate = isolate and probe() is None
        self.root_mode = os.geteuid() == 0
        self.uid = _fresh_uid() if self.isolate and self.root_mode else os.getuid()
        self.env = dict(env or {})
        self.runtime, self.inbox, self.outbox = (self.root / d for d in ("runtime", "in", "out"))
        for d in (self.runtime, self.inbox, self.outbox):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        if self.isolate and self.root_mode:
            os.chown(self.runtime, self.uid, self.uid)  # the kernel binds its sockets here
        # named after this process: a later box removes it if this process dies before closing it
        self.cgroup = (_memory_cgroup(f"{os.getpid()}-{secrets.token_hex(4)}", limits.memory)
                       if self.isolate else None)

    def close(self) -> None:
        """After the kernel: kill anything of it still running, and remove its memory cgroup."""
        if self.cgroup is not None:
            _remove_cgroup(self.cgroup)

    def socket_base(self) -> str:
        """Where the kernel binds its ZeroMQ ipc sockets (``<this>-<port>``), checked to fit."""
        base = str(self.runtime / "kernel")
        if len(f"{base}-65535".encode()) > SOCKET_PATH_MAX:
            raise UserError(f"The grader's scratch folder {self.root.parent} is too deep for the kernel's "
                            f"sockets (a Unix socket path holds at most {SOCKET_PATH_MAX} bytes): set TMPDIR "
                            "to a short folder, such as /tmp.")
        return base

    @property
    def handin(self) -> str:
        """The hand-in folder as the kernel sees it."""
        return HANDIN if self.isolate else str(self.root)

    def kernel_argv(self) -> list[str]:
        """A kernelspec argv: this module's launcher, then the connection file."""
        spec = {"root": str(self.root), "limits": asdict(self.limits), "isolate": self.isolate,
                "uid": self.uid, "env": self.env, "cgroup": str(self.cgroup) if self.cgroup else None}
        return [sys.executable, "-m", "backprop_ninja.grading.sandbox", json.dumps(spec),
                "{connection_file}"]

    def lock(self) -> None:
        """Once the kernel's sockets exist: it may no longer add files to ``runtime/``."""
        if self.isolate and self.root_mode:
            os.chown(self.runtime, 0, 0)
            os.chmod(self.runtime, 0o755)

    # -- the hand-in box ------------------------------------------------------------------

    def put(self, name: str, data: bytes) -> None:
        """A file the kernel may read (it cannot write ``in/``)."""
        (self.inbox / name).write_bytes(data)

    def slot(self, name: str) -> None:
        """An empty file in ``out/`` that the kernel may fill (``out/`` itself stays the grader's)."""
        path = self.outbox / name
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        if self.isolate and self.root_mode:
            os.chown(path, self.uid, self.uid)

    def take(self, name: str, max_bytes: int) -> bytes | None:
        """What the kernel wrote into slot ``name`` (None: empty, too big or not a plain file),
        read without following links; the slot is removed."""
        dir_fd = os.open(self.outbox, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError:
            os.close(dir_fd)
            return None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or not 0 < info.st_size <= max_bytes:
                return None
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read(max_bytes + 1)[:max_bytes]
        finally:
            os.close(fd)
            os.unlink(name, dir_fd=dir_fd)
            os.close(dir_fd)

    def clear_inbox(self) -> None:
        for path in self.inbox.iterdir():
            path.unlink()


# --- the launcher: runs as the grader, outside the box, then becomes bwrap ---------------------


def _package_dir() -> Path:
    return Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    return Path(os.environ.get("BACKPROP_NINJA_DATA", _package_dir().parent / "data")).resolve()


def _matplotlib_cache() -> Path | None:
    """A matplotlib font cache built once, outside every sandbox: a kernel with a fresh home
    would otherwise spend a second building it before its first plot."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "backprop-ninja" / "matplotlib"
    if not any(cache.glob("fontlist-*.json")):
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"], capture_output=True,
                       env={**os.environ, "MPLCONFIGDIR": str(cache)}, timeout=300, check=False)
    found = sorted(cache.glob("fontlist-*.json"))
    return found[-1] if found else None


def _kernel_env(spec: dict, handin: str, home: str) -> dict[str, str]:
    env = {"HOME": home, "USER": "learner", "LOGNAME": "learner", "LANG": "C.UTF-8",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
           "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg",
           "MPLCONFIGDIR": MPL_DIR,
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", HANDIN_ENV: handin,
           "BACKPROP_NINJA_DATA": str(_data_dir()),
           # the kernel imports the very package the grader runs (a checkout, or site-packages)
           "PYTHONPATH": str(_package_dir().parent)}
    return {**env, **spec["env"]}


def _set_limits(limits: dict, uid_limit: bool) -> None:
    cpu = 2 * limits["notebook_timeout"]
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory"], limits["memory"]))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if uid_limit:  # counted per uid: only meaningful for a uid of the kernel's own
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))


def _font_cache() -> list[str]:
    """A writable matplotlib folder in the box's /tmp with the prebuilt font cache in it, read-only."""
    fonts = _matplotlib_cache()
    args = ["--perms", "1777", "--dir", MPL_DIR]
    return [*args, "--ro-bind", str(fonts), f"{MPL_DIR}/{fonts.name}"] if fonts else args


def _bwrap_argv(spec: dict, connection: str, kernel: list[str], seccomp_fd: int | None = None) -> list[str]:
    root, limits, uid = Path(spec["root"]), spec["limits"], spec["uid"]
    package = _package_dir()
    home_size = str(limits["home_bytes"])
    args = [_bwrap(), *_namespaces(), *_system_binds(),
            "--perms", "1777", "--size", home_size, "--tmpfs", "/tmp",
            *_read_only(sys.base_prefix, sys.prefix), *_package_view(package),
            *_read_only(str(_data_dir())),
            *_font_cache(),
            *_parents(HOME), "--perms", "0700" if not spec["uid_switch"] else "1777", "--size", home_size,
            "--tmpfs", HOME,
            *_parents(str(root / "runtime")), "--bind", str(root / "runtime"), str(root / "runtime"),
            *_parents(HANDIN + "/in"), "--ro-bind", str(root / "in"), HANDIN + "/in",
            "--bind", str(root / "out"), HANDIN + "/out",
            "--chdir", HOME, "--clearenv"]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    for key, value in _kernel_env(spec, HANDIN, HOME).items():
        args += ["--setenv", key, value]
    args.append("--")
    if spec["uid_switch"]:
        args += ["setpriv", *_drop_privileges(uid)]
    return [*args, *kernel]


def main(argv: list[str] | None = None) -> None:
    """``python -m backprop_ninja.grading.sandbox SPEC CONNECTION_FILE [kernel args]``."""
    argv = sys.argv[1:] if argv is None else argv
    spec, connection, extra = json.loads(argv[0]), argv[1], argv[2:]
    root = Path(spec["root"])
    spec["uid_switch"] = spec["isolate"] and os.geteuid() == 0
    # The grader's connection file is private to it; the kernel reads a copy in its runtime folder.
    copy = root / "runtime" / "kernel.json"
    copy.write_bytes(Path(connection).read_bytes())
    os.chmod(copy, 0o644)
    kernel = [sys.executable, "-m", "ipykernel_launcher", "-f", str(copy), *extra]
    log = os.open(root / "kernel.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    _set_limits(spec["limits"], uid_limit=spec["uid_switch"])
    _own_session_keyring()
    if spec.get("cgroup"):  # the box and everything it starts are charged to the box's cgroup
        (Path(spec["cgroup"]) / "cgroup.procs").write_text(str(os.getpid()))
    if spec["isolate"]:
        program, seccomp_fd = _seccomp_filter(), None
        if program is not None:  # bwrap reads it from a file descriptor it inherits
            seccomp_fd = os.memfd_create("seccomp")
            os.pwrite(seccomp_fd, program, 0)
            os.set_inheritable(seccomp_fd, True)
        cmd = _bwrap_argv(spec, str(copy), kernel, seccomp_fd)
        os.execv(cmd[0], cmd)
    os.chdir(root)
    env = {**os.environ, **_kernel_env(spec, str(root), str(root / "home"))}
    fonts = _matplotlib_cache()
    env["MPLCONFIGDIR"] = str(fonts.parent) if fonts else str(root / "home")
    (root / "home").mkdir(exist_ok=True)
    os.execve(kernel[0], kernel, env)


if __name__ == "__main__":
    main()
