"""Serve a chat model over HTTP: the chat page at / and an OpenAI-compatible API under /v1.

    python -m scripts.chat_web -i sft --port 8000 --host 127.0.0.1 --num_gpus 1
    python -m scripts.chat_web --model path/to/step_000800     # a checkpoint directory from anywhere

One worker (model replica + continuous-batching thread) per GPU; requests go to the least loaded.
The model is served as `nanochat-<source>` (e.g. nanochat-sft): a request's `model` must name it or be
left out.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from nanochat.checkpoint import ModelChoice
from nanochat.common import autodetect_device_type, log0
from nanochat.flags import parse_flags
from nanochat.inference.decoder import DECODE_ATTENTIONS
from nanochat.inference.engine import cast_params
from nanochat.web.params import Limits

FLAG_ALIASES = {"-i": "source", "--tag": "model_tag"}


@dataclass
class WebConfig(Limits, ModelChoice):
    """Serve a chat model: the chat page and an OpenAI-compatible API. The request limits are Limits' flags."""
    device_type: str = field(default="auto", metadata={"help": "cuda, mps, cpu or auto"})
    num_gpus: int = field(default=1, metadata={"help": "workers, one per GPU (cuda:0 .. cuda:N-1)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0: every interface)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    slots: int = field(default=32, metadata={"help": "sequences decoded together per worker"})
    compile: bool = field(default=True, metadata={"help": "compiled decode step + CUDA graph (CUDA only)"})
    attention: str = field(default="auto", metadata={"help": DECODE_ATTENTIONS.help()})
    kv_fp8: bool = field(default=False, metadata={"help": "fp8 KV cache: half the bytes per step, read by a "
                                                          "decode kernel (not exact)"})
    read_timeout_s: float = field(default=30.0, metadata={"help": "a connection must send each whole request "
                                                                  "(headers and body) within this, or is closed"})
    keep_alive_s: float = field(default=5.0, metadata={"help": "an idle connection is closed this long after "
                                                               "its last response"})
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer KEY' on /v1 and "
                                                                "/metrics (default: $NANOCHAT_API_KEY, else none)"})


def main(argv: list[str] | None = None) -> None:
    cfg = parse_flags(WebConfig, argv, description=__doc__, aliases=FLAG_ALIASES)
    from nanochat.checkpoint import load_model
    from nanochat.runtime import setup_torch_env
    from nanochat.web.app import create_app
    from nanochat.web.scheduler import BatchScheduler
    from nanochat.web.server import make_server

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
        model, tokenizer, meta = load_model(cfg.source, device=device, tag=cfg.model_tag, step=cfg.step,
                                            model_dir=cfg.model or None)
        if device.type == "cuda":
            cast_params(model, torch.bfloat16)
        workers.append(BatchScheduler(model, tokenizer, slots=cfg.slots, name=f"worker{i}",
                                      compile=cfg.compile and device.type == "cuda",
                                      attention=cfg.attention, kv_fp8=cfg.kv_fp8))
        log0(f"worker {i}: {cfg.model or cfg.source} step {meta.get('step')} on {device}")
    api_key = cfg.api_key or os.environ.get("NANOCHAT_API_KEY") or None
    model_name = f"nanochat-{cfg.source}"
    app = create_app(workers, model_name=model_name, limits=cfg, api_key=api_key)  # cfg is a Limits
    log0(f"serving {model_name} on http://{cfg.host}:{cfg.port}/ (API key {'required' if api_key else 'off'})")
    make_server(app, host=cfg.host, port=cfg.port, read_timeout_s=cfg.read_timeout_s,
                keep_alive_s=cfg.keep_alive_s).run()


if __name__ == "__main__":
    main()
