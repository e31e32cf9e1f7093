"""GSM8K: grade-school math word problems, answered step by step with a calculator tool.

The reference solutions carry calculator annotations `<<48/2=24>>`. We turn each one into a tool
call, so SFT teaches the model to emit `<|python_start|>48/2<|python_end|>` and read the forced
`<|output_start|>24<|output_end|>` back. The final answer follows `####`.
"""
from __future__ import annotations

import re

from nanochat.tasks.base import Task, data_file, read_jsonl

CALC_RE = re.compile(r"<<([^<>]*?)=([^<>]*?)>>")
NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def answer_parts(answer: str) -> list[dict]:
    """Assistant content parts: text, python (the expression), python_output (its value), text, ..."""
    parts: list[dict] = []
    pos = 0
    for m in CALC_RE.finditer(answer):
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos:m.start()]})
        parts.append({"type": "python", "text": m.group(1)})
        parts.append({"type": "python_output", "text": m.group(2)})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


def parse_number(text: str) -> float | None:
    """A number written the way GSM8K answers are ("1,234", "-5", "3.50", "$18.")."""
    try:
        return float(text.replace(",", "").replace("$", "").rstrip("."))
    except ValueError:
        return None


def extract_answer(completion: str) -> float | None:
    """The model's final answer: the number after the last `####`, else the last number anywhere."""
    if "####" in completion:
        tail = completion.rsplit("####", 1)[1]
        m = NUMBER_RE.search(tail)
        if m:
            return parse_number(m.group(0))
    numbers = NUMBER_RE.findall(completion)
    return parse_number(numbers[-1]) if numbers else None


def reference_answer(answer: str) -> float:
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' final answer: {answer[-80:]!r}")
    value = parse_number(answer.rsplit("####", 1)[1].strip())
    if value is None:
        raise ValueError(f"GSM8K final answer is not a number: {answer.rsplit('####', 1)[1]!r}")
    return value


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, split: str = "test", data_root=None, **kw):
        super().__init__(**kw)
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
        self.rows = read_jsonl(data_file(data_root, "eval", "gsm8k", f"{split}.jsonl"))

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": answer_parts(row["answer"])}]}

    def evaluate(self, conversation: dict, completion: str) -> int:
        parts = conversation["messages"][-1]["content"]
        gold = reference_answer(parts[-1]["text"] if isinstance(parts, list) else parts)
        pred = extract_answer(completion)
        return int(pred is not None and abs(pred - gold) < 1e-6 * max(1.0, abs(gold)))
