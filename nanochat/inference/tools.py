"""The model's calculator tool: a tiny, safe arithmetic evaluator, and `ToolRunner`, which finds the
calls in each row's tokens and queues the answers.

The model writes `<|python_start|>expr<|python_end|>`; `ToolRunner` hands `expr` to `calculate` and forces
the result back into the sequence. Model output is untrusted, so we never call `eval`: the expression is
parsed with `ast` and walked by a small interpreter that knows only

    numbers, strings, + - * / // % **, unary + -, parentheses, and "literal".count("x")

Everything else (names, attribute access, calls, subscripts, comprehensions, lambdas, ...) is refused.
Work is bounded by construction -- exponents are capped, integers may not grow past a few thousand
bits, strings past a few thousand characters -- so `9**9**9` or `'a'*10**9` are refused at once rather
than eating the server. A wall-clock alarm (SIGALRM, main thread only) is a second line of defence.
"""
from __future__ import annotations

import ast
import math
import operator
import signal
import threading
from collections import deque
from dataclasses import dataclass, field

MAX_EXPR_CHARS = 500      # longer "expressions" are not arithmetic a model needs
MAX_EXPONENT = 100        # |b| in a ** b
MAX_INT_BITS = 4096       # ~1e1233: far beyond any answer, yet cheap to compute
MAX_STR_CHARS = 10_000    # results of string repetition / concatenation
TIME_LIMIT_S = 1.0


class Refused(Exception):
    """The expression is outside the calculator's language or its bounds."""


_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_size(value):
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise Refused("integer too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise Refused("result is not finite")
    if isinstance(value, str) and len(value) > MAX_STR_CHARS:
        raise Refused("string too long")
    return value


def _binop(op: ast.operator, left, right):
    if _number(left) and _number(right):
        if isinstance(op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise Refused(f"exponent {right} beyond +-{MAX_EXPONENT}")
            if isinstance(left, int) and isinstance(right, int) and right > 0 \
                    and left.bit_length() * right > MAX_INT_BITS:
                raise Refused("power too large")
        if isinstance(op, ast.Mult) and isinstance(left, int) and isinstance(right, int) \
                and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise Refused("product too large")
        result = _ARITH[type(op)](left, right)
        if isinstance(result, complex):  # e.g. (-8) ** 0.5
            raise Refused("complex result")
        return _check_size(result)
    if isinstance(op, ast.Add) and isinstance(left, str) and isinstance(right, str):
        return _check_size(left + right)
    if isinstance(op, ast.Mult) and {type(left), type(right)} == {str, int}:
        text, times = (left, right) if isinstance(left, str) else (right, left)
        if len(text) * max(times, 0) > MAX_STR_CHARS:
            raise Refused("string repetition too long")
        return text * times
    raise Refused(f"unsupported operands for {type(op).__name__}: {type(left).__name__}, {type(right).__name__}")


def _eval(node: ast.AST):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if _number(node.value) or isinstance(node.value, str):
            return _check_size(node.value)
        raise Refused(f"literal of type {type(node.value).__name__}")
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        return _binop(node.op, _eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand)
        if not _number(value):
            raise Refused("unary sign on a non-number")
        return -value if isinstance(node.op, ast.USub) else value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
            and len(node.args) == 1 and not node.keywords):
        needle = _eval(node.args[0])
        if not isinstance(needle, str):
            raise Refused(".count() takes a string")
        return node.func.value.value.count(needle)
    raise Refused(f"{type(node).__name__} is not allowed")


def _format(value) -> str:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))  # 8/2 -> "4", as a person (and GSM8K) writes it
        return repr(round(value, 10))
    return str(value)


class _Alarm:
    """SIGALRM-based time limit; a no-op off the main thread or where SIGALRM does not exist."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.active = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()

    def _fire(self, signum, frame):
        raise Refused("time limit")

    def __enter__(self):
        if self.active:
            self.previous = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False


def calculate(expr: str, time_limit: float = TIME_LIMIT_S) -> str | None:
    """The value of `expr` as a string, or None if the expression is refused or fails."""
    if not isinstance(expr, str) or not expr.strip() or len(expr) > MAX_EXPR_CHARS:
        return None
    try:
        with _Alarm(time_limit):
            tree = ast.parse(expr.strip(), mode="eval")
            return _format(_eval(tree))
    except (Refused, SyntaxError, ValueError, ArithmeticError, TypeError, MemoryError, RecursionError):
        return None


@dataclass
class RowState:
    """Per-sample bookkeeping for the tool state machine."""
    forced: deque = field(default_factory=deque)   # tokens to force before sampling again
    python_tokens: list[int] | None = None         # collecting a tool call when not None
    done: bool = False


class ToolRunner:
    """Watches each row's tokens and queues the calculator's answer after a complete tool call."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stop_ids = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}

    def next_token(self, row: RowState, sampled: int) -> tuple[int, int]:
        """(token, mask) this row emits now, given the model's sampled token; updates the row state."""
        token, mask = (row.forced.popleft(), 0) if row.forced else (sampled, 1)
        if token in self.stop_ids:
            row.done = True
        elif token == self.python_start:
            row.python_tokens = []
        elif token == self.python_end and row.python_tokens is not None:
            result = calculate(self.tokenizer.decode(row.python_tokens))
            row.python_tokens = None
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.python_tokens is not None:
            row.python_tokens.append(token)
        return token, mask
