"""Test-wide setup. On a machine without CUDA, Triton kernels run through Triton's CPU interpreter:
the variable must be set before anything imports triton, hence here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
