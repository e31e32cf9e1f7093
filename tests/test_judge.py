"""The judge: a solution cannot forge its own pass (token, early exit, always-equal objects, the verdict pipe),
and real HumanEval problems are judged as the reference harness would."""
from __future__ import annotations

import gzip
import json
import math
import time

import pytest

from nanochat.eval.judge import WIRE, check_solution
from nanochat.tasks.base import resolve_data_root

TESTS = "def check(candidate):\n    assert candidate([3, 1, 2]) == [1, 2, 3]\n    assert candidate([]) == []\n"
GOOD = "def sort_list(xs):\n    return sorted(xs)\n"




def judge(solution: str, backend: str, tests: str = TESTS, **kw) -> dict:
    return check_solution(solution, tests, "sort_list", backend=backend, **kw)


def test_right_and_wrong_solutions(backend):
    assert judge(GOOD, backend)["passed"]
    r = judge("def sort_list(xs):\n    return xs\n", backend)
    assert not r["passed"] and "AssertionError" in r["error"]
    noisy = "print('hello')\nimport sys\nprint('noise', file=sys.stderr)\n" + GOOD  # output is no channel
    assert judge(noisy, backend)["passed"]


FORGERIES = {
    # the old harness's pass token lived in __main__; print every string there, then leave before the tests
    "print_token_and_exit": "import sys, os\nm = sys.modules['__main__']\n"
                            "print(*[v for v in vars(m).values() if isinstance(v, str)], flush=True)\nos._exit(0)\n",
    "always_equal": "class Eq(list):\n    def __eq__(self, other):\n        return True\n"
                    "    __hash__ = None\ndef sort_list(xs):\n    return Eq()\n",
    "always_equal_object": "class Eq:\n    def __eq__(self, other):\n        return True\n"
                           "def sort_list(xs):\n    return Eq()\n",
    "int_subclass": "class I(int):\n    def __eq__(self, other):\n        return True\n"
                    "def sort_list(xs):\n    return I(0)\n",
    "sys_exit_at_import": "import sys\nsys.exit(0)\n" + GOOD,
    "sys_exit_in_call": "import sys\ndef sort_list(xs):\n    sys.exit(0)\n",
    "write_pass_on_every_fd": "import posix\nfor fd in range(3, 1024):\n    try:\n        posix.write(fd, b'pass\\n')\n"
                              "    except OSError:\n        pass\nposix._exit(0)\n",
    "kill_everything": "import posix\ntry:\n    posix.kill(-1, 9)\nexcept OSError:\n    pass\n"
                       "def sort_list(xs):\n    return [1, 2, 3]\n",
    "forge_the_wire": "import json\njson.dumps = lambda *a, **k: '[\"value\", true]'\n"
                      "def sort_list(xs):\n    return True\n",
    "no_function": "x = 1\n",
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_passes_fail(backend, name):
    r = judge(FORGERIES[name], backend)
    assert not r["passed"], r


def test_always_equal_answer_is_named(backend):
    r = judge(FORGERIES["always_equal_object"], backend)
    assert "cannot be checked" in r["error"]


def test_hanging_solution_times_out(backend):
    t0 = time.time()
    r = judge("def sort_list(xs):\n    while True:\n        pass\n", backend, timeout=2)
    assert not r["passed"] and r["timed_out"] and time.time() - t0 < 10


def test_exceptions_cross_by_builtin_type(backend):
    tests = ("def check(candidate):\n    try:\n        candidate(0)\n    except ZeroDivisionError as e:\n"
             "        assert 'raised by the solution' in str(e)\n    else:\n        raise AssertionError('no error')\n")
    assert check_solution("def f(x):\n    return 1 / x\n", tests, "f", backend=backend)["passed"]


def test_wire_round_trip_keeps_exact_types():
    wire = {}
    exec(WIRE, wire)
    value = [None, True, 3, -2**70, 1.5, float("inf"), "é", b"\x00\xff", 2 + 3j, (1, [2, (3,)]), {1, 2},
             frozenset({"a"}), {(1, 2): {"k": [1.0]}, "x": None}, []]
    back = wire["_loads"](wire["_dumps"](value))
    assert back == value and [type(x) for x in back] == [type(x) for x in value]
    assert type(back[9][1][1]) is tuple and type(back[12][(1, 2)]["k"][0]) is float
    nan = wire["_loads"](wire["_dumps"](float("nan")))
    assert math.isnan(nan)
    for bad in (len, object(), type("S", (str,), {})("x")):
        with pytest.raises(TypeError, match="cannot be checked"):
            wire["_dumps"](bad)
    with pytest.raises(ValueError, match="unknown tag"):
        wire["_loads"](b'{"eval": "1"}')


def test_humaneval_problems_judged_like_the_reference():
    """Problems whose tests import random (32, 38, 50, 53: the old guard broke them), call the function by
    its name (33), use the prompt's helpers (38) or check `is True` (72)."""
    try:
        path = resolve_data_root() / "eval" / "humaneval" / "HumanEval.jsonl.gz"
    except FileNotFoundError:
        pytest.skip("shared data not found")
    with gzip.open(path, "rt") as f:
        rows = {row["task_id"]: row for row in map(json.loads, f)}
    for task_id in ("HumanEval/0", "HumanEval/32", "HumanEval/33", "HumanEval/38", "HumanEval/72"):
        row = rows[task_id]
        tests = row["prompt"] + "\n\n" + row["test"]
        r = check_solution(row["prompt"] + row["canonical_solution"], tests, row["entry_point"])
        assert r["passed"], (task_id, r["error"])
        r = check_solution(row["prompt"] + "    return None\n", tests, row["entry_point"])
        assert not r["passed"], task_id
