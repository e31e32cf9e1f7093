"""Inference speed on one GPU: prefill latency, time per output token, tokens/s, memory, bandwidth use.

    python -m scripts.infer_bench                    # d20, random weights, prompt 1024, 256 new tokens
    python -m scripts.infer_bench --kv_fp8 true --batch_sizes 1,128   # an fp8 KV cache (the CUDA-core kernel)
    python -m scripts.infer_bench --attention torch  # the masked torch path instead of a decode kernel

Greedy decoding through the engine's StaticDecoder (static KV cache, per-row positions), with the
decode step compiled and replayed as a CUDA graph. `--prompts distinct` (the default): each row of a batch
has its own random prompt, nothing is shared (a server's load). `--prompts shared`: the rows continue one
prompt, prefilled once and stored once (n samples of a prompt: Engine.generate, RL rollouts, and how the
public nanochat's engine batches). `--prompts distinct,shared` runs both. Decode bandwidth utilization = bytes one step must
read (bf16 weights + the static KV cache it attends over) / TPOT / the device's copy bandwidth; a decode
kernel (`--attention auto`, the default, picks one on CUDA) reads only the filled positions (~90% of the
cache here, on average), so there the figure is an upper bound on the bytes and overstates the utilization
by up to ~10%.
Last line: one JSON object.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

from nanochat.common import compute_init, device_name, log0
from nanochat.flags import parse_flags
from nanochat.inference.decoder import DECODE_ATTENTIONS, resolve_decode_attention
from nanochat.inference.engine import Engine


@dataclass
class BenchConfig:
    depth: int = field(default=20, metadata={"help": "model depth (layers) of the random model"})
    vocab_size: int = field(default=32768, metadata={"help": "vocabulary size"})
    sequence_len: int = field(default=2048, metadata={"help": "the model's context length"})
    prompt_len: int = field(default=1024, metadata={"help": "tokens per prompt"})
    new_tokens: int = field(default=256, metadata={"help": "tokens generated per row"})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32, 128], metadata={"help": "rows decoded together"})
    prompts: list[str] = field(default_factory=lambda: ["distinct"], metadata={
        "help": "distinct (a random prompt per row) and/or shared (all rows continue one prompt, stored once)"})
    compile: bool = field(default=True, metadata={"help": "torch.compile the decode step"})
    cuda_graph: bool = field(default=True, metadata={"help": "replay the decode step as a CUDA graph"})
    attention: str = field(default="auto", metadata={"help": DECODE_ATTENTIONS.help()})
    kv_fp8: bool = field(default=False, metadata={"help": "fp8 KV cache (read by a decode kernel: attention auto on CUDA, triton or triton_dot)"})
    prefill_rows: int = field(default=8, metadata={"help": "prompts prefilled per forward pass (bounds the "
                                                           "[rows, T, vocab] logits)"})
    peak_bandwidth_tbs: float = field(default=4.3, metadata={"help": "device-to-device copy bandwidth, TB/s, for "
                                                                     "the roofline (4.3: measured on the H200)"})
    profile_batches: list[int] = field(default_factory=lambda: [1, 128], metadata={
        "help": "batch sizes whose decode steps get a kernel breakdown"})
    profile_steps: int = field(default=10, metadata={"help": "decode steps profiled per batch size"})
    seed: int = field(default=0, metadata={"help": "seed of the random weights and prompts"})


def build_model(cfg: BenchConfig, device):
    from nanochat.model.gpt import GPT, config_from_depth

    mcfg = config_from_depth(cfg.depth, vocab_size=cfg.vocab_size, sequence_len=cfg.sequence_len)
    with torch.device("meta"):
        model = GPT(mcfg)
    model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():  # zero-initialized projections would make decode trivially cheap to predict
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.02)
    from nanochat.inference.engine import cast_params

    return cast_params(model).eval()


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: every block matrix and the lm_head's real rows
    (embedding tables only contribute the looked-up rows, negligible)."""
    cfg = model.config
    blocks = sum(p.numel() * p.element_size() for p in model.blocks.parameters())
    return blocks + cfg.vocab_size * cfg.n_embd * model.lm_head.weight.element_size()


@torch.inference_mode()
def run_batch(model, cfg: BenchConfig, batch: int, device, shared: bool = False) -> dict:
    from nanochat.inference.decoder import StaticDecoder
    from nanochat.model.gpt import KVCache

    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + batch)
    prompts = torch.randint(0, cfg.vocab_size, (1 if shared else batch, cfg.prompt_len), generator=gen)
    max_len = cfg.prompt_len + cfg.new_tokens
    decoder = StaticDecoder(model, batch, max_len, compile=cfg.compile, cuda_graph=cfg.cuda_graph,
                            attention=cfg.attention, kv_fp8=cfg.kv_fp8,
                            shared_prompt_len=cfg.prompt_len if shared else 0)
    # warm-up: compile / capture the decode step before timing anything
    t0 = time.perf_counter()
    decoder.step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    decoder.pos.fill_(decoder.shared_prompt_len)

    def prefill() -> torch.Tensor:
        first = []
        mc = model.config
        for start in range(0, len(prompts), cfg.prefill_rows):
            rows = list(range(start, min(len(prompts), start + cfg.prefill_rows)))
            cache = KVCache(len(rows), mc.n_layer, mc.n_kv_head, mc.head_dim, cfg.prompt_len, device, torch.bfloat16)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(prompts[rows].to(device), kv_cache=cache)[:, -1].float()
            if shared:
                decoder.load_shared_prompt(cache)
            else:
                decoder.load_prompt(rows, cache)
            first.append(logits.argmax(-1))
        return torch.cat(first).expand(batch)

    prefill()  # warm the prefill path (attention backend choice, allocator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    tokens = prefill()
    torch.cuda.synchronize()
    ttft = time.perf_counter() - t0
    steps = cfg.new_tokens - 1
    t1 = time.perf_counter()
    for _ in range(steps):
        decoder.tokens.copy_(tokens)
        tokens = decoder.step().argmax(-1)
    torch.cuda.synchronize()
    decode_s = time.perf_counter() - t1
    tpot = decode_s / steps
    profile = None
    if batch in cfg.profile_batches:
        try:
            profile = profile_decode(decoder, cfg.profile_steps)
        except Exception as exc:  # the timings above stand without it; the row says why it is missing
            profile = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    kv_bytes = sum(t.numel() * t.element_size() for t in decoder.k + decoder.v + (decoder.k_scale or [])
                   + (decoder.v_scale or []) + (decoder.prompt_k or []) + (decoder.prompt_v or []))
    step_bytes = weight_bytes_per_step(model) + kv_bytes  # the whole static cache: the torch path reads all of it
    return {
        "batch": batch,
        "prompts": "shared" if shared else "distinct",
        "ttft_ms": round(ttft * 1e3, 2),
        "tpot_ms": round(tpot * 1e3, 3),
        "decode_tok_s": round(batch / tpot, 1),
        "e2e_tok_s": round(batch * cfg.new_tokens / (ttft + decode_s), 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        "step_gb": round(step_bytes / 1e9, 3),
        "bw_util": round(step_bytes / tpot / (cfg.peak_bandwidth_tbs * 1e12), 3),
        "warmup_s": round(warmup_s, 1),
        **({"profile": profile} if profile else {}),
    }


def profile_decode(decoder, steps: int) -> dict:
    """Kernel breakdown of `steps` decode steps (the compiled step, run outside its CUDA graph so the
    profiler sees each kernel; the graph replays the same kernels): kernels per step, summed kernel time
    per step (the floor of a graph replay), and the top kernels. Printed; returned for the JSON line."""
    from torch.profiler import ProfilerActivity, profile

    from nanochat.profiling import format_summary, profiler_events, summarize

    decoder.step_outside_graph()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.step_outside_graph()
        torch.cuda.synchronize()
    events = profiler_events(prof)
    summary = summarize(events, top=12)
    log0(f"decode step, batch {decoder.slots}, {steps} steps profiled:\n{format_summary(summary)}")
    return {"kernels_per_step": round(len(events) / steps, 1),
            "kernel_ms_per_step": round(summary["total_us"] / steps / 1e3, 3),
            "top": [[k["name"][:60], round(k["us"] / steps, 1)] for k in summary["top"][:6]]}


@torch.inference_mode()
def engine_tpot(engine, cfg: BenchConfig) -> float:
    """TPOT through Engine.generate at batch 1 (includes the per-step host sync and sampling)."""
    prompt = list(range(1, cfg.prompt_len + 1))
    for _ in engine.generate(prompt, max_tokens=cfg.new_tokens, temperature=0.0):  # compiles + captures
        pass
    times = []
    last = None
    for _ in engine.generate(prompt, max_tokens=cfg.new_tokens, temperature=0.0):
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    times = times[2:] or times
    return sum(times) / len(times)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_flags(BenchConfig, argv, description=__doc__)
    if unknown := set(cfg.prompts) - {"distinct", "shared"}:
        raise SystemExit(f"--prompts takes distinct and/or shared, got {sorted(unknown)}")
    from nanochat.runtime import setup_torch_env
    from nanochat.tokenizer import SPECIAL_TOKENS

    setup_torch_env()
    _, _, _, _, device = compute_init("cuda")
    model = build_model(cfg, device)

    class _Tok:  # the engine only needs special ids and decode for tools; a random model never calls one
        def encode_special(self, name):
            return cfg.vocab_size - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index(name)

        def get_bos_token_id(self):
            return self.encode_special("<|bos|>")

        def decode(self, ids):
            return ""

        def encode(self, text):
            return []

    engine = Engine(model, _Tok(), compile=cfg.compile)
    log0(f"d{cfg.depth}: {model.num_params() / 1e6:.0f}M params on {device_name(device)}; "
         f"prompt {cfg.prompt_len}, {cfg.new_tokens} new tokens, greedy")
    rows = []
    for mode in cfg.prompts:
        for batch in cfg.batch_sizes:
            try:
                rows.append(run_batch(model, cfg, batch, device, shared=mode == "shared"))
            except torch.cuda.OutOfMemoryError as exc:
                rows.append({"batch": batch, "prompts": mode, "error": f"OOM: {exc}"[:200]})
            torch.cuda.empty_cache()
            log0(json.dumps(rows[-1]))
    try:
        eng_tpot = round(engine_tpot(engine, cfg) * 1e3, 3)
    except Exception as exc:  # report, do not lose the table above
        eng_tpot = f"{type(exc).__name__}: {exc}"[:200]
    print(f"{'prompts':>8} {'batch':>6} {'TTFT ms':>9} {'TPOT ms':>9} {'decode tok/s':>13} {'e2e tok/s':>11} "
          f"{'peak GiB':>9} {'step GB':>8} {'BW util':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['prompts']:>8} {r['batch']:>6} {r['error']}")
            continue
        print(f"{r['prompts']:>8} {r['batch']:>6} {r['ttft_ms']:>9} {r['tpot_ms']:>9} {r['decode_tok_s']:>13} "
              f"{r['e2e_tok_s']:>11} {r['peak_mem_gib']:>9} {r['step_gb']:>8} {r['bw_util']:>8}")
    print(f"engine.generate TPOT at batch 1 (host loop, sampling, sync): {eng_tpot} ms")
    print(json.dumps({"device": device_name(device), "depth": cfg.depth, "prompt_len": cfg.prompt_len,
                      "new_tokens": cfg.new_tokens, "compile": cfg.compile, "cuda_graph": cfg.cuda_graph,
                      "attention": resolve_decode_attention(cfg.attention, device, model.config.head_dim, cfg.kv_fp8),
                      "kv_fp8": cfg.kv_fp8,
                      "engine_tpot_ms_b1": eng_tpot, "results": rows}))


if __name__ == "__main__":
    main()
