"""ARC-Easy / ARC-Challenge (AI2 science questions), from the CORE folder's jsonl files.

Those files hold `{query: "Question: ...", choices: [...], gold}`; the chat version lists the
choices with letters and expects the letter back.
"""
from __future__ import annotations

from nanochat.tasks.base import Task, data_file, evaluate_letter, multiple_choice_conversation, read_jsonl

ARC_FILES = {"ARC-Easy": "arc_easy.jsonl", "ARC-Challenge": "arc_challenge.jsonl"}


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset: str = "ARC-Easy", data_root=None, **kw):
        super().__init__(**kw)
        if subset not in ARC_FILES:
            raise ValueError(f"ARC subset must be one of {list(ARC_FILES)}, got {subset!r}")
        self.rows = read_jsonl(data_file(data_root, "eval", "core", "world_knowledge", ARC_FILES[subset]))

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        question = row["query"].removeprefix("Question:").strip()
        return multiple_choice_conversation(question, row["choices"], int(row["gold"]))

    def evaluate(self, conversation: dict, completion: str) -> int:
        return evaluate_letter(conversation, completion)
