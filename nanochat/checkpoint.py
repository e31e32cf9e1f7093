"""Atomic checkpoints: save into a temporary directory, fsync, then one rename; load without pickle code.

Layout: <checkpoint_dir>/step_<n:06d>/ holds `model.safetensors`, `meta.json`, one `optim_rank<r>.pt`
per rank and, when saved with its tokenizer, `tokenizer/` (then the step dir alone is a portable model).
A step directory only ever appears whole (os.replace of a finished temporary directory), so a crash or
`kill -9` mid-save leaves the previous checkpoint as the latest; a save whose tensors do not fit the disk's
free space is refused before it writes, saying so; `check_room_for_checkpoints`, after a run's first step,
refuses a disk too small for its checkpoints then rather than at its first save.
Loading never runs pickled code: the model is safetensors, the optimizer state goes through
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers.
meta.json records each file's sha256, checked at load: a damaged or truncated copy is refused by name
(safetensors itself would load flipped bytes as NaNs). It also records the tokenizer's directory, relative
to the base dir when inside it (a base dir copied elsewhere keeps working), and the sha256 of its files.
`claim_checkpoint_dir`, called before training, keeps a run from mixing its checkpoints with an earlier one's.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from nanochat.common import get_base_dir, log0, nested_tensors

STEP_DIR = re.compile(r"^step_(\d+)$")
TOKENIZER_SUBDIR = "tokenizer"  # a step dir's own copy of its tokenizer (save_checkpoint's tokenizer_dir)
STALE_DIR = re.compile(r"^\.(tmp|old)_step_\d+_(\d+)$")
DISK_MARGIN = 64 << 20  # bytes a save leaves free beyond its tensors (headers, meta.json, the tokenizer)
CHECKSUMS = "checksums"  # meta.json: {file name: sha256} of the step dir's other files
_warned_unverified: set[str] = set()
MODEL_DIR_HELP = ("a checkpoint directory to load instead of the phase/tag under NANOCHAT_BASE_DIR: a step_<n> "
                  "dir (any name; with its tokenizer/) or a run dir (its latest step, or --step)")


@dataclass
class ModelChoice:
    """The flags that name a checkpoint to load: scripts that load a model derive their flags dataclass from it."""
    source: str = field(default="sft", metadata={"help": "checkpoint phase: sft, base or rl"})
    model_tag: str | None = field(default=None, metadata={"help": "checkpoint tag (default: the newest)"})
    step: int | None = field(default=None, metadata={"help": "checkpoint step (default: the latest)"})
    model: str = field(default="", metadata={"help": MODEL_DIR_HELP})


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


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state: what its files will take on disk, give or take headers."""
    return sum(t.nelement() * t.element_size() for t in nested_tensors(obj))


def _pruned_by(steps: list[int], step: int, keep_last: int) -> list[int]:
    """Of the sorted complete `steps`, those keep_last deletes once `step` is saved: never `step` nor steps above."""
    return ([s for s in steps if s < step] + [step])[:-keep_last]


def _deletable_early(checkpoint_dir: Path, step: int, keep_last: int | None) -> list[int]:
    """The complete steps a save of `step` may delete before writing when short of space: those keep_last would
    delete after it, except the newest complete one (a failed save must still leave it)."""
    if keep_last is None:
        return []
    steps = _complete_steps(checkpoint_dir)
    newest = max((s for s in steps if s < step), default=None)
    return [s for s in _pruned_by(steps, step, keep_last) if s != newest]


def _make_room(checkpoint_dir: Path, step: int, need: int, keep_last: int | None) -> str | None:
    """None when a save of `need` bytes fits the disk's free space, else why not. A full disk mid-write fails with
    torch's opaque 'unexpected pos' (S25: a d20 run's optimizer file alone is 5.3 GB), so this runs first. When
    short, the older steps that keep_last would delete after this save go now (`_deletable_early`): a failed save
    still leaves the newest complete one, and a successful one leaves what it would have left."""
    def short() -> bool:
        return need + DISK_MARGIN > shutil.disk_usage(checkpoint_dir).free

    if not short():
        return None
    for s in _deletable_early(checkpoint_dir, step, keep_last):
        shutil.rmtree(_step_dir(checkpoint_dir, s), ignore_errors=True)
        log0(f"low on disk space: deleted checkpoint step {s} before saving step {step} (keep_last={keep_last} "
             "would delete it after)")
    if not short():
        return None
    latest = latest_step(checkpoint_dir)
    kept = f"step {latest}, intact" if latest is not None else "none yet"
    return (f"No space for the checkpoint of step {step}: it needs ~{_gib(need)} in {checkpoint_dir}, which has "
            f"{_gib(shutil.disk_usage(checkpoint_dir).free)} free: free space there, keep fewer checkpoints "
            f"(--keep_last) or save less often (--save_every); the newest complete checkpoint: {kept}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _checkpoint_bytes(model_state: dict, optimizer_state: dict | None, rank: int, world_size: int) -> int:
    """Bytes one checkpoint's tensors take: the model (rank 0's) and every rank's optimizer state. A collective."""
    need = _tensor_bytes(optimizer_state) + (_tensor_bytes(model_state) if rank == 0 else 0)
    if world_size > 1:  # every rank's files go into one dir
        needs = [None] * world_size
        dist.all_gather_object(needs, need)
        need = sum(needs)
    return need


def planned_saves(first_step: int, num_iterations: int, save_every: int) -> int:
    """Checkpoints a run from `first_step` writes: each multiple of save_every > 0 before its last step, and the
    last (save_every -1: the last only; 0: none)."""
    if save_every == 0 or first_step >= num_iterations:
        return 0
    periodic = (num_iterations - 1) // save_every - first_step // save_every if save_every > 0 else 0
    return periodic + 1


def check_room_for_checkpoints(checkpoint_dir: str | Path, next_step: int, model_state: dict,
                               optimizer_state: dict | None, saves: int, keep_last: int | None,
                               rank: int = 0, world_size: int = 1) -> None:
    """A run's disk check, made once its optimizer state exists (after its first step), so that a disk too small
    fails the run now rather than at its first save, hours on: OSError(ENOSPC) when one checkpoint of this run
    does not fit, a warning when the most it holds at once (keep_last's count, each save's when None; at a save
    the newest stays beside the one being written) does not, so a later save would be refused. Room is the free
    space plus the older checkpoints the next save may delete first. Every rank calls it (a collective)."""
    checkpoint_dir = Path(checkpoint_dir)
    need = _checkpoint_bytes(model_state, optimizer_state, rank, world_size)
    refusal = None
    if rank == 0 and saves > 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        older = sum(f.stat().st_size for s in _deletable_early(checkpoint_dir, next_step, keep_last)
                    for f in _step_dir(checkpoint_dir, s).rglob("*") if f.is_file())
        room = shutil.disk_usage(checkpoint_dir).free + older - DISK_MARGIN
        held = saves if keep_last is None else min(saves, max(2, keep_last))
        if need > room:
            refusal = (f"No space for this run's checkpoints: one needs ~{_gib(need)} (model and optimizer state) in "
                       f"{checkpoint_dir}, which has {_gib(room)} to spare, so the first save would fail after "
                       f"training: free space there or point NANOCHAT_BASE_DIR at a larger disk")
        elif held * need > room:
            log0(f"warning: {checkpoint_dir} has room for {room // need} checkpoint(s) of ~{_gib(need)}; this run "
                 f"holds up to {held} at once ({saves} saves, keep_last={keep_last}), so a later save will be "
                 f"refused, keeping the newest: free space there, keep fewer (--keep_last) or save less often")
    if world_size > 1:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal is not None:
        raise OSError(errno.ENOSPC, refusal)


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


def _chosen_step_dir(run_dir: Path, steps: list[int], step: int | None) -> Path:
    """The dir of `step` among a run dir's complete `steps` (not empty); None = the latest."""
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {run_dir}; available steps: {steps}")
    return _step_dir(run_dir, steps[-1] if step is None else step)


def latest_step(checkpoint_dir: str | Path) -> int | None:
    """Highest step with a complete checkpoint; temporary and incomplete directories are ignored."""
    steps = _complete_steps(Path(checkpoint_dir))
    return steps[-1] if steps else None


def save_checkpoint(checkpoint_dir: str | Path, step: int, model_state: dict, optimizer_state: dict | None,
                    meta: dict, rank: int = 0, world_size: int = 1, keep_last: int | None = None,
                    tokenizer_dir: str | Path | None = None) -> Path:
    """Write <checkpoint_dir>/step_<step:06d>/ atomically and return its path.

    Every rank calls this (with world_size > 1, torch.distributed must be initialized): each writes
    its own optimizer state; rank 0 writes the model and meta.json and does the final rename.
    keep_last=K deletes, after the save succeeded, all but the K newest complete steps up to this one: never
    this step, nor steps above it (another run's; `claim_checkpoint_dir` stops a run from starting next to them).
    A save that does not fit the disk's free space first deletes those older steps (not the newest complete
    one), then, still short, raises OSError(ENOSPC) before writing, naming the need, the free space and the fix.
    tokenizer_dir: the model's tokenizer, copied into the step dir (`tokenizer/`, a few hundred KB), so
    that the step dir alone is a model that can be moved to another machine and loaded by path.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    if optimizer_state is not None:
        _check_plain(optimizer_state)
    meta = {**meta, "step": step, **_tokenizer_meta(meta.get("tokenizer_dir"), tokenizer_dir)}
    json.dumps(meta, default=_json_refuse)  # fail before touching the disk
    distributed = world_size > 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"save_checkpoint(world_size={world_size}) needs torch.distributed initialized")

    need = _checkpoint_bytes(model_state, optimizer_state, rank, world_size)
    final = _step_dir(checkpoint_dir, step)
    tmp_name = refusal = None
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale(checkpoint_dir)
        refusal = _make_room(checkpoint_dir, step, need, keep_last)
        if refusal is None:
            tmp_name = f".tmp_step_{step:06d}_{os.getpid()}"
            shutil.rmtree(checkpoint_dir / tmp_name, ignore_errors=True)
            (checkpoint_dir / tmp_name).mkdir()
    if distributed:  # every rank writes into rank 0's temporary dir, or refuses with it
        shared = [(tmp_name, refusal)]
        dist.broadcast_object_list(shared, src=0)
        tmp_name, refusal = shared[0]
    if refusal is not None:
        raise OSError(errno.ENOSPC, refusal)
    tmp = checkpoint_dir / tmp_name

    try:
        checksums = _write_files(tmp, model_state, optimizer_state, rank)
        if rank == 0 and tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), tmp / TOKENIZER_SUBDIR)
        if distributed:  # rank 0's meta.json records every rank's files (this also waits for all of them)
            gathered = [None] * world_size
            dist.all_gather_object(gathered, checksums)
            checksums = {name: digest for part in gathered for name, digest in part.items()}
        if rank == 0:
            (tmp / "meta.json").write_text(json.dumps({**meta, CHECKSUMS: checksums}, indent=2))
            _fsync_file(tmp / "meta.json")
    except BaseException:
        if not distributed:  # with several ranks, the next save's stale-dir sweep cleans up
            shutil.rmtree(tmp, ignore_errors=True)
        raise
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
            for s in _pruned_by(_complete_steps(checkpoint_dir), step, keep_last):
                shutil.rmtree(_step_dir(checkpoint_dir, s), ignore_errors=True)
        log0(f"saved checkpoint {final}")
    if distributed:
        dist.barrier()
    return final


def _write_files(tmp: Path, model_state: dict, optimizer_state: dict | None, rank: int) -> dict[str, str]:
    """This rank's files into the temporary step dir, each fsynced before the rename can publish it;
    returns {file name: sha256}."""
    written = []
    if optimizer_state is not None:
        written.append(tmp / f"optim_rank{rank}.pt")
        torch.save(optimizer_state, written[-1])
    if rank == 0:
        written.append(tmp / "model.safetensors")
        save_file(_model_tensors(model_state), str(written[-1]))
    for path in written:
        _fsync_file(path)
    return {path.name: _sha256(path) for path in written}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _tokenizer_sha256(directory: Path) -> str | None:
    """One digest over a tokenizer's files (None without them): equal digests, equal vocabularies."""
    from nanochat.tokenizer import META_FILE, RANKS_FILE

    paths = [directory / RANKS_FILE, directory / META_FILE]
    if not all(p.is_file() for p in paths):
        return None
    return hashlib.sha256(" ".join(_sha256(p) for p in paths).encode()).hexdigest()


def _tokenizer_meta(named: str | None, copied_from: str | Path | None) -> dict:
    """meta's tokenizer entries as saved: the dir meta names, relative to the base dir when inside it, and
    the digest of the tokenizer's files (the copied one's, else the named one's)."""
    out = {}
    source = Path(copied_from).resolve() if copied_from else None
    if named:
        path, base = Path(named).resolve(), get_base_dir().resolve()
        out["tokenizer_dir"] = str(path.relative_to(base)) if path.is_relative_to(base) else str(path)
        source = source or path
    digest = _tokenizer_sha256(source) if source else None
    if digest:
        out["tokenizer_sha256"] = digest
    return out


def _tokenizer_path(saved: str) -> Path:
    """meta.json's tokenizer_dir on this machine: relative ones are under the base dir."""
    return Path(saved) if Path(saved).is_absolute() else get_base_dir() / saved


def _verify(path: Path, checksums: dict | None) -> None:
    """Refuse a file whose bytes changed since the save; a checkpoint saved without checksums loads, warned once."""
    if checksums is None:
        if str(path.parent) not in _warned_unverified:
            _warned_unverified.add(str(path.parent))
            log0(f"warning: {path.parent} has no checksums (saved before nanochat recorded them): "
                 "loading it unverified")
        return
    expected = checksums.get(path.name)
    if expected is None:
        raise ValueError(f"{path} is not among the files that {path.parent / 'meta.json'} records: it was not saved "
                         "with this checkpoint. Copy the checkpoint again, or load another step")
    actual = _sha256(path)
    if actual != expected:
        raise ValueError(f"{path} is corrupted: its sha256 is {actual[:16]}..., it was {expected[:16]}... when saved "
                         "(a disk or copy error). Copy it again from where it came from, or load another step")


def _read_model(step_dir: Path, device: str | torch.device) -> tuple[dict, dict, dict | None]:
    """(model_state, meta, checksums) of a step dir; the weights checked against their saved sha256, meta's
    tokenizer_dir made a path of this machine."""
    meta_path = step_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{meta_path} is unreadable ({e}): the checkpoint is damaged. Copy it again, or load "
                         "another step") from e
    checksums = meta.pop(CHECKSUMS, None)
    if meta.get("tokenizer_dir"):
        meta["tokenizer_dir"] = str(_tokenizer_path(meta["tokenizer_dir"]))
    path = step_dir / "model.safetensors"
    _verify(path, checksums)
    try:
        model_state = load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path} is unreadable ({e}): the file is damaged. Copy it again, or load another "
                         "step") from e
    return model_state, meta, checksums


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer's files (tokenizer.RANKS_FILE and META_FILE) into dst, fsynced."""
    from nanochat.tokenizer import META_FILE, RANKS_FILE

    dst.mkdir()
    for name in (RANKS_FILE, META_FILE):
        if not (src / name).is_file():
            raise FileNotFoundError(f"tokenizer_dir {src} has no {name}: pass the directory the model's tokenizer "
                                    "was saved in (`python -m scripts.tok_train` writes one)")
        shutil.copyfile(src / name, dst / name)
        _fsync_file(dst / name)


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
    path = _chosen_step_dir(checkpoint_dir, steps, step)
    model_state, meta, checksums = _read_model(path, device)
    optimizer_state = None
    if load_optimizer:
        optim_path = path / f"optim_rank{rank}.pt"
        if not optim_path.is_file():
            saved = sorted(p.name for p in path.glob("optim_rank*.pt"))
            raise FileNotFoundError(f"{optim_path} is missing (found {saved or 'no optimizer files'}): resume "
                                    "with the world size the checkpoint was saved with, or load_optimizer=False")
        _verify(optim_path, checksums)
        try:
            optimizer_state = torch.load(optim_path, map_location=device, weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"refusing to load {optim_path}: it holds objects other than tensors and "
                             f"plain containers, and loading it could execute code ({e})") from e
        except (RuntimeError, EOFError, OSError) as e:
            raise ValueError(f"{optim_path} is unreadable ({e}): the file is damaged. Copy it again, or resume "
                             "from another step") from e
    return model_state, optimizer_state, meta


def claim_checkpoint_dir(checkpoint_dir: str | Path, resume_from_step: int, overwrite: bool, rank: int = 0) -> None:
    """Call before training: keep this run's checkpoints apart from an earlier run's in the same dir.

    A fresh run (resume_from_step < 0) into a dir holding checkpoints, or a resumed one into a dir holding
    steps past its start, would leave steps there that are not its own: `load_model` would return the
    highest of them. Refused, naming the ways out; with `overwrite` those steps are deleted now (rank 0).
    """
    checkpoint_dir = Path(checkpoint_dir)
    steps = _complete_steps(checkpoint_dir)
    others = steps if resume_from_step < 0 else [s for s in steps if s > resume_from_step]
    if not others:
        return
    if not overwrite:
        what = "a fresh run" if resume_from_step < 0 else f"a run resumed from step {resume_from_step}"
        raise FileExistsError(f"{checkpoint_dir} holds steps {others} of an earlier run, and {what} would mix its "
                              f"checkpoints with them: continue that run with --resume_from_step {steps[-1]}, pick "
                              "another --model_tag, or pass --overwrite to delete those steps first")
    if rank == 0:
        for s in others:
            shutil.rmtree(_step_dir(checkpoint_dir, s))
        log0(f"--overwrite: deleted steps {others} of {checkpoint_dir}")


def run_checkpoint_dir(phase: str, tag: str | None = None) -> Path:
    """Where a phase's runs keep their checkpoints: <base_dir>/checkpoints/<phase>[/<tag>]."""
    phase_dir = get_base_dir() / "checkpoints" / phase
    return phase_dir / tag if tag else phase_dir


def resolve_model_dir(path: str | Path, step: int | None = None) -> Path:
    """The step dir that a user-given checkpoint path means: the path itself when it holds model.safetensors
    and meta.json (a step dir, under any name), else its step_<n> dir for `step` (None = the latest)."""
    path = Path(path).expanduser()
    if (path / "model.safetensors").is_file() and (path / "meta.json").is_file():
        if step is not None and STEP_DIR.match(path.name) and int(STEP_DIR.match(path.name).group(1)) != step:
            raise ValueError(f"--model {path} is the checkpoint of step {int(STEP_DIR.match(path.name).group(1))}, "
                             f"but --step {step} was asked for: pass its run directory {path.parent} instead")
        return path
    steps = _complete_steps(path)
    if not steps:
        raise FileNotFoundError(f"{path} is not a checkpoint: a step directory holds model.safetensors and "
                                "meta.json, a run directory holds step_<n>/ ones (e.g. "
                                "~/.cache/nanochat/checkpoints/sft/d20 or its step_000800)")
    return _chosen_step_dir(path, steps, step)


def load_model(phase: str = "base", device: str | torch.device = "cpu", tag: str | None = None,
               step: int | None = None, model_dir: str | Path | None = None):
    """(model in eval mode, tokenizer, meta) from <base_dir>/checkpoints/<phase>/<tag>/step_<n>/, or from
    `model_dir` when given (a step dir or a run dir, anywhere: see `resolve_model_dir`; phase and tag unused).

    tag None: the only tag directory, or else the most recently modified one. The tokenizer is the step
    dir's own copy (`tokenizer/`), else the directory its meta names; a checkpoint found by phase may also
    fall back to <base_dir>/tokenizer, one loaded by path may not (on another machine that would be a
    different tokenizer).
    """
    if model_dir is not None:
        step_dir = resolve_model_dir(model_dir, step)
    else:
        step_dir = _phase_step_dir(phase, tag, step)
    model_state, meta, _ = _read_model(step_dir, device)
    try:
        model = build_model(meta["model_config"], model_state, device)
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"the weights in {step_dir / 'model.safetensors'} do not fit the model that "
                         f"{step_dir / 'meta.json'} describes ({e}): the checkpoint is damaged or mixed from two "
                         "saves. Copy it again, or load another step") from e
    tokenizer_dir = _tokenizer_dir(step_dir, meta, allow_default=model_dir is None)
    from nanochat.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has {tokenizer.get_vocab_size()} tokens but the model "
                         f"in {step_dir} was trained with {model.config.vocab_size}: put the model's own tokenizer "
                         f"in {step_dir / TOKENIZER_SUBDIR}")
    log0(f"model {step_dir} (step {meta.get('step')}) | tokenizer {tokenizer_dir}")
    return model, tokenizer, meta


def build_model(model_config: dict, model_state: dict, device: str | torch.device = "cpu"):
    """A GPT in eval mode from a checkpoint's model_config and weights. The attention backend and activation
    recompute are choices of a training run, not of the weights: reset to auto and none."""
    from nanochat.model.gpt import GPT, GPTConfig

    config = GPTConfig(**{**model_config, "attn_backend": "auto", "recompute": "none"})
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # fills non-persistent buffers (e.g. rotary tables); weights are overwritten next
    model.load_state_dict(model_state, strict=True)
    return model.eval()


def _phase_step_dir(phase: str, tag: str | None, step: int | None) -> Path:
    """<base_dir>/checkpoints/<phase>/<tag>/step_<n>: tag None = the newest tag dir, step None = its latest."""
    phase_dir = run_checkpoint_dir(phase)
    how = HOW_TO_CREATE.get(phase, "the training script of that phase")
    tags = [d for d in phase_dir.iterdir() if d.is_dir() and not d.name.startswith(".")] if phase_dir.is_dir() else []
    tags = [d for d in tags if _complete_steps(d)]
    if tag is None:
        if not tags:
            raise FileNotFoundError(f"no {phase} checkpoint under {phase_dir}: run `{how}` first, "
                                    "or load one by path with --model DIR")
        tag_dir = max(tags, key=lambda d: d.stat().st_mtime)
    else:
        tag_dir = phase_dir / tag
        if tag_dir not in tags:
            raise FileNotFoundError(f"no checkpoint with tag {tag!r} under {phase_dir}; "
                                    f"tags there: {sorted(d.name for d in tags)}. Run `{how}` to make one")
    return _chosen_step_dir(tag_dir, _complete_steps(tag_dir), step)


def _tokenizer_dir(step_dir: Path, meta: dict, allow_default: bool) -> Path:
    from nanochat.tokenizer import resolve_tokenizer_dir

    candidates = [step_dir / TOKENIZER_SUBDIR]
    if meta.get("tokenizer_dir"):
        candidates.append(Path(meta["tokenizer_dir"]))
    if allow_default:
        candidates.append(resolve_tokenizer_dir(None))
    expected = meta.get("tokenizer_sha256")  # saved since checkpoints record it: the vocabulary, exactly
    others = []
    for directory in candidates:
        if directory.is_dir():
            if expected and _tokenizer_sha256(directory) != expected:
                others.append(directory)
                continue
            return directory
    if others:
        raise ValueError(f"the tokenizer in {others[0]} is not the one the model in {step_dir} was trained with "
                         f"(its files' sha256 differs from meta.json's tokenizer_sha256): copy the model's own "
                         f"tokenizer directory to {step_dir / TOKENIZER_SUBDIR}")
    raise FileNotFoundError(f"no tokenizer for the model in {step_dir}: looked in {', '.join(map(str, candidates))}. "
                            f"Copy the model's tokenizer directory (tokenizer.tiktoken, tokenizer.json) to "
                            f"{step_dir / TOKENIZER_SUBDIR}")


__all__ = ["save_checkpoint", "load_checkpoint", "latest_step", "load_model", "resolve_model_dir", "build_model",
           "claim_checkpoint_dir", "ModelChoice"]
