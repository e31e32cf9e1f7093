"""The HumanEval sandbox: dangerous code is stopped, runaway code is killed, the parent survives."""
from __future__ import annotations

import gzip
import json
import os
import time

import pytest

from nanochat.eval.sandbox import run_code
from nanochat.tasks.base import resolve_data_root


def test_correct_code_passes():
    r = run_code("def f(x):\n    return 2 * x\nassert f(21) == 42\nprint('ok', f(21))", timeout=10)
    assert r["passed"] and not r["timed_out"] and r["stdout"] == "ok 42" and r["error"] is None


def test_failing_assert_and_early_exit_fail():
    r = run_code("assert 1 + 1 == 3", timeout=10)
    assert not r["passed"] and "AssertionError" in r["error"]
    r = run_code("import sys\nsys.exit(0)\nassert False", timeout=10)  # exiting before the tests is no pass
    assert not r["passed"] and r["returncode"] == 0


def test_os_system_is_stopped(tmp_path):
    target = tmp_path / "touched"
    r = run_code(f"import os\nos.system('touch {target}')", timeout=10)
    assert not r["passed"] and "disabled" in r["error"]
    r = run_code(f"import subprocess\nsubprocess.run(['touch', '{target}'])", timeout=10)
    assert not r["passed"]
    assert not target.exists()


@pytest.mark.parametrize("isolate", [True, False])  # with the OS layers, and the Python guard alone
@pytest.mark.parametrize("how", ["open", "io", "os.open", "pathlib"])
def test_write_outside_sandbox_is_stopped(tmp_path, how, isolate):
    target = tmp_path / f"outside_{how.replace('.', '_')}.txt"
    code = {"open": f"open({str(target)!r}, 'w').write('x')",
            "io": f"import io\nio.open({str(target)!r}, 'w').write('x')",
            "os.open": f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
            "pathlib": f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')"}[how]
    r = run_code(code, timeout=10, isolate=isolate)
    assert not r["passed"] and not target.exists()


def test_writes_inside_sandbox_work_and_vanish():
    r = run_code("import os\nopen('a.txt', 'w').write('hi')\nprint(open('a.txt').read(), os.getcwd())", timeout=10)
    assert r["passed"]
    text, cwd = r["stdout"].split()
    assert text == "hi" and "nanochat_sandbox_" in cwd and not os.path.exists(cwd)


def test_infinite_loop_times_out_and_group_is_killed():
    t0 = time.time()
    # a child process as well: the whole process group must go (fork is refused; try anyway)
    r = run_code("import os\ntry:\n    os.fork()\nexcept Exception:\n    pass\nwhile True:\n    pass", timeout=1.5)
    assert r["timed_out"] and not r["passed"] and "timed out" in r["error"]
    assert time.time() - t0 < 15


@pytest.mark.parametrize("code", ["x = bytearray(10**10)",
                                  "x = []\nwhile True:\n    x.append(bytearray(10**6))"])
def test_memory_bomb_fails_without_harming_parent(code):
    r = run_code(code, timeout=20, memory_mb=256)
    assert not r["passed"]
    assert r["timed_out"] or "MemoryError" in r["stderr"] or (r["returncode"] or 0) < 0
    assert run_code("print(sum(range(10)))", timeout=10)["stdout"] == "45"  # the parent carries on


def test_output_flood_is_bounded():
    r = run_code("while True:\n    print('y' * 1000)", timeout=3, file_mb=1)
    assert not r["passed"] and len(r["stdout"]) <= 2000


def test_network_isolation_is_reported():
    r = run_code("import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=2)", timeout=10)
    assert not r["passed"]
    assert isinstance(r["network_isolated"], bool) and isinstance(r["isolation"], list)
    if r["network_isolated"]:
        assert "netns" in r["isolation"]


def test_canonical_humaneval_solution_passes():
    try:
        path = resolve_data_root() / "eval" / "humaneval" / "HumanEval.jsonl.gz"
    except FileNotFoundError:
        pytest.skip("shared data not found")
    with gzip.open(path, "rt") as f:
        problem = json.loads(f.readline())
    program = problem["prompt"] + problem["canonical_solution"] + "\n" + problem["test"] + \
        f"\ncheck({problem['entry_point']})\n"
    assert run_code(program, timeout=10)["passed"]
    broken = program.replace("return True", "return False", 1)
    assert not run_code(broken, timeout=10)["passed"]


def test_bad_arguments():
    with pytest.raises(ValueError):
        run_code("pass", timeout=0)
