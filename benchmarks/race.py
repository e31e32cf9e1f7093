"""Time to quality, side by side: training configurations ("racers") one after another on one GPU, or several at
once on the GPUs of one host, on the same data, validation text and budget; validation bits per byte against training
seconds for each.

    python -m benchmarks.race_data --out .race --peer PEER      # once: data and both tokenizers
    python -m benchmarks.race --race_dir .race --peer PEER \\
        --racers "ours; nanochat; nanochat_L=nanochat:--window-pattern L --warmup-steps 0"
    python -m benchmarks.race ... --gpus all                   # one racer per GPU at a time, all GPUs busy
    python -m benchmarks.race --smoke [--peer PEER]             # tiny racers on the CPU, in minutes

A racer is `name=kind:flags` (`ours` alone means `ours=ours:`), or `name=kind@STEPS:flags` for a racer with its own
step count (its whole schedule, warm-down included, fit to a shorter or longer horizon: a time-to-quality race
lets each trainer pick the horizon that reaches the target first). Kind `ours` runs our scripts.base_train,
kind `nanochat` the public nanochat's own scripts.base_train in the checkout given with --peer; each keeps
its own defaults for everything the race does not fix. The race fixes: depth, sequence length, batch
(tokens per step and rows per device), data (--race_dir/data: training shards, the last one validation),
each kind's tokenizer (--race_dir/tokenizer_<kind>, trained on that data) and the budget: --steps N, or
--seconds S (each racer is first timed for --probe_steps and then trains the steps that fit in S at its
speed). No sampling, no CORE evaluation; a checkpoint at the end, deleted once the racer's final bpb is measured
(--keep_checkpoints keeps it: a d20 racer's optimizer file alone is 5.3 GB; in S25 three racers' checkpoints
filled a GPU machine's 64 GiB disk).

Measured per racer: validation bpb against training seconds at --eval_points points (each trainer's own
periodic evaluation), the seconds summed from its per-step times with compilation left out (a step over
3x the median, the first step's compile and any recompile, counts as the median), median tokens/s, MFU
and peak memory as the trainer reports them, and the final bpb computed by one routine of ours
(nanochat/eval/bpb.py:text_bpb via benchmarks/race_eval.py) on the same raw validation text for every
racer, each model with its own tokenizer. The table printed last gives each racer's time to reach the
target bpb and its ratio to the first racer's. The target: the highest final bpb of the racers by their trainers'
own last evaluation (or --target RACER's). A racer's time to it: the training seconds at which its curve FIRST
reaches it, linear between evaluations ("—" if it never does); its ratio: that time / the first racer's. A curve
that dips below the target and rises back above it (overfitting) keeps its first crossing: read it with the
racer's lowest bpb ("min bpb @ step", also in the table; a last evaluation more than 0.01 above it gets a note).

Epochs: a racer trains steps x --total_batch_size tokens; the manifest of --race_dir/data (tokens.json, written by
benchmarks.race_data) counts the tokens of the training shards in each tokenizer (every document with its BOS, as
the trainers read them). Their ratio, the epochs of the race data the racer sees, is printed at start (with
--seconds: once its probe has sized its run), in race.json and in the table; above 1 with a WARNING, since a racer
that sees its documents again is being measured on memorizing them as much as on learning. It is a lower bound: the
tokens a trainer crops to fill a row are read but not trained on. A race dir without a manifest (made before it
existed): said once, and its epochs are "—".
Writes race.json (after every racer), race.png and each racer's logs into --out; checkpoints and logs go to --work,
where a racer's result.json also lets a later run with the same settings skip it (a race longer than one call of a
GPU machine goes on in the next). Last stdout line: one JSON object.

A racer cut off mid-run (the call's time limit) resumes in the next run from its newest complete checkpoint,
when it has one (--save_every N: every N steps) and its attempts.json in --work records the same settings;
else it starts over, saying why. Each attempt logs into its own file (train.log, train.attempt2.log, ...);
the curve and the seconds take each step and evaluation from the attempt that ran it last (an attempt's lines
past the step the next one resumed from are dropped), and the compile of a resumed attempt's first step
counts as the median like the first attempt's.

--gpus 0,1,2,3 (or all: every visible CUDA device) trains up to that many racers at once, each alone on its GPU:
CUDA_VISIBLE_DEVICES in the environment of its probe, training and final bpb (each trainer keeps its own
--device_type; the race itself puts nothing on a GPU). A thread per GPU takes the next racer; race.json, the table and
the curves keep the racers' order, and each result records its GPU index and the device name its trainer printed.
Racers side by side share the host's CPU (data loading, kernel launches), PCIe and power, so their timings compare
only roughly: race one after another on one GPU (no --gpus) to compare speeds closely. A racer that fails does not stop
the others: the race reports each failure at the end, with its logs, and exits non-zero. One whose trainer failed
after evaluations keeps a row in the table ("stopped at step N of M"): no final bpb, but its time to the target
where its curve so far reached it (race.json: its "partial" result under "failed").
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
import zipfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.race_data import check_peer, link_peer_base, peer_env, train_tokens
from nanochat.checkpoint import latest_step
from nanochat.flags import parse_flags

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("ours", "nanochat")
# Our base_train: "step 00010/00100 | loss 4.1 | lrm 1.000 | 980 ms | 535,000 tok/s | MFU 41.2% | mem 40.1 GiB"
OURS_STEP = re.compile(r"^step (\d+)/\d+ \| loss [\d.naif]+ \| lrm [\d.]+ \| (\d+) ms \| [\d,]+ tok/s \| MFU ([\d.]+)%")
OURS_STEP_NO_MFU = re.compile(r"^step (\d+)/\d+ \| loss [\d.naif]+ \| lrm [\d.]+ \| (\d+) ms \|")
OURS_EVAL = re.compile(r"^step (\d+) \| val bpb ([\d.]+)")
OURS_BATCH = re.compile(r"\| batch ([\d,]+)$")  # ends a step line under --batch_schedule
# The peer: "step 00009/00100 (9.00%) | loss: 4.1 | lrm: 1.00 | dt: 980.12ms | tok/sec: 535,000 | bf16_mfu: 41.20 |"
PEER_STEP = re.compile(r"^step (\d+)/\d+ \(.*?\) \| loss: [\d.naif]+ \| lrm: [\d.]+ \| dt: ([\d.]+)ms \| "
                       r"tok/sec: [\d,]+ \| bf16_mfu: ([\d.]+)")
PEER_EVAL = re.compile(r"^Step (\d+) \| Validation bpb: ([\d.]+)")
PEER_MEMORY = re.compile(r"^Peak memory usage: ([\d.]+)MiB")
PEER_GPU = re.compile(r"^GPU: (.+?) \| Peak FLOPS")
COMPILE_FACTOR = 3.0
RISE_NOTE = 0.01  # a last evaluation this much above the curve's lowest bpb is noted (overfitting?)
ATTEMPTS = "attempts.json"  # in a racer's work dir: its settings, steps and training attempts (log, resume step)


@dataclass
class RaceConfig:
    """Race training configurations to a validation bpb."""
    racers: str = field(default="", metadata={"help": "';'-separated `name=kind[@STEPS]:flags` (default: ours, and "
                                                      "nanochat with --peer)"})
    race_dir: str = field(default=".race", metadata={"help": "made by benchmarks.race_data: data/, tokenizer_<kind>/"})
    peer: str = field(default="", metadata={"help": "a checkout of karpathy/nanochat at 92d63d4, for kind nanochat"})
    out: str = field(default="out/race", metadata={"help": "race.json, race.png and the racers' logs"})
    work: str = field(default="", metadata={"help": "racers' checkpoints and results (default <out>/work); a racer "
                                                  "whose result there has the same settings is not run again"})
    steps: int = field(default=400, metadata={"help": "optimizer steps per racer (unless --seconds); the default 400 "
                                               "of 131,072 tokens, 52M tokens, is the batch nanochat's rule gives "
                                               "that horizon and stands closer to a full run than 100 of 524,288"})
    seconds: float = field(default=0.0, metadata={"help": "training seconds per racer instead of --steps"})
    probe_steps: int = field(default=15, metadata={"help": "with --seconds: steps timed to size each racer's run"})
    depth: int = 12
    max_seq_len: int = 2048
    total_batch_size: int = field(default=131072, metadata={"help": "tokens per optimizer step, every racer"})
    device_batch_size: int = field(default=32, metadata={"help": "rows per micro-step, every racer"})
    save_every: int = field(default=0, metadata={"help": "racers save a checkpoint every N steps, from which one "
                                                    "cut off resumes in the next run (0: at the end only)"})
    keep_checkpoints: bool = field(default=False, metadata={"help": "keep each finished racer's checkpoints (default: "
                                                              "deleted once its result is stored)"})
    eval_points: int = field(default=10, metadata={"help": "validation evaluations per racer (plus step 0)"})
    eval_tokens: int = field(default=4 * 524288, metadata={"help": "validation tokens per periodic evaluation"})
    final_chars: int = field(default=4_000_000, metadata={"help": "validation characters of the final bpb"})
    target: str = field(default="", metadata={"help": "racer whose final bpb is the target (default: the worst)"})
    smoke: bool = field(default=False, metadata={"help": "tiny racers on the CPU (data and tokenizers made here)"})
    device_type: str = field(default="", metadata={"help": "passed to every racer (default: the trainer's own)"})
    gpus: str = field(default="", metadata={"help": "race up to N racers at once, one per GPU: `0,1,2,3` or `all` "
                                                "(default: one after another on the default device)"})


@dataclass
class Racer:
    name: str
    kind: str
    flags: list[str]
    steps: int | None = None  # its own step count (`kind@STEPS`); None: the race's --steps or --seconds


def parse_racers(spec: str, with_peer: bool) -> list[Racer]:
    """`name=kind[@STEPS]:flags; ...` -> racers; a bare kind names itself; names are unique."""
    spec = spec.strip() or ("ours; nanochat" if with_peer else "ours")
    racers = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        head, _, flags = item.partition(":")
        name, _, kind = head.partition("=")
        kind, _, steps = kind.partition("@")
        name, kind = name.strip(), (kind or name).strip()
        if steps and not (steps.strip().isdigit() and int(steps) > 0):
            raise SystemExit(f"racer {item!r}: its steps {steps!r} after '@' must be a whole number above 0")
        if kind not in KINDS:
            raise SystemExit(f"racer {item!r}: kind {kind!r} is not one of {', '.join(KINDS)} "
                             f"(write name=kind:flags, e.g. 'sssl=ours:--window_pattern SSSL')")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise SystemExit(f"racer name {name!r}: use letters, digits, '_', '.', '-' (it names a folder)")
        racers.append(Racer(name, kind, flags.split(), int(steps) if steps else None))
    names = [r.name for r in racers]
    if len(set(names)) != len(names):
        raise SystemExit(f"racer names must be unique, got {names}")
    if any(r.kind == "nanochat" for r in racers) and not with_peer:
        raise SystemExit("a nanochat racer needs --peer PATH (a checkout of karpathy/nanochat): "
                         "`git clone https://github.com/karpathy/nanochat PATH && git -C PATH checkout 92d63d4`")
    return racers


def visible_gpu(gpu: int) -> str:
    """A child's CUDA_VISIBLE_DEVICES for GPU `gpu` as this process numbers its devices: the gpu-th entry of our own
    CUDA_VISIBLE_DEVICES when that is set (its entries name devices as the machine does), else the index."""
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        return str(gpu)
    ids = [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    if gpu >= len(ids):
        raise SystemExit(f"--gpus: GPU {gpu} is not among CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}, "
                         f"whose {len(ids)} entries are GPUs 0-{len(ids) - 1} here: pick from those, or unset it")
    return ids[gpu]


def parse_gpus(spec: str) -> list[int | None]:
    """--gpus -> the slots racers run in: [None] (one after another on the default device) or GPU indices."""
    spec = spec.strip()
    if not spec:
        return [None]
    count = torch.cuda.device_count()  # counts without creating a CUDA context in this process
    if spec == "all":
        if count == 0:
            raise SystemExit("--gpus all: no CUDA device is visible here (torch.cuda.device_count() is 0): run on a "
                             "GPU machine, or leave --gpus out to race one after another on this machine")
        return list(range(count))
    try:
        gpus = [int(part) for part in spec.split(",")]
    except ValueError:
        raise SystemExit(f"--gpus {spec!r}: give GPU indices such as 0,1,2,3, or all") from None
    if len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise SystemExit(f"--gpus {spec!r}: name each GPU once, by its index from 0 (e.g. 0,1,2,3)")
    if count and max(gpus) >= count:
        raise SystemExit(f"--gpus {spec!r}: this machine shows {count} CUDA devices (0-{count - 1}): use those, or all")
    for gpu in gpus:
        visible_gpu(gpu)
    return gpus


def pin(env: dict, gpu: int | None) -> dict:
    """`env` with GPU `gpu` the only CUDA device its process sees; unchanged for None (the default device)."""
    return env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": visible_gpu(gpu)}


def who(name: str, gpu: int | None) -> str:
    """A racer as progress lines and the table name it: with its GPU when racers run side by side."""
    return name if gpu is None else f"{name} (GPU {gpu})"


_print_lock = threading.Lock()


def say(name: str, gpu: int | None, message: str) -> None:
    """One progress line of the race, whole even while racers run side by side."""
    with _print_lock:
        print(f"[race] {who(name, gpu)}: {message}", flush=True)


def epochs_of(tokens: int, data_tokens: int | None) -> float | None:
    """Epochs of the race data that training on `tokens` tokens reads (None: data tokens unknown)."""
    return tokens / data_tokens if data_tokens else None


def count(tokens: int) -> str:
    """209.7M, or 10,240 below a million."""
    return f"{tokens / 1e6:.1f}M" if tokens >= 1e6 else f"{tokens:,}"


def say_epochs(name: str, gpu: int | None, steps: int, total_batch_size: int, data_tokens: int | None) -> None:
    """A racer's tokens against the race data's, and a WARNING when that is more than one epoch (an upper bound
    for a racer with a --batch_schedule: its result counts the tokens it trained)."""
    epochs = epochs_of(steps * total_batch_size, data_tokens)
    of = f"{epochs:.2f} epochs of the race data ({count(data_tokens)} tokens)" if epochs is not None else \
        "— epochs of the race data (its token count is unknown)"
    say(name, gpu, f"{steps} steps x {total_batch_size:,} = {count(steps * total_batch_size)} tokens = {of}")
    if epochs is not None and epochs > 1.0:
        one = data_tokens // total_batch_size
        with _print_lock:
            print(f"[race] WARNING: {who(name, gpu)} trains {epochs:.2f} epochs of the race data: it sees its training "
                  f"documents ~{epochs:.1f} times, so past step {one} the race measures how well it memorizes them, "
                  f"not how fast it learns. Fix: more data (`python -m benchmarks.race_data --train_shards N`, into "
                  f"a new --out: more of --src's training shards) or a smaller budget (one epoch is {one} steps of "
                  f"{total_batch_size:,} tokens: fewer --steps, or a smaller --total_batch_size)", flush=True)


def command(cfg: RaceConfig, racer: Racer, steps: int, eval_every: int, work: Path,
            gpu: int | None = None) -> tuple[list[str], dict, Path]:
    """(argv, env, cwd) of one racer's training run, on GPU `gpu` (None: the default device)."""
    race = Path(cfg.race_dir).resolve()
    shared = dict(depth=cfg.depth, max_seq_len=cfg.max_seq_len, total_batch_size=cfg.total_batch_size,
                  device_batch_size=cfg.device_batch_size, num_iterations=steps, eval_every=eval_every,
                  eval_tokens=cfg.eval_tokens, sample_every=-1, save_every=cfg.save_every if cfg.save_every > 0 else -1,
                  model_tag=racer.name)
    if cfg.device_type:
        shared["device_type"] = cfg.device_type
    base = work / "base"
    if racer.kind == "ours":  # its newest checkpoint is all a resume needs
        flags = dict(shared, data_dir=race / "data", tokenizer_dir=race / "tokenizer_ours", keep_last=1)
        argv = [sys.executable, "-m", "scripts.base_train", *(f"--{k}={v}" for k, v in flags.items())]
        env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), PYTHONUNBUFFERED="1")
        return argv + racer.flags, pin(env, gpu), ROOT
    link_peer_base(base, race / "data", race / "tokenizer_nanochat")
    flags = dict(shared, core_metric_every=-1)
    argv = [sys.executable, "-m", "scripts.base_train", *(f"--{k.replace('_', '-')}={v}" for k, v in flags.items())]
    env = dict(peer_env(Path(cfg.peer).resolve(), base), PYTHONUNBUFFERED="1")
    return argv + racer.flags, pin(env, gpu), Path(cfg.peer).resolve()


def run_logged(argv: list[str], env: dict, cwd: Path, log: Path, mirror: Path | None = None) -> list[str]:
    """Run, stream its output into `log` (and `mirror`) line by line, so that a run killed from outside leaves
    every line it printed; return its lines; a failure names the log."""
    lines = []
    with ExitStack() as stack:
        files = [stack.enter_context(open(path, "w", buffering=1)) for path in (log, mirror) if path]
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            for f in files:
                f.write(line)
            lines.append(line.rstrip("\n"))
        if proc.wait() != 0:
            tail = "\n".join(lines[-15:])
            raise SystemExit(f"{argv[2:4]} failed (exit {proc.returncode}); its log: {log}\n{tail}")
    return lines


def parse_log(kind: str, lines: list[str], since: int = -1, until: float = math.inf) -> dict:
    """Per-step seconds, tokens (None: the race's batch) and MFU, (step, bpb) evaluations, peak memory, the device's
    name, the last step done and our compiled model's graph breaks, from a trainer's output; only the steps done and
    evaluations in (since, until]: one attempt's share of a resumed run."""
    dts, tokens, mfus, evals, memory, device, last, breaks = [], [], [], [], None, None, 0, None
    for line in lines:
        line = line.strip()
        step = mfu = point = batch = None
        if kind == "ours":  # its step line counts the steps done
            if m := OURS_STEP.match(line) or OURS_STEP_NO_MFU.match(line):
                step, dt = int(m.group(1)), int(m.group(2)) / 1000
                mfu = float(m.group(3)) if m.re is OURS_STEP else None
                if b := OURS_BATCH.search(line):
                    batch = int(b.group(1).replace(",", ""))
            elif m := OURS_EVAL.match(line):
                point = (int(m.group(1)), float(m.group(2)))
            elif line.startswith("{") and '"peak_memory_gib"' in line:
                report = json.loads(line)
                memory, device, breaks = report["peak_memory_gib"], report.get("device"), report.get("graph_breaks")
        else:  # its step line numbers the step from 0
            if m := PEER_STEP.match(line):
                step, dt, mfu = int(m.group(1)) + 1, float(m.group(2)) / 1000, float(m.group(3))
            elif m := PEER_EVAL.match(line):
                point = (int(m.group(1)), float(m.group(2)))
            elif m := PEER_MEMORY.match(line):
                memory = float(m.group(1)) / 1024
            elif m := PEER_GPU.match(line):  # printed on CUDA only
                device = m.group(1)
        if step is not None and since < step <= until:
            dts.append(dt)
            tokens.append(batch)
            mfus += [mfu] if mfu is not None else []
            last = max(last, step)
        elif point is not None and since < point[0] <= until:
            evals.append(point)
    return {"step_seconds": dts, "step_tokens": tokens, "mfu": mfus, "evals": evals, "peak_memory_gib": memory,
            "device": device, "last_step": last, "graph_breaks": breaks}


def merge_attempts(kind: str, parts: list[tuple[int, list[str]]]) -> dict:
    """parse_log's stats of one run from its attempts' (resume step or -1, output lines), in order: each attempt
    gives the steps after its resume step up to the next attempt's; the peak memory and graph breaks are the
    highest, the device the last one named."""
    merged = {"step_seconds": [], "step_tokens": [], "mfu": [], "evals": [], "peak_memory_gib": None, "device": None,
              "last_step": 0, "graph_breaks": None}
    untils = [since for since, _ in parts[1:]] + [math.inf]
    for (since, lines), until in zip(parts, untils):
        stats = parse_log(kind, lines, since, until)
        for key in ("step_seconds", "step_tokens", "mfu", "evals"):
            merged[key] += stats[key]
        for key in ("peak_memory_gib", "graph_breaks"):
            merged[key] = max((v for v in (merged[key], stats[key]) if v is not None), default=None)
        merged["device"] = stats["device"] or merged["device"]
        merged["last_step"] = max(merged["last_step"], stats["last_step"])
    return merged


def training_seconds(step_seconds: list[float]) -> tuple[list[float], float]:
    """Per-step seconds with compilation left out (a step over COMPILE_FACTOR x the median counts as the
    median), and the seconds so removed."""
    if not step_seconds:
        return [], 0.0
    median = statistics.median(step_seconds)
    kept = [median if dt > COMPILE_FACTOR * median else dt for dt in step_seconds]
    return kept, sum(step_seconds) - sum(kept)


def curve(evals: list[tuple[int, float]], kept: list[float]) -> list[tuple[int, float, float]]:
    """(step, training seconds after that many steps, bpb) per evaluation."""
    cumulative = [0.0]
    for dt in kept:
        cumulative.append(cumulative[-1] + dt)
    return [(step, cumulative[min(step, len(kept))], bpb) for step, bpb in evals]


def time_to_reach(points: list[tuple[int, float, float]], target: float) -> float | None:
    """Training seconds at which the curve first reaches `target` (linear between evaluations), or None."""
    for (_, t0, b0), (_, t1, b1) in zip([points[0]] + points, points):
        if b1 <= target:
            return t1 if b1 == b0 or b0 <= target else t0 + (t1 - t0) * (b0 - target) / (b0 - b1)
    return None


def final_bpb(cfg: RaceConfig, racer: Racer, work: Path, gpu: int | None = None) -> dict:
    """Our routine's bpb of the racer's final checkpoint on the race's validation text, on GPU `gpu`."""
    val = sorted((Path(cfg.race_dir) / "data").glob("*.parquet"))[-1]
    argv = [sys.executable, str(ROOT / "benchmarks" / "race_eval.py"), f"--kind={racer.kind}", f"--val={val}",
            f"--max_chars={cfg.final_chars}"]
    env = dict(os.environ)
    if cfg.device_type:
        argv.append(f"--device={cfg.device_type}")
    if racer.kind == "ours":
        argv.append(f"--model={checkpoint_dir(racer.kind, work / 'base', racer.name)}")
    else:
        argv += [f"--peer={Path(cfg.peer).resolve()}", f"--model_tag={racer.name}"]
        env = peer_env(Path(cfg.peer).resolve(), work / "base")
    lines = run_logged(argv, pin(env, gpu), ROOT, work / "final_bpb.log")
    return json.loads(lines[-1])


def probe_steps(cfg: RaceConfig, racer: Racer, work: Path, gpu: int | None = None) -> int:
    """With --seconds: the steps that fit in the budget at this racer's median step time (on its GPU)."""
    argv, env, cwd = command(cfg, racer, cfg.probe_steps, eval_every=-1, work=work / "probe", gpu=gpu)
    argv.append("--save_every=0" if racer.kind == "ours" else "--save-every=-1")
    stats = parse_log(racer.kind, run_logged(argv, env, cwd, work / "probe.log"))
    kept, _ = training_seconds(stats["step_seconds"])
    shutil.rmtree(work / "probe", ignore_errors=True)
    return max(1, int(cfg.seconds / statistics.median(kept)))


def racer_settings(cfg: RaceConfig, racer: Racer) -> dict:
    """What a racer's result depends on: a stored result with the same settings can stand in for a run."""
    left_out = ("racers", "out", "work", "target", "smoke", "save_every", "keep_checkpoints", "gpus")
    race = {k: v for k, v in asdict(cfg).items() if k not in left_out}
    if racer.steps:
        race.update(steps=racer.steps, seconds=0.0)
    if racer.kind == "ours":  # auto attention picks FlashAttention-4 where it is installed (race_gpu.sh stages it)
        race.update(flash_attn_4=installed_version("flash-attn-4"))
    return {"kind": racer.kind, "flags": racer.flags, **race}


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def checkpoint_dir(kind: str, base: Path, tag: str) -> Path:
    """Where a racer's trainer writes its checkpoints under its base dir."""
    return base / "checkpoints" / "base" / tag if kind == "ours" else base / "base_checkpoints" / tag


def newest_checkpoint(kind: str, base: Path, tag: str) -> int | None:
    """The newest step with a complete checkpoint of racer `tag` under its base dir, or None. Ours writes a step
    dir whole (nanochat.checkpoint); the peer writes model_<step>.pt, meta_<step>.json and optim_<step>_rank0.pt
    one after another, and a torch.save file cut off mid-write lacks the zip directory that ends it."""
    run = checkpoint_dir(kind, base, tag)
    if kind == "ours":
        return latest_step(run)
    metas = (re.fullmatch(r"meta_(\d+)\.json", p.name) for p in run.glob("meta_*.json"))
    for step in sorted((int(m.group(1)) for m in metas if m), reverse=True):
        if all(zipfile.is_zipfile(run / name) for name in (f"model_{step:06d}.pt", f"optim_{step:06d}_rank0.pt")):
            return step
    return None


def read_attempts(kind: str, work: Path, attempts: list[dict]) -> dict:
    """merge_attempts of the attempts that attempts.json records, from their logs in the racer's work dir."""
    return merge_attempts(kind, [(a["resume_from"], (work / a["log"]).read_text().splitlines()) for a in attempts])


def earlier_run(racer: Racer, work: Path, settings: dict, gpu: int | None = None) -> tuple[dict | None, int]:
    """(attempts.json, the step to resume from) of this racer's unfinished run, or (None, -1) to start over,
    saying why: other settings, no complete checkpoint, or logs that stop before it."""
    path = work / ATTEMPTS
    if not path.is_file():
        return None, -1
    record = json.loads(path.read_text())
    n = len(record["attempts"])
    step = newest_checkpoint(racer.kind, work / "base", racer.name)
    if record["settings"] != settings:
        why = "an earlier attempt had other settings"
    elif step is None:
        why = f"attempt {n} left no complete checkpoint (--save_every N saves one every N steps)"
    elif (logged := read_attempts(racer.kind, work, record["attempts"])["last_step"]) < step:
        why = f"the logs of attempts 1-{n} stop at step {logged}, before the checkpoint of step {step}"
    else:
        return record, step
    say(racer.name, gpu, f"{why}: starting over")
    return None, -1


def run_racer(cfg: RaceConfig, racer: Racer, out: Path, work_root: Path, gpu: int | None = None,
              data_tokens: int | None = None) -> dict:
    """Train one racer (or reuse or resume its earlier run) on GPU `gpu` (None: the default device); its result.
    data_tokens: the race data's training tokens in its tokenizer (None: unknown), for its epochs."""
    work, logs = work_root / racer.name, out / racer.name
    settings = racer_settings(cfg, racer)
    stored = work / "result.json"
    if stored.is_file():
        result = json.loads(stored.read_text())
        if result.get("settings") == settings:
            say(racer.name, gpu, f"finished earlier with these settings ({stored}), not run again")
            tokens = result.get("tokens", result["steps"] * cfg.total_batch_size)  # results from before "tokens"
            return {**result, "data_tokens": data_tokens, "epochs": epochs_of(tokens, data_tokens)}
    record, resume = earlier_run(racer, work, settings, gpu)
    if record is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        steps = racer.steps or (probe_steps(cfg, racer, work, gpu) if cfg.seconds > 0 else cfg.steps)
        record = {"settings": settings, "steps": steps, "eval_every": max(1, steps // cfg.eval_points), "attempts": []}
    steps, attempts = record["steps"], record["attempts"]
    if cfg.seconds > 0 and not racer.steps:  # now its steps are known
        say_epochs(racer.name, gpu, steps, cfg.total_batch_size, data_tokens)
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    for attempt in attempts:  # --out may be new (a GPU call's): it gets every attempt's log
        shutil.copy(work / attempt["log"], logs)
    if resume == steps:
        say(racer.name, gpu, f"attempt {len(attempts)} trained all {steps} steps: on to the final bpb")
    else:
        log = f"train.attempt{len(attempts) + 1}.log" if attempts else "train.log"
        argv, env, cwd = command(cfg, racer, steps, record["eval_every"], work, gpu)
        if resume >= 0:
            argv.append(f"--resume_from_step={resume}" if racer.kind == "ours" else f"--resume-from-step={resume}")
            say(racer.name, gpu, f"resuming from step {resume} (attempt {len(attempts) + 1}), log {log}")
        attempts.append({"log": log, "resume_from": resume, "started": time.time()})
        (work / ATTEMPTS).write_text(json.dumps(record))
        say(racer.name, gpu, " ".join(argv[2:]))
        try:
            run_logged(argv, env, cwd, work / log, logs / log)
        except SystemExit as e:  # its curve so far can still have crossed the target
            stats = read_attempts(racer.kind, work, attempts)
            partial = {**measured(cfg, racer, stats, attempts, work, gpu, data_tokens), "steps": steps,
                       "steps_done": stats["last_step"]} if len(stats["evals"]) > 1 else None
            raise StoppedRacer(e.code, partial) from None
    stats = read_attempts(racer.kind, work, attempts)
    if len(stats["step_seconds"]) != steps or not stats["evals"]:
        raise SystemExit(f"{racer.name}: parsed {len(stats['step_seconds'])} step lines of {steps} and "
                         f"{len(stats['evals'])} evaluations from {', '.join(a['log'] for a in attempts)} in {work}; "
                         "its log format changed?")
    result = measured(cfg, racer, stats, attempts, work, gpu, data_tokens)
    final, last_own = final_bpb(cfg, racer, work, gpu), result["curve"][-1][2]
    result.update(steps=steps, final_bpb=final["bpb"], final_bpb_own=last_own, own_minus_ours=last_own - final["bpb"],
                  settings=settings)
    stored.write_text(json.dumps(result))
    if not cfg.keep_checkpoints:  # the result stands in for the run from now on
        shutil.rmtree(checkpoint_dir(racer.kind, work / "base", racer.name), ignore_errors=True)
    return result


def measured(cfg: RaceConfig, racer: Racer, stats: dict, attempts: list[dict], work: Path, gpu: int | None,
             data_tokens: int | None) -> dict:
    """What a racer's logs (merged `stats` of its `attempts`) measure: speed, MFU, memory, seconds, its curve."""
    kept, compile_seconds = training_seconds(stats["step_seconds"])
    step_tokens = [t or cfg.total_batch_size for t in stats["step_tokens"]]  # a --batch_schedule's steps differ
    wall = sum((work / a["log"]).stat().st_mtime - a["started"] for a in attempts)  # each to its last line
    return {"name": racer.name, "kind": racer.kind, "flags": racer.flags,
            "tok_per_s": statistics.median(t / dt for t, dt in zip(step_tokens, kept)),
            "median_step_s": statistics.median(kept), "tokens": sum(step_tokens),
            "mfu": statistics.median(stats["mfu"]) if stats["mfu"] else None,
            "peak_memory_gib": stats["peak_memory_gib"], "train_seconds": sum(kept),
            "compile_seconds": compile_seconds, "wall_seconds": wall, "attempts": len(attempts),
            "curve": curve(stats["evals"], kept), "data_tokens": data_tokens,
            "epochs": epochs_of(sum(step_tokens), data_tokens), "gpu": gpu, "device": stats["device"],
            "graph_breaks": stats["graph_breaks"]}


class StoppedRacer(SystemExit):
    """A racer whose trainer failed mid-run; `partial`: what its logs measured up to then (None: no evaluation
    after step 0), a row of the table with its time to the target if its curve reached it."""

    def __init__(self, message: object, partial: dict | None):
        super().__init__(message)
        self.partial = partial


@dataclass
class Failure:
    """A racer that raised instead of giving a result."""
    name: str
    gpu: int | None
    error: BaseException

    @property
    def partial(self) -> dict | None:
        return getattr(self.error, "partial", None)

    def message(self) -> str:
        """A trainer's failure as run_logged words it (its log named), anything else with its traceback."""
        if isinstance(self.error, SystemExit):
            return str(self.error.code)
        return "".join(traceback.format_exception(self.error)).rstrip()


def run_queue(racers: list[Racer], gpus: list[int | None], run_one: Callable[[Racer, int | None], dict],
              finished: Callable[[list], None]) -> list[dict | Failure]:
    """Each racer through run_one(racer, gpu), one racer per GPU at a time: a thread per GPU takes the next racer
    (one slot runs here, in this thread). A racer that raises becomes a Failure and the others go on. After each
    racer, finished(the outcomes so far, in the racers' order), one call at a time. Returns the outcomes in order."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for item in enumerate(racers):
        todo.put(item)
    outcomes: list = [None] * len(racers)
    lock = threading.Lock()

    def worker(gpu: int | None) -> None:
        while True:
            try:
                i, racer = todo.get_nowait()
            except queue.Empty:
                return
            try:
                outcome = run_one(racer, gpu)
                say(racer.name, gpu, "done")
            except (Exception, SystemExit) as e:  # not KeyboardInterrupt: that stops the race
                outcome = Failure(racer.name, gpu, e)
                first_line = outcome.message().partition("\n")[0]
                say(racer.name, gpu, f"FAILED ({first_line}); the others go on")
            with lock:
                outcomes[i] = outcome
                finished([o for o in outcomes if o is not None])

    if len(gpus) == 1:
        worker(gpus[0])
    else:  # daemon: an interrupted race does not wait for them
        threads = [threading.Thread(target=worker, args=(gpu,), daemon=True) for gpu in gpus]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    lost = [r.name for r, o in zip(racers, outcomes) if o is None]
    if lost:
        raise SystemExit(f"racers {lost} have no outcome: a worker thread died (its traceback is above)")
    return outcomes


def summarize(results: list[dict], target_name: str) -> tuple[float, list[dict]]:
    """The target bpb and, per racer, its epochs, its lowest bpb (and step), how far its last evaluation rose above
    that, its time to reach the target (first crossing) and the ratio to the first racer's time. A stopped racer
    (StoppedRacer's partial result, with "steps_done") has no final bpb and sets no target; its curve so far still
    gives its time to the target when it got there."""
    finished = [r for r in results if "steps_done" not in r]
    if target_name:
        match = [r for r in finished if r["name"] == target_name]
        if not match:
            raise SystemExit(f"--target {target_name}: no such finished racer ({[r['name'] for r in finished]})")
        target = match[0]["final_bpb_own"]
    else:
        target = max(r["final_bpb_own"] for r in finished)
    rows = []
    for r in results:
        t = time_to_reach(r["curve"], target)
        low_step, _, low = min(r["curve"], key=lambda point: point[2])  # the first of equals
        own = r.get("final_bpb_own")
        rows.append({"racer": r["name"], "tok_per_s": r["tok_per_s"], "epochs": r.get("epochs"),
                     "final_bpb": r.get("final_bpb"), "final_bpb_own": own, "min_bpb": low,
                     "min_bpb_step": low_step, "rise_after_min": None if own is None else own - low,
                     "time_to_target_s": t, "stopped_at_step": r.get("steps_done")})
    first = rows[0]["time_to_target_s"]
    for row in rows:
        t = row["time_to_target_s"]
        row["ratio_to_first"] = t / first if t is not None and first else None
    return target, rows


def plot(results: list[dict], target: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot([p[1] for p in r["curve"]], [p[2] for p in r["curve"]], marker="o", ms=3, label=r["name"])
    ax.axhline(target, color="gray", lw=0.8, ls="--", label=f"target {target:.4f}")
    ax.set_xlabel("training seconds (compilation and evaluation excluded)")
    ax.set_ylabel("validation bits per byte")
    later = [p[2] for r in results for p in r["curve"][1:]] or [target]  # step 0's bpb would flatten the rest
    ax.set_ylim(min(later) - 0.05, max(later) + 0.2)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict], results: list[dict]) -> str:
    fmt = lambda v, spec: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)
    lines = ["racer | tok/s | MFU % | mem GiB | train s | epochs | final bpb (ours) | final bpb (own eval) | "
             "min bpb @ step | time to target s | ratio to first", "---|" + "---:|" * 9 + "---:"]
    for row, r in zip(rows, results):
        name = who(row["racer"], r.get("gpu"))
        name += f" (stopped at step {row['stopped_at_step']} of {r['steps']})" if row["stopped_at_step"] else ""
        lines.append(f"{name} | {row['tok_per_s']:,.0f} | {fmt(r['mfu'], '.1f')} | "
                     f"{fmt(r['peak_memory_gib'], '.1f')} | {r['train_seconds']:.1f} | {fmt(row['epochs'], '.2f')} | "
                     f"{fmt(row['final_bpb'], '.4f')} | {fmt(row['final_bpb_own'], '.4f')} | "
                     f"{row['min_bpb']:.4f} @ {row['min_bpb_step']} | {fmt(row['time_to_target_s'], '.1f')} | "
                     f"{fmt(row['ratio_to_first'], '.3f')}")
    return "\n".join(lines)


def rise_notes(rows: list[dict]) -> list[str]:
    """A line for each racer whose last evaluation is more than RISE_NOTE above its lowest bpb."""
    notes = []
    for row in rows:
        if row["rise_after_min"] is not None and row["rise_after_min"] > RISE_NOTE:
            epochs = f"; it trained {row['epochs']:.2f} epochs of the race data" if row["epochs"] else ""
            notes.append(f"[race] {row['racer']}: val bpb rose {row['rise_after_min']:.3f} after step "
                         f"{row['min_bpb_step']} ({row['min_bpb']:.4f} -> {row['final_bpb_own']:.4f} at its last "
                         f"evaluation): overfitting?{epochs}")
    return notes


def graph_break_notes(results: list[dict]) -> list[str]:
    """A line for each racer of ours whose compiled model broke its graph: its speed is not one compiled graph's."""
    return [f"[race] {who(r['name'], r.get('gpu'))}: its compiled model broke its graph {r['graph_breaks']}x, so its "
            "step ran partly outside the compiled graph (the reasons: 'broke its graph' in its train.log)"
            for r in results if r.get("graph_breaks")]


def smoke_setup(cfg: RaceConfig) -> RaceConfig:
    """Tiny data (3 shards of 64 documents of the default data dir) and 512-token tokenizers under --out, and
    tiny racers on the CPU."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.race_data import MANIFEST
    from benchmarks.race_data import main as prepare
    from nanochat.data.shards import DocumentStream, list_shards, resolve_data_dir
    race = Path(cfg.out) / "smoke_data"
    made = [race / "tokenizer_ours", race / "data" / MANIFEST] + ([race / "tokenizer_nanochat"] if cfg.peer else [])
    if not all(path.exists() for path in made):
        src = race / "src"
        src.mkdir(parents=True, exist_ok=True)
        stream = iter(DocumentStream(list_shards(resolve_data_dir())[:1], loop=False))
        for i in range(3):
            texts = [next(stream)[:3000] for _ in range(64)]
            pq.write_table(pa.table({"text": texts}), src / f"shard_{i:05d}.parquet", row_group_size=16)
        prepare([f"--src={src}", f"--out={race}", "--train_shards=2", "--vocab_size=512", "--max_doc_chars=1500",
                 *([f"--peer={cfg.peer}"] if cfg.peer else [])])
    racers = cfg.racers or "ours; lr2=ours:--matrix_lr 0.04" + ("; nanochat" if cfg.peer else "")
    tiny = dict(race_dir=str(race), racers=racers, depth=2, max_seq_len=64, total_batch_size=512,
                device_batch_size=8, steps=20, eval_points=10, eval_tokens=1024, final_chars=20_000,
                device_type="cpu")
    return RaceConfig(**{**asdict(cfg), **tiny})


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_flags(RaceConfig, argv, description=__doc__.split("\n")[0])
    if cfg.peer:
        check_peer(cfg.peer)
    if cfg.smoke:
        cfg = smoke_setup(cfg)
    racers = parse_racers(cfg.racers, bool(cfg.peer))
    race = Path(cfg.race_dir)
    needed = [race / "data"] + [race / f"tokenizer_{kind}" for kind in sorted({r.kind for r in racers})]
    missing = [str(p) for p in needed if not p.is_dir()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: prepare them with `python -m benchmarks.race_data "
                         f"--out {race}{' --peer ' + cfg.peer if cfg.peer else ''}`")
    if cfg.steps <= 0 and cfg.seconds <= 0:
        raise SystemExit("give a budget: --steps N (> 0) or --seconds S")
    data_tokens, notes = train_tokens(race, sorted({r.kind for r in racers}))
    for note in notes:
        print(f"[race] {note}", flush=True)
    for racer in racers:  # with --seconds, a racer without its own steps once its probe has sized its run
        if racer.steps or cfg.seconds <= 0:
            say_epochs(racer.name, None, racer.steps or cfg.steps, cfg.total_batch_size, data_tokens.get(racer.kind))
    gpus = parse_gpus(cfg.gpus)
    if gpus != [None]:
        none_here = "" if torch.cuda.device_count() else "; no CUDA device here: racers run on their --device_type"
        print(f"[race] {len(racers)} racers on GPUs {','.join(map(str, gpus))}, up to {len(gpus)} at once, each "
              f"alone in its CUDA_VISIBLE_DEVICES{none_here}", flush=True)
    if len(gpus) > 1:
        print("[race] warning: racers side by side share this host's CPU, PCIe and power: their timings compare only "
              "roughly (leave --gpus out to race one after another, for close comparisons)", flush=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(cfg.work) if cfg.work else out / "work"

    def report(outcomes: list) -> dict:
        failed = [o for o in outcomes if isinstance(o, Failure)]
        return {"config": asdict(cfg), "racers": [o for o in outcomes if not isinstance(o, Failure)],
                "failed": [{"name": f.name, "gpu": f.gpu, "error": f.message(), "partial": f.partial}
                           for f in failed]}

    outcomes = run_queue(racers, gpus,
                         lambda racer, gpu: run_racer(cfg, racer, out, work, gpu, data_tokens.get(racer.kind)),
                         lambda done: (out / "race.json").write_text(json.dumps(report(done), indent=1)))
    summary, failed = report(outcomes), [o for o in outcomes if isinstance(o, Failure)]
    finished = summary["racers"]
    if finished and cfg.target not in {f.name for f in failed}:
        results = [o.partial if isinstance(o, Failure) else o for o in outcomes
                   if not isinstance(o, Failure) or o.partial]  # in the racers' order, stopped ones with their curve
        target, rows = summarize(results, cfg.target)
        plot(results, target, out / "race.png")
        summary.update(target_bpb=target, table=rows)
        agreement = max(abs(r["own_minus_ours"]) for r in finished)
        print(f"\ntarget bpb {target:.4f} ({cfg.target or 'the worst final'}); each trainer's own last evaluation "
              f"and our routine's final bpb differ by at most {agreement:.4f}\n{table(rows, results)}", flush=True)
        for note in rise_notes(rows) + graph_break_notes(results):
            print(note, flush=True)
    elif finished:
        print(f"\nno table: the --target racer {cfg.target} failed", flush=True)
    (out / "race.json").write_text(json.dumps(summary, indent=1))
    for f in failed:
        print(f"\n[race] {who(f.name, f.gpu)} failed; its logs: {out / f.name}, {work / f.name}\n{f.message()}",
              flush=True)
    print(json.dumps({"target_bpb": summary.get("target_bpb"), "table": summary.get("table", []),
                      "failed": [f.name for f in failed], "out": str(out)}), flush=True)
    if failed:
        faults = [f.error for f in failed if not isinstance(f.error, SystemExit)]
        if faults:
            raise faults[0]  # not a trainer's failure but the race's own fault (or a test's cut): its traceback
        raise SystemExit(f"{len(failed)} of {len(racers)} racers failed: {', '.join(f.name for f in failed)} "
                         f"(their errors and logs above)")
    return summary


if __name__ == "__main__":
    main()
