"""Training precision: bf16 (autocast, fp32 master weights), fp8 (torchao float8 or our own layers), nvfp4
(Transformer Engine).

fp8 recipes: `tensorwise` and `rowwise` swap eligible nn.Linear layers for torchao's Float8Linear, whose
casts (amax, scale, clamp, cast, transpose) are plain PyTorch ops that torch.compile fuses into Triton
kernels; `triton` swaps them for our own layers (nanochat/model/fp8_linear.py: torchao's tensorwise math with
our cast-and-transpose kernels, q/k/v as one GEMM and a fused ReLU² MLP), and `triton_delayed` for the
same layers with delayed scaling (the cast records amaxes and scales from the recent ones: one pass over
each tensor instead of two). Either way the layers keep the very same weight Parameters (fp32, same
names), so the state_dict is unchanged: checkpoints load into a plain GPT for bf16 inference and
evaluation, and Muon sees the same 2-D matrices. Convert first, compile after. nvfp4 needs Blackwell and
runs inside Transformer Engine layers (--arch te). Each recipe is one object in FP8_RECIPES (nanochat.registry):
`is_available()`, `supports(arch)` and `convert(model, names, fast_accum)`.
"""
from __future__ import annotations

from dataclasses import replace
from fnmatch import fnmatch
from typing import Callable, Sequence

import torch
import torch.nn as nn

from nanochat.common import log0
from nanochat.registry import Backend, Registry, package_status

PRECISIONS = ("bf16", "fp8", "nvfp4")


class TorchaoRecipe(Backend):
    """torchao's Float8Linear with its recipe of this name (Transformer Engine runs one of the same name)."""
    summary = "torchao"

    def __init__(self, name: str) -> None:
        self.name = name

    def is_available(self) -> tuple[bool, str]:
        try:
            import torchao.float8  # noqa: F401
        except ImportError as exc:
            return False, (f"--precision fp8 needs torchao (>= 0.10): pip install torchao (or pip install "
                           f"'nanochat[gpu]') ({exc})")
        return True, "ok"

    def convert(self, model: nn.Module, names: list[str], fast_accum: bool) -> None:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        from torchao.float8.config import Float8GemmConfig
        keep = set(names)
        config = Float8LinearConfig.from_recipe_name(self.name)
        if fast_accum:
            fast = Float8GemmConfig(use_fast_accum=True)
            config = replace(config, gemm_config_grad_input=fast, gemm_config_grad_weight=fast)
        convert_to_float8_training(model, config=config, module_filter_fn=lambda mod, fqn: fqn in keep)


class OurRecipe(Backend):
    """Our fp8 layers (nanochat/model/fp8_linear.py), tensorwise, with current or delayed scaling; --arch gpt only."""

    def __init__(self, name: str, delayed: bool, summary: str) -> None:
        self.name, self.delayed, self.summary = name, delayed, summary

    def is_available(self) -> tuple[bool, str]:
        return package_status("triton", "triton", "pip install 'nanochat[gpu]' (or pip install triton)")

    def supports(self, arch: str) -> bool:  # the fp8 recipes' case: the --arch that would run it
        return arch == "gpt"

    def convert(self, model: nn.Module, names: list[str], fast_accum: bool) -> None:
        from nanochat.model.fp8_linear import convert_to_fp8_triton  # imports triton, an optional dependency
        convert_to_fp8_triton(model, names, fast_accum_backward=fast_accum, delayed=self.delayed)


FP8_RECIPES = Registry("fp8 recipe", "--fp8_recipe", [
    TorchaoRecipe("tensorwise"),
    TorchaoRecipe("rowwise"),
    OurRecipe("triton", delayed=False, summary="ours, tensorwise"),
    OurRecipe("triton_delayed", delayed=True, summary="ours, tensorwise, delayed scaling"),
])
OUR_FP8_RECIPES = tuple(name for name, recipe in FP8_RECIPES.items() if isinstance(recipe, OurRecipe))


def check_precision(precision: str, device: torch.device, fp8_recipe: str = "tensorwise") -> None:
    """Fail early with the reason and the fix when `precision` cannot run on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    FP8_RECIPES.canonical(fp8_recipe)
    if precision == "bf16":
        return
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"--precision {precision} needs an NVIDIA GPU (CUDA); this run is on {device.type}. "
                           "Use --precision bf16 here.")
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if precision == "nvfp4" and major < 10:
        raise RuntimeError(f"--precision nvfp4 needs a Blackwell GPU (compute capability >= 10.0); {name} has "
                           f"compute capability {major}.{minor}. Use --precision fp8 on Hopper/Ada.")
    if precision == "fp8" and (major, minor) < (8, 9):
        raise RuntimeError(f"--precision fp8 needs fp8 tensor cores (compute capability >= 8.9, Ada/Hopper or "
                           f"newer); {name} has compute capability {major}.{minor}. Use --precision bf16.")


def fp8_filter(min_dim: int = 1024, include_lm_head: bool = False,
               skip: Sequence[str] = ()) -> Callable[[nn.Module, str], bool]:
    """Which linears gain from fp8: both dims multiples of 16 (the fp8 GEMM needs it) and the smaller one at
    least `min_dim`, so that the faster GEMM pays for the amax/cast kernels around it. `skip`: name
    patterns (fnmatch, e.g. "*.attn.c_proj") kept in bf16 whatever their size."""
    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if fqn.split(".")[-1] == "lm_head" and not include_lm_head:
            return False
        if any(fnmatch(fqn, pattern) for pattern in skip):
            return False
        dims = (module.in_features, module.out_features)
        return all(d % 16 == 0 for d in dims) and min(dims) >= min_dim
    return keep


def fp8_eligible(model: nn.Module, min_dim: int = 1024, include_lm_head: bool = False,
                 skip: Sequence[str] = ()) -> list[str]:
    """Names of the linear layers that `--precision fp8` would convert."""
    keep = fp8_filter(min_dim, include_lm_head, skip)
    return [fqn for fqn, mod in model.named_modules() if keep(mod, fqn)]


def convert_to_fp8(model: nn.Module, *, recipe: str = "tensorwise", min_dim: int = 1024,
                   include_lm_head: bool = False, fast_accum: bool = False, skip: Sequence[str] = ()) -> list[str]:
    """Swap the eligible nn.Linear layers for torchao Float8Linear, or for our fp8 layers with recipe
    "triton" / "triton_delayed" (no device check: CPU modules convert too, but only CUDA sm89+ runs them
    at speed).
    Returns the converted layer names. Both accumulate with Hopper's fast (lower-precision) fp8
    accumulation in the forward GEMM only; `fast_accum` uses it in the two backward GEMMs as well, which
    makes them faster at some cost in gradient precision."""
    FP8_RECIPES.canonical(recipe)
    if include_lm_head and getattr(model, "lm_head_in_loss_kernel", False):
        raise ValueError("--fp8_lm_head: this model hands lm_head.weight to the fused loss kernel "
                         "(kernels.fused_linear_cross_entropy), so an fp8 lm_head would never run its fp8 "
                         "GEMM; drop --fp8_lm_head (the lm_head stays bf16)")
    fp8 = FP8_RECIPES.require(recipe)
    names = fp8_eligible(model, min_dim, include_lm_head, skip)
    if names:
        fp8.convert(model, names, fast_accum)
    return names


def apply_precision(model: nn.Module, precision: str, device: torch.device, *, fp8_recipe: str = "tensorwise",
                    fp8_min_dim: int = 1024, fp8_lm_head: bool = False, fp8_fast_accum: bool = False,
                    fp8_skip: Sequence[str] = ()) -> int:
    """Prepare `model` for training at `precision` (before torch.compile); returns the number of layers
    converted. bf16 changes nothing (the caller's autocast does it); nvfp4 goes to the model's own
    `set_precision` (Transformer Engine layers)."""
    check_precision(precision, device, fp8_recipe)
    if precision == "bf16":
        return 0
    if precision == "nvfp4":
        if not hasattr(model, "set_precision"):
            raise ValueError("--precision nvfp4 runs through Transformer Engine layers: use --arch te --precision nvfp4")
        model.set_precision("nvfp4")
        return len(getattr(model, "blocks", []))
    if hasattr(model, "set_precision"):  # Transformer Engine layers do fp8 themselves (te.autocast)
        if not FP8_RECIPES[fp8_recipe].supports("te"):
            raise ValueError(f"--fp8_recipe {fp8_recipe} is our fp8 layers for --arch gpt; Transformer Engine "
                             "(--arch te) runs its own: use --fp8_recipe tensorwise or rowwise")
        model.set_precision("fp8", fp8_recipe=fp8_recipe)
        return len(getattr(model, "blocks", []))
    names = convert_to_fp8(model, recipe=fp8_recipe, min_dim=fp8_min_dim, include_lm_head=fp8_lm_head,
                           fast_accum=fp8_fast_accum, skip=fp8_skip)
    if not names:
        log0(f"fp8 ({fp8_recipe}): no linear layer has both dims multiples of 16 and >= {fp8_min_dim} outside "
             f"--fp8_skip {list(fp8_skip)}; nothing converted (lower --fp8_min_dim or use a wider model)")
    else:
        log0(f"fp8 ({fp8_recipe}{', fast accumulation in every GEMM' if fp8_fast_accum else ''}): {len(names)} "
             f"linear layers converted (min dim {fp8_min_dim}), e.g. {names[0]}")
    return len(names)


def cache_low_precision_weights(model: nn.Module, optimizer, precision: str) -> None:
    """After the optimizer is built: our fp8 layers then cast their weights once per optimizer step
    instead of in every forward (fp8_linear.cache_fp8_weights). Other layers and precisions: nothing to
    do (and no Triton import: it is not installed without a GPU)."""
    if precision != "fp8":
        return
    from nanochat.model.fp8_linear import cache_fp8_weights
    layers = cache_fp8_weights(model, optimizer)
    if layers:
        log0(f"fp8: {layers} layers cast their weights once per optimizer step")
