"""BOS-aligned best-fit packing of documents into rows of T+1 tokens, on the device, resumable.

Every document is tokenized with BOS in front, and every row starts at a document start, so the model
never sees a row that begins mid-document. Rows are filled best-fit from a buffer of tokenized
documents: the largest one that fits the space left goes in; when none fits, the shortest one is
cropped to fill the row exactly (no padding: every position trains).

A document longer than a row is split (`split_long_docs`, the default) into pieces of at most a row,
each with its own BOS: cut after a line end in the second half of the piece where there is one, else
after a sentence end, else after any line or sentence end, else at the row's length. The pieces are
the document's own tokens, so they join back to it byte for byte. Without splitting, such a document
is cropped to one row and its tail is lost: on Wikipedia at T=2048 that drops ~63% of the tokens.
Cropping to fill a row is then the only way tokens are lost; `cropped_fraction` reports how many.
The stream loops over the shards; `data_epoch` says when the batches start repeating documents.

Exact resume: the packer is a deterministic function of (stream position, buffer contents). The state
holds the stream position after the last refill and the ids (epoch, shard, row group, row, piece) of
the pieces still in the buffer; a new loader re-reads, re-tokenizes and re-splits those few hundred
documents and then continues, producing exactly the batches the old loader would have. Ids are grouped
by row group, so the state is a few KB of JSON. Batch size is not part of it (rows are made one at a
time), so a resume may change it; sequence length, splitting, buffer size, tokenizer batch, rank and
world size may not. Under DDP each rank has its own state: gather them (e.g. `dist.all_gather_object`)
and pass `{"ranks": [state_0, state_1, ...]}`; each loader picks its own.
"""
from __future__ import annotations

import bisect
import queue
import threading
import weakref
from pathlib import Path

import numpy as np
import torch

from nanochat.common import logger
from nanochat.data.shards import DocId, DocumentStream, list_shards, split_shards

STATE_VERSION = 2  # 2: pieces of split documents; 1 (whole documents) resumes with split_long_docs=False
HEAD_CHARS_PER_TOKEN = 6  # English runs ~4-5 chars per token; a head this long nearly always fills a row
_AFTER_ALL = float("inf")  # sorts after any (epoch, group, row, piece) of the same length
LINE_END, SENTENCE_END, SPACE_START = 1, 2, 4  # cut classes of a token (bits): see cut_classes


def text_head(text: str, min_chars: int) -> str:
    """The shortest prefix of `text` with at least `min_chars` chars that ends just after a newline
    followed by a letter or digit (the whole text if there is none).

    With a GPT-4-style split pattern no pre-token spans such a cut (a newline run ends its piece before
    a letter or digit, and nothing before it looks past it), so the prefix encodes to exactly the first
    tokens of the whole text; tests/test_packing.py checks this on real text with the real tokenizer.
    """
    i = text.find("\n", max(0, min_chars - 1))
    while i != -1 and i + 1 < len(text):
        if text[i + 1].isalnum():
            return text[:i + 1]
        i = text.find("\n", i + 1)
    return text


def cut_classes(tokenizer) -> np.ndarray:
    """uint8 per token id, the bits: LINE_END (its bytes end with a newline), SENTENCE_END (end with '.', '!'
    or '?'), SPACE_START (begin with a space). Splitting cuts a document only between two tokens, so its
    pieces hold exactly its tokens; these bits say where a cut falls at a line or sentence boundary."""
    if not (hasattr(tokenizer, "token_piece") and hasattr(tokenizer, "get_vocab_size")):
        raise TypeError(f"splitting long documents needs the tokenizer's token_piece() and get_vocab_size() "
                        f"({type(tokenizer).__name__} has not both); pass split_long_docs=False to crop them instead")
    classes = np.zeros(tokenizer.get_vocab_size(), dtype=np.uint8)
    for i in range(len(classes)):
        piece = tokenizer.token_piece(i)
        classes[i] = (LINE_END * piece.endswith(b"\n") + SENTENCE_END * piece.endswith((b".", b"!", b"?"))
                      + SPACE_START * piece.startswith(b" "))
    return classes


def _last_cut(cuts: np.ndarray, low: int, high: int) -> int | None:
    """The largest cut position c with low < c <= high (cuts sorted), or None."""
    i = int(np.searchsorted(cuts, high, side="right")) - 1
    return int(cuts[i]) if i >= 0 and cuts[i] > low else None


def split_document(tokens: np.ndarray, limit: int, classes: np.ndarray) -> list[np.ndarray]:
    """`tokens` (no BOS) in consecutive pieces of at most `limit` tokens. A piece ends after a line end
    in its second half if there is one (long pieces keep context), else after a sentence end (a token
    ending in . ! ? followed by one starting with a space) in its second half, else after any line or
    sentence end, else at `limit` tokens."""
    if len(tokens) <= limit:
        return [tokens]
    cls = classes[tokens]
    line = np.flatnonzero(cls[:-1] & LINE_END) + 1  # a cut before token i: token i - 1 ends a line
    sentence = np.flatnonzero((cls[:-1] & SENTENCE_END).astype(bool) & (cls[1:] & SPACE_START).astype(bool)) + 1
    pieces, start = [], 0
    while len(tokens) - start > limit:
        end, half = start + limit, start + limit // 2
        cut = next((c for c in (_last_cut(line, half, end), _last_cut(sentence, half, end),
                                _last_cut(line, start, end), _last_cut(sentence, start, end)) if c is not None), end)
        pieces.append(tokens[start:cut])
        start = cut
    pieces.append(tokens[start:])
    return pieces


class PackedLoader:
    """Yields (inputs, targets), each [batch_size, seq_len] int64 on `device`; targets = inputs shifted by one.

    `prefetch` > 0 builds that many batches ahead in a background thread (tokenizers release the GIL),
    so packing overlaps the training step; the state still describes the batches handed out.
    """

    def __init__(self, tokenizer, data_dir: str | Path, split: str, batch_size: int, seq_len: int,
                 device: torch.device | str, rank: int = 0, world_size: int = 1, state: dict | None = None,
                 buffer_size: int = 1000, tokenizer_batch_size: int = 256, tokenizer_threads: int = 4,
                 prefetch: int = 2, split_long_docs: bool = True):
        if batch_size <= 0 or seq_len <= 0 or buffer_size <= 0 or tokenizer_batch_size <= 0:
            raise ValueError(f"batch_size, seq_len, buffer_size and tokenizer_batch_size must be positive, got "
                             f"{batch_size}, {seq_len}, {buffer_size}, {tokenizer_batch_size}")
        self.tokenizer, self.split = tokenizer, split
        self.batch_size, self.seq_len, self.row_len = batch_size, seq_len, seq_len + 1
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.buffer_size, self.tokenizer_batch_size = buffer_size, tokenizer_batch_size
        self.tokenizer_threads, self.prefetch = tokenizer_threads, prefetch
        self.bos = tokenizer.get_bos_token_id()
        self.split_long_docs = split_long_docs
        self._classes = cut_classes(tokenizer) if split_long_docs else None
        self.paths = split_shards(list_shards(data_dir), split)
        self.stream = DocumentStream(self.paths, rank, world_size)
        # The buffer: keys (length, epoch, group, row, piece) kept sorted, and key -> (tokens, tokens lost on entry).
        self._keys: list[tuple] = []
        self._docs: dict[tuple, tuple[np.ndarray, int]] = {}
        self.batches = self.tokens_emitted = self.tokens_cropped = 0
        self.epoch = 0  # newest pass of a document packed so far
        if state is not None:
            self._restore(state)
        self._state = self._snapshot()  # state after the last batch handed out
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    @property
    def cropped_fraction(self) -> float:
        """Tokens dropped by cropping / tokens of the documents packed into the batches handed out so far."""
        emitted, cropped = self._state["tokens_emitted"], self._state["tokens_cropped"]
        return cropped / (emitted + cropped) if emitted + cropped else 0.0

    @property
    def data_epoch(self) -> int:
        """The newest pass over the shards (0: the first) that a document of the batches handed out so far comes
        from: above 0, the model has been shown documents it saw before (or, with fewer documents than the
        buffer holds, copies of them side by side)."""
        return self._state["epoch"]

    # -- the buffer ----------------------------------------------------------------------------------------------
    def _tokenize(self, texts: list[str]) -> list[tuple[list[int], int]]:
        """(tokens, tokens beyond them) per text, BOS first, in batched calls.

        Split documents are tokenized whole. Otherwise a row keeps at most row_len tokens of a document,
        so a long text is tokenized only up to a
        `text_head` of ~HEAD_CHARS_PER_TOKEN chars per row token (doubled until it yields a full row):
        2-3x less tokenizing on long-document data such as Wikipedia. The head's tokens are exactly the
        first tokens of the whole text; the tail's token count is estimated from the head's chars per token.
        """
        if self.split_long_docs:
            return [(tokens, 0) for tokens in
                    self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.tokenizer_threads)]
        out: list[tuple[list[int], int] | None] = [None] * len(texts)
        todo, min_chars = list(range(len(texts))), HEAD_CHARS_PER_TOKEN * self.row_len
        while todo:
            heads = [text_head(texts[i], min_chars) for i in todo]
            encoded = self.tokenizer.encode(heads, prepend=self.bos, num_threads=self.tokenizer_threads)
            short = []
            for i, head, tokens in zip(todo, heads, encoded):
                tail = len(texts[i]) - len(head)
                if tail and len(tokens) < self.row_len:
                    short.append(i)  # the head did not fill a row: try a longer one
                else:
                    out[i] = (tokens, round(tail * (len(tokens) - 1) / len(head)) if tail else 0)
            todo, min_chars = short, 2 * min_chars
        return out

    def _pieces(self, tokens: list[int]) -> list[np.ndarray]:
        """A tokenized document (BOS first) as buffer entries of at most a row: split, or cropped to one."""
        tokens = np.asarray(tokens, dtype=np.int32)
        if not self.split_long_docs:
            return [tokens[:self.row_len]]
        return [np.concatenate(([self.bos], piece)).astype(np.int32)
                for piece in split_document(tokens[1:], self.row_len - 1, self._classes)]

    def _add(self, ids: list[DocId], texts: list[str], keep: dict[DocId, set[int]] | None = None) -> None:
        """Tokenize documents and put their pieces in the buffer (on resume, only the pieces in `keep`)."""
        for doc_id, (tokens, beyond) in zip(ids, self._tokenize(texts)):
            pieces = self._pieces(tokens)
            lost = len(tokens) + beyond - sum(len(p) for p in pieces) + len(pieces) - 1  # extra BOS don't count
            for i, piece in enumerate(pieces):
                if keep is not None and i not in keep[doc_id]:
                    continue
                key = (len(piece), doc_id.epoch, doc_id.group, doc_id.row, i)
                bisect.insort(self._keys, key)
                self._docs[key] = (piece, lost if i == 0 else 0)

    def _refill(self) -> None:
        docs = self.stream.read(self.tokenizer_batch_size)
        self._add([d for d, _ in docs], [t for _, t in docs])

    def _next_rows(self) -> np.ndarray:
        """Pack batch_size rows of row_len tokens."""
        rows = np.empty((self.batch_size, self.row_len), dtype=np.int32)
        for row in rows:
            pos = 0
            while pos < self.row_len:
                while len(self._keys) < self.buffer_size:
                    self._refill()
                space = self.row_len - pos
                i = bisect.bisect_right(self._keys, (space, _AFTER_ALL)) - 1  # largest doc that fits
                key = self._keys.pop(max(i, 0))  # none fits: crop the shortest
                tokens, lost = self._docs.pop(key)
                self.epoch = max(self.epoch, key[1])
                n = min(len(tokens), space)
                row[pos:pos + n] = tokens[:n]
                pos += n
                self.tokens_cropped += lost + len(tokens) - n
        self.batches += 1
        self.tokens_emitted += rows.size
        return rows

    # -- state ---------------------------------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        pending: dict[tuple[int, int], list[list[int]]] = {}
        for _, epoch, group, row, piece in sorted(self._keys, key=lambda k: k[1:]):
            pending.setdefault((epoch, group), []).append([row, piece])
        groups = self.stream.groups
        return {
            "version": STATE_VERSION, "split": self.split, "rank": self.rank, "world_size": self.world_size,
            "seq_len": self.seq_len, "split_long_docs": self.split_long_docs, "buffer_size": self.buffer_size,
            "tokenizer_batch_size": self.tokenizer_batch_size, "num_row_groups": len(groups),
            "position": self.stream.position, "epoch": self.epoch,
            "pending": [[e, *groups[g], rows] for (e, g), rows in pending.items()],
            "batches": self.batches, "tokens_emitted": self.tokens_emitted, "tokens_cropped": self.tokens_cropped,
        }

    def state_dict(self) -> dict:
        """JSON-able state after the last batch handed out; `state=` of a new loader continues from it."""
        return dict(self._state)

    def _restore(self, state: dict) -> None:
        if "ranks" in state:
            if len(state["ranks"]) != self.world_size:
                raise ValueError(f"loader state holds {len(state['ranks'])} ranks but this run has world_size="
                                 f"{self.world_size}: resume on as many ranks, or start the data over (state=None)")
            state = state["ranks"][self.rank]
        if state.get("version") == 1:  # whole documents, cropped: the same as version 2 without splitting
            state = {**state, "version": 2, "split_long_docs": False,
                     "pending": [[e, shard, rg, [[r, 0] for r in rows]] for e, shard, rg, rows in state["pending"]]}
        mine = {"version": STATE_VERSION, "split": self.split, "world_size": self.world_size, "seq_len": self.seq_len,
                "split_long_docs": self.split_long_docs, "buffer_size": self.buffer_size,
                "tokenizer_batch_size": self.tokenizer_batch_size, "num_row_groups": len(self.stream.groups)}
        wrong = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if wrong:
            raise ValueError(f"loader state does not match this loader (saved, now): {wrong}; resume with the same "
                             f"settings and shards, or start the data over (state=None)")
        self.stream = DocumentStream(self.paths, self.rank, self.world_size, position=state["position"])
        self.batches, self.tokens_emitted = state["batches"], state["tokens_emitted"]
        self.tokens_cropped = state["tokens_cropped"]
        self.epoch = state.get("epoch", 0)  # states saved before it was kept: 0
        if state["rank"] != self.rank:
            # Only rank 0's state was saved: continue near its position with an empty buffer (not exact).
            logger.warning(f"rank {self.rank} resumes from rank {state['rank']}'s loader state: the data position is "
                           f"approximate; save every rank's state (see nanochat.data.packing) for an exact resume")
            return
        index = {g: i for i, g in enumerate(self.stream.groups)}
        keep: dict[DocId, set[int]] = {}
        for e, shard, rg, rows in state["pending"]:
            for row, piece in rows:
                keep.setdefault(DocId(e, index[(shard, rg)], row), set()).add(piece)
        ids = sorted(keep, key=lambda d: (d.epoch, d.group, d.row))
        self._add(ids, self.stream.fetch(ids), keep)

    # -- iteration -----------------------------------------------------------------------------------------------
    def _to_host(self, rows: np.ndarray) -> torch.Tensor:
        """[2, B, T] int64 (inputs, targets), pinned when bound for CUDA."""
        pair = np.stack([rows[:, :-1], rows[:, 1:]]).astype(np.int64)
        host = torch.from_numpy(pair)
        return host.pin_memory() if self.device.type == "cuda" else host

    def _produce(self) -> tuple[torch.Tensor, dict]:
        rows = self._next_rows()
        return self._to_host(rows), self._snapshot()

    @staticmethod
    def _worker(ref: weakref.ref, out: queue.Queue, stop: threading.Event) -> None:
        """Produce batches into `out`. Holds the loader only weakly while waiting, so a dropped loader
        (say a validation loader made for one evaluation) is freed and its thread ends."""
        while not stop.is_set():
            loader = ref()
            if loader is None:
                return
            try:
                item = loader._produce()
            except BaseException as err:  # handed to the consumer, which raises it
                item = err
            del loader
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    if ref() is None:
                        return
            if isinstance(item, BaseException):
                return

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stop.is_set():
            raise RuntimeError("this PackedLoader is closed (by close() or an error in its worker): make a new "
                               "one, with state=old.state_dict() to continue")
        if self.prefetch <= 0:
            host, self._state = self._produce()
        else:
            if self._queue is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(target=self._worker, args=(weakref.ref(self), self._queue, self._stop),
                                                name="PackedLoader", daemon=True)
                self._thread.start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._stop.set()  # the worker has ended; later calls fail fast instead of waiting forever
                raise item
            host, self._state = item
        pair = host.to(self.device, non_blocking=True) if self.device.type != "cpu" else host
        return pair[0], pair[1]

    def close(self) -> None:
        """Stop the prefetch thread and wait for it (it also stops once the loader is dropped). Call it
        before the process exits: a thread still inside native tokenizer code at interpreter shutdown
        can abort the process."""
        self._stop.set()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
