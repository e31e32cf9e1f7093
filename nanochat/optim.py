"""Muon for the hidden 2-D matrices, AdamW for everything else, and the LR / momentum schedules.

Why two optimizers: Muon (orthogonalized momentum) trains the transformer's weight matrices faster
per step than AdamW, but it only makes sense for matrices; embeddings, the lm_head and the learnable
scalars keep AdamW. `MuonAdamW` holds both behind one optimizer-like object, so the training loop
calls `.step()` / `.zero_grad()` once.

Distributed: when torch.distributed is running with more than one rank, `MuonAdamW.step()` first
synchronizes the gradients itself (do NOT also wrap the model in DDP). Default: bucketed all-reduce,
then every rank applies the same update. `build_optimizer(..., shard=True)`: each parameter is owned
whole by one rank, which alone keeps its optimizer state and updates it, then broadcasts it (ZeRO-1
style; Muon still sees whole matrices). Either way every rank ends the step with identical parameters,
so a 2-rank run with half the batch per rank matches a 1-rank run with the whole batch (up to float
summation order).
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict, defaultdict
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from nanochat.common import log0


class LearningRates(NamedTuple):
    """Base rates of the four parameter kinds, before batch and width scaling."""
    matrix: float  # Muon
    embedding: float  # AdamW: token (and value) embeddings
    unembedding: float  # AdamW: lm_head
    scalar: float  # AdamW: per-layer scalars


# pretraining's (BuildConfig): the public nanochat's at 92d63d4
PRETRAIN_LRS = LearningRates(matrix=0.02, embedding=0.3, unembedding=0.008, scalar=0.5)
# fine-tuning's (times its --init_lr_frac) and build_optimizer's defaults: nanochat's earlier, gentler AdamW rates
FINETUNE_LRS = LearningRates(matrix=0.02, embedding=0.2, unembedding=0.004, scalar=0.5)

# Polar Express (Amsel, Persson, Musco, Gower 2025): per-iteration coefficients (a, b, c) of the odd
# quintic p(x) = a x + b x^3 + c x^5, each minimax-optimal for the interval the singular values
# occupy after the previous iteration (the 5-step set used by public Muon implementations, with the
# paper's safety margin; we divide by 1.01 * ||G||_F to stay inside that interval). Compared with one
# fixed quintic applied 5 times (Keller Jordan's a=3.4445, b=-4.7750, c=2.0315, singular values land
# in ~[0.68, 1.13]), these 5 steps land every singular value with sigma/||G||_F >= 1e-3 in
# ~[0.85, 1.14] (checked numerically in tests/test_optim.py), so the update is closer to U V^T for
# the same cost.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(G: Tensor) -> Tensor:
    """Approximate the polar factor U V^T of G (over its last two dims; leading dims are a batch).

    bf16 on CUDA (the iteration is self-correcting, so low precision is fine and fast), fp32 elsewhere.
    Dividing by the Frobenius norm first puts the spectral norm at <= 1, where the polynomials work.
    Wide form: a tall matrix is transposed so X @ X^T is the smaller Gram matrix.
    """
    if G.ndim < 2:
        raise ValueError(f"orthogonalize needs a matrix (or a batch of them), got shape {tuple(G.shape)}")
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-7)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X


def equilibrate_rows(G: Tensor) -> Tensor:
    """G [..., rows, cols] with every row rescaled to the matrix's root-mean-square row norm (MuonEq)."""
    G32 = G.float()
    target = G32.norm(dim=(-2, -1), keepdim=True) / G.size(-2) ** 0.5
    return (G32 * (target / G32.norm(dim=-1, keepdim=True).clamp(min=1e-6))).to(G.dtype)


def _lerp(start: Tensor, end: Tensor, weight: Tensor) -> Tensor:
    """start + weight * (end - start), computed in fp32 (fp64 for fp64 tensors) as torch.lerp does for a
    Python-number weight: with a tensor weight it computes in the tensors' dtype, and for bf16 it would round
    the weight itself (0.95 -> 0.9492)."""
    compute = torch.promote_types(start.dtype, torch.float32)
    return torch.lerp(start.to(compute), end.to(compute), weight).to(start.dtype)


def _normalize_neurons(ortho: Tensor, second_moment: Tensor, beta2: Tensor) -> Tensor:
    """ortho [K, rows, cols] with each row (cols > rows: each column) divided by the root of an EMA of its mean
    square (`second_moment`, updated in place), then rescaled to ortho's Frobenius norm per matrix. The EMA starts
    at zero: the rescaling cancels its missing bias correction, so early steps weigh recent updates as a
    bias-corrected EMA would (starting at the first value instead keeps step 1's statistics at weight beta2^t)."""
    dim = -1 if ortho.size(-2) >= ortho.size(-1) else -2  # average along the longer side: per output neuron
    mean_sq = ortho.float().square().mean(dim=dim, keepdim=True)
    second_moment.copy_(_lerp(second_moment, mean_sq, 1 - beta2))
    scaled = ortho.float() * second_moment.clamp(min=1e-10).rsqrt()
    norm_ratio = (ortho.float().norm(dim=(-2, -1), keepdim=True)
                  / scaled.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-10))
    return (scaled * norm_ratio).to(ortho.dtype)


def muon_update(params: Tensor, grads: Tensor, momentum_buffer: Tensor, second_moment: Tensor | None,
                lr: Tensor, momentum: Tensor, weight_decay: Tensor, beta2: Tensor, *, nesterov: bool,
                row_equilibrate: bool, renormalize: bool, cautious_wd: bool, decay: bool) -> None:
    """One Muon step (see `Muon`) of K matrices of one shape, stacked [K, rows, cols]: updates `params`,
    `momentum_buffer` and `second_moment` (per-neuron EMA [K, rows, 1] or [K, 1, cols]; None = off) in place.

    It reads nothing but its arguments, so torch.compile can fuse the elementwise work and reductions around
    the matmuls into a few kernels (`compiled_muon_update`); run as is, it is the eager path. lr (before the
    aspect factor), momentum, weight_decay and beta2 are 0-D float64 tensors: compiled, a new value is not a
    recompile; eager, float64 arithmetic rounds them as the Python floats of the per-parameter loop this
    replaced did. The flags are static (a compiled graph per combination): decay = weight_decay != 0.
    """
    rows, cols = params.shape[-2:]
    momentum_buffer.copy_(_lerp(momentum_buffer, grads, 1 - momentum))  # buf = mu * buf + (1 - mu) * g
    update = _lerp(grads, momentum_buffer, momentum) if nesterov else momentum_buffer
    if row_equilibrate:
        update = equilibrate_rows(update)
    ortho = orthogonalize(update)
    if renormalize:
        norm = ortho.float().norm(dim=(-2, -1), keepdim=True).clamp(min=1e-6)
        ortho = (ortho.float() * (min(rows, cols) ** 0.5 / norm)).to(ortho.dtype)
    if second_moment is not None:
        ortho = _normalize_neurons(ortho, second_moment, beta2)
    lr = lr * max(1.0, rows / cols) ** 0.5
    ortho = ortho.to(params.dtype)
    if decay:
        step_decay = params * (lr * weight_decay)
        if cautious_wd:
            step_decay = step_decay * ((ortho * params) > 0)  # p -= lr*o shrinks |p| here too
        params.sub_(step_decay)
    params.addcmul_(ortho, -lr)  # p -= lr * o, rounded once (as add_ with alpha=-lr)


@functools.cache
def compiled_muon_update() -> Callable[..., None]:
    """muon_update under torch.compile: the whole step one graph (fullgraph), static shapes (a graph per matrix
    shape: four for our GPT)."""
    return torch.compile(muon_update, fullgraph=True, dynamic=False)


class _Stacked(NamedTuple):
    """The optimizer state of the parameters of one shape, stacked: what muon_update works on in place."""
    params: tuple[Tensor, ...]
    momentum: Tensor  # [K, rows, cols]
    second_moment: Tensor | None  # [K, rows, 1] or [K, 1, cols]; None without per-neuron normalization
    views: tuple[Tensor, ...]  # the per-parameter state entries: slices of the two above


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz (Polar Express), for 2-D parameters only.

    Per step: Nesterov momentum on the gradient, optionally equilibrate its rows (below), orthogonalize,
    optionally renormalize (below) and normalize per neuron (beta2 > 0, below), scale the rate by
    sqrt(max(1, rows/cols)) so tall and wide matrices take comparable per-element steps, optional decoupled
    weight decay (rate * weight_decay; "cautious" = only where the update pushes the weight toward zero as
    well), then p -= rate * update. Matrices of one shape are updated together, stacked, by `muon_update`:
    one batched matmul per iteration, and under torch.compile (`compile`: True, or None for CUDA only) a few fused kernels
    instead of dozens of small ones per matrix.

    Row equilibration (MuonEq, arXiv 2603.28254): every row of the momentum is rescaled to the matrix's mean
    row norm before orthogonalizing. A few large rows otherwise dominate the spectrum, and the 5-step
    polynomial, tuned for a bounded condition number, leaves the small directions under-converged.

    Renormalization (Muon+, arXiv 2602.21545): the orthogonalized update is rescaled to Frobenius norm
    sqrt(min(rows, cols)), the norm of an exactly semi-orthogonal matrix, so an under-converged iteration
    does not shrink the step.

    Per-neuron normalization (NorMuon, Li et al. 2025): orthogonalization equalizes singular values, not the
    rows' (or, for wide matrices, the columns') update sizes, which come out uneven. An EMA (beta2) of each
    row's mean squared update divides it out, then the whole update is rescaled to its norm before, so the
    step size stays Muon's and only its distribution over neurons changes.

    State: per parameter "momentum_buffer" and "neuron_second_moment" (state_dict() and checkpoints keep
    that layout); between steps they are views of one stacked tensor per shape.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, cautious_wd: bool = True, beta2: float = 0.0,
                 row_equilibrate: bool = False, renormalize: bool = False, compile: bool | None = False):
        params = list(params)
        for p in params:
            if p.ndim != 2:
                raise ValueError(f"Muon only takes 2-D parameters; got shape {tuple(p.shape)}: "
                                 "put it in an AdamW group instead")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Muon's beta2 (per-neuron normalization) must be in [0, 1), 0 = off; got {beta2}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      weight_decay=weight_decay, cautious_wd=cautious_wd, beta2=beta2,
                                      row_equilibrate=row_equilibrate, renormalize=renormalize))
        self.compile = compile  # None: on for CUDA parameters, decided (and logged) at the first step
        self._update: Callable[..., None] | None = None
        self._scalars: dict[torch.device, tuple[Tensor, ...]] = {}
        self._stacks: dict[tuple[int, torch.Size], _Stacked] = {}

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon.step does not take a closure")
        for index, group in enumerate(self.param_groups):
            by_shape: dict[torch.Size, list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[p.shape].append(p)
            if not by_shape:
                continue
            device = next(iter(by_shape.values()))[0].device
            update = self._update_function(device)
            scalars = self._scalar_tensors(group, device)
            for shape, params in by_shape.items():
                momentum, second_moment = self._stacked_state((index, shape), params, group["beta2"] > 0.0)
                stacked = torch.stack(params)
                update(stacked, torch.stack([p.grad for p in params]), momentum, second_moment, *scalars,
                       nesterov=group["nesterov"], row_equilibrate=group["row_equilibrate"],
                       renormalize=group["renormalize"], cautious_wd=group["cautious_wd"],
                       decay=group["weight_decay"] != 0.0)
                torch._foreach_copy_(params, list(stacked.unbind(0)))

    def _update_function(self, device: torch.device) -> Callable[..., None]:
        """muon_update, compiled or not (`compile`; None: compiled on CUDA), chosen and logged once."""
        if self._update is None:
            compiled = self.compile if self.compile is not None else device.type == "cuda"
            self._update = compiled_muon_update() if compiled else muon_update
            log0("muon: compiled update (torch.compile)" if compiled else "muon: eager update")
        return self._update

    def _scalar_tensors(self, group: dict, device: torch.device) -> tuple[Tensor, ...]:
        """The group's lr, momentum, weight_decay and beta2 as 0-D float64 tensors on the parameters' device, refilled
        in place: a compiled graph guards on tensor metadata, not values, so new values are no recompile. On CUDA
        that is four tiny fills per step, and every operand of the update, eager or compiled, is on one device."""
        if device not in self._scalars:
            self._scalars[device] = tuple(torch.zeros((), dtype=torch.float64, device=device) for _ in range(4))
        values = (group["lr"], group["momentum"], group["weight_decay"], group["beta2"])
        for tensor, value in zip(self._scalars[device], values):
            tensor.fill_(value)
        return self._scalars[device]

    def _stacked_state(self, key: tuple[int, torch.Size], params: list[Tensor],
                       neurons: bool) -> tuple[Tensor, Tensor | None]:
        """The momentum buffers (and, with `neurons`, per-neuron second moments) of `params` as [K, ...] tensors,
        with each parameter's state entries views of its slice. Stacked anew (one copy; zeros for missing
        entries) when the entries are not those views: the first step, after load_state_dict, or when another
        set of parameters of this shape has gradients."""
        names = ("momentum_buffer", "neuron_second_moment") if neurons else ("momentum_buffer",)
        entries = [self.state[p].get(name) for p in params for name in names]
        known = self._stacks.get(key)
        if (known is not None and len(known.params) == len(params) and all(a is b for a, b in zip(known.params, params))
                and len(known.views) == len(entries) and all(a is b for a, b in zip(known.views, entries))):
            return known.momentum, known.second_moment
        rows, cols = params[0].shape
        neuron_shape = (rows, 1) if rows >= cols else (1, cols)  # one per output neuron (the longer side)
        zeros = {"momentum_buffer": lambda p: torch.zeros_like(p),
                 "neuron_second_moment": lambda p: torch.zeros(neuron_shape, device=p.device)}
        stacks = [torch.stack([self.state[p][name] if name in self.state[p] else zeros[name](p) for p in params])
                  for name in names]
        momentum, second_moment = stacks[0], stacks[1] if neurons else None
        for name, stack in zip(names, stacks):
            for p, view in zip(params, stack.unbind(0)):
                self.state[p][name] = view
        views = tuple(self.state[p][name] for p in params for name in names)
        self._stacks[key] = _Stacked(tuple(params), momentum, second_moment, views)
        return momentum, second_moment


class MuonAdamW:
    """Muon for the "matrix" group, AdamW for "embedding", "lm_head" and "scalar", as one optimizer.

    `param_groups` lists every group of both (each has "kind" and "initial_lr"); the LR schedule goes
    through `set_lr_multiplier`, which sets lr = initial_lr * m everywhere.

    With world_size > 1, step() first synchronizes gradients. Replicated (owners=None): all-reduce,
    and every rank updates every parameter. Sharded (owners = {param: rank}): each parameter is owned
    whole by one rank (Muon needs whole matrices); its gradient is reduced to the owner, only the owner
    holds its optimizer state and updates it, then broadcasts it. Optimizer memory and Muon's compute
    drop by ~world_size for the same traffic; the state dict is then this rank's shard.
    """

    def __init__(self, muon: Muon | None, adamw: torch.optim.AdamW | None, params: list[Tensor],
                 world_size: int = 1, owners: dict[Tensor, int] | None = None,
                 bucket_numel: int = 32 * 1024 * 1024):
        self.muon = muon
        self.adamw = adamw
        self.params = params  # every trainable parameter, in a fixed order (same on all ranks)
        self.world_size = world_size
        self.owners = owners
        self.bucket_numel = bucket_numel
        self._step_post_hooks: OrderedDict[int, Callable] = OrderedDict()

    @property
    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self._optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        """Per-parameter state of both optimizers (each parameter is in one), as torch.optim's `state`."""
        return {p: s for o in self._optimizers for p, s in o.state.items()}

    @torch.no_grad()
    def step(self) -> None:
        if self.world_size > 1 and self.owners is None:
            reduce_gradients(self.params, self.world_size, self.bucket_numel)
        elif self.world_size > 1:
            self._reduce_to_owners()
        for o in self._optimizers:
            o.step()
        if self.world_size > 1 and self.owners is not None:
            works = [dist.broadcast(p.data, src=self.owners[p], async_op=True) for p in self.params]
            for w in works:
                w.wait()
        for hook in list(self._step_post_hooks.values()):
            hook(self, (), {})

    def register_step_post_hook(self, hook: Callable) -> RemovableHandle:
        """hook(optimizer, args, kwargs) after every step, once all parameters hold their new values (as
        torch.optim.Optimizer's): e.g. fp8 layers re-cast their weights."""
        handle = RemovableHandle(self._step_post_hooks)
        self._step_post_hooks[handle.id] = hook
        return handle

    def _reduce_to_owners(self) -> None:
        with_grad = [p for p in self.params if p.grad is not None]
        works = [dist.reduce(p.grad, dst=self.owners[p], op=dist.ReduceOp.SUM, async_op=True) for p in with_grad]
        rank = dist.get_rank()
        for p, w in zip(with_grad, works):
            w.wait()
            if self.owners[p] == rank:
                p.grad.div_(self.world_size)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    def set_lr_multiplier(self, m: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["initial_lr"] * m

    def set_muon_momentum(self, m: float) -> None:
        for g in self.muon.param_groups if self.muon is not None else []:
            g["momentum"] = m

    def set_weight_decay_multiplier(self, m: float) -> None:
        """Muon's weight decay = its initial value * m (a schedule)."""
        for g in self.muon.param_groups if self.muon is not None else []:
            g["weight_decay"] = g["initial_weight_decay"] * m

    def state_dict(self) -> dict:
        """Plain tensors, numbers, strings, lists and dicts only: loadable with weights_only=True."""
        return {"muon": self.muon.state_dict() if self.muon is not None else None,
                "adamw": self.adamw.state_dict() if self.adamw is not None else None,
                "world_size": self.world_size, "sharded": self.owners is not None}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not {"muon", "adamw"} <= set(state):
            raise ValueError("not a MuonAdamW state dict (expected keys 'muon' and 'adamw')")
        if state.get("sharded") and self.owners is not None and state.get("world_size") != self.world_size:
            raise ValueError(f"this sharded optimizer state was saved with world size {state.get('world_size')}, "
                             f"now it is {self.world_size}: resume with the same number of processes")
        for name, opt in (("muon", self.muon), ("adamw", self.adamw)):
            if (opt is None) != (state[name] is None):
                raise ValueError(f"optimizer state has {'no ' if state[name] is None else ''}{name} part but this "
                                 "optimizer does" + (" not" if opt is None else "") + ": different model or sharding")
        groups_now = [len(opt.param_groups) if opt is not None else 0 for opt in (self.muon, self.adamw)]
        groups_saved = [len(state[name]["param_groups"]) if state[name] is not None else 0 for name in ("muon", "adamw")]
        if groups_now != groups_saved:
            raise ValueError(f"the optimizer state has (Muon, AdamW) parameter groups {tuple(groups_saved)}, this "
                             f"optimizer {tuple(groups_now)}: it was saved by another model or optimizer recipe "
                             f"(e.g. before --adam_groups and the model's finer parameter kinds); resume with the code "
                             f"and flags that saved it, or start the optimizer fresh")
        if self.muon is not None:
            defaults = [dict(g) for g in self.muon.param_groups]
            self.muon.load_state_dict(state["muon"])
            for g, now in zip(self.muon.param_groups, defaults):  # keys older states lack
                for key in ("beta2", "row_equilibrate", "renormalize", "initial_weight_decay"):
                    g.setdefault(key, g["weight_decay"] if key == "initial_weight_decay" else now[key])
        if self.adamw is not None:
            # fused/foreach are properties of this process's device, not of the run being resumed
            impl = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in self.adamw.param_groups]
            self.adamw.load_state_dict(state["adamw"])
            for g, kept in zip(self.adamw.param_groups, impl):
                g.update(kept)


def reduce_gradients(params: list[Tensor], world_size: int, bucket_numel: int = 32 * 1024 * 1024) -> None:
    """Average .grad over all ranks in place: flat buckets per dtype, all-reduces in flight together.

    SUM then divide (gloo has no AVG). Every rank must hold grads for the same parameters.
    """
    grads = [p.grad for p in params if p.grad is not None]
    buckets: list[list[Tensor]] = []
    by_dtype: dict[tuple, list[Tensor]] = defaultdict(list)
    for g in grads:
        by_dtype[(g.dtype, g.device)].append(g)
    for group in by_dtype.values():
        bucket, size = [], 0
        for g in group:
            if bucket and size + g.numel() > bucket_numel:
                buckets.append(bucket)
                bucket, size = [], 0
            bucket.append(g)
            size += g.numel()
        if bucket:
            buckets.append(bucket)
    flats = [torch._utils._flatten_dense_tensors(b) for b in buckets]
    works = [dist.all_reduce(f, op=dist.ReduceOp.SUM, async_op=True) for f in flats]
    for bucket, flat, work in zip(buckets, flats, works):
        work.wait()
        flat.div_(world_size)
        for g, synced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
            g.copy_(synced)


def assign_owners(groups: dict[str, list[Tensor]], world_size: int) -> dict[Tensor, int]:
    """Whole parameters to ranks, balanced: matrices of one shape are dealt round-robin (equal Muon
    work per rank), then the rest go largest-first to the least loaded rank. Deterministic, so every
    rank computes the same map."""
    by_shape: dict[torch.Size, list[Tensor]] = defaultdict(list)
    for p in groups["matrix"]:
        by_shape[p.shape].append(p)
    matrices = [p for _, same in sorted(by_shape.items(), key=lambda kv: -kv[0].numel()) for p in same]
    rest = sorted((p for k, ps in groups.items() if k != "matrix" for p in ps),
                  key=lambda t: -t.numel())  # stable sort: ties keep model order
    load = [0] * world_size
    owners: dict[Tensor, int] = {}
    for p in matrices + rest:  # each to the least loaded rank (lowest rank on a tie)
        r = min(range(world_size), key=lambda i: (load[i], i))
        owners[p] = r
        load[r] += p.numel()
    return owners


# AdamW kinds of model.param_groups(): (which learning rate, its factor, betas, weight decay) under
# adam_groups="tuned" (per-kind settings, as the public nanochat's record runs tune them); "uniform" gives
# every kind its learning rate unscaled, adam_betas and no weight decay.
ADAMW_KINDS: dict[str, tuple[str, float, tuple[float, float], float]] = {
    "embedding": ("embedding_lr", 1.0, (0.8, 0.995), 0.001),
    "value_embed": ("embedding_lr", 0.5, (0.8, 0.995), 0.01),
    # the bigram table takes the value embeddings' settings: like them, a token-indexed table whose rows are a side
    # input added under a learned scale (into v there, the residual here), not the stream's normed input as wte is
    "bigram_embed": ("embedding_lr", 0.5, (0.8, 0.995), 0.01),
    "lm_head": ("unembedding_lr", 1.0, (0.8, 0.96), 0.01),
    "resid": ("scalar_lr", 0.01, (0.8, 0.95), 0.05),
    "x0": ("scalar_lr", 1.0, (0.96, 0.95), 0.0),
    "scalar": ("scalar_lr", 0.4, (0.8, 0.95), 0.0),
}
ADAM_GROUPS = ("uniform", "tuned")
WIDTH_SCALED = ("embedding", "value_embed", "bigram_embed", "lm_head")  # AdamW rates x min(1, (n_embd / 768) ** -0.5)


def build_optimizer(model: nn.Module, *, matrix_lr: float = FINETUNE_LRS.matrix,
                    embedding_lr: float = FINETUNE_LRS.embedding, unembedding_lr: float = FINETUNE_LRS.unembedding,
                    scalar_lr: float = FINETUNE_LRS.scalar, weight_decay: float = 0.0,
                    adam_betas: tuple[float, float] = (0.8, 0.95), adam_groups: str = "uniform",
                    muon_beta2: float = 0.0, muon_row_equilibrate: bool = False, muon_renorm: bool = False,
                    muon_compile: bool | None = False, shard: bool = False) -> MuonAdamW:
    """Muon (the "matrix" group) + AdamW (every other kind of `model.param_groups()`, see ADAMW_KINDS).

    The embedding and lm_head LRs are scaled by (n_embd / 768) ** -0.5 above width 768: they were tuned at
    768 and AdamW's per-element step should shrink as the model widens. Narrower models keep the 768 rates
    (scaled up, the tuned rates made d2-d4 CPU runs at a 512-token batch spike). weight_decay is Muon's (cautious);
    adam_groups="tuned" also gives each AdamW kind its own betas and weight decay. muon_beta2 > 0 turns on
    Muon's per-neuron normalization, muon_row_equilibrate its MuonEq and muon_renorm its Muon+ step;
    muon_compile runs its update under torch.compile (None: on CUDA, where it measured 2.4% faster at d12). Under
    torch.distributed (world size > 1) step() synchronizes gradients itself (do not wrap the model in DDP);
    shard=True also splits the optimizer state and work across ranks.
    """
    if adam_groups not in ADAM_GROUPS:
        raise ValueError(f"adam_groups must be one of {', '.join(ADAM_GROUPS)}, got {adam_groups!r}")
    groups = model.param_groups()
    unknown = set(groups) - {"matrix", *ADAMW_KINDS}
    if "matrix" not in groups or unknown:
        raise ValueError(f"model.param_groups() must return 'matrix' and kinds among {sorted(ADAMW_KINDS)}, "
                         f"got {sorted(groups)}")
    grouped = [p for ps in groups.values() for p in ps]
    if len({id(p) for p in grouped}) != len(grouped):
        raise ValueError("a parameter appears in two of model.param_groups()")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if {id(p) for p in grouped} != trainable:
        raise ValueError("model.param_groups() must cover every trainable parameter exactly once")

    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    owners = assign_owners(groups, world_size) if shard and world_size > 1 else None
    if owners is not None:
        rank = dist.get_rank()
        groups = {k: [p for p in ps if owners[p] == rank] for k, ps in groups.items()}

    muon = None
    if groups["matrix"]:
        muon = Muon(groups["matrix"], lr=matrix_lr, momentum=0.95, weight_decay=weight_decay, beta2=muon_beta2,
                    row_equilibrate=muon_row_equilibrate, renormalize=muon_renorm, compile=muon_compile)
        muon.param_groups[0].update(kind="matrix", initial_lr=matrix_lr, initial_weight_decay=weight_decay)
    rates = dict(embedding_lr=embedding_lr, unembedding_lr=unembedding_lr, scalar_lr=scalar_lr)
    dmodel_scale = min(1.0, (model.config.n_embd / 768) ** -0.5)  # narrower models keep d12's rates
    adam_param_groups = []
    for kind, params in groups.items():
        if kind == "matrix" or not params:
            continue
        rate, factor, betas, decay = ADAMW_KINDS[kind]
        lr = rates[rate] * (dmodel_scale if kind in WIDTH_SCALED else 1.0)
        if adam_groups == "tuned":
            adam_param_groups.append(dict(params=params, lr=lr * factor, betas=betas, weight_decay=decay, kind=kind))
        else:
            adam_param_groups.append(dict(params=params, lr=lr, betas=adam_betas, weight_decay=0.0, kind=kind))
    for g in adam_param_groups:
        g["initial_lr"] = g["lr"]
    adamw = None
    if adam_param_groups:
        on_cuda = any(p.is_cuda for p in grouped)
        adamw = torch.optim.AdamW(adam_param_groups, eps=1e-10, fused=True if on_cuda else None,
                                  foreach=None if on_cuda else True)
    return MuonAdamW(muon, adamw, grouped, world_size=world_size, owners=owners)


def lr_multiplier(step: int, num_iterations: int, warmup_steps: int, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """Linear warmup (1/warmup_steps at step 0, 1.0 at warmup_steps-1), flat at 1.0, then a linear
    warmdown over the last round(warmdown_ratio * num_iterations) steps, reaching final_lr_frac at
    step == num_iterations."""
    if num_iterations <= 0 or warmup_steps < 0 or not 0.0 <= warmdown_ratio <= 1.0:
        raise ValueError(f"bad schedule: num_iterations={num_iterations} (> 0), warmup_steps={warmup_steps} "
                         f"(>= 0), warmdown_ratio={warmdown_ratio} (in [0, 1])")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    warmdown_steps = round(warmdown_ratio * num_iterations)
    if warmdown_steps == 0 or step <= num_iterations - warmdown_steps:
        return 1.0
    progress = min(1.0, (step - (num_iterations - warmdown_steps)) / warmdown_steps)
    return 1.0 + progress * (final_lr_frac - 1.0)


def muon_momentum(step: int, warmup: int = 300, start: float = 0.85, end: float = 0.95,
                  num_iterations: int = 0, warmdown_ratio: float = 0.0, final: float | None = None) -> float:
    """Muon momentum: start -> end linearly over the first `warmup` steps (less momentum early, while
    the gradients still change direction fast); with `final`, end -> final linearly over the LR's warmdown
    (the last round(warmdown_ratio * num_iterations) steps), as the steps shrink."""
    momentum = start + min(step / warmup, 1.0) * (end - start) if warmup > 0 else end
    warmdown = round(warmdown_ratio * num_iterations)
    if final is None or warmdown == 0 or step < num_iterations - warmdown:
        return momentum
    progress = min(1.0, (step - (num_iterations - warmdown)) / warmdown)
    return momentum + progress * (final - momentum)


def weight_decay_multiplier(step: int, num_iterations: int, schedule: str) -> float:
    """Muon's weight decay over training: "constant" 1, or "cosine" from 1 to 0 over num_iterations."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, num_iterations) / max(num_iterations, 1)))
    raise ValueError(f"weight decay schedule must be constant or cosine, got {schedule!r}")


__all__ = ["POLAR_EXPRESS_COEFFS", "orthogonalize", "Muon", "MuonAdamW", "reduce_gradients", "assign_owners",
           "build_optimizer", "lr_multiplier", "muon_momentum", "weight_decay_multiplier"]
