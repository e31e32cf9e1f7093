"""The Task base class and where the evaluation / SFT data lives.

A task is a list of conversations in the format `nanochat.conversation` renders:
{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}], ...}.
The last assistant message holds the reference answer; evaluation drops it, lets the model
answer, and `evaluate(conversation, completion)` turns the model's answer into 0 or 1.

Two kinds of tasks: "categorical" (the answer is one of a few letters, listed under the
conversation's "letters" key, scored from one forward pass) and "generative" (the model samples
a free-form answer).
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

DATA_ENV = "NANOCHAT_EVAL_DATA"
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """The shared data folder: `data_root` if given, else $NANOCHAT_EVAL_DATA, else <repo>/../shared/data.

    Returns the folder that holds `eval/` and `sft/`; a wrong path raises naming the fix.
    """
    if data_root is not None:
        root, how = Path(data_root), "the data_root argument"
    elif os.environ.get(DATA_ENV):
        root, how = Path(os.environ[DATA_ENV]), f"${DATA_ENV}"
    else:
        root, how = REPO_ROOT.parent / "shared" / "data", "the default <repo>/../shared/data"
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} (from {how}) does not exist; pass --data_root=/path/to/data "
                                f"or set {DATA_ENV} to the folder that holds eval/ and sft/")
    return root


def data_file(data_root: str | Path | None, *parts: str) -> Path:
    """A file under the data root, with an error that names the full path when it is missing."""
    path = resolve_data_root(data_root).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"missing data file {path}; check --data_root / ${DATA_ENV} "
                                f"(it must point at the folder that holds eval/ and sft/)")
    return path


def read_jsonl(path: Path) -> list[dict]:
    """The JSON object on each non-blank line of a .jsonl file (gzip-compressed when it ends in .gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Task:
    """A sliceable, indexable list of conversations.

    Subclasses implement `num_examples` and `get_example`; `start/stop/step` take a view of the
    task (e.g. a validation slice) without copying data.
    """

    eval_type: str = "generative"  # or "categorical"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}: need 0 <= start <= stop, step >= 1")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 if `completion` (the model's assistant reply) answers `conversation` correctly, else 0."""
        raise NotImplementedError(f"{type(self).__name__} is not an evaluation task")

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, (stop - self.start + self.step - 1) // self.step)

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{type(self).__name__} index {index} out of range [0, {n})")
        return self.get_example(self.start + index * self.step)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def centered(accuracy: float, baseline: float) -> float:
    """Accuracy rescaled so that chance scores 0 and a perfect model 1."""
    return (accuracy - baseline) / (1.0 - baseline)


LETTERS = "ABCDEFGHIJ"


def multiple_choice_prompt(question: str, choices: list[str]) -> str:
    """The user turn of a categorical task: the question, lettered choices, and the instruction."""
    lines = [question.strip(), ""]
    lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices)]
    lines += ["", "Respond only with the letter of the correct answer."]
    return "\n".join(lines)


def multiple_choice_conversation(question: str, choices: list[str], gold: int, **extra) -> dict:
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} out of range for {len(choices)} choices")
    letters = list(LETTERS[:len(choices)])
    return {"messages": [{"role": "user", "content": multiple_choice_prompt(question, choices)},
                         {"role": "assistant", "content": letters[gold]}],
            "letters": letters, **extra}


def evaluate_letter(conversation: dict, completion: str) -> int:
    """Categorical scoring: the reply's first non-space character must be the gold letter."""
    gold = conversation["messages"][-1]["content"]
    return int(completion.strip()[:1] == gold)
