"""Continuous batching: one thread per model replica steps every active sequence together.

Each sequence (one of a request's n samples) owns a slot of a StaticDecoder: its own rows of the KV
cache and its own position. The loop, once per decode step:
  1. admits waiting requests into free slots: their prompts are prefilled together, one batched forward
     (right-padded, bounded by `prefill_tokens`), and each request's row is copied into its n slots,
  2. samples the next token of every active slot (one batch per set of sampling settings, each row's
     noise hashed from its request's seed and its position, all on the device) straight into the
     decoder's input, and launches ONE decode step for all slots at once,
  3. while the device runs that step, reports the previous step's tokens, copies this step's to the
     host, runs the calculator tool on them and frees finished slots.
The token a slot is fed is always the one the host reports: a token the tool forces is known before the
step that feeds it is launched (it overrides the sample), and a slot that finished or was cancelled is
freed, so the step's work for it is discarded. A request that arrives while others are decoding joins at
the next step instead of waiting for them to finish, so 32 streaming clients share each step's weight
reads instead of queuing behind each other.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanochat.inference.decoder import StaticDecoder, int_tensor_on
from nanochat.inference.engine import Engine
from nanochat.inference.sampling import draw, hashed_exp_noise, token_probs
from nanochat.inference.tools import RowState

log = logging.getLogger("nanochat")
SAMPLE_STRIDE = 1_000_003  # a row's key: seed * SAMPLE_STRIDE + its sample index (n <= slots < this)
MAX_TOP_LOGPROBS = 20      # most alternatives per token a request may ask for (OpenAI's limit)


@dataclass
class GenerationRequest:
    """One completion call. `emit(event)` is called from the scheduler thread with
    ("token", sample_index, token_id), ("done", sample_index, finish_reason) or ("error", -1, message);
    with `logprobs` = k, each token's event follows ("logprob", sample_index, (logprob, [(id, logprob)] * k)):
    the token's log-probability under the model (temperature 1, before top-k/top-p) and the k likeliest.
    `cancelled` ends the request; a sample index added to `stopped` ends that sample (a stop string)."""
    prompt: list[int]
    emit: Callable[[tuple], None]
    num_samples: int = 1
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    logprobs: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    stopped: set[int] = field(default_factory=set)


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
                 attention: str = "auto", kv_fp8: bool = False, prefill_tokens: int = 8192):
        self.engine = Engine(model, tokenizer)
        self.prefill_tokens = prefill_tokens  # most padded tokens (requests x longest prompt) per prefill batch
        self.tokenizer = tokenizer
        self.decoder = StaticDecoder(model, slots, model.config.sequence_len, compile=compile,
                                     attention=attention, kv_fp8=kv_fp8)
        self.slots: list[_Sequence | None] = [None] * slots
        self.logits = torch.zeros(slots, model.config.vocab_size, device=self.decoder.device)
        self.slot_keys = torch.zeros(slots, dtype=torch.long, device=self.decoder.device)  # seed and sample
        self._row_index: dict[tuple[int, ...], torch.Tensor] = {}
        self._cuda = self.decoder.device.type == "cuda"
        # a step's tokens come back through pinned memory: an asynchronous copy, waited for by its event alone
        self._host_tokens = torch.zeros(slots, dtype=torch.long, pin_memory=self._cuda)
        # and, when a request asks for them, each token's logprob and the top alternatives
        self._host_logprobs = torch.zeros(slots, 1 + MAX_TOP_LOGPROBS, pin_memory=self._cuda)
        self._host_top_ids = torch.zeros(slots, MAX_TOP_LOGPROBS, dtype=torch.long, pin_memory=self._cuda)
        self._copied = torch.cuda.Event() if self._cuda else None
        self._outbox: list[tuple[Callable[[tuple], None], tuple]] = []  # (emit, event) for `_report`
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
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs={request.logprobs}: the top alternatives are 0 to {MAX_TOP_LOGPROBS}")
        request.max_tokens = self.engine.fit_max_tokens(request.prompt, request.max_tokens)
        self.pending.put(request)

    def load(self) -> int:
        """Sequences active or waiting: the app sends new requests to the least loaded worker."""
        return sum(s is not None for s in self.slots) + self.pending.qsize() + len(self.waiting)

    def stats(self) -> dict[str, int]:
        """Slots in all, slots decoding, requests queued for a slot (for /metrics)."""
        return {"slots": len(self.slots), "active": sum(s is not None for s in self.slots),
                "queued": self.pending.qsize() + len(self.waiting)}

    def close(self) -> None:
        self._stop.set()
        self.pending.put(None)  # type: ignore[arg-type]  # wake the loop
        self.thread.join(timeout=10)

    # ---- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        if self._cuda:  # a thread starts on cuda:0: its events and streams must be on this worker's GPU
            torch.cuda.set_device(self.decoder.device)
        while not self._stop.is_set():
            try:
                self._admit(block=not any(self.slots))
                if any(self.slots):
                    self._step()
            except Exception as exc:  # never let one bad batch kill the worker: fail its requests
                log.exception("scheduler step failed")
                self._report()
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
        still_waiting, admitted = [], []
        for req in self.waiting:
            if req.cancelled.is_set():
                continue
            if len(free) < req.num_samples:
                still_waiting.append(req)
                continue
            take, free = free[:req.num_samples], free[req.num_samples:]
            admitted.append((req, take))
        self.waiting = still_waiting
        batch, longest = [], 0  # in arrival order, each batch's padded size within prefill_tokens
        for req, take in admitted:
            if batch and max(longest, len(req.prompt)) * (len(batch) + 1) > self.prefill_tokens:
                self._prefill(batch)
                batch, longest = [], 0
            batch.append((req, take))
            longest = max(longest, len(req.prompt))
        if batch:
            self._prefill(batch)

    def _prefill(self, batch: list[tuple[GenerationRequest, list[int]]]) -> None:
        """Prefill the prompts of `batch` (request, its slots) as one forward and load each into its slots;
        when that fails, one request at a time, so that a bad prompt fails its request alone."""
        try:
            logits, cache, lengths = self.engine.prefill_batch([req.prompt for req, _ in batch])
        except Exception as exc:
            if len(batch) > 1:
                for item in batch:
                    self._prefill([item])
            else:
                batch[0][0].emit(("error", -1, f"{type(exc).__name__}: {exc}"))
            return
        slots, rows, keys = [], [], []  # per slot: its cache row (its request's) and its sampling key
        for row, (req, take) in enumerate(batch):
            seed = req.seed if req.seed is not None else next(self._seeds)
            for j, slot in enumerate(take):
                slots.append(slot), rows.append(row), keys.append(seed % 2**40 * SAMPLE_STRIDE + j)
                self.slots[slot] = _Sequence(req, j)  # before the copies: a failure there fails these requests
        index = self._rows_on_device(slots)
        rows_keys = int_tensor_on([rows, keys], self.decoder.device)
        rows = rows_keys[0]
        self.decoder.load_prompt(slots, cache, rows=rows, lengths=lengths.index_select(0, rows))
        self.logits.index_copy_(0, index, logits.index_select(0, rows).to(self.logits.dtype))
        self.slot_keys.index_copy_(0, index, rows_keys[1])

    def _free(self, slot: int) -> None:
        """Empty `slot`; its position goes back to 0 (fill_: `pos[slot] = 0` copies a CPU scalar, which
        may wait for the step in flight)."""
        self.slots[slot] = None
        self.decoder.pos[slot].fill_(0)

    def _rows_on_device(self, slots: list[int]) -> torch.Tensor:
        """`slots` as an index tensor on the device, cached (built without waiting for the step in flight)."""
        key = tuple(slots)
        index = self._row_index.get(key)
        if index is None:
            if len(self._row_index) > 4 * len(self.slots):
                self._row_index.clear()
            index = self._row_index[key] = int_tensor_on(slots, self.decoder.device)
        return index

    def _sample(self, rows: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
        """Next token of each slot in `rows` (requests that share these sampling settings), in that order.

        One batch of tensor ops for them all (sampled one request at a time, they cost the host over a
        dozen kernel launches per request per step); each row's noise is hashed from its request's seed
        and sample and its position, so a request gets the same tokens whoever shares the step."""
        logits = self.logits.index_select(0, rows)
        if temperature == 0.0:
            return logits.argmax(dim=-1)
        probs = token_probs(logits, temperature, top_k, top_p)
        return draw(probs, hashed_exp_noise(self.slot_keys[rows], self.decoder.pos[rows], probs.size(1)))

    def _fetch_tokens(self) -> list[int]:
        """The tokens the last `_step` fed, on the host: waits for their copy only, not for the step
        launched after it."""
        if self._copied is not None:
            self._copied.synchronize()
        return self._host_tokens.tolist()

    def _copy_logprobs(self, tokens: torch.Tensor, top: int) -> None:
        """Queue, before the step that overwrites the logits, the copy to the host of each slot's
        log-probability of the token it is fed and of its `top` likeliest tokens (only when a live
        request asks for logprobs: a log-softmax over every slot's logits). The copies land in the
        front of the pinned buffers, contiguous (a strided destination would make them synchronous)."""
        logp = torch.log_softmax(self.logits.float(), dim=-1)
        values, ids = logp.topk(top, dim=-1)
        host_logprobs, host_ids = self._host_logprob_views(top)
        host_logprobs.copy_(torch.cat([logp.gather(1, tokens[:, None]), values], dim=1), non_blocking=True)
        host_ids.copy_(ids, non_blocking=True)

    def _host_logprob_views(self, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The contiguous fronts of the pinned buffers that hold `top` alternatives per slot: [slots, top + 1]
        logprobs (the fed token's first) and [slots, top] ids."""
        slots = len(self.slots)
        return (self._host_logprobs.view(-1)[:slots * (top + 1)].view(slots, top + 1),
                self._host_top_ids.view(-1)[:slots * top].view(slots, top))

    def _fetch_logprobs(self, top: int) -> tuple[list, list]:
        """What `_copy_logprobs(tokens, top)` copied (ready with the tokens): per slot [logprob, top
        logprobs...] and [top ids...]."""
        if self._copied is not None:
            self._copied.synchronize()
        host_logprobs, host_ids = self._host_logprob_views(top)
        return host_logprobs.tolist(), host_ids.tolist()

    def _report(self) -> None:
        """Emit the events the last step's tokens made."""
        for emit, event in self._outbox:
            emit(event)
        self._outbox.clear()

    @torch.inference_mode()
    def _step(self) -> None:
        """Sample every live slot into the decoder's input and launch the decode step on it; report the
        previous step's tokens, then bring this step's to the host and run the tools on them, while the
        device runs the step. Reporting after the launch lets the event loop thread (woken by the
        reports) take the GIL while the device is busy, not while the next step is being launched."""
        by_settings: dict[tuple, list[int]] = {}  # sampling settings -> the slots of the requests using them
        forced: list[tuple[int, int]] = []         # (slot, token) the tool forces this step
        top = -1                                   # the most top logprobs a live request asks for (-1: none)
        for i, seq in enumerate(self.slots):
            if seq is None:
                continue
            req = seq.request
            if req.cancelled.is_set() or req.stopped and seq.index in req.stopped:
                self._free(i)
                continue
            by_settings.setdefault((req.temperature, req.top_k, req.top_p), []).append(i)
            if seq.row.forced:
                forced.append((i, seq.row.forced[0]))
            if req.logprobs is not None:
                top = max(top, req.logprobs)
        if not by_settings:
            self._report()
            return
        tokens = self.decoder.tokens
        for settings, slots in by_settings.items():
            rows = self._rows_on_device(slots)
            tokens.index_copy_(0, rows, self._sample(rows, *settings))
        for i, token in forced:  # replaces the sample, as ToolRunner.next_token will on the host
            tokens[i].fill_(token)
        if top >= 0:
            self._copy_logprobs(tokens, top)
        self._host_tokens.copy_(tokens, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self.logits.copy_(self.decoder.step())
        self._report()
        next_token, outbox = self.engine.tools.next_token, self._outbox
        logprobs = self._fetch_logprobs(top) if top >= 0 else None
        for i, token in enumerate(self._fetch_tokens()):
            seq = self.slots[i]
            if seq is None:
                continue
            emit, index = seq.request.emit, seq.index
            token, _ = next_token(seq.row, token)
            seq.generated += 1
            if logprobs is not None and seq.request.logprobs is not None and not seq.row.done:
                values, ids, k = logprobs[0][i], logprobs[1][i], seq.request.logprobs
                outbox.append((emit, ("logprob", index, (values[0], list(zip(ids[:k], values[1:k + 1]))))))
            if seq.row.done:
                outbox.append((emit, ("done", index, "stop")))
                self._free(i)
            elif seq.generated >= seq.request.max_tokens:
                outbox.append((emit, ("token", index, token)))
                outbox.append((emit, ("done", index, "length")))
                self._free(i)
            else:
                outbox.append((emit, ("token", index, token)))
        if not any(self.slots):  # no step to overlap with
            self._report()
