"""Inference: prefill once, decode with a preallocated KV cache, sample, and run the calculator tool.

    engine = Engine(model, tokenizer)
    for column, masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8):
        ...   # column[i] = next token of sample i; masks[i] = 0 if the tool forced it, 1 if sampled

The prompt is run through the model once at batch 1; for n > 1 samples its KV cache is then stored once
and shared by every row of a decoder of batch `num_samples` (rows keep caches for their own max_tokens
only), so n samples cost one prefill and each step reads the prompt's keys once, not n times. Each decode
step feeds one token per row. A row stops at <|assistant_end|> or <|bos|>.

Tool use: when a row emits <|python_start|>, its tokens up to <|python_end|> are decoded and handed to
`tools.calculate`; the answer is then forced into that row as <|output_start|> answer
<|output_end|> over the next steps (mask 0: the model did not choose them), and the model continues
from there, seeing the answer in its context.
"""
from __future__ import annotations

import codecs
from collections.abc import Iterator

import torch

from nanochat.common import autocast_for
from nanochat.inference.decoder import StaticDecoder, cache_dtype, int_tensor_on
from nanochat.inference.sampling import sample_next
from nanochat.inference.tools import RowState, ToolRunner
from nanochat.model.gpt import KVCache, lm_head_output


def cast_params(model, dtype: torch.dtype = torch.bfloat16):
    """Store the weights in `dtype` for serving (decode is bound by reading them: bf16 halves that);
    buffers such as the rotary tables keep their fp32 precision. Returns the model."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


class TextStream:
    """One sample's tokens turned into text pieces for streaming to a reader.

    A token can end inside a multi-byte UTF-8 character, so each token's bytes go through an
    incremental UTF-8 decoder, which holds such a character back until its last byte arrives. A token
    costs the same however long the reply is (decoding the whole list per token made a reply
    quadratic). The pieces from add() and finish() add up to exactly `tokenizer.decode(tokens)`."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens = tokenizer, []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        """Append `token`; returns the new text to show ("" while a character is incomplete)."""
        self.tokens.append(token)
        return self._utf8.decode(self.tokenizer.token_piece(token))

    def finish(self) -> str:
        """The text still held back once the tokens end: U+FFFD for a character left incomplete, else ""."""
        return self._utf8.decode(b"", final=True)

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens)


class Engine:
    """Batched sampling from a GPT with a KV cache; see the module docstring.

    compile=True compiles the decode step and (on CUDA) replays it as a CUDA graph; the graph is
    captured per (num_samples, cache length) shape, so it pays off for repeated calls of one shape.
    """

    def __init__(self, model, tokenizer, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.tools = ToolRunner(tokenizer)
        self.device = next(model.parameters()).device
        self.config = model.config
        self.compile = compile
        self._decoders: dict[tuple[int, int, int], StaticDecoder] = {}

    def prefill(self, tokens: list[int]):
        """Run the prompt through the model once (batch 1); returns (last logits [1, V], its KVCache)."""
        logits, cache, _ = self.prefill_batch([tokens])
        return logits, cache

    def prefill_batch(self, prompts: list[list[int]]) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
        """Run several prompts through the model as one batch -> (each prompt's last-position logits [B, V],
        the KVCache [B, longest prompt], the prompt lengths as int64 on the device). Prompts are
        right-padded to the longest: attention is causal, so padding after a prompt changes none of its
        positions' keys, values or logits. lm_head runs at each row's last position only (not at B x T
        positions: the largest tensor of a batched prefill)."""
        if not prompts or not all(prompts):
            raise ValueError("prefill_batch needs at least one prompt and no empty one")
        model, cfg = self.model, self.config
        B, T = len(prompts), max(map(len, prompts))
        ids = int_tensor_on([p + [0] * (T - len(p)) for p in prompts], self.device)
        lengths_last = int_tensor_on([[len(p) for p in prompts], [i * T + len(p) - 1 for i, p in enumerate(prompts)]],
                                     self.device)
        lengths, last = lengths_last[0], lengths_last[1]
        cache = KVCache(B, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, T, self.device, cache_dtype(self.device))
        with autocast_for(self.device):
            x = model.trunk(ids, cache).reshape(B * T, -1).index_select(0, last)
            logits = lm_head_output(x, model.lm_head, cfg, None, "mean").float()
        cache.last_tokens = ids.reshape(-1).index_select(0, last)  # each row's own last token, not its padding
        return logits, cache, lengths

    def decoder(self, slots: int, max_seq_len: int, shared_prompt_len: int = 0) -> StaticDecoder:
        """A (cached, when compiled) static decoder of this shape."""
        if not self.compile:
            return StaticDecoder(self.model, slots, max_seq_len, shared_prompt_len=shared_prompt_len)
        key = (slots, max_seq_len, shared_prompt_len)
        if key not in self._decoders:
            self._decoders[key] = StaticDecoder(self.model, slots, max_seq_len, compile=True,
                                                shared_prompt_len=shared_prompt_len)
        return self._decoders[key]

    def fit_max_tokens(self, tokens: list[int], max_tokens: int) -> int:
        """`max_tokens` capped so prompt + generation fits the model's context; an empty prompt or
        one that fills the context raises ValueError."""
        if not tokens:
            raise ValueError("the prompt is empty; start it with <|bos|> (render_for_completion does)")
        room = self.config.sequence_len - len(tokens)
        if room <= 0:
            raise ValueError(f"the prompt has {len(tokens)} tokens but the model's context is "
                             f"{self.config.sequence_len}; shorten the conversation")
        return max(0, min(max_tokens, room))

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int = 256, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int = 42) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, token_masks) per step, one entry per sample.

        `max_tokens` is capped so prompt + generation fits the model's context. Rows that already
        stopped repeat their stop token with mask 0 until every row has stopped.
        """
        max_tokens = self.fit_max_tokens(tokens, max_tokens)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if max_tokens == 0:
            return
        generator = torch.Generator(device=self.device).manual_seed(seed)
        rows = [RowState() for _ in range(num_samples)]
        last = [0] * num_samples
        logits, prompt_cache = self.prefill(tokens)
        logits = logits.expand(num_samples, -1)
        # n > 1 samples share one stored prompt; one sample keeps the plain path (fewer kernels per step)
        shared = len(tokens) if num_samples > 1 else 0
        decoder = self.decoder(num_samples, len(tokens) + max_tokens, shared_prompt_len=shared)
        if shared:
            decoder.load_shared_prompt(prompt_cache)
        else:
            decoder.load_prompt([0], prompt_cache)
        del prompt_cache
        for step in range(max_tokens):
            sampled = sample_next(logits, generator, temperature, top_k, top_p).tolist()
            column, masks = [], []
            for i, row in enumerate(rows):
                if row.done:
                    column.append(last[i]), masks.append(0)
                    continue
                token, mask = self.tools.next_token(row, sampled[i])
                last[i] = token
                column.append(token), masks.append(mask)
            yield column, masks
            if all(row.done for row in rows) or step == max_tokens - 1:
                break
            decoder.tokens.copy_(torch.tensor(column, dtype=torch.long))
            logits = decoder.step()

    def generate_batch(self, tokens: list[int], num_samples: int = 1,
                       **kw) -> tuple[list[list[int]], list[list[int]]]:
        """Whole sequences (prompt + generated, without the stop token) and their masks
        (prompt 0, forced tool output 0, sampled 1)."""
        seqs = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kw):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if token in self.tools.stop_ids:
                    done[i] = True
                    continue
                seqs[i].append(token)
                masks[i].append(mask)
        return seqs, masks
