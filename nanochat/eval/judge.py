"""A pass/fail verdict that the code under test cannot forge: the solution and its tests run in two sandboxes.

Code that shares a process with its tests can do anything the tests can: print the pass token, exit before
they fail, replace `check`, or return an object whose `__eq__` always says True. So the solution runs alone
in sandbox S and only serves calls: it reads each call's arguments and answers with the return value,
encoded as plain data (None, bool, int, float, complex, str, bytes, and lists, tuples, sets, frozensets
and dicts of those: exact built-in types, no subclasses). The tests run in sandbox J against a stand-in
`candidate` that forwards each call to S and decodes the answer into fresh built-in objects, so every
comparison is the built-in one. J writes its verdict to a pipe that only J holds. S never sees the tests,
and a crash, early exit or odd answer of S fails the call that needed it. Both are killed at the timeout.
"""
from __future__ import annotations

import os
import subprocess

from nanochat.eval.sandbox import Limits, Sandboxed, sandbox_setup

MAX_MESSAGE_BYTES = 16 * 2**20  # one call's arguments or answer

# Plain data <-> one JSON line, in both sandboxes. Lists, None, bool, int, float and str are JSON's own;
# the other types are one-key objects ({"tuple": [...]}, ...), so JSON objects never mean anything else.
WIRE = r'''
import json

def _encode(x):
    t = type(x)
    if x is None or t in (bool, int, float, str):
        return x
    if t is list:
        return [_encode(v) for v in x]
    if t in (tuple, set, frozenset):
        return {t.__name__: [_encode(v) for v in x]}
    if t is dict:
        return {"dict": [[_encode(k), _encode(v)] for k, v in x.items()]}
    if t is bytes:
        return {"bytes": x.hex()}
    if t is complex:
        return {"complex": [x.real, x.imag]}
    raise TypeError(f"a {t.__module__}.{t.__qualname__} cannot be checked: return plain values (None, bool, int, "
                    f"float, complex, str, bytes, and lists, tuples, sets, dicts of those)")

def _tagged(obj):
    (tag, value), = obj.items()
    if tag == "tuple":
        return tuple(value)
    if tag == "set":
        return set(value)
    if tag == "frozenset":
        return frozenset(value)
    if tag == "dict":
        return {k: v for k, v in value}
    if tag == "bytes":
        return bytes.fromhex(value)
    if tag == "complex":
        return complex(*value)
    raise ValueError(f"unknown tag {tag!r}")

def _dumps(x):
    return (json.dumps(_encode(x)) + "\n").encode()

def _loads(line):
    return json.loads(line, object_hook=_tagged)
'''

# Sandbox S: define the solution, then answer calls until J hangs up.
SERVE = WIRE + r'''
import os

def _serve(source, entry_point, requests_fd, replies_fd):
    namespace = {"__name__": "__main__"}
    exec(compile(source, "solution.py", "exec"), namespace)
    fn = namespace.get(entry_point)
    if not callable(fn):
        raise NameError(f"the solution defines no function {entry_point!r}")
    requests, replies = os.fdopen(requests_fd, "rb"), os.fdopen(replies_fd, "wb")
    for line in requests:
        args, kwargs = _loads(line)
        try:
            reply = ["value", fn(*args, **kwargs)]
            message = _dumps(reply)
        except BaseException as e:  # SystemExit too: an answer is due either way
            message = _dumps(["error", type(e).__name__, str(e)[:1000]])
        replies.write(message)
        replies.flush()
'''

# Sandbox J: the tests, against a stand-in that asks S; "pass" on the verdict pipe only if check() returns.
JUDGE = WIRE + r'''
import builtins, os

def _judge(tests, entry_point, requests_fd, replies_fd, verdict_fd, max_bytes):
    requests, replies = os.fdopen(requests_fd, "wb"), os.fdopen(replies_fd, "rb")

    def candidate(*args, **kwargs):
        try:
            requests.write(_dumps([list(args), kwargs]))
            requests.flush()
        except BrokenPipeError:
            raise RuntimeError("the solution's process ended before this call (see its stderr)") from None
        line = replies.readline(max_bytes)
        if not line.endswith(b"\n"):
            raise RuntimeError("the solution's process ended during this call (see its stderr)" if len(line) <
                               max_bytes else f"the solution's answer is over {max_bytes} bytes")
        reply = _loads(line)
        if reply[0] == "value":
            return reply[1]
        name, message = reply[1], reply[2]
        kind = getattr(builtins, name, None)
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            kind = RuntimeError
        raise kind(f"{message} (raised by the solution as {name})")

    candidate.__name__ = entry_point
    namespace = {"__name__": "__main__"}
    exec(compile(tests, "tests.py", "exec"), namespace)
    namespace[entry_point] = candidate  # some tests call the function by its name (HumanEval/33)
    namespace["check"](candidate)
    os.write(verdict_fd, b"pass\n")
'''


def check_solution(solution: str, tests: str, entry_point: str, timeout: float = 10.0, memory_mb: int = 512,
                   backend: str = "auto") -> dict:
    """Run `tests` (which define `check(candidate)`) against `solution`'s function `entry_point`.

    Returns {passed, timed_out, error, solution: run_code-like result of S, tests: the same of J}.
    `passed` is True only if check() returned in J; nothing S does can produce it.
    """
    limits = Limits(timeout=timeout, memory_mb=memory_mb)
    setup = sandbox_setup(backend)
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    serve = f"{SERVE}\n_serve({solution!r}, {entry_point!r}, {requests_r}, {replies_w})\n"
    judge = (f"{JUDGE}\n_judge({tests!r}, {entry_point!r}, {requests_w}, {replies_r}, {verdict_w}, "
             f"{MAX_MESSAGE_BYTES})\n")
    s = j = None
    try:
        s = Sandboxed(serve, limits, setup, pass_fds=(requests_r, replies_w))
        j = Sandboxed(judge, limits, setup, pass_fds=(requests_w, replies_r, verdict_w))
        for fd in (requests_r, replies_w, requests_w, replies_r, verdict_w):  # the children hold them now:
            os.close(fd)  # with our copies closed, one side's end is the other side's EOF
        requests_r = replies_w = requests_w = replies_r = verdict_w = None
        j.wait()
        try:  # J is done and hung up: S ends on that EOF unless it is stuck
            s.proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        s.kill()
        os.set_blocking(verdict_r, False)
        try:
            verdict = os.read(verdict_r, 16)
        except BlockingIOError:
            verdict = b""
        solution_result, tests_result = s.result(), j.result()
    finally:
        for fd in (requests_r, replies_w, requests_w, replies_r, verdict_w, verdict_r):
            if fd is not None:
                os.close(fd)
        for box in (s, j):
            if box is not None:
                box.close()
    passed = verdict == b"pass\n" and tests_result["returncode"] == 0 and not j.timed_out
    error = None
    if not passed:
        error = tests_result["error"] or "the tests did not finish"
        if solution_result["error"] and "solution's process ended" in (tests_result["stderr"] or ""):
            error += f" | solution: {solution_result['error']}"
    return {"passed": passed, "timed_out": j.timed_out, "error": error, "solution": solution_result,
            "tests": tests_result}
