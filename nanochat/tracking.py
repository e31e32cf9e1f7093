"""Experiment tracking shared by every trainer: one call per logged step feeds the report card's training
log, Weights & Biases (optional) and TensorBoard (optional).

    tracker = Tracker("sft", config=asdict(cfg), run=cfg.run, tensorboard_dir=cfg.tensorboard)
    tracker.log(step, loss=2.91, lrm=0.5)     # rank 0 writes; other ranks do nothing
    tracker.finish(summary)                   # numbers of the run's summary to wandb; flush and close

Each metric goes to <report dir>/train_log.jsonl as `key` (the report's loss curves) and to wandb and
TensorBoard as "<stage>/<key>" (e.g. "sft/loss"), so several stages can share one wandb project or one
TensorBoard directory. wandb: `--run NAME` (`pip install wandb`, then `wandb login`, or WANDB_MODE=offline).
TensorBoard: `--tensorboard DIR` (`pip install tensorboard`, then `tensorboard --logdir DIR`).
"""
from __future__ import annotations

import math
from typing import Any

from nanochat.common import get_rank, log0
from nanochat.report import log_metrics

RUN_HELP = "wandb run name; empty = no wandb (needs `pip install wandb`)"
TENSORBOARD_HELP = "write TensorBoard events to this directory; empty = none (needs `pip install tensorboard`)"
WANDB_PROJECT = "nanochat"


class Tracker:
    """The report's training log plus the trackers a run asked for. Every rank imports the optional
    packages, so a missing one stops all ranks at once, before any work; only rank 0 writes."""

    def __init__(self, stage: str, config: dict[str, Any] | None = None, run: str = "", tensorboard_dir: str = "",
                 project: str = WANDB_PROJECT) -> None:
        self.stage = stage
        self.master = get_rank() == 0
        wandb = _require("wandb", "--run", "pip install wandb` (then `wandb login`)") if run else None
        writer_cls = None
        if tensorboard_dir:
            _require("tensorboard", "--tensorboard", "pip install tensorboard`")
            from torch.utils.tensorboard import SummaryWriter as writer_cls
        self.wandb_run = None
        self.writer = None
        if self.master and wandb is not None:
            self.wandb_run = wandb.init(project=project, name=run, config=config or {}, job_type=stage)
            log0(f"wandb: project {project}, run {run}")
        if self.master and writer_cls is not None:
            self.writer = writer_cls(log_dir=tensorboard_dir)
            log0(f"TensorBoard events in {tensorboard_dir} (tensorboard --logdir {tensorboard_dir})")

    def log(self, step: int, **metrics: float) -> None:
        """Record `metrics` at `step`: the training log always, wandb and TensorBoard when on (rank 0)."""
        if not self.master:
            return
        log_metrics(self.stage, step, **metrics)
        keyed = {f"{self.stage}/{key}": float(value) for key, value in metrics.items()}
        if self.wandb_run is not None:
            self.wandb_run.log(keyed, step=step)
        if self.writer is not None:
            for key, value in keyed.items():
                self.writer.add_scalar(key, value, step)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        """The summary's finite numbers to wandb's run summary; flush and close both trackers."""
        if self.wandb_run is not None:
            numbers = {k: v for k, v in (summary or {}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            self.wandb_run.summary.update(numbers)
            self.wandb_run.finish()
            self.wandb_run = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _require(package: str, flag: str, install: str):
    """Import an optional package, or stop with the flag that needs it and how to install it."""
    try:
        return __import__(package)
    except ImportError as err:
        raise RuntimeError(f"{flag} needs the {package} package, which is not installed: `{install}, "
                           f"or leave {flag} out") from err
