"""CORE task loading: the in-context-learning tasks of DCLM's CORE score.

`eval/core/tasks_v0.3.yaml` (llm-foundry's) lists many tasks; we evaluate those whose jsonl file is
present under `eval/core/<category>/` (matched by the file name in `dataset_uri`), plus HellaSwag
from its own bz2 file since the yaml lists it too. Two local files have no yaml entry; they get the
settings DCLM's CORE uses for them (FALLBACK_SETTINGS).

Three task types:
  multiple_choice  {query, choices, gold}        score each choice as the continuation of the query
  schema           {context_options, continuation, gold}   score the shared continuation per context
  language_modeling {context, continuation}      the greedy prediction must reproduce the continuation

Random baselines: the yaml carries none, so we use 1 / num_choices for multiple choice and schema
(averaged over items), 0 for language modeling, except where DCLM's table differs (BoolQ: the
majority-class rate, 62%).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nanochat.tasks.base import data_file, read_jsonl
from nanochat.tasks.hellaswag import load_hellaswag

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FALLBACK_SETTINGS = {
    "bigbench_language_identification": {"icl_task_type": "multiple_choice", "num_fewshot": [10]},
    "bigbench_repeat_copy_logic": {"icl_task_type": "language_modeling", "num_fewshot": [10]},
}
BASELINE_OVERRIDES = {"boolq": 0.62}
DEFAULT_DELIMITER = " "  # llm-foundry's default continuation delimiter


@dataclass
class CoreTask:
    label: str
    task_type: str
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float
    items: list[dict] = field(repr=False)
    source: str = ""

    @property
    def meta(self) -> dict:
        return {"label": self.label, "task_type": self.task_type, "num_fewshot": self.num_fewshot,
                "continuation_delimiter": self.continuation_delimiter, "random_baseline": self.random_baseline}


def _check_items(label: str, task_type: str, items: list[dict], source: str) -> None:
    need = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
            "language_modeling": ("context", "continuation")}[task_type]
    for i, item in enumerate(items):
        missing = [k for k in need if k not in item]
        if missing:
            raise ValueError(f"{source}: item {i} of {label} ({task_type}) lacks {missing}")


def random_baseline(label: str, task_type: str, items: list[dict], configured: float | None = None) -> float:
    if configured is not None:
        return float(configured) / (100.0 if configured > 1 else 1.0)
    if label in BASELINE_OVERRIDES:
        return BASELINE_OVERRIDES[label]
    if task_type == "language_modeling":
        return 0.0
    key = "choices" if task_type == "multiple_choice" else "context_options"
    return sum(1.0 / len(item[key]) for item in items) / len(items)


def make_task(label: str, settings: dict, items: list[dict], source: str) -> CoreTask:
    task_type = settings["icl_task_type"]
    if task_type not in TASK_TYPES:
        raise ValueError(f"CORE task {label}: unsupported icl_task_type {task_type!r}; known: {TASK_TYPES}")
    if not items:
        raise ValueError(f"CORE task {label}: {source} holds no items")
    _check_items(label, task_type, items, source)
    fewshot = settings.get("num_fewshot", [0])
    return CoreTask(label=label, task_type=task_type,
                    num_fewshot=int(fewshot[0] if isinstance(fewshot, list) else fewshot),
                    continuation_delimiter=settings.get("continuation_delimiter", DEFAULT_DELIMITER),
                    random_baseline=random_baseline(label, task_type, items, settings.get("random_baseline")),
                    items=items, source=source)


def load_core_tasks(data_root=None, include_hellaswag: bool = True) -> list[CoreTask]:
    """Every CORE task with local data, in the yaml's order (fallback tasks last)."""
    core_dir = data_file(data_root, "eval", "core")
    config_path = data_file(data_root, "eval", "core", "tasks_v0.3.yaml")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not entries:
        raise ValueError(f"{config_path} has no icl_tasks list")
    files = {p.name: p for p in sorted(core_dir.rglob("*.jsonl"))}
    tasks, used = [], set()
    for entry in entries:
        label, filename = entry["label"], Path(entry.get("dataset_uri", "")).name
        if label == "hellaswag" and include_hellaswag:
            tasks.append(make_task(label, entry, load_hellaswag(data_root), "hellaswag_val_full.txt.bz2"))
        elif filename in files:
            used.add(filename)
            tasks.append(make_task(label, entry, read_jsonl(files[filename]), str(files[filename])))
    for filename, path in files.items():
        label = path.stem
        if filename not in used and label in FALLBACK_SETTINGS:
            tasks.append(make_task(label, FALLBACK_SETTINGS[label], read_jsonl(path), str(path)))
    return tasks
