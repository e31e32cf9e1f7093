"""text_bpb, the race's shared bits-per-byte routine, against hand computations."""
import math

import pytest
import torch

from nanochat.eval.bpb import text_bpb

TEXTS = ["Hello world.\nA second line.", "naïve café — 東京", "x"]
BOS = 1000


def byte_encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def pair_encode(text: str) -> list[int]:
    """A second 'tokenizer': two bytes per token (a lone last byte alone), ids 256 + 256 * a + b."""
    data = text.encode("utf-8")
    return [data[i] if i + 1 == len(data) else 256 + 256 * data[i] + data[i + 1] for i in range(0, len(data), 2)]


def token_len(t: int) -> int:
    return 1 if t < 256 else 2


@pytest.mark.parametrize("seq_len,batch_size", [(4, 1), (7, 3), (64, 8)])
def test_uniform_model_gives_log2_of_its_vocab(seq_len, batch_size):
    """A byte-level model that is uniform over 257 symbols: every byte costs ln 257 nats, whatever the rows."""
    uniform = lambda x, y: torch.full(y.shape, math.log(257.0))
    got = text_bpb(uniform, byte_encode, BOS, TEXTS, seq_len, batch_size, "cpu")
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert got["bytes"] == n_bytes and got["tokens"] == n_bytes  # BOS targets are left out, every byte once
    assert got["bpb"] == pytest.approx(math.log2(257.0))


@pytest.mark.parametrize("seq_len", [3, 16])
def test_same_loss_per_byte_is_the_same_bpb_under_two_tokenizers(seq_len):
    """A model that pays 0.3 nats per byte of each target token: bpb = 0.3 / ln 2 for both tokenizers,
    though one needs half as many tokens; a BOS target would add 5 nats if it were counted."""
    def loss(x, y):
        per = torch.tensor([0.3 * token_len(t) for t in y.flatten().tolist()]).view(y.shape)
        return torch.where(y == BOS, torch.tensor(5.0), per)

    by_bytes = text_bpb(loss, byte_encode, BOS, TEXTS, seq_len, 2, "cpu")
    by_pairs = text_bpb(loss, pair_encode, BOS, TEXTS, seq_len, 2, "cpu")
    assert by_pairs["tokens"] < by_bytes["tokens"]
    assert by_bytes["bpb"] == pytest.approx(0.3 / math.log(2)) and by_pairs["bpb"] == pytest.approx(0.3 / math.log(2))


def test_rows_overlap_by_one_and_carry_the_context():
    """Each row's inputs start with the previous row's last target; padding targets are -1."""
    seen = []

    def record(x, y):
        seen.append((x.clone(), y.clone()))
        return torch.zeros(y.shape)

    text_bpb(record, byte_encode, BOS, ["abcdefg"], 3, 1, "cpu")  # stream: BOS a b c d e f g (8 tokens)
    rows = [(x.tolist()[0], y.tolist()[0]) for x, y in seen]
    assert rows == [([BOS, 97, 98], [97, 98, 99]), ([99, 100, 101], [100, 101, 102]), ([102, 103, 0], [103, -1, -1])]


def test_empty_text_is_an_error():
    with pytest.raises(ValueError, match="no bytes"):
        text_bpb(lambda x, y: torch.zeros(y.shape), byte_encode, BOS, [""], 4, 1, "cpu")
