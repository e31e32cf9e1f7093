"""Test-wide setup. On a machine without CUDA, Triton kernels run through Triton's CPU interpreter:
the variable must be set before anything imports triton, hence here."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=["bwrap", "fallback"])
def backend(request):
    """Each sandbox backend of nanochat.eval.sandbox (tests/test_sandbox.py, tests/test_judge.py)."""
    from nanochat.eval.sandbox import sandbox_setup
    try:
        sandbox_setup(request.param)
    except RuntimeError as e:
        if request.param == "bwrap" and os.environ.get("CI"):
            raise  # CI installs bubblewrap (.ci/run): its absence there is a failure, not a skip
        pytest.skip(str(e))
    return request.param
