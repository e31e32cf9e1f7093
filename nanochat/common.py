"""Shared plumbing: base dir, device detection, distributed init, logging, peak-FLOPS table.

Knows nothing of the rest of nanochat, so every module can import it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

class TqdmWriteHandler(logging.Handler):
    """Writes each record to stderr through tqdm.write: a progress bar on the terminal is lifted out of
    the way and drawn again below the line, instead of the line landing in the middle of the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 -- logging's own contract: report, never raise
            self.handleError(record)


logger = logging.getLogger("nanochat")
if not logger.handlers:
    _handler = TqdmWriteHandler()
    _handler.setFormatter(logging.Formatter("[nanochat] %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(os.environ.get("NANOCHAT_LOG_LEVEL", "INFO"))
    logger.propagate = False


def get_base_dir() -> Path:
    """Where run artifacts live: $NANOCHAT_BASE_DIR, default ~/.cache/nanochat (created)."""
    base = Path(os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat")
    base.mkdir(parents=True, exist_ok=True)
    return base


def default_data_dir() -> Path:
    """Pretraining shards directory: $NANOCHAT_DATA_DIR, else <base>/base_data."""
    env = os.environ.get("NANOCHAT_DATA_DIR")
    return Path(env) if env else get_base_dir() / "base_data"


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def dist_info() -> tuple[bool, int, int, int]:
    """(is_distributed, rank, local_rank, world_size) from torchrun's environment."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else dist_info()[1]


def print0(*args, sep: str = " ", end: str = "\n") -> None:
    """print to stdout on rank 0 only, flushed (logs of several ranks stay readable), through tqdm.write so
    that a progress bar on the terminal is not broken by the line."""
    if get_rank() == 0:
        from tqdm import tqdm

        tqdm.write(sep.join(map(str, args)), file=sys.stdout, end=end)
        sys.stdout.flush()


def log0(msg: str) -> None:
    if get_rank() == 0:
        logger.info(msg)


def compute_init(device_type: str = "auto") -> tuple[bool, int, int, int, torch.device]:
    """Pick the device, seed, set matmul precision, and start torch.distributed under torchrun.

    NCCL on CUDA, gloo otherwise. NVLink multicast is kept off (it can take shared GPUs out of
    service), unless the user set those variables themselves.
    """
    if device_type == "auto":
        device_type = autodetect_device_type()
    is_ddp, rank, local_rank, world_size = dist_info()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    torch.manual_seed(42)
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device_type=cuda was asked for but torch sees no CUDA GPU; use --device_type=cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if is_ddp and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None)
        dist.barrier()
    return is_ddp, rank, local_rank, world_size, device


def compute_cleanup() -> None:
    """Tear down torch.distributed once every rank is done: a rank that exits while a peer is still in
    its last collective makes gloo abort that peer."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by substring of the device name.
# Order matters: the first match wins, so more specific names come first.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("B100", 1.75e15),
    ("GB10", 2.09e14),  # DGX Spark: ~1 PFLOP fp4 sparse -> ~209 TFLOP/s dense bf16 (vendor)
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s for a GPU name, or None if unknown (MFU then shows n/a)."""
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def autocast_precision(device: torch.device | str) -> str:
    """The precision the evaluation and fine-tuning stages run at, for their reports: bf16 autocast on
    CUDA, fp32 elsewhere."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def autocast_for(device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op elsewhere, so CPU runs stay fp32."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_gib(device: torch.device | str) -> float:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0


def nested_tensors(obj) -> Iterator[torch.Tensor]:
    """The tensors inside nested dicts, lists and tuples (a state dict, an optimizer state), depth first."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from nested_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from nested_tensors(v)
