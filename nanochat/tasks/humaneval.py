"""HumanEval: write a Python function from its signature and docstring; graded by unit tests.

The user turn is the prompt (imports, signature, docstring); the reference reply is the prompt
with the canonical body. Scoring runs the reply's code in one sandbox and the prompt + tests in another,
which call the reply's function across the boundary (nanochat/eval/judge.py): the reply cannot see,
skip or fool the tests.
"""
from __future__ import annotations

import re

from nanochat.tasks.base import Task, data_file, read_jsonl

CODE_BLOCK_RE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code in a reply: the first fenced block if there is one, else the reply as is."""
    m = CODE_BLOCK_RE.search(completion)
    return m.group(1) if m else completion


def build_solution(prompt: str, completion: str, entry_point: str) -> str:
    """The reply's code as the solution sandbox runs it. If the reply only holds the function body (or
    omits the function), the prompt goes in front so the signature and imports are there."""
    code = extract_code(completion)
    if not re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        code = prompt + code
    else:
        # keep the prompt's imports, which a reply that restates the function often drops
        imports = "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))
        code = imports + "\n" + code
    return code


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, data_root=None, timeout: float = 10.0, **kw):
        super().__init__(**kw)
        self.rows = read_jsonl(data_file(data_root, "eval", "humaneval", "HumanEval.jsonl.gz"))
        self.timeout = timeout

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
                "task_id": row["task_id"], "entry_point": row["entry_point"], "test": row["test"],
                "prompt": row["prompt"]}

    def evaluate(self, conversation: dict, completion: str) -> int:
        from nanochat.eval.judge import check_solution  # imported here: tasks stay importable without eval

        solution = build_solution(conversation["prompt"], completion, conversation["entry_point"])
        # the tests run with the prompt's own helpers (e.g. encode_cyclic), not the reply's versions of them
        tests = conversation["prompt"] + "\n\n" + conversation["test"]
        return int(check_solution(solution, tests, conversation["entry_point"], timeout=self.timeout)["passed"])
