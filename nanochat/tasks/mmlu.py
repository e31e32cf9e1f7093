"""MMLU: four-choice questions over 57 subjects (csv rows: question, A, B, C, D, answer letter)."""
from __future__ import annotations

import csv

from nanochat.tasks.base import LETTERS, Task, data_file, evaluate_letter, multiple_choice_conversation


class MMLU(Task):
    eval_type = "categorical"

    def __init__(self, split: str = "test", subjects: list[str] | None = None, data_root=None, **kw):
        super().__init__(**kw)
        if split not in ("dev", "val", "test"):
            raise ValueError(f"MMLU split must be one of dev/val/test, got {split!r}")
        folder = data_file(data_root, "eval", "mmlu", split)
        files = sorted(folder.glob(f"*_{split}.csv"))
        if subjects is not None:
            known = {f.name[: -len(f"_{split}.csv")]: f for f in files}
            unknown = sorted(set(subjects) - set(known))
            if unknown:
                raise ValueError(f"unknown MMLU subjects {unknown}; known: {', '.join(sorted(known))}")
            files = [known[s] for s in subjects]
        if not files:
            raise FileNotFoundError(f"no *_{split}.csv files in {folder}")
        self.rows: list[tuple[str, list[str], int, str]] = []
        for path in files:
            subject = path.name[: -len(f"_{split}.csv")]
            with open(path, encoding="utf-8", newline="") as f:
                for lineno, row in enumerate(csv.reader(f), 1):
                    if len(row) != 6 or row[5].strip() not in "ABCD":
                        raise ValueError(f"{path}:{lineno}: expected question,A,B,C,D,answer-letter; got {row[:6]}")
                    self.rows.append((row[0], row[1:5], LETTERS.index(row[5].strip()), subject))

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        question, choices, gold, subject = self.rows[index]
        return multiple_choice_conversation(question, choices, gold, subject=subject)

    def evaluate(self, conversation: dict, completion: str) -> int:
        return evaluate_letter(conversation, completion)
