"""Export a checkpoint as a Hugging Face transformers model directory (weights, config, model code, tokenizer).

    python -m scripts.export_hf --out hf/nanochat-d20                    # the newest SFT checkpoint
    python -m scripts.export_hf -i base --model_tag d20 --out hf/base-d20 --dtype bfloat16
    python -m scripts.export_hf --model path/to/step_000800 --out hf/my-model

Then, anywhere with `pip install transformers torch`:

    model = AutoModelForCausalLM.from_pretrained("hf/nanochat-d20", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("hf/nanochat-d20")

See nanochat/export/hf.py for what the directory holds. The last stdout line is one JSON object.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from nanochat.checkpoint import ModelChoice, load_model
from nanochat.export.hf import DTYPES, export_hf
from nanochat.flags import parse_flags

FLAG_ALIASES = {"-i": "source", "-g": "model_tag", "-s": "step"}


@dataclass
class ExportConfig(ModelChoice):
    """Export a checkpoint for Hugging Face transformers."""
    out: str = field(default="", metadata={"help": "output directory (required)"})
    dtype: str = field(default="", metadata={"help": f"weights as {', '.join(DTYPES)} (default: as stored)"})


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_flags(ExportConfig, argv, aliases=FLAG_ALIASES)
    if not cfg.out:
        raise SystemExit("--out DIR is required: the directory to write the transformers model to")
    if cfg.dtype and cfg.dtype not in DTYPES:
        raise SystemExit(f"--dtype must be one of {', '.join(DTYPES)} (or left out: as stored), got {cfg.dtype!r}")
    model, tokenizer, meta = load_model(cfg.source, "cpu", cfg.model_tag, cfg.step, model_dir=cfg.model or None)
    out = export_hf(model, tokenizer, cfg.out, dtype=cfg.dtype or None)
    result = {"out": str(out), "step": meta.get("step"), "params": model.num_params(),
              "files": sorted(p.name for p in out.iterdir())}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
