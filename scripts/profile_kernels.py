"""Kernel audit of a training step: which kernels ran, grouped, and whether the expected ones did.

    python -m scripts.profile_kernels --depth=12 --kernel=liger --attn=cudnn \\
        --expect attention=cudnn --expect loss=liger
    python -m scripts.profile_kernels --device_type=cpu --depth=2 --max_seq_len=64 --steps=1   # smoke test

Builds scripts.base_train's model and optimizer from the same flags (nanochat.build; depth 12 and context
2048 by default; `--recipe false`: the plain GPT and optimizer) with random weights, on random tokens (no
tokenizer or data needed), runs `--warmup` steps (compilation, autotuning) and then `--steps` training
steps (forward, backward, optimizer) under torch.profiler, or under Nsight Systems with `--profiler=nsys`
(`auto`: nsys when it is on PATH). Prints the group shares and top kernels (nanochat.profiling), and
exits 1 when an `--expect group=backend` is not met, naming what ran instead. Last line: JSON {"groups",
"top", "expect_failures", ...}. On the CPU the "kernels" are aten ops: good for a smoke test, not for the grouping.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from nanochat import kernels, profiling
from nanochat.build import BuildConfig, build
from nanochat.common import (compute_init, device_name, nested_tensors, peak_flops, peak_memory_gib, print0,
                             synchronize)
from nanochat.flags import parse_flags, redeclare
from nanochat.kernels import attention as attention_backends
from nanochat.precision import OUR_FP8_RECIPES
from nanochat.runtime import apply_inductor_config

_CHILD_ENV = "NANOCHAT_PROFILE_NSYS_CHILD"  # set in the process that nsys runs


@dataclass
class ProfileConfig(BuildConfig):
    depth: int = redeclare(BuildConfig, "depth", 12, "model depth (layers); --depth 2 --aspect_ratio 768: two "
                                                     "d24-wide layers, quick to compile")
    max_seq_len: int = redeclare(BuildConfig, "max_seq_len", 2048, "context length")
    device_batch_size: int = field(default=16, metadata={"help": "rows per micro-batch"})
    vocab_size: int = field(default=32768, metadata={"help": "vocabulary size of the synthetic model"})
    recipe: bool = field(default=True, metadata={"help": "the model and optimizer of the flags above; false: the "
                                                 "plain GPT (GPTConfig's defaults) and optimizer"})
    inductor: str = field(default="default", metadata={"help": "torch._inductor.config entries, KEY=VALUE;KEY=VALUE"})
    warmup: int = field(default=3, metadata={"help": "untimed steps first (compilation, autotuning)"})
    steps: int = field(default=3, metadata={"help": "profiled training steps"})
    top: int = field(default=20, metadata={"help": "kernels listed in the table, by time"})
    expect: list[str] = field(default_factory=list, metadata={"help": "group=backend, repeatable or comma list"})
    profiler: str = field(default="torch", metadata={"help": "torch, nsys, or auto (nsys when on PATH)"})
    device_type: str = field(default="auto", metadata={"help": "cuda, mps, cpu or auto"})
    trace: str = field(default="", metadata={"help": "write a Chrome trace (torch profiler) to this path"})
    timed_steps: int = field(default=0, metadata={"help": "time this many steps before profiling (bench mode)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    expect_auto: bool = field(default=False, metadata={"help": "also expect the kernels this config should run"})
    doc_len: int = field(default=0, metadata={"help": "with --doc_mask: a document (token 0 as its BOS) starts "
                                              "every doc_len tokens of a row; 0: one per row, the mask's cost "
                                              "without the work it saves"})


SYNTHETIC_BOS = 0  # the BOS of the random tokens' documents (--doc_mask)


def synthetic_rows(cfg: ProfileConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random inputs and targets (the data pipeline is not what is audited); with --doc_mask the rows are
    documents of doc_len tokens, each starting with SYNTHETIC_BOS, which appears nowhere else."""
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (cfg.device_batch_size, cfg.max_seq_len)
    idx = torch.randint(SYNTHETIC_BOS + 1, cfg.vocab_size, shape, device=device, generator=gen)
    if cfg.doc_mask:
        idx[:, ::cfg.doc_len or cfg.max_seq_len] = SYNTHETIC_BOS
    return idx, torch.randint(0, cfg.vocab_size, shape, device=device, generator=gen)


def make_step(cfg: ProfileConfig, model, optimizer, device: torch.device):
    """One training step on synthetic_rows."""
    idx, targets = synthetic_rows(cfg, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        for _ in range(cfg.grad_accum):
            with autocast:
                loss = model(idx, targets)
            (loss / cfg.grad_accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _tensor_bytes(obj, seen: set[int]) -> int:
    """Bytes of the distinct tensors (by storage) inside nested dicts, lists and tuples; `seen` grows."""
    total = 0
    for t in nested_tensors(obj):
        key = t.untyped_storage().data_ptr()
        if key not in seen and t.device.type != "meta":
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def memory_breakdown(model, optimizer, peak_gib: float) -> dict:
    """Where the peak goes, GiB: weights, their gradients (alive at the end of backward), optimizer state,
    and the rest (activations, autocast weight copies, loss buffers, allocator workspace)."""
    params = list(model.parameters())
    weights = _tensor_bytes(params, set()) / 2**30
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad) / 2**30
    state = _tensor_bytes(list(optimizer.state.values()), set()) / 2**30
    return {"weights": round(weights, 3), "grads": round(grads, 3), "optimizer": round(state, 3),
            "rest": round(peak_gib - weights - grads - state, 3)}


def time_steps(cfg: ProfileConfig, model, optimizer, step, device: torch.device) -> dict:
    """Warm up (the first step carries compilation), then time `timed_steps` steps: median tok/s, MFU,
    peak memory and its breakdown."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(cfg.warmup + cfg.timed_steps):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    if cfg.timed_steps == 0:
        return {}
    median = statistics.median(times[cfg.warmup:])
    tokens = cfg.device_batch_size * cfg.max_seq_len * cfg.grad_accum
    flops_per_token = getattr(model, "_orig_mod", model).estimate_flops()
    peak = peak_flops(device_name(device)) if device.type == "cuda" else None
    peak_gib = peak_memory_gib(device)
    return {"tok_per_s": tokens / median, "step_ms": 1e3 * median, "peak_memory_gib": peak_gib,
            "memory_gib": memory_breakdown(model, optimizer, peak_gib) if device.type == "cuda" else {},
            "mfu": flops_per_token * tokens / median / peak if peak else None,
            "compile_seconds": max(0.0, times[0] - median), "flops_per_token": flops_per_token}


def auto_expectations(cfg: ProfileConfig, model, device: torch.device) -> list[str]:
    """What this configuration must run: the loss backend's kernels, each layer's attention backend (our
    GPT's; TE picks its own) and, at fp8/nvfp4, low-precision GEMMs."""
    if device.type != "cuda":  # on the CPU the "kernels" are aten ops: nothing to expect
        return []
    attention = []
    if cfg.arch == "gpt":
        windows = getattr(model, "_orig_mod", model).windows
        names = sorted(attention_backends.layer_backends(windows, device, cfg.attn, cfg.doc_mask,
                                                         compiled=bool(cfg.compile)))
        attention = [f"attention={n}" for n in names]
    matmul = [f"matmul={cfg.precision}"] if cfg.precision != "bf16" else []
    if cfg.precision == "fp8" and cfg.fp8_recipe in OUR_FP8_RECIPES:
        matmul.append("quantize/transpose=re:_fp8_cast_transpose_kernel")  # our casts, not Inductor's
    return [f"loss={kernels.LOSS_BACKENDS.canonical(cfg.kernel)}"] + attention + matmul


def profile_torch(step, cfg: ProfileConfig, device: torch.device) -> list[tuple[str, float]]:
    """(kernel name, device us) for every CUDA kernel/memcpy/memset; on CPU, (aten op, self CPU us)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(cfg.steps):
            step()
        synchronize(device)
    if cfg.trace:
        prof.export_chrome_trace(cfg.trace)
    return profiling.profiler_events(prof, on_cuda=device.type == "cuda")


def profile_nsys(cfg: ProfileConfig, argv: list[str]) -> list[tuple[str, float]]:
    """Re-run this script under `nsys profile` (capture limited to the profiled steps), then read
    `nsys stats --report cuda_gpu_kern_sum` (and the memory reports) as CSV."""
    nsys = shutil.which("nsys")
    if nsys is None:
        raise RuntimeError("--profiler=nsys: nsys is not on PATH; use --profiler=torch")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "audit")
        cmd = [nsys, "profile", "--trace=cuda,nvtx", "--capture-range=cudaProfilerApi", "--force-overwrite=true",
               "-o", out, sys.executable, "-m", "scripts.profile_kernels", *argv]
        subprocess.run(cmd, check=True, env={**os.environ, _CHILD_ENV: "1"})
        events = []
        for report in ("cuda_gpu_kern_sum", "cuda_gpu_mem_time_sum"):
            res = subprocess.run([nsys, "stats", "--report", report, "--format", "csv", "--force-export=true",
                                  out + ".nsys-rep"], check=True, capture_output=True, text=True)
            text = res.stdout[res.stdout.find('"Time'):] if '"Time' in res.stdout else res.stdout
            for row in csv.DictReader(io.StringIO(text)):
                name = row.get("Name") or row.get("Operation")
                total_ns = row.get("Total Time (ns)")
                if name and total_ns:
                    count = max(int(float(row.get("Instances") or row.get("Count") or 1)), 1)
                    events.extend([(name, float(total_ns) / 1e3 / count)] * count)
    return events


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_flags(ProfileConfig, argv, description=__doc__.split("\n")[0])
    expects = [e for spec in cfg.expect for e in spec.split(",") if e]
    for spec in expects:
        profiling.parse_expect(spec)  # a typo fails now, not after the run
    if cfg.profiler not in ("torch", "nsys", "auto"):
        raise ValueError(f"--profiler must be torch, nsys or auto, got {cfg.profiler!r}")
    use_nsys = cfg.profiler == "nsys" or (cfg.profiler == "auto" and shutil.which("nsys") is not None)
    in_child = os.environ.get(_CHILD_ENV) == "1"

    if use_nsys and not in_child:
        events = profile_nsys(cfg, argv)
        device_label = "cuda (nsys)"
    else:
        _, _, _, _, device = compute_init(cfg.device_type)
        apply_inductor_config(cfg.inductor)  # before compiling; a typo fails even without --compile
        # random weights; TE's layers run the plain block
        _, model, optimizer = build(cfg, device, cfg.vocab_size, recipe=cfg.recipe and cfg.arch == "gpt",
                                    bos_id=SYNTHETIC_BOS)
        step = make_step(cfg, model, optimizer, device)
        expects += auto_expectations(cfg, model, device) if cfg.expect_auto else []
        timing = time_steps(cfg, model, optimizer, step, device)
        if in_child:  # nsys captures between cudaProfilerStart and Stop
            torch.cuda.profiler.start()
            for _ in range(cfg.steps):
                step()
            synchronize(device)
            torch.cuda.profiler.stop()
            return {}
        events = profile_torch(step, cfg, device)
        device_label = device_name(device)

    summary = profiling.summarize(events, top=cfg.top)
    failures = profiling.check_expectations(summary, expects)
    print0(f"kernel audit: {cfg.steps} steps, depth {cfg.depth}, batch {cfg.device_batch_size}x{cfg.max_seq_len}, "
           f"loss={cfg.kernel}, attn={cfg.attn}, compile={cfg.compile}, on {device_label}")
    print0(profiling.format_summary(summary))
    for f in failures:
        print0(f"EXPECTATION FAILED: {f}")
    result = {
        "groups": {g: round(s, 4) for g, s in summary["groups"].items()},
        "top": [{"name": k["name"], "group": k["group"], "share": round(k["share"], 4),
                 "ms_per_step": round(k["us"] / 1e3 / max(cfg.steps, 1), 3)} for k in summary["top"]],
        "expect_failures": failures,
        "total_ms_per_step": round(summary["total_us"] / 1e3 / max(cfg.steps, 1), 3),
        "kernels_ran": profiling.top_kernel_per_group(summary, ("attention", "loss", "matmul")),
        "timing": timing if not use_nsys else {},
        "config": asdict(cfg),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    out = main()
    sys.exit(1 if out.get("expect_failures") else 0)
