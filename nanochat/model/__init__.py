"""The model: our GPT (`gpt.py`), the same shape on Transformer Engine layers (`gpt_te.py`), our fp8 layers
(`fp8_linear.py`), and here the architectures `--arch` chooses from.

The registry sits above both model files, which import nothing of each other's choosing: gpt_te builds on gpt.
"""
from __future__ import annotations

import torch.nn as nn

from nanochat.model.gpt import GPT
from nanochat.model.gpt_te import TEGPT, import_te
from nanochat.registry import Backend, Registry


class GPTArch(Backend):
    name, summary, model_class = "gpt", "ours", GPT


class TEArch(Backend):
    name, summary, model_class = "te", "Transformer Engine layers; no sampling", TEGPT

    def is_available(self) -> tuple[bool, str]:
        try:
            import_te()
        except ImportError as exc:  # its message names the package and the install command
            return False, str(exc)
        return True, "ok"


ARCHITECTURES = Registry("architecture", "--arch", [GPTArch(), TEArch()])


def model_class(arch: str = "gpt") -> type[nn.Module]:
    """The model class of an architecture name; ValueError naming the choices, BackendUnavailable naming
    the install command when its package is missing."""
    return ARCHITECTURES.require(arch).model_class
