"""Serve a chat model over HTTP: the chat page at / and an OpenAI-compatible API under /v1.

    python -m scripts.chat_web -i sft --port 8000 --host 127.0.0.1 --num_gpus 1

One worker (model replica + continuous-batching thread) per GPU; requests go to the least loaded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nanochat.common import autodetect_device_type, log0
from nanochat.flags import parse_flags

SHORT_FLAGS = {"-i": "source"}


@dataclass
class WebConfig:
    source: str = "sft"             # checkpoint phase: sft | base | rl
    tag: str | None = None
    step: int | None = None
    device_type: str = "auto"
    num_gpus: int = 1               # workers, one per GPU (cuda:0 .. cuda:N-1)
    host: str = "127.0.0.1"
    port: int = 8000
    slots: int = 32                 # sequences decoded together per worker
    compile: bool = True            # compiled decode step + CUDA graph (CUDA only)
    attention: str = "auto"         # decode attention: auto | torch (masked) | triton (kernels.decode_attention) | triton_dot
    kv_fp8: bool = False            # fp8 KV cache, half the bytes per step (a decode kernel reads it; not exact)
    max_messages: int = 500
    max_chars_per_message: int = 8000
    max_tokens: int = 2048
    default_max_tokens: int = 512


def main(argv: list[str] | None = None) -> None:
    cfg = parse_flags(WebConfig, argv, description=__doc__, short=SHORT_FLAGS)
    import uvicorn

    from nanochat.checkpoint import load_model
    from nanochat.engine import cast_params
    from nanochat.runtime import setup_torch_env
    from nanochat.web.app import Limits, create_app
    from nanochat.web.scheduler import BatchScheduler

    setup_torch_env()
    device_type = autodetect_device_type() if cfg.device_type == "auto" else cfg.device_type
    if device_type == "cuda":
        if cfg.num_gpus > torch.cuda.device_count():
            raise SystemExit(f"--num_gpus={cfg.num_gpus} but only {torch.cuda.device_count()} GPU(s) are visible")
        devices = [torch.device("cuda", i) for i in range(cfg.num_gpus)]
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        devices = [torch.device(device_type)]
    workers = []
    for i, device in enumerate(devices):
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model, tokenizer, meta = load_model(cfg.source, device=device, tag=cfg.tag, step=cfg.step)
        if device.type == "cuda":
            cast_params(model, torch.bfloat16)
        workers.append(BatchScheduler(model, tokenizer, slots=cfg.slots, name=f"worker{i}",
                                      compile=cfg.compile and device.type == "cuda",
                                      attention=cfg.attention, kv_fp8=cfg.kv_fp8))
        log0(f"worker {i}: {cfg.source} step {meta.get('step')} on {device}")
    limits = Limits(max_messages=cfg.max_messages, max_chars_per_message=cfg.max_chars_per_message,
                    max_tokens=cfg.max_tokens, default_max_tokens=min(cfg.default_max_tokens, cfg.max_tokens))
    app = create_app(workers, model_name=f"nanochat-{cfg.source}", limits=limits)
    log0(f"serving on http://{cfg.host}:{cfg.port}/")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")


if __name__ == "__main__":
    main()
