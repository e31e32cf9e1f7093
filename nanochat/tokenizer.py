"""Byte-level BPE tokenizer: trained with rustbpe, run with tiktoken.

Training and inference use different engines on purpose: rustbpe learns merges quickly from a stream
of texts, and tiktoken encodes with the same merges many times faster than a Python loop, with a
multi-threaded batch path for the data loader. What links them is the table of "mergeable ranks"
(token bytes -> id), which is also what we write to disk.

Ids: 0..255 are the raw bytes, then the learned merges in order, then the special tokens last, so
`vocab_size` counts everything and the model's embedding table has exactly that many rows.

Ordinary text never produces special tokens: `encode` treats a literal "<|bos|>" inside a document
as plain characters. Special tokens enter a sequence only through `prepend`/`append` or
`encode_special`, so untrusted text cannot forge conversation structure.
"""
from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from pathlib import Path

import tiktoken
import torch

from nanochat.common import get_base_dir

SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

# GPT-4's (cl100k) split pattern, except that digit runs are cut into chunks of 1-2 digits instead of
# 1-3. With a vocabulary ~3x smaller than GPT-4's, merges spent on the 1000 three-digit numbers are
# better spent on words; and shorter chunks give the model a more regular view of numbers.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

RANKS_FILE = "tokenizer.tiktoken"  # one "<base64 token bytes> <rank>" per line, as tiktoken's own files
META_FILE = "tokenizer.json"       # pattern, special tokens, vocab size
FORMAT_VERSION = 1


class Tokenizer:
    """A tiktoken `Encoding` plus the few conveniences the rest of nanochat needs."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN,
                 special_tokens: list[str] | None = None, name: str = "nanochat"):
        special_tokens = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise ValueError(f"mergeable ranks must be exactly the ids 0..{n - 1}, each once")
        self._special_ids = {tok: n + i for i, tok in enumerate(special_tokens)}
        self._mergeable_ranks = mergeable_ranks
        self._pattern = pattern
        self._enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                      special_tokens=self._special_ids)
        self._token_bytes: torch.Tensor | None = None
        self._pieces: list[bytes] | None = None
        self.directory: Path | None = None  # where `load` read it from (checkpoints copy it from there)

    # ---- training -------------------------------------------------------------------------------

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int = 32768) -> "Tokenizer":
        """Learn `vocab_size - len(SPECIAL_TOKENS) - 256` merges from a stream of documents.

        The stream is consumed once; rustbpe splits and counts chunks in parallel. If the text runs
        out of pairs to merge before the vocabulary is full, we raise instead of returning a smaller
        vocabulary than the model was configured for.
        """
        min_size = 256 + len(SPECIAL_TOKENS)
        if not isinstance(vocab_size, int) or vocab_size < min_size:
            raise ValueError(f"vocab_size={vocab_size!r} is too small: it must be an int >= {min_size} "
                             f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens); pass a larger vocab_size")
        import rustbpe  # training only: a machine that just loads a tokenizer (a GPU box, a server) needs no rustbpe
        target = vocab_size - len(SPECIAL_TOKENS)
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), target, pattern=SPLIT_PATTERN)
        ranks = {bytes(tok): rank for tok, rank in trainer.get_mergeable_ranks()}
        if len(ranks) != target:
            raise ValueError(f"the training text only allowed {len(ranks) - 256} merges, but vocab_size={vocab_size} "
                             f"needs {target - 256}; train on more text or lower vocab_size")
        return cls(ranks, SPLIT_PATTERN)

    # ---- persistence ----------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write plain-text files (no pickle): loading them can never run code."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n"
                 for tok, rank in sorted(self._mergeable_ranks.items(), key=lambda kv: kv[1])]
        meta = {"format_version": FORMAT_VERSION, "pattern": self._pattern,
                "special_tokens": list(self._special_ids), "vocab_size": self.get_vocab_size()}
        # write-then-rename, so an interrupted save never leaves a truncated file under the real name
        for name, text in ((RANKS_FILE, "".join(lines)), (META_FILE, json.dumps(meta, indent=2) + "\n")):
            tmp = directory / (name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, directory / name)

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        ranks_path, meta_path = directory / RANKS_FILE, directory / META_FILE
        for path in (ranks_path, meta_path):
            if not path.is_file():
                raise FileNotFoundError(f"no tokenizer file {path}; train one with `python -m scripts.tok_train`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            pattern, specials, vocab_size = meta["pattern"], meta["special_tokens"], meta["vocab_size"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{meta_path} is not a valid tokenizer description ({e}); "
                             f"re-run `python -m scripts.tok_train`") from e
        ranks: dict[bytes, int] = {}
        for lineno, line in enumerate(ranks_path.read_text(encoding="ascii").splitlines(), 1):
            if not line:
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{ranks_path}:{lineno} is not '<base64> <rank>' ({e}); "
                                 f"re-run `python -m scripts.tok_train`") from e
        tokenizer = cls(ranks, pattern, specials)
        tokenizer.directory = directory
        if tokenizer.get_vocab_size() != vocab_size:
            raise ValueError(f"{directory} is inconsistent: {META_FILE} says vocab_size={vocab_size} but the files "
                             f"hold {tokenizer.get_vocab_size()} tokens; re-run `python -m scripts.tok_train`")
        return tokenizer

    # ---- queries --------------------------------------------------------------------------------

    def get_vocab_size(self) -> int:
        return self._enc.n_vocab

    def get_special_tokens(self) -> list[str]:
        return list(self._special_ids)

    def mergeable_ranks(self) -> dict[bytes, int]:
        """Token bytes -> id of every ordinary token (a copy): what another BPE engine needs to reproduce ours."""
        return dict(self._mergeable_ranks)

    @property
    def pattern(self) -> str:
        """The regex that cuts text into chunks before BPE merges within each."""
        return self._pattern

    def get_bos_token_id(self) -> int:
        return self._special_ids["<|bos|>"]

    def encode_special(self, name: str) -> int:
        try:
            return self._special_ids[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(self._special_ids)}") from None

    def _as_id(self, token: int | str) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        if not 0 <= token < self.get_vocab_size():
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.get_vocab_size()})")
        return int(token)

    # ---- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Ids of `text` (a str), or of each text (a list: encoded in parallel by tiktoken's threads).

        `prepend`/`append` take an id or a special token's name, e.g. prepend="<|bos|>".
        Special-token strings inside the text are encoded as ordinary characters.
        """
        head = [self._as_id(prepend)] if prepend is not None else []
        tail = [self._as_id(append)] if append is not None else []
        if isinstance(text, str):
            return head + self._enc.encode_ordinary(text) + tail
        if isinstance(text, list):
            rows = self._enc.encode_ordinary_batch(text, num_threads=num_threads)
            if head or tail:
                rows = [head + row + tail for row in rows]
            return rows
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 come out as U+FFFD."""
        return self._enc.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The raw bytes of `ids` (special tokens as their names), with no UTF-8 repair."""
        return self._enc.decode_bytes(ids)

    def token_piece(self, token: int) -> bytes:
        """decode_bytes([token]) from a table built on first use. A streaming server decodes one token per
        call, and tiktoken releases the GIL in each call: its event-loop thread then waited for the
        scheduler thread once per token (~36 µs per call in benchmarks.web_host's profile at 32 clients)."""
        if self._pieces is None:
            self._pieces = [self._enc.decode_bytes([i]) for i in range(self.get_vocab_size())]
        return self._pieces[token]

    def token_bytes(self, device="cpu") -> torch.Tensor:
        """int32 [vocab_size]: UTF-8 byte length of each token, 0 for special tokens.

        Summing it over a sequence's targets gives the number of text bytes predicted, which turns a
        summed loss into bits per byte, a figure comparable across vocabularies.
        """
        if self._token_bytes is None:
            lengths = [0] * self.get_vocab_size()
            for tok, rank in self._mergeable_ranks.items():
                lengths[rank] = len(tok)
            self._token_bytes = torch.tensor(lengths, dtype=torch.int32)
        return self._token_bytes.to(device, copy=True)  # a copy: callers may modify theirs


def resolve_tokenizer_dir(directory: str | Path | None = None) -> Path:
    """`directory`, or the default <base_dir>/tokenizer when it is None or empty."""
    return Path(directory) if directory else get_base_dir() / "tokenizer"


def get_tokenizer(directory: str | Path | None = None) -> Tokenizer:
    """The trained tokenizer from `directory` (default <base_dir>/tokenizer)."""
    directory = resolve_tokenizer_dir(directory)
    if not (directory / RANKS_FILE).is_file():
        raise FileNotFoundError(f"no tokenizer in {directory}: train one first with `python -m scripts.tok_train` "
                                f"(or set NANOCHAT_BASE_DIR to the base dir that holds tokenizer/)")
    return Tokenizer.load(directory)
