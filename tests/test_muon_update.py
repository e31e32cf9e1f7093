"""Muon's stacked update (nanochat.optim.muon_update): the same numbers as the per-parameter loop it replaced,
checkpoints of that loop's state load and continue identically, and torch.compile of it matches eager without
recompiling when the scheduled values change."""
import copy
import io
import itertools
import os
import shutil

import pytest
import torch
from torch import nn

from nanochat.optim import Muon, compiled_muon_update, equilibrate_rows, muon_update, orthogonalize


class ReferenceMuon(torch.optim.Optimizer):
    """Muon's step as it was before muon_update (nanochat.optim at dd60071), frozen here as the reference: a
    foreach lerp over per-parameter buffers, the stack, then per-parameter loops for the neuron EMA, the cautious
    weight decay and the update. Its hyperparameters and state layout are Muon's, so states load across."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, cautious_wd=True,
                 beta2=0.0, row_equilibrate=False, renormalize=False):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                            cautious_wd=cautious_wd, beta2=beta2, row_equilibrate=row_equilibrate,
                                            renormalize=renormalize))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for shape, params in by_shape.items():
                self._update_same_shape(group, params, shape)

    def _update_same_shape(self, group, params, shape):
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            bufs.append(state["momentum_buffer"])
        mu = group["momentum"]
        torch._foreach_lerp_(bufs, grads, 1.0 - mu)
        updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
        stacked = torch.stack(updates)
        if group["row_equilibrate"]:
            stacked = equilibrate_rows(stacked)
        ortho = orthogonalize(stacked)
        if group["renormalize"]:
            norm = ortho.float().norm(dim=(-2, -1), keepdim=True).clamp(min=1e-6)
            ortho = (ortho.float() * (min(shape) ** 0.5 / norm)).to(ortho.dtype)
        if group["beta2"] > 0.0:
            ortho = self._normalize_neurons(group["beta2"], params, ortho)
        lr = group["lr"] * max(1.0, shape[0] / shape[1]) ** 0.5
        wd = group["weight_decay"]
        for p, o in zip(params, ortho.unbind(0)):
            o = o.to(p.dtype)
            if wd != 0.0:
                decay = p * (lr * wd)
                if group["cautious_wd"]:
                    decay = decay * ((o * p) > 0)
                p.sub_(decay)
            p.add_(o, alpha=-lr)

    def _normalize_neurons(self, beta2, params, ortho):
        dim = -1 if ortho.size(-2) >= ortho.size(-1) else -2
        mean_sq = ortho.float().square().mean(dim=dim, keepdim=True)
        for i, p in enumerate(params):
            state = self.state[p]
            if "neuron_second_moment" not in state:
                state["neuron_second_moment"] = torch.zeros_like(mean_sq[i])
            state["neuron_second_moment"].lerp_(mean_sq[i], 1.0 - beta2)
        second = torch.stack([self.state[p]["neuron_second_moment"] for p in params])
        scaled = ortho.float() * second.clamp(min=1e-10).rsqrt()
        norm_ratio = (ortho.float().norm(dim=(-2, -1), keepdim=True)
                      / scaled.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-10))
        return (scaled * norm_ratio).to(ortho.dtype)


# two tall matrices of one shape (stacked together), a wide one, and a square one
SHAPES = [(48, 16), (48, 16), (16, 40), (24, 24)]
# (lr, momentum, weight decay) per step: they change every step, as the schedules change them
SCHEDULE = [(0.02, 0.85, 0.1), (0.05, 0.9, 0.05), (0.03, 0.95, 0.2), (0.011, 0.97, 0.0), (0.007, 0.93, 0.3)]


def make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter((torch.randn(s, generator=g) * 0.5).to(dtype)) for s in SHAPES]


def grads_for(step, dtype, seed=0):
    """Gradients with rows of very different size (row equilibration and the neuron EMA have work to do); step 3
    leaves the square matrix without one (it is skipped, as in the reference)."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    out = [(torch.randn(s, generator=g) * torch.linspace(0.1, 3.0, s[0])[:, None]).to(dtype) for s in SHAPES]
    if step == 3:
        out[-1] = None
    return out


def run(opt, params, steps, dtype, seed=0):
    for step in steps:
        lr, mu, wd = SCHEDULE[step % len(SCHEDULE)]
        for group in opt.param_groups:
            group.update(lr=lr, momentum=mu, weight_decay=wd if opt.defaults["weight_decay"] != 0.0 else 0.0)
        for p, g in zip(params, grads_for(step, dtype, seed)):
            p.grad = g
        opt.step()


FLAGS = ("nesterov", "row_equilibrate", "renormalize", "cautious_wd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta2,weight_decay", [(0.0, 0.0), (0.9, 0.1)])
@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=len(FLAGS))),
                         ids=lambda f: "".join("NERC"[i] if on else "-" for i, on in enumerate(f)))
def test_eager_update_equals_the_per_parameter_loop(dtype, beta2, weight_decay, flags):
    """Bitwise on the CPU, fp32 and bf16 parameters: parameters, momentum buffers and neuron second moments after
    5 steps with changing lr, momentum and weight decay, one of them skipping a matrix."""
    options = dict(zip(FLAGS, flags), beta2=beta2, weight_decay=weight_decay)
    params_ref, params_new = make_params(dtype), make_params(dtype)
    ref, new = ReferenceMuon(params_ref, **options), Muon(params_new, **options)
    run(ref, params_ref, range(5), dtype)
    run(new, params_new, range(5), dtype)
    for i, (a, b) in enumerate(zip(params_ref, params_new)):
        assert torch.equal(a, b), f"param {i} {tuple(a.shape)}: max diff {(a.float() - b.float()).abs().max().item()}"
        for name, tensor in ref.state[a].items():
            assert torch.equal(tensor, new.state[b][name]), f"param {i} state {name}"
        assert set(new.state[b]) == set(ref.state[a])


def saved_and_loaded(state: dict) -> dict:
    """A weights_only round trip, as the checkpoint loader does."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_keeps_the_per_parameter_layout_and_old_states_continue_identically():
    """The loop's state (one tensor per parameter and entry) loads into Muon and both continue bitwise alike;
    Muon's own state_dict has that layout too (and the loop continues from it alike)."""
    options = dict(beta2=0.9, weight_decay=0.1, row_equilibrate=True, renormalize=True)
    params_ref = make_params(torch.float32)
    ref = ReferenceMuon(params_ref, **options)
    run(ref, params_ref, range(3), torch.float32)
    old_state = saved_and_loaded(ref.state_dict())

    params_new = [nn.Parameter(p.detach().clone()) for p in params_ref]
    new = Muon(params_new, **options)
    new.load_state_dict(old_state)
    run(ref, params_ref, range(3, 7), torch.float32)
    run(new, params_new, range(3, 7), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(params_ref, params_new))

    state = new.state_dict()["state"]
    for i, p in enumerate(params_new):
        rows, cols = p.shape
        assert state[i]["momentum_buffer"].shape == (rows, cols)
        assert state[i]["neuron_second_moment"].shape == ((rows, 1) if rows >= cols else (1, cols))
    back = ReferenceMuon([nn.Parameter(p.detach().clone()) for p in params_new], **options)
    back.load_state_dict(saved_and_loaded(copy.deepcopy(new.state_dict())))
    run(back, back.param_groups[0]["params"], range(7, 9), torch.float32)
    run(new, params_new, range(7, 9), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(back.param_groups[0]["params"], params_new))


def test_state_entries_are_views_of_one_stack_per_shape():
    """Between steps each parameter's momentum is a slice of its shape's stack (no copy per step), and an entry
    replaced from outside (a load) is taken up at the next step."""
    params = make_params(torch.float32)
    opt = Muon(params, beta2=0.9)
    run(opt, params, range(2), torch.float32)
    a, b = (opt.state[p]["momentum_buffer"] for p in params[:2])
    assert a._base is not None and a._base is b._base and a._base.shape == (2, *SHAPES[0])
    replaced = torch.full_like(a, 0.5)
    opt.state[params[0]]["momentum_buffer"] = replaced.clone()
    run(opt, params, range(2, 3), torch.float32)
    mu = SCHEDULE[2][1]
    grad = grads_for(2, torch.float32)[0]
    torch.testing.assert_close(opt.state[params[0]]["momentum_buffer"], torch.lerp(replaced, grad, 1 - mu))


def test_the_update_path_is_chosen_once_and_logged(monkeypatch):
    """compile=None is eager on the CPU; compile=True takes compiled_muon_update (stubbed here: it would compile).
    Either way one log line, at the first step."""
    import nanochat.optim as optim
    logged, calls = [], []
    monkeypatch.setattr(optim, "log0", logged.append)
    monkeypatch.setattr(optim, "compiled_muon_update", lambda: lambda *a, **kw: calls.append(a) or muon_update(*a, **kw))
    for compile, line in ((None, "muon: eager update"), (True, "muon: compiled update (torch.compile)")):
        params = make_params(torch.float32)
        opt = Muon(params, compile=compile)
        run(opt, params, range(2), torch.float32)
        assert logged == [line]
        logged.clear()
    assert len(calls) == 2 * 3  # two steps of three shapes
    assert all(t.dtype == torch.float64 and t.ndim == 0 for t in calls[0][4:])  # lr, momentum, weight decay, beta2


def have_cpp_compiler() -> bool:
    return shutil.which(os.environ.get("CXX", "g++")) is not None


def stacked_inputs(shape, k, seed):
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    params = torch.randn(k, rows, cols, generator=g) * 0.5
    grads = torch.randn(k, rows, cols, generator=g) * torch.linspace(0.1, 3.0, rows)[:, None]
    momentum = torch.randn(k, rows, cols, generator=g) * 0.1
    second = torch.rand(k, rows, 1, generator=g) if rows >= cols else torch.rand(k, 1, cols, generator=g)
    return params, grads, momentum, second


# CPU fp32, compiled vs eager: fused kernels reorder float sums; 5 Polar Express iterations amplify that for the
# smallest singular directions, so the bound is on the update, relative to its largest element.
COMPILED_RTOL = 1e-4


@pytest.mark.skipif(not have_cpp_compiler(), reason="torch.compile on the CPU needs a C++ compiler (inductor's "
                    "C++ backend): none found as $CXX or g++")
def test_compiled_update_matches_eager_and_does_not_recompile_for_new_values():
    """Tall and wide stacks with every option on, 4 steps each from fresh random state, lr/momentum/weight decay
    changing each step: compiled == eager within COMPILED_RTOL, and no graph after each shape's first."""
    from torch._dynamo.utils import counters
    compiled = compiled_muon_update()
    flags = dict(nesterov=True, row_equilibrate=True, renormalize=True, cautious_wd=True, decay=True)
    scalars = [torch.zeros((), dtype=torch.float64) for _ in range(4)]  # lr, momentum, weight decay, beta2
    for shape, seed in (((32, 16), 0), ((16, 40), 1)):
        eager_state = stacked_inputs(shape, 3, seed)
        compiled_state = [t.clone() for t in eager_state]
        graphs = None
        for step in range(4):
            lr, mu, wd = SCHEDULE[step]
            for t, v in zip(scalars, (lr, mu, wd + 0.01, 0.9)):
                t.fill_(v)
            g = torch.Generator().manual_seed(100 * seed + step)
            grads = torch.randn(3, *shape, generator=g)
            before = eager_state[0].clone()
            for fn, (params, _, momentum, second) in ((muon_update, eager_state), (compiled, compiled_state)):
                fn(params, grads, momentum, second, *scalars, **flags)
            if graphs is None:
                graphs = counters["stats"]["unique_graphs"]  # this shape's graph is compiled now
            step_eager, step_compiled = eager_state[0] - before, compiled_state[0] - before
            tol = COMPILED_RTOL * step_eager.abs().max().item()
            torch.testing.assert_close(step_compiled, step_eager, rtol=0, atol=tol)
            torch.testing.assert_close(compiled_state[2], eager_state[2], rtol=1e-6, atol=1e-7)  # momentum
            torch.testing.assert_close(compiled_state[3], eager_state[3], rtol=COMPILED_RTOL, atol=0)  # neurons
        assert counters["stats"]["unique_graphs"] == graphs, f"{shape}: recompiled for new scalar values"


# d12's matrix shapes (two of the square one: they stack)
GPU_SHAPES = [(768, 768), (768, 768), (3072, 768), (768, 3072)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_muon_matches_eager():
    """On CUDA Muon(compile=True) and Muon(compile=False) take the same steps within bf16 tolerance, over 5 steps
    with changing lr, momentum and weight decay, each step from the same parameters: momentum within 1e-5; each
    matrix's step within 6% (Frobenius, relative) and its norm within 2%. The orthogonalization runs in bf16, and
    the fused kernels round its elementwise intermediates once where eager rounds each op: a CPU emulation of that
    difference gives ~3% at these shapes. A wrong factor, sign or missing stage is far outside. The compiled path
    must really have compiled."""
    from torch._dynamo.utils import counters
    options = dict(beta2=0.9, weight_decay=0.1, row_equilibrate=True, renormalize=True)
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) * 0.02 for s in GPU_SHAPES]
    params = {mode: [nn.Parameter(t.cuda()) for t in init] for mode in ("eager", "compiled")}
    opts = {mode: Muon(params[mode], compile=mode == "compiled", **options) for mode in params}
    graphs = counters["stats"]["unique_graphs"]
    for step in range(5):
        lr, mu, wd = SCHEDULE[step]
        grads = [(torch.randn(s, generator=g) * torch.linspace(0.1, 3.0, s[0])[:, None]).cuda() for s in GPU_SHAPES]
        before = [p.detach().clone() for p in params["eager"]]
        for mode, opt in opts.items():
            for group in opt.param_groups:
                group.update(lr=lr, momentum=mu, weight_decay=wd + 0.01)
            for p, grad in zip(params[mode], grads):
                p.grad = grad.clone()
            opt.step()
        for i, (e, c, b) in enumerate(zip(params["eager"], params["compiled"], before)):
            de, dc = e.detach() - b, c.detach() - b
            err, ratio = ((dc - de).norm() / de.norm()).item(), (dc.norm() / de.norm()).item()
            assert err < 6e-2 and abs(ratio - 1) < 2e-2, f"step {step} matrix {i}: compiled vs eager step differs by " \
                                                         f"{err:.3g} (relative), norm ratio {ratio:.4f}"
            torch.testing.assert_close(opts["compiled"].state[c]["momentum_buffer"],
                                       opts["eager"].state[e]["momentum_buffer"], rtol=1e-5, atol=1e-6)
            c.data.copy_(e.data)  # the next step from the same parameters
    assert counters["stats"]["unique_graphs"] > graphs, "Muon(compile=True) did not compile anything"
