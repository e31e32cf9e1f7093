"""A nanochat model as a Hugging Face transformers model directory, loadable elsewhere with

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)   # modeling_nanochat.py, shipped in DIR
    AutoTokenizer.from_pretrained(DIR)                                   # tokenizer.json: a fast BPE tokenizer

DIR holds model.safetensors (our parameter names, the vocabulary's padding rows dropped), config.json (every
architecture field of GPTConfig, and the gates' channel counts), generation_config.json (stops at <|assistant_end|> or
<|bos|>, as our engine does), modeling_nanochat.py (this package's copy) and the tokenizer files, with a chat
template that renders conversations as nanochat.conversation does.

The tokenizer: our tiktoken ranks become a byte-level BPE for the `tokenizers` library. tiktoken merges, at
each step, the adjacent pair whose concatenation has the lowest rank; a BPE with one merge (left, right) for
every way of splitting each token into two tokens, ordered by the token's rank, merges the same pairs in the
same order, and like tiktoken takes a whole pre-token that is itself a token without merging
(`ignore_merges`). The split regex is ours, run by the same engine (Oniguruma) that tokenizers uses for
tiktoken's own patterns. Two differences: text that spells a special token ("<|bos|>") becomes that token,
where our encode() keeps it as plain characters; and `tokenizer(text)` starts with <|bos|> (as our documents
do), our encode() only when asked. tests/test_export_hf.py checks the ids against ours on real text.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from nanochat.common import log0
from nanochat.model.gpt import ATTN_GATE_CHANNELS, BIGRAM_HASH, GPT, SMEAR_CHANNELS, VE_GATE_CHANNELS, GPTConfig
from nanochat.tokenizer import Tokenizer

MODELING_FILE = Path(__file__).with_name("modeling_nanochat.py")
# GPTConfig fields that modeling_nanochat.py implements (same name, same meaning in config.json) ...
IMPLEMENTED_FIELDS = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim",
                      "window_pattern", "short_window", "value_embeds", "softcap", "rope_base", "qk_scale", "smear",
                      "backout", "value_embed_gate", "unet_skips", "attn_gate", "bigram_embeds"}
# ... and those that say how a run computed or initialized, not what the trained weights compute (left out);
# doc_mask keeps packed training rows' documents apart: on one document, as the exported model runs, it is a no-op
RUN_ONLY_FIELDS = {"attn_backend", "recompute", "init_ramp", "c_fc_init_scale", "embedding_init_std", "doc_mask",
                   "bos_id"}
AUTO_MAP = {"AutoConfig": "modeling_nanochat.NanochatConfig",
            "AutoModelForCausalLM": "modeling_nanochat.NanochatForCausalLM"}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% elif message['role'] == 'user' %}<|user_start|>{{ ns.system + message['content'] }}<|user_end|>"
    "{% set ns.system = '' %}"
    "{% elif message['role'] == 'assistant' %}<|assistant_start|>{{ message['content'] }}<|assistant_end|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant_start|>{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_exportable(model_config: dict) -> None:
    """Refuse a config with a field that modeling_nanochat.py does not implement: exported without it, the
    model would compute something else than it was trained to, silently."""
    unknown = sorted(set(model_config) - IMPLEMENTED_FIELDS - RUN_ONLY_FIELDS)
    if unknown:
        values = ", ".join(f"{name}={model_config[name]!r}" for name in unknown)
        raise ValueError(f"cannot export: the model's config has {values}, which nanochat/export/modeling_nanochat.py "
                         f"does not implement. Implement it there, add it to IMPLEMENTED_FIELDS in "
                         f"nanochat/export/hf.py and to the model of tests/test_export_hf.py, then export again")


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise RuntimeError("the export needs transformers: `pip install 'nanochat[export]'` "
                           "(or `pip install transformers`)") from err
    return transformers


def _modeling_module():
    """modeling_nanochat.py, imported as part of this package (it needs transformers)."""
    _transformers()
    from nanochat.export import modeling_nanochat
    return modeling_nanochat


def hf_config(cfg: GPTConfig, tokenizer: Tokenizer):
    """The NanochatConfig of `cfg` (every implemented field, gpt.py's channel counts of the smear, value-embedding
    and attention output gates, and its bigram table's rows and hash multipliers), with the auto_map that points
    transformers at modeling_nanochat.py."""
    model_config = asdict(cfg)
    check_exportable(model_config)
    module = _modeling_module()
    config = module.NanochatConfig(**{k: v for k, v in model_config.items() if k in IMPLEMENTED_FIELDS},
                                   smear_channels=SMEAR_CHANNELS, ve_gate_channels=VE_GATE_CHANNELS,
                                   attn_gate_channels=ATTN_GATE_CHANNELS, bigram_rows=cfg.bigram_rows,
                                   bigram_hash=list(BIGRAM_HASH))
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["NanochatForCausalLM"]
    config.bos_token_id = tokenizer.get_bos_token_id()
    config.eos_token_id = tokenizer.encode_special("<|assistant_end|>")
    return config


def hf_weights(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict without the vocabulary's padding rows (wte, lm_head, value embeddings): the exported
    model's vocabulary is exactly the tokenizer's. The bigram table keeps all its rows: the hash reads their number."""
    vocab = model.config.vocab_size
    state = {}
    for name, tensor in model.state_dict().items():
        name = name.removeprefix("_orig_mod.")
        if name in ("wte.weight", "lm_head.weight") or name.startswith("value_embeds."):
            tensor = tensor[:vocab]
        state[name] = tensor.detach().to("cpu").contiguous()
    return state


def bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's alphabet: each byte as one printable character. Printable Latin-1 bytes stand for
    themselves; the others (controls, space, ...) take the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def hf_tokenizer(tokenizer: Tokenizer, model_max_length: int):
    """Our tokenizer as a transformers fast tokenizer (see the module docstring for how, and its limits)."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as BPETokenizer
    from tokenizers.models import BPE

    transformers = _transformers()
    alphabet = bytes_to_unicode()
    as_text = lambda b: "".join(alphabet[x] for x in b)  # noqa: E731
    ranks = tokenizer.mergeable_ranks()
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        merges += [(as_text(a), as_text(b)) for a, b in splits if a in ranks and b in ranks]
    bpe = BPETokenizer(BPE({as_text(t): r for t, r in ranks.items()}, merges, ignore_merges=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    specials = tokenizer.get_special_tokens()
    bpe.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    for s in specials:
        if bpe.token_to_id(s) != tokenizer.encode_special(s):
            raise AssertionError(f"special token {s} got id {bpe.token_to_id(s)}, ours is {tokenizer.encode_special(s)}")
    bos = tokenizer.get_bos_token_id()
    bpe.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                       special_tokens=[("<|bos|>", bos)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|assistant_end|>", pad_token="<|bos|>",
        additional_special_tokens=[s for s in specials if s not in ("<|bos|>", "<|assistant_end|>")],
        chat_template=CHAT_TEMPLATE, model_max_length=model_max_length, clean_up_tokenization_spaces=False)


def export_hf(model: GPT, tokenizer: Tokenizer, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Write the transformers model directory of `model` and `tokenizer` to out_dir; returns it.
    dtype: float32, bfloat16 or float16 for the weights (None: as they are)."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or None: as stored), got {dtype!r}")
    out_dir = Path(out_dir)
    transformers = _transformers()
    module = _modeling_module()
    config = hf_config(model.config, tokenizer)
    weights = hf_weights(model)
    if dtype is not None:
        weights = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in weights.items()}
    config.dtype = str(next(iter(weights.values())).dtype).removeprefix("torch.")
    with torch.device("meta"):
        hf_model = module.NanochatForCausalLM(config)
    hf_model.load_state_dict(weights, strict=True, assign=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir)
    shutil.copyfile(MODELING_FILE, out_dir / MODELING_FILE.name)
    stop = [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()]
    transformers.GenerationConfig(bos_token_id=tokenizer.get_bos_token_id(), eos_token_id=stop,
                                  pad_token_id=tokenizer.get_bos_token_id()).save_pretrained(out_dir)
    hf_tokenizer(tokenizer, model.config.sequence_len).save_pretrained(out_dir)
    # the class name every transformers release knows (5.x writes its own alias, TokenizersBackend)
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    log0(f"exported to {out_dir}: {', '.join(sorted(p.name for p in out_dir.iterdir()))}")
    return out_dir


__all__ = ["export_hf", "check_exportable", "hf_tokenizer", "IMPLEMENTED_FIELDS", "RUN_ONLY_FIELDS"]