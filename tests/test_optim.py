"""Muon + AdamW: orthogonalization accuracy, convergence, schedules, exact state round trip, and
2-process gloo data parallelism equal to one process with the same global batch."""
import copy
import io
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from helpers_dist import spawn_gloo
from nanochat.optim import (POLAR_EXPRESS_COEFFS, Muon, build_optimizer, lr_multiplier, muon_momentum,
                            orthogonalize)

# Stated bound: after the 5 Polar Express iterations, every singular value whose share of the input's
# Frobenius norm is >= 1e-3 lands in [SV_LO, SV_HI] (the polynomials alone give ~[0.853, 1.141]).
SV_LO, SV_HI, SV_REL_MIN = 0.84, 1.15, 1e-3


class ToyModel(nn.Module):
    """A tiny LM with the GPT's parameter groups: embedding, 2-D matrices (tall, wide, repeated
    shapes), lm_head and a learnable scalar per layer."""

    def __init__(self, vocab: int = 32, d: int = 16, n_layer: int = 2):
        super().__init__()
        self.config = SimpleNamespace(n_embd=d)
        self.wte = nn.Embedding(vocab, d)
        self.up = nn.ModuleList(nn.Linear(d, 4 * d, bias=False) for _ in range(n_layer))
        self.down = nn.ModuleList(nn.Linear(4 * d, d, bias=False) for _ in range(n_layer))
        self.lambdas = nn.Parameter(torch.ones(n_layer))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def param_groups(self):
        return {"matrix": [m.weight for m in (*self.up, *self.down)], "embedding": [self.wte.weight],
                "lm_head": [self.lm_head.weight], "scalar": [self.lambdas]}

    def forward(self, idx, targets):
        x = self.wte(idx)
        for i, (up, down) in enumerate(zip(self.up, self.down)):
            x = x + self.lambdas[i] * down(F.relu(up(F.rms_norm(x, (x.size(-1),)))).square())
        logits = self.lm_head(F.rms_norm(x, (x.size(-1),)))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def make_batches(steps: int, batch: int = 8, seq: int = 12, vocab: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (batch, seq), generator=g), torch.randint(0, vocab, (batch, seq), generator=g))
            for _ in range(steps)]


def poly_iterate(s: torch.Tensor) -> torch.Tensor:
    for a, b, c in POLAR_EXPRESS_COEFFS:
        s = a * s + b * s**3 + c * s**5
    return s


def test_polar_express_polynomials_cover_the_interval():
    x = torch.logspace(-3, 0, 5000, dtype=torch.float64) / 1.01
    y = poly_iterate(x)
    assert y.min() >= SV_LO and y.max() <= SV_HI, (y.min().item(), y.max().item())


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (64, 64), (3, 24, 40), (2, 50, 20)])
def test_orthogonalize_singular_values_and_vectors(shape):
    torch.manual_seed(hash(shape) % 1000)
    G = torch.randn(shape) * 3.0
    O = orthogonalize(G)
    assert O.shape == G.shape and O.dtype == torch.float32
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    So = torch.linalg.svdvals(O.double())
    share = S / torch.linalg.matrix_norm(G.double(), keepdim=True).squeeze(-1)
    big = share >= SV_REL_MIN
    # singular values: sorted the same way as the input's (the iteration is monotone on [0, 1])
    assert So[big].min() >= SV_LO and So[big].max() <= SV_HI, (So.min().item(), So.max().item())
    # vectors: the iteration acts on singular values only, so O == U f(S) V^T with the scalar f
    f = poly_iterate(S / (torch.linalg.matrix_norm(G.double(), keepdim=True).squeeze(-1) * 1.01 + 1e-7))
    ref = U @ torch.diag_embed(f) @ Vh
    assert torch.allclose(O.double(), ref, atol=2e-4), (O.double() - ref).abs().max()


def test_orthogonalize_rejects_vectors():
    with pytest.raises(ValueError, match="matrix"):
        orthogonalize(torch.randn(5))


def test_muon_rejects_non_matrix():
    with pytest.raises(ValueError, match="AdamW"):
        Muon([nn.Parameter(torch.randn(4))])


def test_muon_lowers_least_squares_loss():
    torch.manual_seed(0)
    X = torch.randn(256, 32)
    W_true = torch.linalg.qr(torch.randn(32, 16))[0] * 2.0  # spectral norm 2
    Y = X @ W_true
    W = nn.Parameter(torch.zeros(32, 16))
    opt = Muon([W], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(80):
        loss = (X @ W - Y).square().mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.02 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("cautious,expected", [(True, 1.0), (False, 1.0 - 0.1 * 0.5)])
def test_weight_decay_cautious_and_decoupled(cautious, expected):
    W = nn.Parameter(torch.ones(4, 6))
    opt = Muon([W], lr=0.1, weight_decay=0.5, cautious_wd=cautious)
    W.grad = torch.zeros_like(W)  # zero update: cautious decay has nothing to agree with
    opt.step()
    assert torch.allclose(W.detach(), torch.full_like(W, expected))


def test_build_optimizer_groups_and_lr_scaling():
    model = ToyModel(d=16)
    opt = build_optimizer(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, scalar_lr=0.5)
    kinds = {g["kind"]: g for g in opt.param_groups}
    assert set(kinds) == {"matrix", "embedding", "lm_head", "scalar"}
    scale = 1.0  # narrower than 768: the d12 rates, not scaled up
    assert kinds["matrix"]["lr"] == 0.02 and kinds["scalar"]["lr"] == 0.5
    assert kinds["embedding"]["lr"] == pytest.approx(0.2 * scale)
    assert kinds["lm_head"]["lr"] == pytest.approx(0.004 * scale)
    opt.set_lr_multiplier(0.25)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(g["initial_lr"] * 0.25)
    opt.set_muon_momentum(0.9)
    assert kinds["matrix"]["momentum"] == 0.9


def test_tuned_adamw_groups_take_their_kind_settings():
    """adam_groups="tuned": each kind's rate (times its factor; width-scaled kinds also by (d/768)^-0.5), betas and
    weight decay from ADAMW_KINDS; a model may return any subset of the kinds."""
    from nanochat.optim import ADAMW_KINDS
    model = ToyModel(d=16)
    opt = build_optimizer(model, embedding_lr=0.3, unembedding_lr=0.008, scalar_lr=0.5, adam_groups="tuned",
                          weight_decay=0.2, muon_beta2=0.9)
    kinds = {g["kind"]: g for g in opt.param_groups}
    rates = {"embedding_lr": 0.3, "unembedding_lr": 0.008, "scalar_lr": 0.5}  # width 16: not scaled up
    for kind in ("embedding", "lm_head", "scalar"):
        rate, factor, betas, decay = ADAMW_KINDS[kind]
        assert kinds[kind]["lr"] == pytest.approx(rates[rate] * factor)
        assert kinds[kind]["betas"] == betas and kinds[kind]["weight_decay"] == decay
    assert kinds["matrix"]["beta2"] == 0.9 and kinds["matrix"]["initial_weight_decay"] == 0.2
    opt.set_weight_decay_multiplier(0.5)
    assert kinds["matrix"]["weight_decay"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="adam_groups"):
        build_optimizer(model, adam_groups="fancy")


def test_optimizer_state_of_another_recipe_is_a_clear_error():
    class Split(ToyModel):  # one more parameter kind, so one more AdamW group
        def __init__(self):
            super().__init__()
            self.gate = nn.Parameter(torch.zeros(2))

        def param_groups(self):
            return {**super().param_groups(), "x0": [self.gate]}
    state = build_optimizer(ToyModel()).state_dict()
    with pytest.raises(ValueError, match="parameter groups"):
        build_optimizer(Split()).load_state_dict(state)


def test_neuron_normalization_evens_rows_and_keeps_the_norm():
    """NorMuon's first step: every row of the update gets the same RMS (the EMA holds one value, up to a factor
    the rescaling cancels), and the update's Frobenius norm is Muon's."""
    torch.manual_seed(0)
    W, plain = nn.Parameter(torch.zeros(24, 16)), nn.Parameter(torch.zeros(24, 16))
    grad = torch.randn(24, 16) * torch.linspace(0.1, 3, 24)[:, None]  # rows of very different size
    for p, beta2 in ((W, 0.9), (plain, 0.0)):
        opt = Muon([p], lr=1.0, momentum=0.0, nesterov=False, beta2=beta2)
        p.grad = grad.clone()
        opt.step()
    rms = W.detach().square().mean(dim=1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, rms.mean().item()), rtol=1e-3, atol=0)
    assert plain.detach().square().mean(dim=1).sqrt().std() > 10 * rms.std()
    torch.testing.assert_close(W.detach().norm(), plain.detach().norm(), rtol=1e-4, atol=0)
    wide = nn.Parameter(torch.zeros(8, 20))  # wide: normalized per column
    opt = Muon([wide], lr=1.0, momentum=0.0, nesterov=False, beta2=0.5)
    wide.grad = torch.randn(8, 20) * torch.linspace(0.1, 3, 20)
    opt.step()
    cols = wide.detach().square().mean(dim=0).sqrt()
    torch.testing.assert_close(cols, torch.full_like(cols, cols.mean().item()), rtol=1e-3, atol=0)


def test_momentum_and_weight_decay_schedules():
    from nanochat.optim import weight_decay_multiplier
    kw = dict(warmup=400, start=0.85, end=0.97, num_iterations=1000, warmdown_ratio=0.5, final=0.90)
    assert muon_momentum(0, **kw) == pytest.approx(0.85) and muon_momentum(200, **kw) == pytest.approx(0.91)
    assert muon_momentum(500, **kw) == pytest.approx(0.97)  # warmdown starts after step 500
    assert muon_momentum(750, **kw) == pytest.approx(0.935) and muon_momentum(1000, **kw) == pytest.approx(0.90)
    assert muon_momentum(1000, warmup=400, end=0.97) == pytest.approx(0.97)  # no final: stays at the peak
    assert weight_decay_multiplier(0, 100, "cosine") == 1.0 and weight_decay_multiplier(100, 100, "cosine") == 0.0
    assert weight_decay_multiplier(50, 100, "cosine") == pytest.approx(0.5)
    assert weight_decay_multiplier(70, 100, "constant") == 1.0


def test_build_optimizer_rejects_uncovered_params():
    model = ToyModel()
    model.extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="every trainable parameter"):
        build_optimizer(model)


def test_training_lowers_loss():
    torch.manual_seed(0)
    model = ToyModel()
    opt = build_optimizer(model)
    idx, tgt = make_batches(1)[0]
    tgt = (idx + 1) % 32  # learnable: next token = this token + 1
    losses = []
    for step in range(30):
        opt.set_lr_multiplier(lr_multiplier(step, 30, 3, 0.3, 0.0))
        opt.set_muon_momentum(muon_momentum(step))
        loss = model(idx, tgt)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[-1] < 0.5 * losses[0], losses


def test_step_post_hooks_see_updated_parameters_until_removed():
    torch.manual_seed(0)
    model = ToyModel()
    opt = build_optimizer(model)
    idx, tgt = make_batches(1)[0]
    seen = []
    handle = opt.register_step_post_hook(lambda o, args, kwargs: seen.append(
        (o is opt, [p.detach().clone() for p in model.parameters()])))
    model(idx, tgt).backward()
    opt.step()
    assert len(seen) == 1 and seen[0][0]
    assert all(torch.equal(a, b) for a, b in zip(seen[0][1], model.parameters()))  # after the update
    handle.remove()
    opt.step()
    assert len(seen) == 1


def test_lr_schedule_key_steps():
    kw = dict(num_iterations=100, warmup_steps=10, warmdown_ratio=0.2, final_lr_frac=0.1)
    assert lr_multiplier(0, **kw) == pytest.approx(0.1)  # from 1/warmup
    assert lr_multiplier(4, **kw) == pytest.approx(0.5)
    assert lr_multiplier(9, **kw) == pytest.approx(1.0)  # warmup end
    assert lr_multiplier(50, **kw) == 1.0  # mid
    assert lr_multiplier(80, **kw) == 1.0  # warmdown start
    assert lr_multiplier(90, **kw) == pytest.approx(0.55)
    assert lr_multiplier(99, **kw) == pytest.approx(0.1 + 0.9 * 0.05)  # last step
    assert lr_multiplier(100, **kw) == pytest.approx(0.1)
    assert lr_multiplier(5, 100, 0, 0.0, 0.0) == 1.0  # no warmup, no warmdown
    with pytest.raises(ValueError, match="warmdown_ratio"):
        lr_multiplier(0, 100, 10, 1.5, 0.0)


def test_muon_momentum_schedule():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(5000) == pytest.approx(0.95)


def _train(model, opt, batches, start: int):
    losses = []
    for i, (idx, tgt) in enumerate(batches):
        opt.set_lr_multiplier(lr_multiplier(start + i, 20, 2, 0.5, 0.0))
        opt.set_muon_momentum(muon_momentum(start + i))
        loss = model(idx, tgt)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def test_state_dict_round_trip_is_exact():
    torch.manual_seed(0)
    batches = make_batches(10)
    model_a = ToyModel()
    opt_a = build_optimizer(model_a, weight_decay=0.1)
    _train(model_a, opt_a, batches[:5], 0)

    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)  # through weights_only, as the checkpoint loader does
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model_b = copy.deepcopy(model_a)
    opt_b = build_optimizer(model_b, weight_decay=0.1, matrix_lr=1.0)  # hyperparameters come from the state
    opt_b.load_state_dict(state)
    assert [g["lr"] for g in opt_b.param_groups] == [g["lr"] for g in opt_a.param_groups]
    adam_steps = [s["step"].item() for s in opt_b.adamw.state.values()]
    assert adam_steps and all(s == 5 for s in adam_steps)

    losses_a = _train(model_a, opt_a, batches[5:], 5)
    losses_b = _train(model_b, opt_b, batches[5:], 5)
    assert losses_a == losses_b
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(pa, pb), name


def test_load_state_dict_rejects_foreign_state():
    opt = build_optimizer(ToyModel())
    with pytest.raises(ValueError, match="MuonAdamW"):
        opt.load_state_dict({"state": {}, "param_groups": []})


# ---- data parallel over 2 gloo processes ----------------------------------------------------------

DIST_STEPS = 20


def _run_steps(rank: int, world_size: int, out_dir: str, batches, shard: bool = False, resume_at: int | None = None):
    """Train on this rank's half of each global batch; at `resume_at`, rebuild model and optimizer from
    a weights_only round trip of their state (what a checkpoint resume does)."""
    torch.manual_seed(0)
    model = ToyModel()
    opt = build_optimizer(model, weight_decay=0.05, shard=shard)
    assert opt.world_size == world_size
    losses = []
    for step, (idx, tgt) in enumerate(batches):
        if step == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            torch.manual_seed(123)  # a different init, fully overwritten by the load
            model = ToyModel()
            model.load_state_dict(saved["model"])
            opt = build_optimizer(model, weight_decay=0.05, shard=shard)
            opt.load_state_dict(saved["optim"])
        shard_rows = slice(rank * len(idx) // world_size, (rank + 1) * len(idx) // world_size)
        opt.set_lr_multiplier(lr_multiplier(step, DIST_STEPS, 2, 0.5, 0.0))
        opt.set_muon_momentum(muon_momentum(step))
        loss = model(idx[shard_rows], tgt[shard_rows])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        global_loss = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(global_loss)
            global_loss /= world_size
        losses.append(global_loss.item())
    n_muon_state = len(opt.muon.state) if opt.muon is not None else 0
    torch.save({"losses": losses, "params": {k: v.detach() for k, v in model.state_dict().items()},
                "n_muon_state": n_muon_state}, os.path.join(out_dir, f"rank{rank}.pt"))


def _dist_worker(rank: int, world_size: int, out_dir: str) -> None:
    for mode in ("replicated", "sharded"):
        _run_steps(rank, world_size, os.path.join(out_dir, mode), make_batches(DIST_STEPS),
                   shard=mode == "sharded", resume_at=DIST_STEPS // 2)


def test_two_gloo_ranks_match_one_process(tmp_path):
    """2 ranks x half batch (resumed from a state round trip mid-way) == 1 rank x full batch,
    uninterrupted: same losses over 20 steps and same params, within 1e-5 in fp32; both the
    replicated and the sharded optimizer. One spawn for both keeps it ~10 s (more on a loaded box)."""
    for d in ("single", "replicated", "sharded"):
        (tmp_path / d).mkdir()
    spawn_gloo(_dist_worker, 2, str(tmp_path))
    _run_steps(0, 1, str(tmp_path / "single"), make_batches(DIST_STEPS))
    ref = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    assert ref["n_muon_state"] == 4
    for mode in ("replicated", "sharded"):
        r0 = torch.load(tmp_path / mode / "rank0.pt", weights_only=True)
        r1 = torch.load(tmp_path / mode / "rank1.pt", weights_only=True)
        assert r0["losses"] == pytest.approx(ref["losses"], abs=1e-5), mode
        for name, p in ref["params"].items():
            assert torch.equal(r0["params"][name], r1["params"][name]), f"{mode}: ranks diverged on {name}"
            err = (r0["params"][name] - p).abs().max().item()
            assert err <= 1e-5, f"{mode}: {name} differs from the 1-process run by {err}"
        # sharded: each rank keeps momentum for its own 2 of the 4 matrices only
        expected = [2, 2] if mode == "sharded" else [4, 4]
        assert [r0["n_muon_state"], r1["n_muon_state"]] == expected, mode


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_orthogonalize_and_fused_adamw_round_trip():
    G = torch.randn(8, 256, 1024, device="cuda")
    O = orthogonalize(G)
    assert O.dtype == torch.bfloat16
    sv = torch.linalg.svdvals(O.float())
    assert sv.min() >= 0.7 and sv.max() <= 1.3, (sv.min().item(), sv.max().item())  # bf16: looser than fp32
    torch.manual_seed(0)
    model = ToyModel().cuda()
    opt = build_optimizer(model)
    assert opt.adamw.param_groups[0]["fused"]
    idx, tgt = (t.cuda() for t in make_batches(1)[0])
    for _ in range(3):
        model(idx, tgt).backward()
        opt.step()
        opt.zero_grad()
    model_b = copy.deepcopy(model)
    opt_b = build_optimizer(model_b)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (model_b, opt_b)):
        m(idx, tgt).backward()
        o.step()
    for a, b in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_row_equilibration_evens_row_norms_and_keeps_the_frobenius_norm():
    """MuonEq: each row ends at the matrix's RMS row norm, so the total norm is unchanged."""
    from nanochat.optim import equilibrate_rows
    torch.manual_seed(0)
    G = torch.randn(3, 12, 7) * torch.rand(3, 12, 1) * 5  # rows of very different size
    E = equilibrate_rows(G)
    rows = E.norm(dim=-1)
    torch.testing.assert_close(rows, rows.mean(dim=-1, keepdim=True).expand_as(rows), rtol=1e-5, atol=0)
    torch.testing.assert_close(E.norm(dim=(-2, -1)), G.norm(dim=(-2, -1)), rtol=1e-5, atol=0)
    cos = torch.nn.functional.cosine_similarity(E, G, dim=-1)  # each row keeps its direction
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-5)


def test_renormalized_update_has_the_norm_of_a_semi_orthogonal_matrix():
    """Muon+: with lr 1, no momentum and no decay the step is the update; its norm is sqrt(min(rows, cols))
    (times sqrt(rows/cols) for a tall matrix, Muon's aspect factor), whatever the gradient's conditioning."""
    torch.manual_seed(0)
    for rows, cols in ((16, 40), (40, 16)):
        W = nn.Parameter(torch.zeros(rows, cols))
        opt = Muon([W], lr=1.0, momentum=0.0, nesterov=False, renormalize=True)
        U, _, V = torch.linalg.svd(torch.randn(rows, cols), full_matrices=False)
        W.grad = U @ torch.diag(torch.logspace(0, -4, min(rows, cols))) @ V  # badly conditioned
        opt.step()
        expected = min(rows, cols) ** 0.5 * max(1.0, rows / cols) ** 0.5
        assert W.detach().norm().item() == pytest.approx(expected, rel=1e-4)
        plain = nn.Parameter(torch.zeros(rows, cols))
        plain.grad = W.grad.clone()
        Muon([plain], lr=1.0, momentum=0.0, nesterov=False).step()
        assert plain.detach().norm().item() < 0.9 * expected  # the under-converged update Muon+ corrects


def test_weight_decay_uses_the_aspect_scaled_rate():
    """A tall matrix steps at lr * sqrt(rows/cols); its decay is that rate times weight_decay as well."""
    W = nn.Parameter(torch.ones(32, 8))
    opt = Muon([W], lr=0.01, momentum=0.0, nesterov=False, weight_decay=1.0, cautious_wd=False)
    W.grad = torch.zeros(32, 8)
    W.grad[0, 0] = 1.0
    before = W.detach().clone()
    opt.step()
    # the orthogonalized rank-1 gradient lives in row 0 and column 0: elsewhere only the decay moves W
    assert (W.detach() - before)[5, 5].item() == pytest.approx(-0.01 * (32 / 8) ** 0.5 * 1.0, rel=1e-3)


def test_neuron_second_moment_is_an_ema_from_zero():
    """After two steps the per-neuron EMA is (1-b) b m1 + (1-b) m2: step 1's statistics do not linger at weight b."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.zeros(12, 6))
    opt = Muon([W], lr=0.0, momentum=0.0, nesterov=False, beta2=0.8)
    mean_sqs = []
    for _ in range(2):
        W.grad = torch.randn(12, 6) * torch.linspace(0.1, 3, 12)[:, None]
        mean_sqs.append(orthogonalize(W.grad[None])[0].float().square().mean(dim=-1, keepdim=True))
        opt.step()
    expected = 0.2 * 0.8 * mean_sqs[0] + 0.2 * mean_sqs[1]
    torch.testing.assert_close(opt.state[W]["neuron_second_moment"], expected, rtol=1e-5, atol=0)
