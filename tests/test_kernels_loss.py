"""The loss-kernel registry on the CPU: every backend available here against a float64 reference.

Backends that need a GPU (liger, cce) are checked here only for their error messages; their numbers are
checked on the H200 by benchmarks/check_kernels.py. `triton` runs on the CPU only under Triton's interpreter,
in its own test file (tests/test_kernels_triton.py), so it is skipped here.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from nanochat import kernels

IGNORE = -1
SOFTCAP = 15.0
# Relative (Frobenius) error allowed against the float64 reference, per input dtype. fp32: rounding of an
# fp32 matmul + softmax over ~100 logits; bf16: the gradients themselves are stored in bf16 (2^-8).
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
CPU_SKIPPED = {
    "triton": "runs under TRITON_INTERPRET=1 in tests/test_kernels_triton.py",
    "liger": "CUDA-only: checked on the GPU by benchmarks/check_kernels.py",
    "cce": "CUDA-only: checked on the GPU by benchmarks/check_kernels.py",
}


def cpu_backends() -> list:
    params = []
    for name, (ok, reason) in kernels.available_backends().items():
        if name in CPU_SKIPPED:
            reason, ok = CPU_SKIPPED[name], False
        params.append(pytest.param(name, marks=() if ok else pytest.mark.skip(reason=f"{name}: {reason}")))
    return params


@pytest.fixture(autouse=True)
def restore_backend():
    before = kernels.get_kernel_backend()
    yield
    kernels.set_kernel_backend(before)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def reference(hidden, weight, targets, softcap, reduction):
    """Float64 loss and gradients, written out (no fused PyTorch path shared with the backends)."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    logits = h @ w.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = targets != IGNORE
    logprobs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    per_token = -logprobs.gather(1, targets.clamp(min=0)[:, None])[:, 0] * valid
    if reduction == "none":
        loss = per_token
    elif reduction == "sum":
        loss = per_token.sum()
    else:
        loss = per_token.sum() / valid.sum().clamp(min=1)
    return loss, h, w


def make_inputs(n: int, c: int, v: int, dtype: torch.dtype, ignore_frac: float = 0.2):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    hidden = (torch.randn(n, c, generator=gen) * 2.0).to(dtype)  # logits of a few units: softcap matters
    weight = (torch.randn(v, c, generator=gen) / c**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignore_frac] = IGNORE
    targets[0] = IGNORE  # at least one ignored token in every draw
    return hidden, weight, targets


@pytest.mark.parametrize("name", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, SOFTCAP])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_grads_match_float64(name, dtype, softcap, reduction):
    kernels.set_kernel_backend(name)
    hidden, weight, targets = make_inputs(48, 32, 97, dtype)  # V=97: not a multiple of any block size
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = kernels.fused_linear_cross_entropy(h, w, targets, ignore_index=IGNORE, softcap=softcap,
                                              reduction=reduction)
    ref, h64, w64 = reference(hidden, weight, targets, softcap, reduction)
    assert loss.shape == ref.shape
    assert loss.dtype == torch.float32, "losses are returned in fp32 whatever the input dtype"
    tol = TOL[dtype]
    assert rel_err(loss, ref) < tol
    if reduction == "none":
        assert torch.all(loss[targets == IGNORE] == 0), "ignored tokens have loss 0 under reduction='none'"
    # a random upstream gradient, so "none" checks per-token weighting and mean/sum their scaling
    grad_out = torch.rand_like(ref)
    (loss * grad_out.to(loss.dtype)).sum().backward()
    (ref * grad_out).sum().backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert rel_err(h.grad, h64.grad) < tol, f"dhidden rel err {rel_err(h.grad, h64.grad):.2e}"
    assert rel_err(w.grad, w64.grad) < tol, f"dW rel err {rel_err(w.grad, w64.grad):.2e}"
    assert torch.all(h.grad[targets == IGNORE] == 0), "ignored tokens get no gradient"


@pytest.mark.parametrize("name", cpu_backends())
def test_leading_dims_are_flattened(name):
    kernels.set_kernel_backend(name)
    hidden, weight, targets = make_inputs(24, 16, 40, torch.float32)
    flat = kernels.fused_linear_cross_entropy(hidden, weight, targets, softcap=SOFTCAP, reduction="none")
    batched = kernels.fused_linear_cross_entropy(hidden.view(4, 6, 16), weight, targets.view(4, 6),
                                                 softcap=SOFTCAP, reduction="none")
    torch.testing.assert_close(batched.reshape(-1), flat, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", cpu_backends())
def test_all_targets_ignored_gives_zero_loss_and_zero_grads(name):
    """Our definition (PyTorch's mean would be 0/0 = nan): a batch with no trained token contributes
    nothing. mean -> 0.0, sum -> 0.0, none -> zeros; gradients are exactly zero, never nan."""
    kernels.set_kernel_backend(name)
    hidden, weight, _ = make_inputs(16, 8, 30, torch.float32)
    targets = torch.full((16,), IGNORE)
    for reduction in ("mean", "sum", "none"):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss = kernels.fused_linear_cross_entropy(h, w, targets, softcap=SOFTCAP, reduction=reduction)
        assert torch.all(loss == 0), f"{reduction}: {loss}"
        loss.sum().backward()
        assert torch.all(h.grad == 0) and torch.all(w.grad == 0), reduction


def test_unknown_backend_lists_the_names():
    with pytest.raises(ValueError) as info:
        kernels.set_kernel_backend("no-such-kernel")
    for name in kernels.LOSS_BACKENDS:
        assert name in str(info.value)
    assert kernels.get_kernel_backend() == "torch", "a failed switch leaves the backend as it was"


@pytest.mark.parametrize("name", ["liger", "cce"])
def test_unavailable_backend_names_the_pip_extra(name):
    ok, reason = kernels.available_backends()[name]
    if ok:
        pytest.skip(f"{name} is available on this machine")
    assert "nanochat[gpu]" in reason
    with pytest.raises(kernels.BackendUnavailable, match=r"nanochat\[gpu\]"):
        kernels.set_kernel_backend(name)


def test_available_backends_gives_a_reason_for_each_unavailable_one():
    table = kernels.available_backends()
    assert set(table) == set(kernels.LOSS_BACKENDS)
    assert table["torch"][0] is True
    for name, (ok, reason) in table.items():
        assert isinstance(ok, bool) and isinstance(reason, str) and reason, name


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_backend_in_use_is_logged_once():
    logger = logging.getLogger("nanochat")  # does not propagate to the root logger, so no caplog
    handler, old_level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        kernels.set_kernel_backend("torch")
        hidden, weight, targets = make_inputs(8, 8, 16, torch.float32)
        for _ in range(3):
            kernels.fused_linear_cross_entropy(hidden, weight, targets)
        kernels.set_kernel_backend("current")  # the old name of torch: accepted, and the log says so
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = [m for m in handler.messages if "backend" in m]
    assert lines == ["loss kernel backend: torch", "loss backend 'current' is an old name of 'torch': using torch",
                     "loss kernel backend: torch"], handler.messages
    assert kernels.get_kernel_backend() == "torch"


@pytest.mark.parametrize("softcap", [None, SOFTCAP])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_on_logits_matches_float64(softcap, dtype):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    logits = (torch.randn(3, 5, 50, generator=gen) * 8).to(dtype)
    targets = torch.randint(0, 50, (3, 5), generator=gen)
    targets[0, :2] = IGNORE
    x = logits.double()
    capped = x if softcap is None else softcap * torch.tanh(x / softcap)
    ref = F.cross_entropy(capped.view(-1, 50), targets.view(-1), ignore_index=IGNORE)
    got = kernels.cross_entropy(logits, targets, softcap=softcap)
    assert got.dtype == torch.float32, "logits are upcast: the loss is fp32"
    assert rel_err(got, ref) < 1e-6  # the upcast is exact, so only fp32 rounding remains


@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_matches_float64(eps):
    x = torch.randn(4, 7, 64) * 3
    x64 = x.double()
    ref_eps = torch.finfo(torch.float32).eps if eps is None else eps
    ref = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + ref_eps)
    got = kernels.rms_norm(x, eps=eps)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert rel_err(got, ref) < 1e-6
    xb = x.bfloat16()
    assert rel_err(kernels.rms_norm(xb), ref) < 1e-2
