"""Tokenizer: training, round trips, special tokens, batching, persistence, byte table, CLI scripts.

One small tokenizer (vocab 768, ~1.5 MB of the shared Wikipedia shards) is trained once per session.
Encodings are checked against a plain-Python BPE written here from the definition, so a wrong merge
order, split pattern or id layout in the tiktoken path shows up as a mismatch.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import regex
import torch

from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, get_tokenizer

PRETRAIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pretrain"
VOCAB = 768

pytestmark = pytest.mark.skipif(not (PRETRAIN / "shard_00000.parquet").is_file(),
                                reason=f"shared pretraining shards not found at {PRETRAIN}")


def read_docs(path: Path, max_chars: int) -> list[str]:
    docs, total = [], 0
    for text in pq.ParquetFile(path).read_row_group(0, columns=["text"]).column("text").to_pylist():
        docs.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return docs


@pytest.fixture(scope="session")
def train_docs() -> list[str]:
    return read_docs(PRETRAIN / "shard_00000.parquet", 1_500_000)


@pytest.fixture(scope="session")
def heldout_docs() -> list[str]:
    return read_docs(PRETRAIN / "shard_00006.parquet", 200_000)


@pytest.fixture(scope="session")
def tok(train_docs) -> Tokenizer:
    return Tokenizer.train_from_iterator(iter(train_docs), vocab_size=VOCAB)


def reference_encode(tok: Tokenizer, text: str) -> list[int]:
    """Textbook byte-level BPE: split with the pattern, then in each chunk merge the lowest-ranked
    adjacent pair until none is in the vocabulary."""
    ranks = {tok.decode_bytes([i]): i for i in range(tok.get_vocab_size() - len(SPECIAL_TOKENS))}
    out = []
    for chunk in regex.findall(SPLIT_PATTERN, text):
        parts = [bytes([b]) for b in chunk.encode("utf-8")]
        while len(parts) > 1:
            pairs = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
            pairs = [p for p in pairs if p[0] is not None]
            if not pairs:
                break
            _, i = min(pairs)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        out.extend(ranks[p] for p in parts)
    return out


def random_unicode(rng: random.Random, n: int) -> str:
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"()[]{}<>|-_+=*/\\@#$%^&~`",
        "".join(chr(c) for c in range(0x00, 0x20)) + "\x7f\x85\u2028\u2029\u00a0\u200b\ufeff \t\r\n",
        "".join(chr(c) for c in range(0xC0, 0x250)),            # Latin-1 and Latin Extended
        "".join(chr(c) for c in range(0x4E00, 0x4E00 + 400)),   # CJK
        "".join(chr(c) for c in range(0x0400, 0x0450)) + "αβγδεζηθλμπσω",
        "😀😂🥲👍🏽🚀🇫🇷👩‍👩‍👧\u200d\ufe0f\U0001F9EA\U0010FFFD",  # emoji, ZWJ, flags, skin tones, plane 16
        "\u0301\u0308\u0327é\u0065\u0301",                     # combining marks
        "<|bos|><|user_start|><|assistant_end|>",              # special-token text as plain text
    ]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


# ---- training and layout ---------------------------------------------------------------------------

def test_vocab_size_and_id_layout(tok):
    assert tok.get_vocab_size() == VOCAB
    special_ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert special_ids == list(range(VOCAB - len(SPECIAL_TOKENS), VOCAB))
    assert tok.get_bos_token_id() == tok.encode_special("<|bos|>") == VOCAB - len(SPECIAL_TOKENS)
    assert [tok.decode_bytes([i]) for i in range(256)] == [bytes([i]) for i in range(256)]


def test_token_piece_is_each_tokens_bytes(tok):
    """The streaming server's per-token table holds decode_bytes of every id, special tokens included."""
    ids = range(tok.get_vocab_size())
    assert [tok.token_piece(i) for i in ids] == [tok.decode_bytes([i]) for i in ids]
    assert tok.token_piece(tok.get_bos_token_id()) == b"<|bos|>"


def test_matches_reference_bpe(tok, heldout_docs):
    rng = random.Random()
    text = heldout_docs[0][:3000] + random_unicode(rng, 300) + " 1234567 3.14159 2024-05-09"
    assert tok.encode(text) == reference_encode(tok, text)


def test_digits_are_grouped_by_at_most_two(tok):
    ordinary = range(VOCAB - len(SPECIAL_TOKENS))
    assert not [i for i in ordinary if regex.search(rb"[0-9]{3}", tok.decode_bytes([i]))]
    assert regex.findall(SPLIT_PATTERN, "in 12345 years") == ["in", " ", "12", "34", "5", " years"]
    assert all(len(tok.decode([i])) <= 2 for i in tok.encode("3141592653589793"))


def test_training_is_deterministic(tok, train_docs):
    again = Tokenizer.train_from_iterator(train_docs, vocab_size=VOCAB)
    text = " ".join(train_docs[:3])
    assert again.encode(text) == tok.encode(text)


@pytest.mark.parametrize("vocab_size", [0, 100, 256, 256 + len(SPECIAL_TOKENS) - 1])
def test_too_small_vocab_is_rejected(vocab_size):
    with pytest.raises(ValueError, match="vocab_size.*too small"):
        Tokenizer.train_from_iterator(["hello world"], vocab_size=vocab_size)


def test_minimal_vocab_has_only_bytes_and_specials():
    tok = Tokenizer.train_from_iterator(["hello world"], vocab_size=256 + len(SPECIAL_TOKENS))
    assert tok.get_vocab_size() == 265
    assert tok.encode("hi") == [ord("h"), ord("i")]


def test_too_little_text_for_the_vocab_is_rejected():
    with pytest.raises(ValueError, match="train on more text or lower vocab_size"):
        Tokenizer.train_from_iterator(["ab ab ab"], vocab_size=1000)


# ---- round trips -----------------------------------------------------------------------------------

def test_round_trip_random_unicode(tok):
    rng = random.Random()
    texts = [random_unicode(rng, rng.randint(1, 400)) for _ in range(200)]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_round_trip_real_text(tok, heldout_docs):
    for doc in heldout_docs:
        assert tok.decode(tok.encode(doc)) == doc


def test_lone_surrogate_becomes_replacement_char(tok):
    # not valid Unicode, so it cannot be UTF-8 encoded; tiktoken substitutes U+FFFD rather than failing
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


# ---- special tokens --------------------------------------------------------------------------------

def test_special_tokens_are_single_ids(tok):
    for name in SPECIAL_TOKENS:
        i = tok.encode_special(name)
        assert tok.decode([i]) == name
        assert tok.token_bytes()[i] == 0


def test_special_token_text_is_plain_text(tok):
    specials = set(range(VOCAB - len(SPECIAL_TOKENS), VOCAB))
    for name in SPECIAL_TOKENS:
        text = f"before {name} after{name}"
        ids = tok.encode(text)
        assert not specials & set(ids)
        assert tok.decode(ids) == text
    batch = tok.encode(["<|bos|>", "x<|assistant_end|>"])
    assert not specials & {i for row in batch for i in row}


def test_unknown_special_token(tok):
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|nope|>")
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode("x", prepend="<|nope|>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("x", append=VOCAB)


def test_prepend_append(tok):
    body = tok.encode("Hello there")
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    assert tok.encode("Hello there", prepend="<|bos|>") == [bos] + body
    assert tok.encode("Hello there", prepend=bos, append=end) == [bos] + body + [end]
    assert tok.encode("Hello there", append="<|assistant_end|>") == body + [end]
    assert tok.encode("", prepend=bos, append=bos) == [bos, bos]


def test_batch_equals_single(tok, heldout_docs):
    rng = random.Random()
    texts = heldout_docs[:20] + [random_unicode(rng, 50) for _ in range(20)] + [""]
    rng.shuffle(texts)
    singles = [tok.encode(t, prepend="<|bos|>") for t in texts]
    assert tok.encode(texts, prepend="<|bos|>", num_threads=4) == singles
    assert tok.encode(texts, prepend="<|bos|>", num_threads=1) == singles
    assert tok.encode([]) == []
    with pytest.raises(TypeError, match="str or a list of str"):
        tok.encode(("a", "b"))


# ---- byte table ------------------------------------------------------------------------------------

def test_token_bytes_matches_decode(tok, heldout_docs):
    tb = tok.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (VOCAB,) and tb.device.type == "cpu"
    for i in range(VOCAB - len(SPECIAL_TOKENS)):
        assert tb[i] == len(tok.decode_bytes([i])) > 0
    rng = random.Random()
    for text in heldout_docs[:10] + [random_unicode(rng, 300) for _ in range(20)]:
        ids = tok.encode(text, prepend="<|bos|>", append="<|output_end|>")
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))


# ---- persistence -----------------------------------------------------------------------------------

def test_save_load_round_trip(tok, heldout_docs, tmp_path):
    tok.save(tmp_path / "tok")
    files = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert files == ["tokenizer.json", "tokenizer.tiktoken"]
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert meta["special_tokens"] == SPECIAL_TOKENS and meta["vocab_size"] == VOCAB
    loaded = Tokenizer.load(tmp_path / "tok")
    rng = random.Random()
    texts = heldout_docs[:10] + [random_unicode(rng, 200) for _ in range(10)]
    assert loaded.encode(texts, prepend="<|bos|>") == tok.encode(texts, prepend="<|bos|>")
    assert torch.equal(loaded.token_bytes(), tok.token_bytes())
    assert loaded.get_vocab_size() == VOCAB


def test_loading_and_encoding_need_no_rustbpe(tok, tmp_path):
    """rustbpe only trains: a GPU box or a server without it still loads and runs a saved tokenizer."""
    import subprocess
    import sys
    tok.save(tmp_path / "tok")
    code = ("import sys; sys.modules['rustbpe'] = None\n"  # any `import rustbpe` now raises ImportError
            "from nanochat.tokenizer import Tokenizer\n"
            f"print(Tokenizer.load({str(tmp_path / 'tok')!r}).encode('hello world'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == str(tok.encode("hello world"))


def test_load_rejects_damaged_files(tok, tmp_path):
    tok.save(tmp_path)
    ranks = tmp_path / "tokenizer.tiktoken"
    good = ranks.read_text()
    ranks.write_text(good + "not-base64!! 99999\n")
    with pytest.raises(ValueError, match="tokenizer.tiktoken:"):
        Tokenizer.load(tmp_path)
    ranks.write_text("\n".join(good.splitlines()[:-1]) + "\n")  # a rank missing
    with pytest.raises(ValueError, match="0..|inconsistent"):
        Tokenizer.load(tmp_path)
    ranks.write_text(good)
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_get_tokenizer_from_base_dir(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        get_tokenizer()
    tok.save(tmp_path / "tokenizer")
    assert get_tokenizer().encode("Hello world!") == tok.encode("Hello world!")
    assert get_tokenizer(tmp_path / "tokenizer").get_vocab_size() == VOCAB


# ---- scripts ---------------------------------------------------------------------------------------

def test_tok_train_and_eval_scripts(train_docs, heldout_docs, tmp_path, capsys, monkeypatch):
    from scripts import tok_eval, tok_train

    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"text": train_docs}), data / "shard_00000.parquet", row_group_size=64)
    pq.write_table(pa.table({"text": heldout_docs}), data / "shard_00001.parquet", row_group_size=64)

    docs = list(tok_train.iter_texts(data, max_chars=50_000, doc_cap=1000))
    assert sum(map(len, docs)) == 50_000 and max(map(len, docs)) <= 1000
    assert docs[0] == train_docs[0][:1000]

    out = tmp_path / "tok"
    result = tok_train.main(["--data_dir", str(data), "--max_chars", "400000", "--vocab_size", "600",
                             "--out_dir", str(out)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result and last["vocab_size"] == 600 and last["chars"] == 400_000
    assert Tokenizer.load(out).get_vocab_size() == 600

    summary = tok_eval.main(["--tokenizer_dir", str(out), "--data_dir", str(data), "--num_docs", "5",
                             "--no-compare"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == summary and summary["comparison_skipped"] is None
    ratio = summary["bytes_per_token"]["val:shard_00001.parquet"]["ours"]
    assert 1.5 < ratio < 6  # a 600-token vocab compresses English text well above 1 byte per token

    # reference encodings: "gpt2" stands in as our own encoding, "cl100k_base" cannot be fetched
    def fake_get_encoding(name):
        if name == "gpt2":
            return Tokenizer.load(out)._enc
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tok_eval.tiktoken, "get_encoding", fake_get_encoding)
    summary = tok_eval.main(["--tokenizer_dir", str(out), "--data_dir", str(data), "--num_docs", "5"])
    printed = capsys.readouterr().out
    assert "gpt2/cl100k comparison skipped: encoding files cannot be fetched offline (cl100k_base: " \
           "ConnectionError" in printed
    for row in summary["bytes_per_token"].values():
        assert row["gpt2"] == row["ours"] and "cl100k_base" not in row

    with pytest.raises((FileNotFoundError, ValueError), match="missing"):
        list(tok_train.iter_texts(tmp_path / "missing", max_chars=10))
