"""HellaSwag validation (10042 items): pick the most plausible ending of an activity description.

The bz2 text file holds 6 lines per item: `activity label: context`, the gold index (0-3) and the
four endings. Items come out in the CORE multiple-choice layout `{query, choices, gold}`, so the
in-context evaluator scores them like any other CORE task.
"""
from __future__ import annotations

import bz2

from nanochat.tasks.base import Task, data_file, evaluate_letter, multiple_choice_conversation

HELLASWAG_FILE = ("eval", "hellaswag", "hellaswag_val_full.txt.bz2")


def load_hellaswag(data_root=None) -> list[dict]:
    path = data_file(data_root, *HELLASWAG_FILE)
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, gold, 4 endings)")
    items = []
    for i in range(0, len(lines), 6):
        context, gold, endings = lines[i], lines[i + 1].strip(), lines[i + 2:i + 6]
        if gold not in ("0", "1", "2", "3"):
            raise ValueError(f"{path}:{i + 2}: gold index must be 0-3, got {gold!r}")
        items.append({"query": context, "choices": endings, "gold": int(gold)})
    return items


class HellaSwag(Task):
    """The chat (lettered choices) view of HellaSwag; the base-model view is `load_hellaswag`."""

    eval_type = "categorical"

    def __init__(self, data_root=None, **kw):
        super().__init__(**kw)
        self.items = load_hellaswag(data_root)

    def num_examples(self) -> int:
        return len(self.items)

    def get_example(self, index: int) -> dict:
        item = self.items[index]
        return multiple_choice_conversation(f"Pick the best ending.\n\n{item['query']} ...", item["choices"],
                                            item["gold"])

    def evaluate(self, conversation: dict, completion: str) -> int:
        return evaluate_letter(conversation, completion)
