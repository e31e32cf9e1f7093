"""The sandbox against code that tries to get out: escapes, fork and memory bombs, floods and timeouts.

Every attack goes around the in-process Python guard on purpose (`posix.*`, a reloaded `subprocess`, a
re-imported `ctypes`): the OS layers must hold alone. Each test runs on both backends (bubblewrap and the
fallback); a backend this machine lacks is skipped, except on CI, which installs bubblewrap.
Every run is bounded: small timeouts, 256 MB of memory, a few processes.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid

import pytest

from nanochat.eval.sandbox import Limits, run_code, sandbox_setup

AS_ROOT = os.geteuid() == 0
BYPASS = "import posix, importlib, subprocess, sys\nsubprocess = importlib.reload(subprocess)\n"




def run(code: str, backend: str, **kw) -> dict:
    kw.setdefault("timeout", 10)
    kw.setdefault("memory_mb", 256)
    return run_code(code, backend=backend, **kw)


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line holds `marker` (zombies have none)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and marker.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                found.append(int(pid))
        except OSError:
            pass
    return found


# ---- it runs, and reports ----------------------------------------------------------------------------------

def test_code_runs_and_reports(backend):
    r = run("import hashlib, json, math, random, re\nprint('ok', sum(range(10)))", backend)
    assert r["returncode"] == 0 and r["stdout"] == "ok 45" and r["error"] is None and not r["timed_out"]
    assert r["backend"] == backend and "rlimits" in r["isolation"]
    if AS_ROOT:
        assert "fresh-uid" in r["isolation"]
    r = run("assert 1 + 1 == 3", backend)
    assert r["returncode"] == 1 and "AssertionError" in r["error"]


def test_runs_as_a_fresh_unprivileged_uid(backend):
    if not AS_ROOT:
        pytest.skip("a fresh uid is given only when the parent is root")
    uids = [int(run("import os\nprint(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())", backend)
                ["stdout"].split()[0]) for _ in range(2)]
    assert all(u >= 1_000_000 for u in uids) and uids[0] != uids[1]


def test_writes_inside_work_dir_work_and_vanish(backend):
    r = run("import os\nopen('a.txt', 'w').write('hi')\nprint(open('a.txt').read(), os.getcwd())", backend)
    text, cwd = r["stdout"].split()
    assert r["returncode"] == 0 and text == "hi" and "nanochat_sandbox_" in cwd and not os.path.exists(cwd)


# ---- escapes ----------------------------------------------------------------------------------------------

def test_shell_and_subprocess_cannot_touch_the_host(backend, tmp_path):
    # posix.system, a reloaded subprocess and a re-imported ctypes all run a shell; none may write outside
    targets = [tmp_path / f"t{i}" for i in range(3)] + [f"/tmp/nanochat_escape_{uuid.uuid4().hex}"]
    os.chmod(tmp_path, 0o777)  # the file system permissions alone would let anyone write here
    code = BYPASS + (
        f"posix.system('touch {targets[0]} {targets[3]}')\n"
        f"subprocess.run(['sh', '-c', 'echo x > {targets[1]}'])\n"
        "del sys.modules['ctypes']\nimport ctypes\n"
        f"ctypes.CDLL(None).system(b'touch {targets[2]}')\n")
    r = run(code, backend)
    assert r["returncode"] == 0, r["stderr"]  # the shell ran: the guard is bypassed, the OS layers hold
    try:
        assert not any(os.path.exists(t) for t in targets)
    finally:
        for t in targets:
            if os.path.exists(t):
                os.remove(t)


@pytest.mark.parametrize("how", ["open", "os.open", "pathlib"])
def test_write_outside_work_dir_is_stopped(backend, tmp_path, how):
    os.chmod(tmp_path, 0o777)
    target = tmp_path / "outside.txt"
    code = {"open": f"open({str(target)!r}, 'w').write('x')",
            "os.open": f"import posix\nfd = posix.open({str(target)!r}, posix.O_WRONLY | posix.O_CREAT)\n"
                       "posix.write(fd, b'x')",
            "pathlib": f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')"}[how]
    r = run(code, backend)
    assert r["returncode"] != 0 and not target.exists()


def test_metadata_of_host_files_cannot_change(backend, tmp_path):
    if not AS_ROOT:
        pytest.skip("as a normal user the sandbox has that user's rights on that user's files")
    os.chmod(tmp_path, 0o755)
    victim = tmp_path / "victim"
    victim.write_text("data")
    os.chmod(victim, 0o644)
    before = os.stat(victim)
    code = (f"import posix\np = {str(victim)!r}\n"
            "for name, call in [('chmod', lambda: posix.chmod(p, 0o777)), ('chown', lambda: posix.chown(p, 0, 0)),\n"
            "                   ('utime', lambda: posix.utime(p, (1, 1)))]:\n"
            "    try:\n        call()\n        print(name, 'done')\n"
            "    except OSError as e:\n        print(name, 'refused', e.errno)\n")
    r = run(code, backend)
    after = os.stat(victim)
    assert "done" not in r["stdout"] and r["stdout"].count("refused") == 3
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (before.st_mode, before.st_uid, before.st_mtime_ns)


def test_host_files_cannot_be_read(backend, tmp_path):
    os.chmod(tmp_path, 0o755)
    secret = tmp_path / "secret.txt"
    token = uuid.uuid4().hex
    secret.write_text(token)
    os.chmod(secret, 0o644)  # readable by every user: only the sandbox's own view may hide it
    code = f"try:\n    print(open({str(secret)!r}).read())\nexcept OSError as e:\n    print('refused', e.errno)"
    r = run(code, backend)
    assert token not in r["stdout"] and "refused" in r["stdout"]


def test_other_processes_environment_cannot_be_read(backend):
    token = uuid.uuid4().hex
    holder = subprocess.Popen(["sleep", "30"], env={"SECRET": token})
    try:
        code = (f"try:\n    print(open('/proc/{holder.pid}/environ', 'rb').read())\n"
                f"except OSError as e:\n    print('refused', e.errno)\n"
                f"try:\n    print(open('/proc/{os.getpid()}/environ', 'rb').read())\n"
                f"except OSError as e:\n    print('refused', e.errno)\n")
        r = run(code, backend)
    finally:
        holder.kill()
        holder.wait()
    assert token not in r["stdout"] and r["stdout"].count("refused") == 2


def test_host_unix_socket_cannot_be_reached(backend, tmp_path):
    if backend == "fallback":
        pytest.skip("the fallback has no mount namespace: a socket file that the file permissions open to "
                    "everyone stays reachable (SECURITY.md)")
    os.chmod(tmp_path, 0o777)
    path = str(tmp_path / "host.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o777)
    assert_unreachable(server, "_socket.AF_UNIX, _socket.SOCK_STREAM", repr(path), backend)


def test_no_network_even_to_the_host_loopback(backend):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    assert_unreachable(server, "_socket.AF_INET, _socket.SOCK_STREAM", repr(("127.0.0.1", server.getsockname()[1])),
                       backend)


def assert_unreachable(server: socket.socket, family: str, address: str, backend: str) -> None:
    """Sandboxed code that connects to the listening `server` is refused, and the server sees no one."""
    server.listen(1)
    server.settimeout(0.2)
    try:
        code = (f"import _socket\ns = _socket.socket({family})\ns.settimeout(2)\n"
                f"try:\n    s.connect({address})\n    print('connected')\n"
                "except OSError as e:\n    print('refused', e.errno)")
        r = run(code, backend)
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    assert "connected" not in r["stdout"] and "refused" in r["stdout"]


# ---- limits and the timeout -------------------------------------------------------------------------------

def test_setsid_child_does_not_outlive_the_run(backend):
    marker = f"nanochat_marker_{uuid.uuid4().hex}"
    code = BYPASS + (f"if posix.fork() == 0:\n    posix.setsid()\n"
                     f"    posix.execv('/bin/sh', ['sh', '-c', 'while :; do :; done', '{marker}'])\n"
                     "while True:\n    pass\n")
    t0 = time.time()
    r = run(code, backend, timeout=2)
    assert r["timed_out"] and "timed out" in r["error"] and time.time() - t0 < 10
    assert processes_with(marker) == []
    # a daemon left behind by code that ends normally goes too
    r = run(code.replace("while True:\n    pass\n", "print('bye')\n"), backend, timeout=5)
    assert r["stdout"] == "bye" and not r["timed_out"]
    assert processes_with(marker) == []


def test_fork_bomb_is_capped_and_cleaned_up(backend):
    marker = f"nanochat_marker_{uuid.uuid4().hex}"
    code = BYPASS + ("import time\nn = 0\ntry:\n    while True:\n        if posix.fork() == 0:\n"
                     f"            posix.execv('/bin/sh', ['sh', '-c', 'sleep 60', '{marker}'])\n"
                     "        n += 1\nexcept OSError as e:\n    print(n, e.errno)\n")
    r = run(code, backend, timeout=5, max_procs=6)
    forks, errno = map(int, r["stdout"].split())
    assert forks < 6 and errno == 11  # EAGAIN: the process limit, long before the machine's
    assert processes_with(marker) == []


@pytest.mark.parametrize("code", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(bytearray(10**6))"])
def test_memory_bomb_fails_without_harming_parent(backend, code):
    r = run(code, backend, timeout=20, memory_mb=256)
    assert r["returncode"] != 0
    assert r["timed_out"] or "MemoryError" in r["stderr"] or (r["returncode"] or 0) < 0
    assert run("print(sum(range(10)))", backend)["stdout"] == "45"  # the parent carries on


def test_file_size_and_output_flood_are_bounded(backend):
    r = run("open('big', 'wb').write(b'x' * 3 * 2**20)", backend, file_mb=1)
    assert r["returncode"] != 0 and ("File too large" in r["stderr"] or "No space" in r["stderr"])
    r = run("while True:\n    print('y' * 1000)", backend, timeout=3, file_mb=1)
    assert r["returncode"] != 0 and len(r["stdout"]) <= 2000


def test_many_small_files_cannot_fill_the_disk(backend):
    if backend == "fallback":
        pytest.skip("the fallback bounds each file, not their sum (SECURITY.md)")
    r = run("for i in range(50):\n    open(f'f{i}', 'wb').write(b'x' * 500_000)", backend, file_mb=2)
    assert r["returncode"] != 0 and "No space left" in r["stderr"]


def test_cpu_burn_times_out(backend):
    t0 = time.time()
    r = run("while True:\n    pass", backend, timeout=1.5)
    assert r["timed_out"] and r["returncode"] != 0 and time.time() - t0 < 10


def test_bad_limits():
    with pytest.raises(ValueError):
        Limits(timeout=0)
    with pytest.raises(ValueError):
        run_code("pass", memory_mb=0)
    with pytest.raises(ValueError, match="auto, bwrap or fallback"):
        sandbox_setup("docker")

