"""Continuous batching: one thread per model replica steps every active sequence together.

Each sequence (one of a request's n samples) owns a slot of a StaticDecoder: its own rows of the KV
cache and its own position. The loop, once per decode step:
  1. admits waiting requests into free slots (prefill at batch 1, then copy the cache into n slots),
  2. samples the next token of every active slot (one batch per set of sampling settings, each row's
     noise hashed from its request's seed and its position, all on the device, then one copy of every
     token to the host; the calculator tool runs here too) and reports it,
  3. frees finished slots, and runs ONE decode step for all slots at once.
A request that arrives while others are decoding joins at the next step instead of waiting for them
to finish, so 32 streaming clients share each step's weight reads instead of queuing behind each other.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanochat.engine import Engine, RowState, StaticDecoder, draw, hashed_exp_noise, token_probs

log = logging.getLogger("nanochat")
SAMPLE_STRIDE = 1_000_003  # a row's key: seed * SAMPLE_STRIDE + its sample index (n <= slots < this)


@dataclass
class GenerationRequest:
    """One completion call. `emit(event)` is called from the scheduler thread with
    ("token", sample_index, token_id), ("done", sample_index, finish_reason) or ("error", -1, message)."""
    prompt: list[int]
    emit: Callable[[tuple], None]
    num_samples: int = 1
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Sequence:
    request: GenerationRequest
    index: int                     # which of the request's samples
    row: RowState = field(default_factory=RowState)
    generated: int = 0


class BatchScheduler:
    """A model replica with a background thread that decodes all its active sequences together."""

    _seeds = itertools.count(1)

    def __init__(self, model, tokenizer, slots: int = 32, compile: bool = False, name: str = "worker0",
                 attention: str = "auto", kv_fp8: bool = False):
        self.engine = Engine(model, tokenizer)
        self.tokenizer = tokenizer
        self.decoder = StaticDecoder(model, slots, model.config.sequence_len, compile=compile,
                                     attention=attention, kv_fp8=kv_fp8)
        self.slots: list[_Sequence | None] = [None] * slots
        self.logits = torch.zeros(slots, model.config.vocab_size, device=self.decoder.device)
        self.slot_keys = torch.zeros(slots, dtype=torch.long, device=self.decoder.device)  # seed and sample
        self._row_index: dict[tuple[int, ...], torch.Tensor] = {}
        self.pending: queue.Queue[GenerationRequest] = queue.Queue()
        self.waiting: list[GenerationRequest] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    # ---- public ---------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        """Queue `request`, its max_tokens capped to the context; ValueError (the app answers 400)
        when it asks for more samples than there are slots or its prompt fills the context."""
        if request.num_samples > len(self.slots):
            raise ValueError(f"n={request.num_samples} exceeds this server's {len(self.slots)} slots per worker")
        request.max_tokens = self.engine.fit_max_tokens(request.prompt, request.max_tokens)
        self.pending.put(request)

    def load(self) -> int:
        """Sequences active or waiting: the app sends new requests to the least loaded worker."""
        return sum(s is not None for s in self.slots) + self.pending.qsize() + len(self.waiting)

    def close(self) -> None:
        self._stop.set()
        self.pending.put(None)  # type: ignore[arg-type]  # wake the loop
        self.thread.join(timeout=10)

    # ---- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit(block=not any(self.slots))
                if any(self.slots):
                    self._step()
            except Exception as exc:  # never let one bad batch kill the worker: fail its requests
                log.exception("scheduler step failed")
                for i, seq in enumerate(self.slots):
                    if seq is not None:
                        seq.request.emit(("error", -1, f"{type(exc).__name__}: {exc}"))
                        self._free(i)

    @torch.inference_mode()
    def _admit(self, block: bool) -> None:
        if block and not self.waiting:  # idle: sleep until a request arrives
            try:
                self.waiting.append(self.pending.get(timeout=0.5))
            except queue.Empty:
                return
        while not self.pending.empty():
            self.waiting.append(self.pending.get_nowait())
        self.waiting = [r for r in self.waiting if r is not None]  # None only wakes the loop (close)
        free = [i for i, s in enumerate(self.slots) if s is None]
        still_waiting = []
        for req in self.waiting:
            if req.cancelled.is_set():
                continue
            if len(free) < req.num_samples:
                still_waiting.append(req)
                continue
            take, free = free[:req.num_samples], free[req.num_samples:]
            try:
                logits, cache = self.engine.prefill(req.prompt)
            except Exception as exc:
                req.emit(("error", -1, f"{type(exc).__name__}: {exc}"))
                continue
            self.decoder.load_prompt(take, cache)
            self.logits[take] = logits.to(self.logits.dtype)
            seed = req.seed if req.seed is not None else next(self._seeds)
            self.slot_keys[take] = torch.tensor([seed % 2**40 * SAMPLE_STRIDE + j for j in range(len(take))])
            for j, slot in enumerate(take):
                self.slots[slot] = _Sequence(req, j)
        self.waiting = still_waiting

    def _free(self, slot: int) -> None:
        seq = self.slots[slot]
        self.slots[slot] = None
        self.decoder.pos[slot] = 0

    def _rows_on_device(self, slots: list[int]) -> torch.Tensor:
        """`slots` as an index tensor on the device, cached: building one copies from pageable host
        memory, which waits for the GPU, so each distinct set of slots is built once."""
        key = tuple(slots)
        index = self._row_index.get(key)
        if index is None:
            if len(self._row_index) > 4 * len(self.slots):
                self._row_index.clear()
            index = self._row_index[key] = torch.tensor(slots, device=self.decoder.device)
        return index

    def _sample(self, slots: list[int], temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
        """Next token of each of `slots` (requests that share these sampling settings), in that order.

        One batch of tensor ops for them all (sampled one request at a time, they cost the host over a
        dozen kernel launches per request per step); each row's noise is hashed from its request's seed
        and sample and its position, so a request gets the same tokens whoever shares the step."""
        rows = self._rows_on_device(slots)
        logits = self.logits.index_select(0, rows)
        if temperature == 0.0:
            return logits.argmax(dim=-1)
        probs = token_probs(logits, temperature, top_k, top_p)
        return draw(probs, hashed_exp_noise(self.slot_keys[rows], self.decoder.pos[rows], probs.size(1)))

    @torch.inference_mode()
    def _step(self) -> None:
        tools = self.engine.tools
        groups: dict[int, list[int]] = {}
        for i, seq in enumerate(self.slots):
            if seq is not None:
                groups.setdefault(id(seq.request), []).append(i)
        by_settings: dict[tuple, list[int]] = {}  # sampling settings -> the slots of the requests using them
        for slots in groups.values():
            req = self.slots[slots[0]].request
            if req.cancelled.is_set():
                for i in slots:
                    self._free(i)
                continue
            by_settings.setdefault((req.temperature, req.top_k, req.top_p), []).extend(slots)
        live, sampled = [], []
        for settings, slots in by_settings.items():
            sampled.append(self._sample(slots, *settings))
            live.extend(slots)
        # one copy to the host for all requests: a .tolist() per request would wait for the GPU each time
        tokens = torch.cat(sampled).tolist() if sampled else []
        next_tokens = [0] * len(self.slots)
        for i, token in zip(live, tokens):
            seq = self.slots[i]
            req = seq.request
            token, _ = tools.next_token(seq.row, token)
            seq.generated += 1
            if seq.row.done:
                req.emit(("done", seq.index, "stop"))
                self._free(i)
                continue
            req.emit(("token", seq.index, token))
            if seq.generated >= req.max_tokens:
                req.emit(("done", seq.index, "length"))
                self._free(i)
                continue
            next_tokens[i] = token
        if any(self.slots):
            self.decoder.tokens.copy_(torch.tensor(next_tokens, dtype=torch.long))
            self.logits.copy_(self.decoder.step())
