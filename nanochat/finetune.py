"""The start and the checkpoints shared by the fine-tuning scripts (scripts/chat_sft.py, chat_rl.py).

Both load a model of an earlier phase, keep its tag (so sft/d20 and rl/d20 descend from base/d20),
train it with nanochat's learning rates scaled down by --init_lr_frac, and resume from their own phase's
checkpoints. `FineTuneFlags` declares the flags both share; `start_finetune` does those steps once for
both; `FineTune.save` writes the checkpoint meta both phases share, plus each phase's own entries, and
`FineTune.finish` their report section.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nanochat.build import BuildConfig
from nanochat.checkpoint import (check_room_for_checkpoints, load_checkpoint, load_model, planned_saves,
                                 run_checkpoint_dir, save_checkpoint)
from nanochat.common import autocast_precision, get_rank, log0
from nanochat.flags import redeclare
from nanochat.optim import FINETUNE_LRS, build_optimizer
from nanochat.tracking import RUN_HELP, TENSORBOARD_HELP

if TYPE_CHECKING:
    from nanochat.model.gpt import GPT
    from nanochat.optim import MuonAdamW
    from nanochat.tokenizer import Tokenizer


@dataclass
class FineTuneFlags:
    """The flags of chat_sft and chat_rl alike: the checkpoint to start from, the optimizer, the run's own
    checkpoints and runtime. The learning rates are FINETUNE_LRS (not pretraining's PRETRAIN_LRS) times
    --init_lr_frac."""
    source: str = field(default="base", metadata={"help": "checkpoint phase to start from: base, sft or rl"})
    model_tag: str = field(default="", metadata={"help": "source checkpoint tag, also the output tag (default: newest)"})
    step: int | None = field(default=None, metadata={"help": "source checkpoint step (default: latest)"})
    model: str = field(default="", metadata={"help": "start from this checkpoint directory instead of --source/"
                                                     "--model_tag: a step_<n> dir or a run dir (latest, or --step)"})
    matrix_lr: float = redeclare(BuildConfig, "matrix_lr", FINETUNE_LRS.matrix)
    embedding_lr: float = redeclare(BuildConfig, "embedding_lr", FINETUNE_LRS.embedding)
    unembedding_lr: float = redeclare(BuildConfig, "unembedding_lr", FINETUNE_LRS.unembedding)
    scalar_lr: float = redeclare(BuildConfig, "scalar_lr", FINETUNE_LRS.scalar)
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay of the matrices"})
    init_lr_frac: float = field(default=0.02, metadata={"help": "every LR above is multiplied by this"})
    keep_last: int | None = field(default=2, metadata={"help": "keep this many newest checkpoints; none = all"})
    resume_from_step: int = field(default=-1, metadata={"help": "resume from this saved step of this phase; "
                                                                "-1 = fresh run"})
    overwrite: bool = field(default=False, metadata={"help": "delete this tag's checkpoints that are not this run's "
                                                     "(all for a fresh run, those past --resume_from_step else)"})
    device_type: str = field(default="auto", metadata={"help": "cuda, mps, cpu or auto"})
    kernel: str = redeclare(BuildConfig, "kernel", "torch")
    seed: int = field(default=42, metadata={"help": "seed of the data order and sampling"})
    run: str = field(default="", metadata={"help": RUN_HELP})
    tensorboard: str = field(default="", metadata={"help": TENSORBOARD_HELP})


@dataclass
class FineTune:
    """A fine-tuning run's model, optimizer and where it saves; `step` > 0 when it resumed."""
    cfg: FineTuneFlags         # the script's flags
    model: "GPT"               # in train mode; the uncompiled module (what checkpoints hold)
    tokenizer: "Tokenizer"
    source_meta: dict          # meta.json of the checkpoint fine-tuned from
    tag: str                   # output tag, the source's unless --model_tag says otherwise
    tokenizer_dir: str         # the tokenizer loaded with the model (each checkpoint gets a copy)
    optimizer: "MuonAdamW"
    phase: str                 # what this run trains: "sft" or "rl"
    step: int = 0              # the step resumed from, else 0
    loader_state: dict | None = None  # the resumed checkpoint's data position, else None

    @property
    def checkpoint_dir(self) -> Path:
        return run_checkpoint_dir(self.phase, self.tag)

    def save(self, step: int, rank: int = 0, world_size: int = 1, **meta) -> Path:
        """Checkpoint `step` with the shared meta (model and train config, tokenizer, tag, source) + `meta`."""
        full_meta = {"step": step, "model_config": asdict(self.model.config), "train_config": asdict(self.cfg),
                     "tokenizer_dir": self.tokenizer_dir, "model_tag": self.tag,
                     "source": self.source(), **meta}
        return save_checkpoint(self.checkpoint_dir, step, self.model.state_dict(), self.optimizer.state_dict(),
                               full_meta, rank=rank, world_size=world_size, keep_last=self.cfg.keep_last,
                               tokenizer_dir=self.tokenizer_dir)

    def check_room(self, step: int, num_iterations: int, save_every: int, rank: int = 0, world_size: int = 1) -> None:
        """After this process's first step: refuse now a disk too small for the run's checkpoints (the last step
        always saves) rather than at its first save (checkpoint.check_room_for_checkpoints)."""
        saves = planned_saves(self.step, num_iterations, save_every if save_every > 0 else -1)
        check_room_for_checkpoints(self.checkpoint_dir, step, self.model.state_dict(), self.optimizer.state_dict(),
                                   saves, self.cfg.keep_last, rank, world_size)

    def source(self) -> dict:
        """What this run fine-tunes: {"phase", "step"}, and "path" when it was loaded with --model."""
        where = {"path": str(self.cfg.model)} if self.cfg.model else {"phase": self.cfg.source}
        return {**where, "step": self.source_meta["step"]}

    def finish(self, section: str, summary: dict, device: torch.device, world_size: int) -> None:
        """On rank 0: write report section `section` (the flags, and the GPU count for the report's
        cost line: 0 on a CPU) and print `summary` as the last stdout line."""
        if get_rank() != 0:
            return
        from nanochat.report import write_section
        write_section(section, {"phase": self.phase, "config": asdict(self.cfg),
                                "wall_time_s": summary["total_seconds"], "precision": autocast_precision(device),
                                "num_gpus": world_size if device.type == "cuda" else 0, **summary})
        print(json.dumps(summary), flush=True)


def output_tag(model_tag: str, source_meta: dict, n_layer: int) -> str:
    """--model_tag, else the source run's tag (top-level, or base_train's in its train_config), else d<depth>."""
    return model_tag or source_meta.get("model_tag") or source_meta.get("train_config", {}).get("model_tag") \
        or f"d{n_layer}"


def start_finetune(cfg: FineTuneFlags, phase: str, device: torch.device, rank: int = 0) -> FineTune:
    """Load `cfg.source`'s checkpoint, build the scaled-LR optimizer, and resume from
    checkpoints/<phase>/<tag>/step_<cfg.resume_from_step> when that flag is >= 0."""
    model, tokenizer, source_meta = load_model(cfg.source, device, cfg.model_tag or None, cfg.step,
                                               model_dir=cfg.model or None)
    model.train()
    tag = output_tag(cfg.model_tag, source_meta, model.config.n_layer)
    frac = cfg.init_lr_frac
    optimizer = build_optimizer(model, matrix_lr=cfg.matrix_lr * frac, embedding_lr=cfg.embedding_lr * frac,
                                unembedding_lr=cfg.unembedding_lr * frac, scalar_lr=cfg.scalar_lr * frac,
                                weight_decay=cfg.weight_decay)
    run = FineTune(cfg, model, tokenizer, source_meta, tag, str(tokenizer.directory), optimizer, phase)
    if cfg.resume_from_step >= 0:
        model_state, optim_state, meta = load_checkpoint(run.checkpoint_dir, cfg.resume_from_step, device, rank=rank)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        run.step, run.loader_state = meta["step"], meta["loader_state"]
        log0(f"resumed from {run.checkpoint_dir} step {run.step}")
    return run
