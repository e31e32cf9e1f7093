"""Atomic checkpoints: save into a temporary directory, fsync, then one rename; load without pickle code.

Layout: <checkpoint_dir>/step_<n:06d>/ holds `model.safetensors`, `meta.json` and one
`optim_rank<r>.pt` per rank. A step directory only ever appears whole (os.replace of a finished
temporary directory), so a crash or `kill -9` mid-save leaves the previous checkpoint as the latest.
Loading never runs pickled code: the model is safetensors, the optimizer state goes through
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from nanochat.common import get_base_dir, log0

STEP_DIR = re.compile(r"^step_(\d+)$")
STALE_DIR = re.compile(r"^\.(tmp|old)_step_\d+_(\d+)$")
HOW_TO_CREATE = {
    "base": "python -m scripts.base_train",
    "sft": "python -m scripts.chat_sft",
    "rl": "python -m scripts.chat_rl",
}


def _step_dir(checkpoint_dir: Path, step: int) -> Path:
    return checkpoint_dir / f"step_{step:06d}"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (the directory entry itself must reach the disk)."""
    try:
        _fsync_file(path)
    except OSError:  # some filesystems do not allow fsync on a directory; best effort
        pass


def _check_plain(obj, where: str = "optimizer_state") -> None:
    """Refuse at save time what weights_only loading would refuse later (fail early, name the key)."""
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: dict key {k!r} must be str or int for weights_only loading")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}; checkpoints only hold tensors, numbers, strings, "
                    "lists and dicts (so loading never executes pickled code): convert it first")


def _model_tensors(model_state: dict) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies (safetensors refuses shared/non-contiguous storage); drop torch.compile's prefix."""
    out = {}
    for key, value in model_state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model_state[{key!r}] is a {type(value).__name__}, expected a tensor")
        out[key.removeprefix("_orig_mod.")] = value.detach().to("cpu", copy=True).contiguous()
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(checkpoint_dir: Path) -> None:
    """Remove temporary dirs left by saves that were killed (their process is gone)."""
    for entry in checkpoint_dir.iterdir():
        m = STALE_DIR.match(entry.name)
        if m and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(entry, ignore_errors=True)


def _complete_steps(checkpoint_dir: Path) -> list[int]:
    if not checkpoint_dir.is_dir():
        return []
    steps = []
    for entry in checkpoint_dir.iterdir():
        m = STEP_DIR.match(entry.name)
        if m and (entry / "meta.json").is_file() and (entry / "model.safetensors").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step(checkpoint_dir: str | Path) -> int | None:
    """Highest step with a complete checkpoint; temporary and incomplete directories are ignored."""
    steps = _complete_steps(Path(checkpoint_dir))
    return steps[-1] if steps else None


def save_checkpoint(checkpoint_dir: str | Path, step: int, model_state: dict, optimizer_state: dict | None,
                    meta: dict, rank: int = 0, world_size: int = 1, keep_last: int | None = None) -> Path:
    """Write <checkpoint_dir>/step_<step:06d>/ atomically and return its path.

    Every rank calls this (with world_size > 1, torch.distributed must be initialized): each writes
    its own optimizer state; rank 0 writes the model and meta.json and does the final rename.
    keep_last=K deletes all but the K newest complete steps after the save succeeded.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    if optimizer_state is not None:
        _check_plain(optimizer_state)
    meta = {**meta, "step": step}
    meta_text = json.dumps(meta, indent=2, default=_json_refuse)  # fail before touching the disk
    distributed = world_size > 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"save_checkpoint(world_size={world_size}) needs torch.distributed initialized")

    final = _step_dir(checkpoint_dir, step)
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale(checkpoint_dir)
        tmp = checkpoint_dir / f".tmp_step_{step:06d}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if distributed:  # every rank writes into rank 0's temporary dir
        name = [tmp.name if rank == 0 else None]
        dist.broadcast_object_list(name, src=0)
        tmp = checkpoint_dir / name[0]

    try:
        _write_files(tmp, model_state, optimizer_state, meta_text, rank)
    except BaseException:
        if not distributed:  # with several ranks, the next save's stale-dir sweep cleans up
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if distributed:
        dist.barrier()
    if rank == 0:
        _fsync_dir(tmp)
        old = None
        if final.exists():  # re-save of the same step: move the old one aside, swap, then delete it
            old = checkpoint_dir / f".old_step_{step:06d}_{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                os.replace(old, final)  # put the previous copy of this step back
            if not distributed:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(checkpoint_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if keep_last is not None:
            for s in _complete_steps(checkpoint_dir)[:-keep_last]:
                shutil.rmtree(_step_dir(checkpoint_dir, s), ignore_errors=True)
        log0(f"saved checkpoint {final}")
    if distributed:
        dist.barrier()
    return final


def _write_files(tmp: Path, model_state: dict, optimizer_state: dict | None, meta_text: str, rank: int) -> None:
    """This rank's files into the temporary step dir, each fsynced before the rename can publish it."""
    written = []
    if optimizer_state is not None:
        written.append(tmp / f"optim_rank{rank}.pt")
        torch.save(optimizer_state, written[-1])
    if rank == 0:
        written.append(tmp / "model.safetensors")
        save_file(_model_tensors(model_state), str(written[-1]))
        written.append(tmp / "meta.json")
        written[-1].write_text(meta_text)
    for path in written:
        _fsync_file(path)


def _json_refuse(obj):
    raise TypeError(f"meta holds a {type(obj).__name__} ({obj!r:.80}); meta.json takes only JSON types "
                    "(use dataclasses.asdict for configs)")


def load_checkpoint(checkpoint_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu",
                    load_optimizer: bool = True, rank: int = 0) -> tuple[dict, dict | None, dict]:
    """(model_state, optimizer_state or None, meta) of `step` (None = the latest complete one)."""
    checkpoint_dir = Path(checkpoint_dir)
    steps = _complete_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir} (missing or empty): train one first, "
                                f"e.g. `{HOW_TO_CREATE['base']}`, or point to the right directory")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {checkpoint_dir}; "
                                f"available steps: {steps}")
    path = _step_dir(checkpoint_dir, step)
    model_state = load_file(str(path / "model.safetensors"), device=str(device))
    meta = json.loads((path / "meta.json").read_text())
    optimizer_state = None
    if load_optimizer:
        optim_path = path / f"optim_rank{rank}.pt"
        if not optim_path.is_file():
            saved = sorted(p.name for p in path.glob("optim_rank*.pt"))
            raise FileNotFoundError(f"{optim_path} is missing (found {saved or 'no optimizer files'}): resume "
                                    "with the world size the checkpoint was saved with, or load_optimizer=False")
        try:
            optimizer_state = torch.load(optim_path, map_location=device, weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"refusing to load {optim_path}: it holds objects other than tensors and "
                             f"plain containers, and loading it could execute code ({e})") from e
    return model_state, optimizer_state, meta


def run_checkpoint_dir(phase: str, tag: str | None = None) -> Path:
    """Where a phase's runs keep their checkpoints: <base_dir>/checkpoints/<phase>[/<tag>]."""
    phase_dir = get_base_dir() / "checkpoints" / phase
    return phase_dir / tag if tag else phase_dir


def load_model(phase: str = "base", device: str | torch.device = "cpu", tag: str | None = None,
               step: int | None = None):
    """(model in eval mode, tokenizer, meta) from <base_dir>/checkpoints/<phase>/<tag>/step_<n>/.

    tag None: the only tag directory, or else the most recently modified one.
    """
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer, get_tokenizer

    phase_dir = run_checkpoint_dir(phase)
    how = HOW_TO_CREATE.get(phase, "the training script of that phase")
    tags = [d for d in phase_dir.iterdir() if d.is_dir() and not d.name.startswith(".")] if phase_dir.is_dir() else []
    tags = [d for d in tags if _complete_steps(d)]
    if tag is None:
        if not tags:
            raise FileNotFoundError(f"no {phase} checkpoint under {phase_dir}: run `{how}` first")
        tag_dir = max(tags, key=lambda d: d.stat().st_mtime)
    else:
        tag_dir = phase_dir / tag
        if tag_dir not in tags:
            raise FileNotFoundError(f"no checkpoint with tag {tag!r} under {phase_dir}; "
                                    f"tags there: {sorted(d.name for d in tags)}. Run `{how}` to make one")
    model_state, _, meta = load_checkpoint(tag_dir, step=step, device=device, load_optimizer=False)
    # the attention backend and activation recompute are choices of a run, not of the weights: reset here
    config = GPTConfig(**{**meta["model_config"], "attn_backend": "auto", "recompute": "none"})
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # fills non-persistent buffers (e.g. rotary tables); weights are overwritten next
    model.load_state_dict(model_state, strict=True)
    tokenizer_dir = meta.get("tokenizer_dir")
    if tokenizer_dir and Path(tokenizer_dir).is_dir():
        tokenizer = Tokenizer.load(tokenizer_dir)
    else:
        tokenizer = get_tokenizer()
    return model.eval(), tokenizer, meta


__all__ = ["save_checkpoint", "load_checkpoint", "latest_step", "load_model"]
