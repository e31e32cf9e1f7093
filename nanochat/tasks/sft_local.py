"""The local SFT sets under `sft/`: GPTeacher instruction pairs and FastChat's short dialogues.

Neither comes with a validation split, so we hold out every `VAL_EVERY`-th example
(deterministic, spread over the whole file): split="train" | "val" | "all".
"""
from __future__ import annotations

import json

from nanochat.tasks.base import Task, data_file, resolve_data_root

VAL_EVERY = 50
SPLITS = ("train", "val", "all")


def _split_indices(n: int, split: str) -> list[int]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return list(range(n))
    held_out = split == "val"
    return [i for i in range(n) if (i % VAL_EVERY == VAL_EVERY - 1) == held_out]


class GPTeacher(Task):
    """`{instruction, input, response}` -> user: instruction (+ blank line + input), assistant: response."""

    eval_type = "generative"

    def __init__(self, split: str = "train", files: list[str] | None = None, data_root=None, **kw):
        super().__init__(**kw)
        folder = data_file(data_root, "sft", "gpteacher")
        paths = [folder / f for f in files] if files else sorted(folder.glob("*.json"))
        if not paths:
            raise FileNotFoundError(f"no *.json files in {folder}")
        rows = []
        for path in paths:
            with open(path, encoding="utf-8") as f:
                for row in json.load(f):
                    if row.get("instruction", "").strip() and row.get("response", "").strip():
                        rows.append(row)
        self.rows = [rows[i] for i in _split_indices(len(rows), split)]

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        user = row["instruction"].strip()
        if row.get("input", "").strip():
            user += "\n\n" + row["input"].strip()
        return {"messages": [{"role": "user", "content": user},
                             {"role": "assistant", "content": row["response"].strip()}]}


FASTCHAT_ROLES = {"human": "user", "gpt": "assistant"}


class FastChatConversations(Task):
    """`{id, conversations: [{from: human|gpt, value}]}` -> alternating user/assistant messages.

    Conversations that do not alternate human/gpt starting with human, or hold an empty turn, are
    skipped (counted in `skipped`) rather than trained on with a broken structure.
    """

    eval_type = "generative"

    def __init__(self, split: str = "train", data_root=None, **kw):
        super().__init__(**kw)
        path = data_file(data_root, "sft", "fastchat_dummy_conversation.json")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        convs, self.skipped = [], 0
        for row in raw:
            turns = row.get("conversations", [])
            roles = [FASTCHAT_ROLES.get(t.get("from")) for t in turns]
            ok = (len(turns) >= 2 and len(turns) % 2 == 0
                  and all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))
                  and all(t.get("value", "").strip() for t in turns))
            if not ok:
                self.skipped += 1
                continue
            convs.append({"messages": [{"role": r, "content": t["value"].strip()} for r, t in zip(roles, turns)]})
        self.convs = [convs[i] for i in _split_indices(len(convs), split)]

    def num_examples(self) -> int:
        return len(self.convs)

    def get_example(self, index: int) -> dict:
        return self.convs[index]


def local_sft_tasks(split: str = "train", data_root=None) -> list[Task]:
    """Both local SFT sets, for building a TaskMixture."""
    resolve_data_root(data_root)
    return [GPTeacher(split, data_root=data_root), FastChatConversations(split, data_root=data_root)]
