"""Run untrusted (model-written) Python as an unprivileged, isolated, limited, always-killed process.

Two backends; `sandbox_setup()` picks one per process, after checking that it really runs, and logs it:

- "bwrap" (bubblewrap, `apt-get install bubblewrap`; needs user namespaces): the child gets its own user,
  PID, mount, network, IPC and UTS namespaces. It sees /usr and the Python install read-only, a fresh /proc
  (its own processes only) and a minimal /dev, and writes only to its working dir, a private tmpfs of
  `file_mb`. The host's /tmp, /home, /root, /run (Unix sockets), /proc/<pid> entries and network are absent.
- "fallback" (no bwrap, or user namespaces off): no private file system view. As root: private network and
  IPC namespaces. Landlock (Linux >= 5.13, unprivileged) confines reads to the Python install and /usr and
  writes to the working dir, denies TCP (>= 6.7), and blocks signals to outside processes (>= 6.12).

Both: the child runs as a fresh uid from a range no account uses (when we are root; otherwise as
ourselves), in a new session, with rlimits on address space, CPU seconds, file size and processes, and no
core dumps. At the timeout and at the end, its process group is killed and, as root, every process of its
uid (a `setsid` child included); under bwrap the PID namespace dies with it. The Python-level guard inside
(os.system & co. raise) only stops accidents: code can get around it, the layers above are what hold.
SECURITY.md lists the promises and the attacks they were tested against.

`run_code` reports what the code did (exit status, output tails); it is no verdict, since the code
controls both. nanochat/eval/judge.py gets a verdict the code cannot forge.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import log0

TAIL_CHARS = 2000
UID_BASE, UID_COUNT = 1_700_000_000, 100_000_000  # one fresh uid per run (no account uses these)
CLONE_NEWIPC, CLONE_NEWNET = 0x08000000, 0x40000000

# Runs inside the child, before the program: reads the payload from stdin, locks the process down
# (Landlock, then the guard), reports which layers held on the status fd, and runs the program.
BOOTSTRAP = r'''
import builtins, json, os, sys
payload = json.loads(sys.stdin.read())
sys.stdin.close()
layers = []

def _landlock(work_dir, read_roots):
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except Exception:
        return
    sys_create, sys_add_rule, sys_restrict = 444, 445, 446  # same numbers on x86_64 and arm64
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(sys_create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return
    read = (1 << 0) | (1 << 2) | (1 << 3)  # EXECUTE, READ_FILE, READ_DIR
    write = (1 << 1) | sum(1 << b for b in range(4, 13))  # WRITE_FILE, REMOVE_*, MAKE_*
    if abi >= 2:
        write |= 1 << 13  # REFER (link/rename across directories)
    if abi >= 3:
        write |= 1 << 14  # TRUNCATE
    if abi >= 5:
        write |= 1 << 15  # IOCTL_DEV
    net = 0b11 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, with no rule allowing any port
    scoped = 0b11 if abi >= 6 else 0  # no signals to, no abstract unix sockets of, processes outside
    attr = (ctypes.c_uint64 * 3)(read | write, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    fd = libc.syscall(sys_create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        return
    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
    file_rights = (1 << 0) | (1 << 1) | (1 << 2) | (write & ((1 << 14) | (1 << 15)))
    rules = [(work_dir, read | write)] + [(p, read) for p in read_roots]
    rules += [(p, (1 << 1) | (1 << 2)) for p in ("/dev/null", "/dev/zero", "/dev/urandom")]
    ok = True
    for path, rights in rules:
        try:
            dir_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not os.path.isdir(path):
            rights &= file_rights
        rule = PathBeneath(rights, dir_fd)
        ok = ok and libc.syscall(sys_add_rule, ctypes.c_int(fd), ctypes.c_int(1), ctypes.byref(rule),
                                 ctypes.c_uint32(0)) == 0
        os.close(dir_fd)
    ok = ok and libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    ok = ok and libc.syscall(sys_restrict, ctypes.c_int(fd), ctypes.c_uint32(0)) == 0
    os.close(fd)
    if ok:
        layers.append("landlock-fs")
        if net:
            layers.append("landlock-tcp")
        if scoped:
            layers.append("landlock-signals")

def _guard(work_dir, netns):
    def refuse(name):
        def refused(*args, **kwargs):
            raise PermissionError(f"{name} is disabled in the sandbox")
        return refused
    import shutil, subprocess
    for name in ("system", "popen", "kill", "killpg", "fork", "forkpty", "execv", "execve", "execvp", "execvpe",
                 "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl",
                 "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp", "remove", "unlink", "rmdir",
                 "removedirs", "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod", "chown",
                 "fchown", "lchown", "chroot", "chdir", "fchdir", "link", "symlink", "setuid", "setgid",
                 "putenv", "unsetenv", "plock"):
        if hasattr(os, name):
            setattr(os, name, refuse(f"os.{name}"))
    for name in ("rmtree", "move", "chown", "copyfile", "copytree"):
        setattr(shutil, name, refuse(f"shutil.{name}"))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, refuse(f"subprocess.{name}"))
    import io
    real_open, real_os_open = builtins.open, os.open
    root = os.path.realpath(work_dir)
    def check_inside(file):
        if isinstance(file, (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(file))
            if path != root and not path.startswith(root + os.sep):
                raise PermissionError(f"writing outside the sandbox directory is disabled: {path}")
    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in str(mode) for c in "wax+"):
            check_inside(file)
        return real_open(file, mode, *args, **kwargs)
    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            check_inside(path)
        return real_os_open(path, flags, *args, **kwargs)
    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
    builtins.exit = builtins.quit = refuse("exit")
    for mod in ["ctypes", "resource", "psutil", "multiprocessing", "pty"] + ([] if netns else ["socket"]):
        sys.modules[mod] = None

_landlock(payload["dir"], payload["read_roots"])
os.write(payload["status_fd"], json.dumps(layers).encode())
os.close(payload["status_fd"])
_guard(payload["dir"], payload["netns"])
code = compile(payload.pop("code"), "solution.py", "exec")
del payload
exec(code, {"__name__": "__main__", "__builtins__": builtins})
'''

@dataclass(frozen=True)
class Limits:
    """What one sandboxed run may use. Worst case memory: max_procs x memory_mb."""
    timeout: float = 10.0     # wall-clock seconds, then everything is killed
    memory_mb: int = 512      # address space per process
    file_mb: int = 16         # size of any file it writes (and, under bwrap, all its files together)
    max_procs: int = 8        # processes and threads

    def __post_init__(self):
        if self.timeout <= 0 or self.memory_mb <= 0 or self.file_mb <= 0 or self.max_procs < 1:
            raise ValueError(f"sandbox limits must be positive: {self}")


@dataclass(frozen=True)
class Setup:
    """How this machine runs sandboxes (chosen once per process by `sandbox_setup`)."""
    backend: str              # "bwrap" | "fallback"
    python: str               # an interpreter the sandbox's uid can run (stdlib only: -I -S)
    as_root: bool             # we are root: each run gets a fresh unprivileged uid
    private_net: bool = True  # fallback as root: network and IPC namespaces (off where the kernel refuses them)

    @property
    def layers(self) -> list[str]:
        fresh_uid = ["fresh-uid"] if self.as_root else []
        if self.backend == "bwrap":
            return fresh_uid + ["userns", "pidns", "mountns", "netns", "ipcns", "rlimits"]
        return fresh_uid + (["netns", "ipcns"] if self.as_root and self.private_net else []) + ["rlimits"]


def _read_roots(python: str) -> list[str]:
    """What the child may read: /usr (merged /bin, /lib), the interpreter's install, the loader cache."""
    prefix = str(Path(python).resolve().parents[1])
    return sorted({"/usr", prefix, "/etc/ld.so.cache"})


def _bwrap_argv(setup: Setup, work_dir: str, limits: Limits, env: dict) -> list[str]:
    argv = ["bwrap", "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--clearenv"]
    for path in _read_roots(setup.python):
        argv += ["--ro-bind-try", path, path]
    for path in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):  # merged /usr: symlinks into /usr
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(limits.file_mb * 2**20), "--tmpfs", work_dir,
             "--chdir", work_dir, "--remount-ro", "/dev", "--remount-ro", "/"]
    for key, value in env.items():
        argv += ["--setenv", key, value]
    return argv + ["--"]


def _own_tasks(uid: int) -> int:
    """Processes and threads of `uid` now: RLIMIT_NPROC counts all of them, not only the sandbox's."""
    count = 0
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return count


def _preexec(setup: Setup, uid: int, limits: Limits, libc):
    """Runs in the child between fork and exec: namespaces (as root), drop to `uid`, rlimits."""
    nproc = limits.max_procs + (2 if setup.backend == "bwrap" else 0)  # bwrap's own two processes
    if not setup.as_root:
        nproc += _own_tasks(uid)
    memory, cpu, fsize = limits.memory_mb * 2**20, int(limits.timeout) + 1, limits.file_mb * 2**20

    def apply():
        if setup.as_root:
            if setup.backend == "fallback" and setup.private_net and libc.unshare(CLONE_NEWNET | CLONE_NEWIPC) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET | CLONE_NEWIPC) failed")
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        for which, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu),
                             (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NPROC, nproc),
                             (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(which, (value, value))
    return apply


def _live_pids_of(uid: int) -> list[int]:
    """Processes (not zombies) with `uid` as their real, effective, saved or file-system uid."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if str(uid) in fields.get("Uid", "").split() and fields.get("State", "").split()[:1] not in (["Z"], ["X"]):
            pids.append(int(pid))
    return pids


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of the run's uid (fresh per run, so nothing else has it) until none is left."""
    for _ in range(100):
        pids = _live_pids_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    log0(f"sandbox: processes {_live_pids_of(uid)} of uid {uid} survived 100 rounds of SIGKILL")


class Sandboxed:
    """One sandboxed Python process running `code`; `close()` (or leaving the `with`) kills all of it."""

    def __init__(self, code: str, limits: Limits, setup: Setup, pass_fds: tuple[int, ...] = ()):
        self.limits, self.setup = limits, setup
        self.uid = UID_BASE + secrets.randbelow(UID_COUNT) if setup.as_root else os.getuid()
        self.started = time.monotonic()
        self.timed_out = False
        # the parent's dir (output files, 0711 root): under bwrap the child's working dir is a tmpfs at the
        # same path; in the fallback it is the subdir work/, owned by the run's uid
        self.host_dir = Path(tempfile.mkdtemp(prefix="nanochat_sandbox_"))
        self.proc: subprocess.Popen | None = None
        status_r, status_w = os.pipe()
        try:
            work_dir = self.host_dir if setup.backend == "bwrap" else self.host_dir / "work"
            if setup.backend == "fallback":
                work_dir.mkdir(mode=0o700)
                if setup.as_root:
                    os.chown(work_dir, self.uid, self.uid)
                    self.host_dir.chmod(0o711)
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
                   "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(work_dir), "TMPDIR": str(work_dir)}
            argv = [setup.python, "-I", "-S", "-B", "-c", BOOTSTRAP]
            if setup.backend == "bwrap":
                argv = _bwrap_argv(setup, str(work_dir), limits, env) + argv
            libc = ctypes.CDLL(None, use_errno=True) if setup.as_root else None
            with open(self.host_dir / "stdout.txt", "wb") as out, open(self.host_dir / "stderr.txt", "wb") as err:
                self.proc = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work_dir, env=env,
                    start_new_session=True, close_fds=True, pass_fds=(*pass_fds, status_w),
                    preexec_fn=_preexec(setup, self.uid, limits, libc))
            payload = {"code": code, "dir": str(work_dir), "read_roots": _read_roots(setup.python),
                       "netns": "netns" in setup.layers, "status_fd": status_w}
            try:
                self.proc.stdin.write(json.dumps(payload).encode())
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        except BaseException:
            os.close(status_r)
            self.close()
            raise
        finally:
            os.close(status_w)
        os.set_blocking(status_r, False)  # read after the end: never wait on it
        self._status_r = status_r

    def wait(self) -> bool:
        """Wait until the process ends or its time is up (then kill it all); True if it ended in time."""
        left = self.limits.timeout - (time.monotonic() - self.started)
        try:
            self.proc.wait(timeout=max(left, 0.001))
            return True
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.kill()
            return False

    def kill(self) -> None:
        """SIGKILL its process group, reap it, then (as root) every process left with its uid."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log0(f"sandbox: process {self.proc.pid} did not die within 5 s of SIGKILL")
        if self.setup.as_root:
            _kill_uid(self.uid)

    def result(self) -> dict:
        """{returncode, timed_out, stdout, stderr (tails), error, backend, isolation}; call after wait()."""
        code = self.proc.returncode
        if self.setup.backend == "bwrap" and code is not None and code > 128:
            code = -(code - 128)  # bwrap reports a child killed by signal N as 128 + N
        stderr = _tail(self.host_dir / "stderr.txt")
        error = None
        if self.timed_out:
            error = f"timed out after {self.limits.timeout:g} s"
        elif code is not None and code < 0:
            error = f"killed by signal {-code} ({signal.Signals(-code).name})"
        elif code:
            error = (stderr.strip().splitlines() or [f"exit code {code}"])[-1]
        try:
            child_layers = json.loads(os.read(self._status_r, 4096) or b"[]")
        except (OSError, ValueError):
            child_layers = []
        return {"returncode": code, "timed_out": self.timed_out, "stdout": _tail(self.host_dir / "stdout.txt"),
                "stderr": stderr, "error": error, "backend": self.setup.backend,
                "isolation": self.setup.layers + child_layers}

    def close(self) -> None:
        self.kill()
        if hasattr(self, "_status_r"):
            os.close(self._status_r)
            del self._status_r
        shutil.rmtree(self.host_dir, ignore_errors=True)

    def __enter__(self) -> "Sandboxed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * TAIL_CHARS))
            return f.read().decode("utf-8", errors="replace").rstrip("\n")[-TAIL_CHARS:]
    except OSError:
        return ""


def _python_candidates() -> list[str]:
    """This interpreter, else a system one: the sandbox's uid may not reach ours (e.g. under /root)."""
    found = [os.path.realpath(sys.executable), shutil.which("python3") or "", "/usr/bin/python3"]
    return list(dict.fromkeys(os.path.realpath(p) for p in found if p and os.path.isfile(p)))


def _works(setup: Setup) -> str | None:
    """None if a sandbox of `setup` runs a program; else why not."""
    try:
        with Sandboxed("import hashlib, json; print('ok')", Limits(timeout=20), setup) as box:
            box.wait()
            r = box.result()
    except OSError as e:
        return str(e)
    return None if r["returncode"] == 0 and r["stdout"] == "ok" else (r["error"] or r["stderr"] or "no output")


def sandbox_setup(backend: str = "auto") -> Setup:
    """The first backend/interpreter pair that works here ("auto": bwrap, then the fallback); logged once."""
    if backend not in ("auto", "bwrap", "fallback"):
        raise ValueError(f"sandbox backend must be auto, bwrap or fallback, got {backend!r}")
    return _find_setup(backend)


@functools.lru_cache(maxsize=None)
def _find_setup(backend: str) -> Setup:
    as_root = os.geteuid() == 0
    tried = []
    backends = ["bwrap", "fallback"] if backend == "auto" else [backend]
    for name in backends:
        if name == "bwrap" and shutil.which("bwrap") is None:
            tried.append("bwrap: not installed (apt-get install bubblewrap)")
            continue
        for python in _python_candidates():
            for private_net in ([True, False] if name == "fallback" and as_root else [True]):
                setup = Setup(name, python, as_root, private_net)
                why = _works(setup)
                if why is None:
                    note = f" ({'; '.join(tried)})" if tried else ""
                    log0(f"sandbox: {name} with {python}, layers {', '.join(setup.layers)}{note}")
                    return setup
                tried.append(f"{name} with {python}{'' if private_net else ', no namespaces'}: {why}")
    raise RuntimeError("no sandbox works on this machine: " + "; ".join(tried) + ". Install bubblewrap "
                       "(`apt-get install bubblewrap`) with user namespaces enabled, or a Python that other "
                       "users can run (the sandbox runs as an unprivileged uid)")


def run_code(code: str, timeout: float = 10.0, memory_mb: int = 512, file_mb: int = 16, max_procs: int = 8,
             backend: str = "auto") -> dict:
    """Run `code` (stdlib only) in a sandbox; returns {returncode, timed_out, stdout, stderr (tails), error,
    backend, isolation}. What the code reports about itself is no verdict: see nanochat/eval/judge.py."""
    limits = Limits(timeout, memory_mb, file_mb, max_procs)
    with Sandboxed(code, limits, sandbox_setup(backend)) as box:
        box.wait()
        return box.result()
