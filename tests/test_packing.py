"""PackedLoader: determinism, exact resume, packing invariants, rank sharding, real tokenizer."""
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.data.packing import PackedLoader

BOS = 0


class NumberTokenizer:
    """Stand-in tokenizer: a text is space-separated token ids. Each test document holds ids that say
    which document and which position they are (doc * 10_000 + k), so any row can be traced back."""

    def get_bos_token_id(self) -> int:
        return BOS

    def encode(self, texts, prepend=None, num_threads=1):
        return [[prepend] + [int(w) for w in t.split()] for t in texts]


def doc_text(doc: int, length: int) -> str:
    return " ".join(str(doc * 10_000 + k + 1) for k in range(length))


def write_shards(tmp_path, num_files=3, docs_per_file=40, row_group=8, max_len=150, seed=0):
    """Parquet shards of numbered docs with random lengths (some longer than a row); returns doc lengths."""
    rng = random.Random(seed)
    lengths, doc = {}, 1
    for f in range(num_files):
        texts = []
        for _ in range(docs_per_file):
            lengths[doc] = rng.choice([rng.randint(1, 20), rng.randint(1, max_len)])
            texts.append(doc_text(doc, lengths[doc]))
            doc += 1
        pq.write_table(pa.table({"text": texts}), tmp_path / f"shard_{f:05d}.parquet", row_group_size=row_group)
    return lengths


def take(loader, n):
    return [tuple(t.clone() for t in next(loader)) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def make(tmp_path, **kw):
    args = dict(tokenizer=NumberTokenizer(), data_dir=tmp_path, split="train", batch_size=4, seq_len=32,
                device="cpu", buffer_size=16, tokenizer_batch_size=5, split_long_docs=False)
    args.update(kw)
    return PackedLoader(**args)


def test_determinism_with_and_without_prefetch(tmp_path):
    write_shards(tmp_path)
    a = take(make(tmp_path, prefetch=0), 12)
    b = take(make(tmp_path, prefetch=3), 12)
    assert_same(a, b)
    assert a[0][0].dtype == torch.int64 and a[0][0].shape == (4, 32)


@pytest.mark.parametrize("k", [0, 1, 5, 40])  # 40 batches run past the end of an epoch
@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_gives_exactly_the_next_batches(tmp_path, k, prefetch):
    write_shards(tmp_path, num_files=3, docs_per_file=20)
    loader = make(tmp_path, prefetch=prefetch)
    take(loader, k)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = take(loader, 3)
    resumed = make(tmp_path, state=state, prefetch=prefetch)
    assert_same(take(resumed, 3), expected)
    assert resumed.state_dict()["batches"] == k + 3
    if k == 40:
        assert state["position"]["epoch"] >= 1
    assert len(json.dumps(state)) < 4000


def test_worker_error_reaches_the_caller(tmp_path):
    write_shards(tmp_path)

    class Broken(NumberTokenizer):
        def encode(self, texts, prepend=None, num_threads=1):
            raise RuntimeError("tokenizer exploded")

    loader = make(tmp_path, tokenizer=Broken(), prefetch=2)
    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        next(loader)
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_resume_from_gathered_rank_states(tmp_path):
    write_shards(tmp_path)
    loaders = [make(tmp_path, rank=r, world_size=2, prefetch=0) for r in range(2)]
    for loader in loaders:
        take(loader, 3)
    gathered = json.loads(json.dumps({"ranks": [loader.state_dict() for loader in loaders]}))
    for r, loader in enumerate(loaders):
        assert_same(take(make(tmp_path, rank=r, world_size=2, state=gathered, prefetch=0), 2), take(loader, 2))
    # rank 0's state alone still lets rank 1 go on (approximately, with a warning)
    x, _ = next(make(tmp_path, rank=1, world_size=2, state=gathered["ranks"][0], prefetch=0))
    assert (x[:, 0] == BOS).all()


def test_resume_rejects_other_settings(tmp_path):
    write_shards(tmp_path)
    loader = make(tmp_path)
    take(loader, 2)
    with pytest.raises(ValueError, match="seq_len"):
        make(tmp_path, seq_len=64, state=loader.state_dict())


def test_packing_invariants_and_cropped_fraction(tmp_path):
    docs_per_file, row_group = 100, 8
    lengths = write_shards(tmp_path, num_files=4, docs_per_file=docs_per_file, row_group=row_group)
    seq_len = 48
    loader = make(tmp_path, seq_len=seq_len, buffer_size=12, prefetch=0)
    seen, bos_only, emitted = set(), 0, 0
    for x, y in take(loader, 25):
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
        rows = torch.cat([x, y[:, -1:]], dim=1)  # the T+1 row
        for row in rows.tolist():
            assert row[0] == BOS  # every row starts at a document start
            emitted += len(row)
            starts = [i for i, t in enumerate(row) if t == BOS] + [len(row)]
            for s, e in zip(starts, starts[1:]):
                body = row[s + 1:e]
                if not body:  # a document cropped to its BOS to fill the last slot of a row
                    assert e == len(row)
                    bos_only += 1
                    continue
                doc = body[0] // 10_000
                assert doc not in seen, "a document is packed at most once per epoch"
                seen.add(doc)
                # the document appears from its start, whole or cropped (only its tail is lost)
                assert body == [doc * 10_000 + k + 1 for k in range(len(body))]
                if len(body) < lengths[doc]:
                    assert e == len(row) or len(body) + 1 == seq_len + 1, \
                        "only a row's last document, or one longer than a row, is cropped"
    # The documents that left the buffer = those read minus those still pending; their tokens are
    # exactly the emitted ones plus the cropped ones: nothing else is lost.
    state = loader.state_dict()
    pos = state["position"]
    assert pos["epoch"] == 0 and all(p[0] == 0 for p in state["pending"])
    read = pos["shard"] * docs_per_file + pos["row_group"] * row_group + pos["row"]
    pending = {sh * docs_per_file + rg * row_group + r + 1 for _, sh, rg, rows in state["pending"] for r, _ in rows}
    consumed = set(range(1, read + 1)) - pending
    assert seen <= consumed and len(consumed - seen) == bos_only
    cropped = sum(lengths[d] + 1 for d in consumed) - emitted
    assert cropped > 0
    assert loader.cropped_fraction == pytest.approx(cropped / (emitted + cropped), rel=1e-12)
    assert any(lengths[d] + 1 > seq_len + 1 for d in seen)  # some documents were longer than a row


def test_data_epoch_is_the_newest_pass_packed(tmp_path):
    """`data_epoch` is the newest pass (the epoch in the ids) of the documents in the batches handed out: 0 until a
    document read a second time is packed, then 1; a resumed loader reports the same."""
    write_shards(tmp_path, num_files=2, docs_per_file=16, row_group=8, max_len=30)  # train: shard 0, 16 documents
    loader = make(tmp_path, batch_size=2, seq_len=32, buffer_size=4, tokenizer_batch_size=4, prefetch=0)
    assert loader.data_epoch == 0
    packed: set[int] = set()
    while loader.data_epoch == 0:
        x, y = next(loader)
        docs = {t // 10_000 for t in torch.cat([x, y[:, -1:]], dim=1).flatten().tolist() if t != BOS}
        assert not packed & docs or loader.data_epoch == 1, "a document came back while data_epoch said 0"
        packed |= docs
    assert len(packed) >= 16 - 4  # the first pass went by, but for what the buffer (4 documents) held
    resumed = make(tmp_path, batch_size=2, seq_len=32, buffer_size=4, tokenizer_batch_size=4, prefetch=0,
                   state=loader.state_dict())
    assert resumed.data_epoch == 1


def segments(row):
    """[(doc, tokens incl. BOS)] of a row of NumberTokenizer documents."""
    starts = [i for i, t in enumerate(row) if t == BOS] + [len(row)]
    return [(row[s + 1] // 10_000 if e > s + 1 else None, e - s) for s, e in zip(starts, starts[1:])]


def test_best_fit_choice(tmp_path):
    # documents of 7, 5, 4, 3 and 2 tokens (BOS included), rows of 10: the best fit for 10 is 7 + 3,
    # where first-fit would take 7 and crop the 5.
    texts = [doc_text(d, n - 1) for d, n in zip(range(1, 6), [7, 5, 4, 3, 2])]
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["1"]}), tmp_path / "b.parquet")
    x, y = next(make(tmp_path, batch_size=3, seq_len=9, buffer_size=5, tokenizer_batch_size=5, prefetch=0))
    rows = torch.cat([x, y[:, -1:]], dim=1).tolist()
    assert segments(rows[0]) == [(1, 7), (4, 3)]
    assert segments(rows[1]) == [(1, 7), (4, 3)]  # the next epoch's copies, as the data loops
    assert segments(rows[2]) == [(2, 5), (2, 5)]


def test_rank_sharding_splits_the_documents(tmp_path):
    write_shards(tmp_path, num_files=3, docs_per_file=24, max_len=5)
    docs = []
    for rank in range(2):
        loader = make(tmp_path, rank=rank, world_size=2, batch_size=2, seq_len=16, prefetch=0)
        got = set()
        for x, y in take(loader, 30):
            rows = torch.cat([x, y[:, -1:]], dim=1)
            got |= {t // 10_000 for t in rows.flatten().tolist() if t != BOS}
        docs.append(got)
    # row group g (8 docs; numbered across the two training files) belongs to rank g % 2
    expected = [{d for d in range(1, 49) if (d - 1) // 8 % 2 == rank} for rank in range(2)]
    for rank in range(2):
        assert docs[rank] <= expected[rank] and len(docs[rank]) > len(expected[rank]) // 2


def test_val_split_reads_only_the_last_shard(tmp_path):
    write_shards(tmp_path, num_files=3, docs_per_file=10)
    x, y = next(make(tmp_path, split="val", prefetch=0))
    docs = {t // 10_000 for t in x.flatten().tolist() if t != BOS}
    assert docs and all(21 <= d <= 30 for d in docs)


def random_texts(n, seed):
    """Short documents with newlines, blank lines, indents, digits, quotes and non-ASCII in odd places."""
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "über", "naïve", "dog", "ran", "42", "zebra", "!", "'ll",
             "\n", "\n\n", "\n  ", " \n", "\r\n", "\n1", "\t", "x\n", ";\n", "東京", "\n\nThe", "...", "2024"]
    return ["".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(3, 200)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def small_tokenizer():
    from nanochat.tokenizer import Tokenizer

    return Tokenizer.train_from_iterator(random_texts(500, 0), vocab_size=300)


def test_text_head_tokens_are_a_prefix_of_the_whole_text(small_tokenizer):
    from nanochat.data.packing import text_head

    texts = random_texts(300, 2)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain" / "shard_00006.parquet"
    if shared.is_file():  # real Wikipedia text: paragraphs, lists, tables
        texts += pq.ParquetFile(shared).read_row_group(0, columns=["text"]).column(0).to_pylist()[:60]
    cuts = 0
    for text in texts:
        whole = small_tokenizer.encode(text)
        for min_chars in (1, 20, 100, 1000):
            head = text_head(text, min_chars)
            assert text.startswith(head) and (len(head) >= min_chars or head == text)
            tokens = small_tokenizer.encode(head)
            assert whole[:len(tokens)] == tokens
            cuts += head != text
    assert cuts > 100


def test_head_cut_changes_nothing(tmp_path, small_tokenizer, monkeypatch):
    from nanochat.data import packing

    texts = random_texts(120, 3)
    for f in range(2):
        pq.write_table(pa.table({"text": texts[f * 60:(f + 1) * 60]}), tmp_path / f"s{f}.parquet", row_group_size=9)
    args = (small_tokenizer, tmp_path, "train", 3, 24, "cpu")
    fast = PackedLoader(*args, buffer_size=10, prefetch=0)
    batches = take(fast, 15)
    monkeypatch.setattr(packing, "HEAD_CHARS_PER_TOKEN", 10**9)  # tokenize every text whole
    slow = PackedLoader(*args, buffer_size=10, prefetch=0)
    assert_same(batches, take(slow, 15))
    assert fast.cropped_fraction == pytest.approx(slow.cropped_fraction, rel=0.1)


@pytest.mark.parametrize("split", [False, True])
def test_real_tokenizer(tmp_path, small_tokenizer, split):
    tok = small_tokenizer
    texts = random_texts(200, 1)
    for f in range(2):
        pq.write_table(pa.table({"text": texts[f * 100:(f + 1) * 100]}), tmp_path / f"s{f}.parquet",
                       row_group_size=25)
    loader = PackedLoader(tok, tmp_path, "train", 2, 64, "cpu", buffer_size=20, prefetch=1, split_long_docs=split)
    bos = tok.get_bos_token_id()
    for x, y in take(loader, 5):
        assert (x[:, 0] == bos).all() and torch.equal(x[:, 1:], y[:, :-1])
        for row in x.tolist():
            starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
            for s, e in zip(starts, starts[1:]):
                piece = tok.decode(row[s + 1:e]).strip("\ufffd")  # a cut may split a UTF-8 char
                if split:  # a piece of a training doc
                    assert any(piece in t for t in texts[:100])
                else:  # a training doc, from its start
                    assert any(t.startswith(piece) for t in texts[:100])


class LineNumberTokenizer(NumberTokenizer):
    """NumberTokenizer whose every 7th id ends a line, for splitting (ids stay traceable to doc and position)."""

    def get_vocab_size(self) -> int:
        return 10_000 * 130

    def token_piece(self, token: int) -> bytes:
        return f" {token}".encode() + (b"\n" if token % 7 == 0 else b"")


@pytest.mark.parametrize("k", [0, 3, 40])
def test_split_resume_gives_exactly_the_next_batches(tmp_path, k):
    write_shards(tmp_path, num_files=3, docs_per_file=20)
    loader = make(tmp_path, tokenizer=LineNumberTokenizer(), split_long_docs=True, prefetch=0)
    take(loader, k)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = take(loader, 3)
    resumed = make(tmp_path, tokenizer=LineNumberTokenizer(), split_long_docs=True, prefetch=0, state=state)
    assert_same(take(resumed, 3), expected)
    with pytest.raises(ValueError, match="split_long_docs"):
        make(tmp_path, state=state)


def test_split_pieces_fit_rows_cut_at_lines_and_lose_nothing(tmp_path):
    lengths = write_shards(tmp_path, num_files=3, docs_per_file=80, max_len=150)  # one epoch outlasts 12 batches
    seq_len = 32
    loader = make(tmp_path, tokenizer=LineNumberTokenizer(), split_long_docs=True, seq_len=seq_len, prefetch=0,
                  batch_size=8)
    got: dict[int, list[int]] = {}
    for x, y in take(loader, 12):
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            starts = [i for i, t in enumerate(row) if t == BOS] + [len(row)]
            for s, e in zip(starts, starts[1:]):
                body = row[s + 1:e]
                if body:
                    got.setdefault(body[0] // 10_000, []).append(body)
    for doc, pieces in got.items():
        tokens = sorted(t for p in pieces for t in p)
        assert len(tokens) == len(set(tokens))  # no token twice
        for p in pieces:
            assert p == list(range(p[0], p[0] + len(p)))  # each piece is a run of the document
            if p[-1] % 10_000 != lengths[doc] and len(p) > seq_len // 2:  # not the doc's end, not a fill crop
                assert p[-1] % 7 == 0 or len(p) == seq_len, "cut after a line end, or at a full row"
    assert any(lengths[d] > seq_len for d in got)
    cropping = make(tmp_path, seq_len=seq_len, prefetch=0, batch_size=8)  # the same data without splitting
    take(cropping, 12)
    assert loader.cropped_fraction < cropping.cropped_fraction / 2


def test_split_document_on_real_text_joins_back_byte_for_byte():
    import numpy as np

    from nanochat.data.packing import cut_classes, split_document
    from nanochat.tokenizer import Tokenizer
    from tests.helpers_base_train import real_texts

    tok = Tokenizer.train_from_iterator(real_texts(200, offset=1000), vocab_size=512)
    classes = cut_classes(tok)
    for text in real_texts(8, offset=50):
        tokens = np.asarray(tok.encode(text), dtype=np.int32)
        for limit in (64, 257, 2047):
            pieces = split_document(tokens, limit, classes)
            assert all(0 < len(p) <= limit for p in pieces)
            assert np.array_equal(np.concatenate(pieces), tokens)
            assert b"".join(tok.decode_bytes(p.tolist()) for p in pieces) == text.encode()
            ends = [tok.decode_bytes(p[-1:].tolist()) for p in pieces[:-1]]
            hard = [e for e in ends if not e.endswith((b"\n", b".", b"!", b"?"))]
            if limit == 2047:  # Wikipedia's paragraphs are shorter than that: every cut is at a line end
                assert all(e.endswith(b"\n") for e in ends)
            elif limit == 257:  # a few paragraphs are longer: then sentence ends, rarely a hard cut
                assert len(hard) <= len(ends) // 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu(tmp_path):
    write_shards(tmp_path)
    cpu = take(make(tmp_path, prefetch=0), 6)
    gpu = take(make(tmp_path, device="cuda", prefetch=2), 6)
    assert all(x.is_cuda and x.dtype == torch.int64 and x.is_contiguous() for x, _ in gpu)
    assert_same(cpu, [(x.cpu(), y.cpu()) for x, y in gpu])
