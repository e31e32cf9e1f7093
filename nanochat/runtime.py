"""Process-wide torch settings every entry point applies first.

A persistent inductor cache under the base dir (FX graph cache on) makes a second run of the same
configuration skip most of its compile time; expandable segments cut fragmentation in long runs.
Variables the user already set are left alone.
"""
from __future__ import annotations

import os

from nanochat.common import get_base_dir


def setup_torch_env() -> dict[str, str]:
    """Set (unless already set) the inductor cache and allocator variables; returns what is in force."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(get_base_dir() / "inductor_cache"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    keys = ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "PYTORCH_ALLOC_CONF")
    return {k: os.environ[k] for k in keys if k in os.environ}


def default_compile(device_type: str, arch: str = "gpt") -> bool:
    """Whether to torch.compile the model when the user did not say: on CUDA only (elsewhere the compile
    time outweighs the gain), and never for Transformer Engine layers (`arch="te"`), which graph-break."""
    return device_type == "cuda" and arch != "te"


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def compile_model(model, mode: str = "default"):
    """torch.compile with static shapes. "max-autotune-no-cudagraphs" has Inductor time Triton GEMM
    templates against cuBLAS per matmul shape and fuse elementwise neighbours (ReLU², residual adds, casts)
    into the winners: the step's ~16% of elementwise time is what it can win, at minutes of autotuning on
    the first compile (then cached under TORCHINDUCTOR_CACHE_DIR). CUDA-graph modes are left out: the
    optimizer step and gradient accumulation run outside the compiled model."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    import torch

    if getattr(getattr(model, "config", None), "recompute", "none") == "pointwise":
        recompute_pointwise_in_backward()
    # FA4's document offsets (cu_seqlens) have a length that depends on the data. Uncaptured, Dynamo breaks
    # the graph there in every layer and compiles each block on its own, past its recompile limit, leaving the
    # rest eager (a d12 step at 0.67x, S20). Process-wide, like the recompute settings.
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    return torch.compile(model, dynamic=False, mode=None if mode == "default" else mode)


def graph_breaks() -> dict[str, int]:
    """Dynamo's graph breaks in this process so far: each reason (whitespace collapsed) -> how often. A compiled
    model should have none: a break splits the step into graphs run one after another, and a break inside a
    repeated block compiles each block on its own, past the recompile limit eagerly (S20: a step at 0.67x)."""
    from torch._dynamo.utils import counters

    return {" ".join(reason.split()): n for reason, n in counters["graph_break"].items()}


def recompute_pointwise_in_backward() -> None:
    """`--recompute pointwise`: AOTAutograd's partitioner recomputes every elementwise op it may (norms,
    rotary, ReLU², residual mixing) in the backward instead of saving its output; matmuls and attention stay
    saved (its allowlist is kept). By default it also saves outputs that the backward would have to write
    again (ReLU²'s 4C-wide output, which c_proj's weight gradient reads) or that are used far apart; on d20
    that roughly halves a block's saved activations for one extra write of those outputs in the backward.
    Process-wide: it applies to every graph compiled afterwards."""
    import torch._functorch.config as functorch_config

    functorch_config.ban_recompute_used_far_apart = False
    functorch_config.ban_recompute_long_fusible_chains = False
    functorch_config.ban_recompute_materialized_backward = False


def check_recompute(recompute: str, compile: bool) -> None:
    """Refuse --recompute pointwise without torch.compile: it is a setting of the compiler's partitioner, and
    an eager run would silently keep every activation."""
    if recompute == "pointwise" and not compile:
        raise ValueError("--recompute pointwise is done by torch.compile's partitioner and needs --compile true; "
                         "without compiling use --recompute mlp or block")


def apply_inductor_config(spec: str) -> dict[str, object]:
    """`--inductor "triton.prefer_nd_tiling=True;triton.tile_reductions=True"`: set torch._inductor.config
    entries (values are Python literals) for every graph compiled afterwards, process-wide. For kernel
    studies: the benchmark harness compares settings row by row. "" or "default" changes nothing."""
    import ast

    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    settings: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        if item == "default":
            continue
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ValueError(f"--inductor: {item!r} is not KEY=VALUE with KEY a torch._inductor.config entry (e.g. "
                             "triton.prefer_nd_tiling=True; torch._inductor.config.get_config_copy() lists them)")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"--inductor: the value of {key} must be a Python literal (True, 3, 'ATEN'); "
                             f"got {text.strip()!r}") from exc
        *path, name = key.split(".")
        owner = inductor_config
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, value)
        settings[key] = value
    return settings
