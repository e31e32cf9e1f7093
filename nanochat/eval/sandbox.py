"""Run untrusted (model-written) Python in a separate, limited, always-killed process.

Layers, outermost first:
  - a child process in its own session / process group, killed as a group (SIGKILL) on timeout
    and again in a `finally`, so nothing it forked outlives the call;
  - rlimits set before exec: address space (memory), CPU seconds, file size, core dumps off;
  - a fresh temporary directory as cwd, removed afterwards; stdout/stderr go to files there, so
    RLIMIT_FSIZE also bounds how much output a runaway print loop can produce;
  - inside the child, before the code runs: a private network namespace (`unshare(CLONE_NEWNET)`:
    needs root or CAP_SYS_ADMIN), else Landlock's TCP bind/connect ban (Linux >= 6.7, unprivileged);
    a Landlock file-system rule allowing writes only under the sandbox directory (Linux >= 5.13);
    Landlock scoping, so no signals reach processes outside the sandbox (Linux >= 6.12);
    then the Python-level guard, which removes process, file-deletion and shell functions.
The Python guard alone can be bypassed by determined code; the OS layers are what hold. Which
ones applied is reported in the result ("isolation"), and `network_isolated` is True only for a
network namespace.
"""
from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

TAIL_CHARS = 2000

# Runs inside the child. Reads the program and a nonce from stdin, locks itself down, runs the
# program, and prints the nonce only if the program ran to its end (so sys.exit(0) or os._exit in
# the middle of a test does not count as a pass).
BOOTSTRAP = r'''
import builtins, json, os, sys
payload = json.loads(sys.stdin.read())
sys.stdin.close()
status = {"isolation": []}

def _isolate(sandbox_dir):
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except Exception:
        return
    if libc.unshare(0x40000000) == 0:  # CLONE_NEWNET: a namespace with only a down loopback
        status["isolation"].append("netns")
    sys_create, sys_add_rule, sys_restrict = 444, 445, 446  # same numbers on x86_64 and arm64
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(sys_create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return
    write_fs = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12)
    if abi >= 2:
        write_fs |= 1 << 13  # REFER (link/rename across directories)
    if abi >= 3:
        write_fs |= 1 << 14  # TRUNCATE
    net = 0b11 if abi >= 4 and "netns" not in status["isolation"] else 0  # BIND_TCP | CONNECT_TCP
    scoped = 0b11 if abi >= 6 else 0  # no signals to, no abstract unix sockets of, processes outside
    attr = (ctypes.c_uint64 * 3)(write_fs, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    fd = libc.syscall(sys_create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        return
    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
    dir_fd = os.open(sandbox_dir, os.O_PATH | getattr(os, "O_CLOEXEC", 0))
    rule = PathBeneath(write_fs, dir_fd)
    ok = libc.syscall(sys_add_rule, ctypes.c_int(fd), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0)) == 0
    ok = ok and libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    ok = ok and libc.syscall(sys_restrict, ctypes.c_int(fd), ctypes.c_uint32(0)) == 0
    os.close(dir_fd)
    os.close(fd)
    if ok:
        status["isolation"].append("landlock-fs")
        if net:
            status["isolation"].append("landlock-tcp")
        if scoped:
            status["isolation"].append("landlock-signals")

def _guard(sandbox_dir):
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
                 "putenv", "unsetenv", "plock", "register_at_fork"):
        if hasattr(os, name):
            setattr(os, name, refuse(f"os.{name}"))
    for name in ("rmtree", "move", "chown", "copyfile", "copytree"):
        setattr(shutil, name, refuse(f"shutil.{name}"))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, refuse(f"subprocess.{name}"))
    import io
    real_open, real_os_open = builtins.open, os.open
    root = os.path.realpath(sandbox_dir)
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
    blocked = ["ctypes", "resource", "psutil", "multiprocessing", "pty"]
    if "netns" not in status["isolation"]:
        blocked.append("socket")  # no network namespace: keep the socket module out at least
    for mod in blocked:
        sys.modules[mod] = None

if payload["isolate"]:
    _isolate(payload["dir"])
with open(os.path.join(payload["dir"], ".sandbox_status.json"), "w") as f:
    json.dump(status, f)
_guard(payload["dir"])
nonce = payload.pop("nonce")
code = compile(payload.pop("code"), "solution.py", "exec")
del payload
exec(code, {"__name__": "__main__", "__builtins__": builtins})
sys.stdout.flush()
os.write(1, ("\n" + nonce + "\n").encode())
'''


def _limits(memory_bytes: int, cpu_seconds: int, file_bytes: int):
    """preexec_fn: only async-signal-tolerant work (setrlimit) between fork and exec."""
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # RLIMIT_NPROC counts every process of the user (and is ignored for root), so it cannot
        # bound this child alone; forking is refused by the in-child guard instead.
    return apply


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Path, nonce: str | None = None) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * TAIL_CHARS))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    if nonce:
        text = text.replace(nonce, "")
    return text[-TAIL_CHARS:]


def run_code(code: str, timeout: float = 10.0, memory_mb: int = 1024, file_mb: int = 16,
             isolate: bool = True) -> dict:
    """Run `code` in a sandboxed child Python; returns
    {passed, timed_out, returncode, stdout, stderr (tails), error, network_isolated, isolation}.

    `passed` means the code ran to its end and the process exited 0.
    """
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout ({timeout}) and memory_mb ({memory_mb}) must be positive")
    sandbox_dir = Path(tempfile.mkdtemp(prefix="nanochat_sandbox_"))
    nonce = secrets.token_hex(16)
    result = {"passed": False, "timed_out": False, "returncode": None, "stdout": "", "stderr": "",
              "error": None, "network_isolated": False, "isolation": []}
    proc = None
    try:
        with open(sandbox_dir / "stdout.txt", "wb") as out, open(sandbox_dir / "stderr.txt", "wb") as err:
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
                   "PYTHONIOENCODING": "utf-8", "HOME": str(sandbox_dir), "TMPDIR": str(sandbox_dir)}
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", BOOTSTRAP], stdin=subprocess.PIPE, stdout=out, stderr=err,
                cwd=sandbox_dir, env=env, start_new_session=True, close_fds=True,
                preexec_fn=_limits(memory_mb * 2**20, int(timeout) + 1, file_mb * 2**20))
            payload = json.dumps({"code": code, "nonce": nonce, "dir": str(sandbox_dir), "isolate": isolate})
            try:
                proc.stdin.write(payload.encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                result["timed_out"] = True
                result["error"] = f"timed out after {timeout:g} s"
                _kill_group(proc)
        result["returncode"] = proc.returncode
        stdout = _tail(sandbox_dir / "stdout.txt")
        finished = nonce in stdout
        result["stdout"] = stdout.replace(nonce, "").rstrip("\n")[-TAIL_CHARS:]
        result["stderr"] = _tail(sandbox_dir / "stderr.txt")
        result["passed"] = bool(finished and proc.returncode == 0 and not result["timed_out"])
        if not result["passed"] and result["error"] is None:
            last = result["stderr"].strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            if proc.returncode is not None and proc.returncode < 0:
                last = [f"killed by signal {-proc.returncode} ({signal.Signals(-proc.returncode).name})"]
            result["error"] = last[0]
        try:
            status = json.loads((sandbox_dir / ".sandbox_status.json").read_text())
            result["isolation"] = status.get("isolation", [])
            result["network_isolated"] = "netns" in result["isolation"]
        except (OSError, ValueError):
            pass
    finally:
        if proc is not None:
            _kill_group(proc)
        shutil.rmtree(sandbox_dir, ignore_errors=True)
    return result
