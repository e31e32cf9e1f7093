"""Loss kernels checked where they run: the whole model's gradients in training, kernel against kernel.

    python -m benchmarks.check_train_grads --depth 20 --kernels torch,triton --steps 12

`check_kernels` checks each loss kernel alone against an fp32 reference. This checks what a training run
sees: d20 under bf16 autocast on real batches, the loss kernel's dhidden flowing back through every
block. Each step, every kernel computes the loss and all gradients on the same batch from the same
weights. The reference (the first kernel) runs twice, so its own run-to-run difference (attention
backwards need not be deterministic) is the yardstick. Then the reference's gradients drive a Muon + AdamW
update, so all kernels are compared along one trajectory. A kernel fails a step when its worst
per-parameter relative gradient error exceeds max(--tol, --noise_factor x the reference's own).
Last line: one JSON object.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from nanochat import kernels
from nanochat.common import compute_init, device_name, log0
from nanochat.flags import parse_flags


@dataclass
class CheckConfig:
    depth: int = 20
    device_batch_size: int = 16
    max_seq_len: int = 2048
    kernels: list[str] = field(default_factory=lambda: ["torch", "triton"])  # the first is the reference
    steps: int = 12
    compile: bool = False
    tol: float = 0.05
    noise_factor: float = 4.0
    data: str = "shards"        # "shards" (the tokenizer and --data_dir) or "random" tokens
    data_dir: str = ""
    vocab_size: int = 32768     # for --data random
    device_type: str = ""       # "" = cuda when available
    seed: int = 0


def batches(cfg: CheckConfig, device: torch.device):
    """(vocab size, an endless iterator of (inputs, targets)) from the shards or random tokens."""
    if cfg.data == "random":
        gen = torch.Generator().manual_seed(cfg.seed)

        def random_batches():
            while True:
                ids = torch.randint(0, cfg.vocab_size, (cfg.device_batch_size, cfg.max_seq_len + 1), generator=gen)
                yield ids[:, :-1].to(device), ids[:, 1:].to(device)
        return cfg.vocab_size, random_batches()
    if cfg.data != "shards":
        raise ValueError(f"--data must be shards or random, got {cfg.data!r}")
    from nanochat.data.packing import PackedLoader
    from nanochat.data.shards import resolve_data_dir
    from nanochat.tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    loader = PackedLoader(tokenizer, resolve_data_dir(cfg.data_dir or None), "train", cfg.device_batch_size,
                          cfg.max_seq_len, device)
    return tokenizer.get_vocab_size(), loader


def gradients(model, inputs, targets, kernel: str, autocast) -> tuple[float, list[torch.Tensor]]:
    """(loss, one fp32 gradient per parameter) of one forward + backward with `kernel`."""
    kernels.set_kernel_backend(kernel)
    model.zero_grad(set_to_none=True)
    with autocast:
        loss = model(inputs, targets)
    loss.backward()
    return loss.item(), [p.grad.float().clone() for p in model.parameters()]


def compare(grads: list[torch.Tensor], ref: list[torch.Tensor], names: list[str]) -> tuple[float, str]:
    """Worst per-parameter relative error ||g - ref|| / ||ref|| and that parameter's name, over the
    parameters whose reference gradient holds at least 1e-4 of the global norm (at init the zeroed
    projections leave some, e.g. the residual scalars, with gradients of rounding-noise size only)."""
    norms = torch.stack([r.norm() for r in ref])
    floor = 1e-4 * norms.norm()
    errs = [((g - r).norm() / n).item() if n >= floor else 0.0 for g, r, n in zip(grads, ref, norms)]
    worst = max(range(len(errs)), key=errs.__getitem__)
    return errs[worst], names[worst]


def sign_flips(grads: list[torch.Tensor], ref: list[torch.Tensor], names: list[str]) -> tuple[float, str]:
    """Worst per-parameter fraction of elements whose gradient sign differs from the reference's (where the
    reference is nonzero). AdamW's first updates are close to lr * sign(g) per element, so a small norm
    error spread over near-zero elements can still move the embeddings, lm_head and scalars differently."""
    fracs = []
    for g, r in zip(grads, ref):
        nonzero = r != 0
        fracs.append(((torch.sign(g) != torch.sign(r)) & nonzero).sum().item() / max(1, nonzero.sum().item()))
    worst = max(range(len(fracs)), key=fracs.__getitem__)
    return fracs[worst], names[worst]


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_flags(CheckConfig, argv, description=__doc__.split("\n")[0])
    from nanochat.model.gpt import GPT, config_from_depth
    from nanochat.optim import build_optimizer
    from nanochat.runtime import setup_torch_env

    setup_torch_env()
    device_type = cfg.device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    _, _, _, _, device = compute_init(device_type)
    torch.manual_seed(cfg.seed)
    vocab, data = batches(cfg, device)
    model = GPT(config_from_depth(cfg.depth, vocab_size=vocab, sequence_len=cfg.max_seq_len)).to(device)
    model.init_weights()
    optimizer = build_optimizer(model)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    run = torch.compile(model, dynamic=False) if cfg.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    ref_kernel, others = cfg.kernels[0], cfg.kernels[1:]
    log0(f"d{cfg.depth} on {device_name(device)}: {cfg.device_batch_size} x {cfg.max_seq_len} tokens per step, "
         f"{cfg.data} data, compile {cfg.compile}; reference {ref_kernel} (twice), against {', '.join(others)}")
    rows = []
    for step in range(1, cfg.steps + 1):
        inputs, targets = next(data)
        ref_loss, ref = gradients(run, inputs, targets, ref_kernel, autocast)
        rep_loss, rep = gradients(run, inputs, targets, ref_kernel, autocast)
        noise, noise_name = compare(rep, ref, names)
        noise_flips, noise_flips_name = sign_flips(rep, ref, names)
        row = {"step": step, "loss": ref_loss, "noise": noise, "noise_param": noise_name,
               "noise_loss": abs(rep_loss - ref_loss), "noise_flips": noise_flips, "noise_flips_param": noise_flips_name}
        limit = max(cfg.tol, cfg.noise_factor * noise)
        for kernel in others:
            loss, grads = gradients(run, inputs, targets, kernel, autocast)
            err, where = compare(grads, ref, names)
            flips, flips_where = sign_flips(grads, ref, names)
            row[kernel] = {"loss_diff": loss - ref_loss, "grad_err": err, "param": where, "ok": err <= limit,
                           "sign_flips": flips, "sign_flips_param": flips_where}
            del grads
        rows.append(row)
        log0(f"step {step:3d} | {ref_kernel} loss {ref_loss:.4f} | own noise {noise:.2e} ({noise_name}), sign flips "
             f"{noise_flips:.1e} ({noise_flips_name}) | "
             + " | ".join(f"{k}: loss {row[k]['loss_diff']:+.2e}, grad err {row[k]['grad_err']:.2e} "
                          f"({row[k]['param']}), sign flips {row[k]['sign_flips']:.1e} ({row[k]['sign_flips_param']})"
                          f"{'' if row[k]['ok'] else ' FAIL'}" for k in others))
        for p, g in zip(params, ref):  # the reference's gradients take the step
            p.grad = g.to(p.dtype)
        optimizer.step()
        del ref, rep
    if hasattr(data, "close"):
        data.close()  # the loader's prefetch thread
    failed = [(r["step"], k) for r in rows for k in others if not r[k]["ok"]]
    print(f"{len(failed)} failed of {len(rows) * len(others)} (kernel, step) checks"
          + (f": {failed}" if failed else ""))
    result = {"check": "train_grads", "device": device_name(device), "depth": cfg.depth, "compile": cfg.compile,
              "reference": ref_kernel, "failed": len(failed), "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    main()
