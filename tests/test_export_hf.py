"""scripts.export_hf through real transformers, on the CPU: a tiny GPT with every architecture feature of
GPTConfig turned on (value embeddings, grouped-query heads, short windows, a non-default softcap, a vocabulary
that needs padding rows), saved as a checkpoint, exported by the script, loaded with
AutoModelForCausalLM/AutoTokenizer: the logits, the loss and greedy generate() match our model and our Engine,
the tokenizer's ids match ours, and a config field the exported code does not implement is refused."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import pytest
import torch

pytest.importorskip("transformers", reason="the export test needs transformers (pip install -e '.[dev]')")

from nanochat.conversation import render_for_completion  # noqa: E402
from nanochat.export.hf import IMPLEMENTED_FIELDS, RUN_ONLY_FIELDS, check_exportable, export_hf  # noqa: E402
from nanochat.inference.engine import Engine  # noqa: E402
from nanochat.model.gpt import ATTN_GATE_CHANNELS, BIGRAM_HASH, GPT, SMEAR_CHANNELS, GPTConfig  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402
from tests.helpers_chat import _training_text  # noqa: E402

VOCAB = 500  # not a multiple of 64: the checkpoint has padding rows, the export must drop them
UNICODE = "héllo wörld 你好世界 🙂 naïve café — “quotes” 1234567 3.14159\n\n\ttabs  and   spaces\r\n"
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"},
                     {"role": "assistant", "content": "A king of Denmark."},
                     {"role": "user", "content": "And what of Hamlet, my good lord, and of the ghost?"}]}


def every_feature_config(vocab_size: int, **overrides) -> GPTConfig:
    """Each architecture field away from its default: turn on here every feature GPTConfig gains."""
    return GPTConfig(**{**dict(sequence_len=96, vocab_size=vocab_size, n_layer=5, n_head=4, n_kv_head=2, n_embd=64,
                               head_dim=16, window_pattern="LS", short_window=8, value_embeds=True, softcap=10.0,
                               rope_base=50_000.0, qk_scale=1.3, smear=True, backout=True, value_embed_gate="input",
                               unet_skips=True, attn_gate=True, bigram_embeds=True), **overrides})


def random_gpt(cfg: GPTConfig, seed: int = 0) -> GPT:
    """Random weights that make every path matter: nonzero output projections and x0 scalars, gates != 1."""
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.3 / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.rand_like(p) + 0.25)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our model, our tokenizer, transformers model, transformers tokenizer, export dir), exported through
    the script from a checkpoint directory saved with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanochat.checkpoint import save_checkpoint
    from scripts import export_hf as script

    root = tmp_path_factory.mktemp("export")
    text = _training_text()
    tokenizer = Tokenizer.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], VOCAB)
    tokenizer.save(root / "tokenizer")
    # a seed whose greedy generations below emit no tool token (our engine's calculator would change the rest)
    model = random_gpt(every_feature_config(tokenizer.get_vocab_size()), seed=3)
    assert model.config.padded_vocab_size > model.config.vocab_size
    meta = {"model_config": asdict(model.config), "train_config": {}, "tokenizer_dir": str(root / "tokenizer")}
    save_checkpoint(root / "run", 3, model.state_dict(), None, meta, tokenizer_dir=root / "tokenizer")
    result = script.main(["--model", str(root / "run"), "--out", str(root / "hf")])
    assert result["step"] == 3 and "modeling_nanochat.py" in result["files"]
    hf_model = AutoModelForCausalLM.from_pretrained(root / "hf", trust_remote_code=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(root / "hf")
    return model, tokenizer, hf_model, hf_tok, root / "hf"


def test_every_gptconfig_field_is_exported_or_refused():
    names = {f.name for f in fields(GPTConfig)}
    new = sorted(names - IMPLEMENTED_FIELDS - RUN_ONLY_FIELDS)
    assert not new, (f"GPTConfig gained {new}: implement them in nanochat/export/modeling_nanochat.py, list them in "
                     "IMPLEMENTED_FIELDS (nanochat/export/hf.py) and turn them on in every_feature_config above")
    assert IMPLEMENTED_FIELDS | RUN_ONLY_FIELDS <= names
    defaults = GPTConfig(vocab_size=VOCAB)
    changed = {f.name for f in fields(GPTConfig) if getattr(every_feature_config(VOCAB), f.name) != getattr(defaults, f.name)}
    assert IMPLEMENTED_FIELDS - changed <= {"vocab_size"}, "every implemented field must differ from its default here"


def test_logits_and_loss_match(exported):
    model, tokenizer, hf_model, _, _ = exported
    rows = [tokenizer.encode(t, prepend="<|bos|>")[:60] for t in (_training_text()[:400], _training_text()[5000:5400])]
    idx = torch.tensor(rows)
    assert idx.size(1) > 4 * model.config.short_window  # the short windows cut in
    with torch.no_grad():
        ours, theirs = model(idx), hf_model(idx).logits
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        our_loss = model(idx[:, :-1], idx[:, 1:])
        torch.testing.assert_close(hf_model(idx, labels=idx).loss, our_loss, rtol=1e-5, atol=1e-5)


def test_greedy_generate_matches_our_engine(exported):
    model, tokenizer, hf_model, _, _ = exported
    engine = Engine(model, tokenizer)
    stop = engine.tools.stop_ids
    prompts = [render_for_completion(tokenizer, CHAT), tokenizer.encode("To be, or not to be", prepend="<|bos|>")]
    for prompt in prompts:
        new = min(40, model.config.sequence_len - len(prompt))  # our engine stops at the context; HF's would go on
        seqs, _ = engine.generate_batch(prompt, max_tokens=new, temperature=0.0)
        ours = seqs[0][len(prompt):]
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)[0, len(prompt):].tolist()
        theirs = out[:next((i for i, t in enumerate(out) if t in stop), len(out))]
        assert tokenizer.encode_special("<|python_end|>") not in ours  # our calculator would change the rest
        assert theirs == ours and len(ours) > 2 * model.config.short_window  # decode steps past the window


def test_left_padded_batch_generates_what_each_prompt_does_alone(exported):
    _, tokenizer, hf_model, hf_tok, _ = exported
    texts = ["Now is the winter of our discontent", "O"]
    hf_tok.padding_side = "left"
    batch = hf_tok(texts, return_tensors="pt", padding=True)
    together = hf_model.generate(**batch, max_new_tokens=12, do_sample=False)[:, batch["input_ids"].size(1):]
    for row, text in zip(together.tolist(), texts):
        alone = hf_tok(text, return_tensors="pt")
        single = hf_model.generate(**alone, max_new_tokens=12, do_sample=False)[0, alone["input_ids"].size(1):]
        assert row[:len(single)] == single.tolist()


def test_left_padded_batch_has_each_prompts_logits_alone(exported):
    """The logits behind generate(): a token after padding has no previous token (smear, bigram table), as a
    prompt's first token alone has none. Padding is <|bos|>, so a reach over it would be a real (bos, bos) pair."""
    _, _, hf_model, hf_tok, _ = exported
    texts = ["Now is the winter of our discontent", "O"]
    hf_tok.padding_side = "left"
    batch = hf_tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        together = hf_model(**batch).logits
        for row, text in zip(together, texts):
            alone = hf_model(**hf_tok(text, return_tensors="pt")).logits[0]
            torch.testing.assert_close(row[-alone.size(0):], alone, rtol=1e-5, atol=1e-5)


def test_tokenizer_matches_ours(exported):
    _, tokenizer, _, hf_tok, _ = exported
    for text in (_training_text(), UNICODE):
        ids = tokenizer.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
        assert hf_tok(text)["input_ids"] == [tokenizer.get_bos_token_id()] + ids  # documents start with <|bos|>
        assert hf_tok.decode(ids) == text
    chat = hf_tok.apply_chat_template(CHAT["messages"][:-1] + CHAT["messages"][-1:], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
    assert chat == render_for_completion(tokenizer, CHAT)


def test_scalar_value_embed_gates_and_no_options(exported, tmp_path):
    """The other value-embedding gate, and a model of GPTConfig's defaults (a checkpoint of before the options)."""
    from transformers import AutoModelForCausalLM

    _, tokenizer, _, _, _ = exported
    idx = torch.tensor([tokenizer.encode(_training_text()[:300], prepend="<|bos|>")[:48]])
    for name, overrides in (("scalar", {"value_embed_gate": "scalar"}),
                            ("plain", {f.name: f.default for f in fields(GPTConfig) if f.name in (
                                "rope_base", "qk_scale", "smear", "backout", "value_embed_gate", "unet_skips",
                                "attn_gate", "bigram_embeds")})):
        model = random_gpt(every_feature_config(tokenizer.get_vocab_size(), **overrides))
        export_hf(model, tokenizer, tmp_path / name)
        hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / name, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf_model(idx).logits, model(idx), rtol=1e-5, atol=1e-5)


def test_bf16_export_stays_close(exported, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, tokenizer, _, _, _ = exported
    export_hf(model, tokenizer, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", trust_remote_code=True).eval()
    idx = torch.tensor([tokenizer.encode(_training_text()[:300], prepend="<|bos|>")[:48]])
    with torch.no_grad():
        ours, theirs = model(idx), hf_model(idx).logits
    assert theirs.dtype == torch.float32 and (theirs - ours).abs().max() < 0.1 * ours.abs().max()


def test_a_field_the_export_does_not_implement_is_refused(exported, tmp_path):
    model, tokenizer, _, _, _ = exported

    @dataclass
    class FutureConfig(GPTConfig):
        gated_mlp: bool = True  # a feature GPTConfig may gain

    with pytest.raises(ValueError, match=r"gated_mlp=True.*modeling_nanochat.py does not implement"):
        check_exportable({**asdict(model.config), "gated_mlp": True})
    future = random_gpt(model.config)
    future.config = FutureConfig(**asdict(model.config))
    with pytest.raises(ValueError, match="gated_mlp=True"):
        export_hf(future, tokenizer, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_export_dir_describes_itself(exported):
    model, tokenizer, _, _, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nanochat.NanochatForCausalLM"
    assert {k: config[k] for k in ("window_pattern", "short_window", "value_embeds", "softcap", "n_kv_head", "smear",
                                   "value_embed_gate", "smear_channels", "attn_gate", "attn_gate_channels")} == \
        {"window_pattern": "LS", "short_window": 8, "value_embeds": True, "softcap": 10.0, "n_kv_head": 2,
         "smear": True, "value_embed_gate": "input", "smear_channels": SMEAR_CHANNELS, "attn_gate": True,
         "attn_gate_channels": ATTN_GATE_CHANNELS}
    rows = 5 * model.config.padded_vocab_size  # every row of the table, padding included: the hash reads their number
    assert (config["bigram_embeds"], config["bigram_rows"], config["bigram_hash"]) == (True, rows, list(BIGRAM_HASH))
    assert not RUN_ONLY_FIELDS & set(config)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()]
