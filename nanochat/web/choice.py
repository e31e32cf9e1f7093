"""One sample of a response as it streams in: its text (cut at the first stop string) and its logprobs.

Stop strings are matched on the text, not on tokens: "\\n\\nUser:" can end in the middle of a token, or
span several. While the text seen so far ends with the start of a stop string, that tail is held back:
the reader never sees text that a stop string later removes.
"""
from __future__ import annotations

from nanochat.inference.engine import TextStream


class StopText:
    """Text that arrives in pieces, cut before the first occurrence of any of `stops`."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = stops, ""
        self.longest, self.firsts = max(map(len, stops)), {s[0] for s in stops}

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to release now, whether a stop string was found: nothing follows it)."""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        # an occurrence completed by a later piece starts in the longest tail that begins a stop string
        keep = next((k for k in range(min(len(text), self.longest - 1), 0, -1)
                     if text[-k] in self.firsts and any(s.startswith(text[-k:]) for s in self.stops)), 0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held-back tail, once the text has ended without a stop string."""
        held, self.held = self.held, ""
        return held


class Choice(TextStream):
    """A sample's tokens -> released text pieces, its finish reason and its logprob entries.

    `plain` (no stop strings, no logprobs) lets a streaming handler take TextStream.add's pieces as
    they come, the fast path; otherwise `on_token` / `on_done` release text through the stop matcher."""

    def __init__(self, tokenizer, stops: list[str] | None = None, logprobs: int | None = None):
        super().__init__(tokenizer)
        self.finish_reason: str | None = None
        self.plain = not stops and logprobs is None
        self.stop = StopText(stops) if stops else None
        self.wants_logprobs = logprobs is not None
        self.pieces: list[str] = []        # the released text
        self.released = 0                  # its length in characters
        self.decoded = 0                   # characters decoded, held back ones included
        self.cut: int | None = None        # where a stop string cut the text
        self.stop_token = False            # ended by the model's end-of-turn token (counted as generated)
        self.entries: list[tuple] = []     # per token: (token, text offset, logprob, [(id, logprob), ...])
        self.sent_entries = 0
        self._logprob: tuple | None = None

    def on_logprob(self, value: tuple) -> None:
        """The scheduler's (logprob, top) for the token that comes next."""
        self._logprob = value

    def on_token(self, token: int) -> str:
        """Append `token`; returns the text it releases (sets finish_reason when a stop string is found)."""
        piece = self.add(token)
        if self.wants_logprobs:
            logprob, top = self._logprob
            self.entries.append((token, self.decoded, logprob, top))
        self.decoded += len(piece)
        return self._release(piece)

    def on_done(self, reason: str) -> str:
        """The sample ended ("stop": its end-of-turn token, or "length"); returns the text still held."""
        self.stop_token = reason == "stop"
        text = self._release(self.finish(), final=True)
        self.finish_reason = self.finish_reason or reason
        return text

    def _release(self, piece: str, final: bool = False) -> str:
        if self.stop is None:
            text = piece
        else:
            text, hit = self.stop.feed(piece)
            if hit:
                self.finish_reason, self.cut = "stop", self.released + len(text)
            elif final:
                text += self.stop.flush()
        self.pieces.append(text)
        self.released += len(text)
        return text

    def new_entries(self) -> list[tuple]:
        """Logprob entries not yet taken whose token's text is released (all once finished, except the
        tokens past a stop string's start)."""
        if self.finish_reason is None:
            end = self.released
        else:
            end = self.cut if self.cut is not None else float("inf")
        taken = self.sent_entries
        while taken < len(self.entries) and self.entries[taken][1] < end:
            taken += 1
        new, self.sent_entries = self.entries[self.sent_entries:taken], taken
        return new

    def generated(self) -> int:
        """Tokens generated for this sample: the end-of-turn token too (the scheduler does not stream it)."""
        return len(self.tokens) + self.stop_token

    def full_text(self) -> str:
        return "".join(self.pieces)


def _token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    piece = tokenizer.token_piece(token)
    return piece.decode("utf-8", errors="replace"), list(piece)


def chat_logprobs(tokenizer, entries: list[tuple]) -> dict:
    """Chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    content = []
    for token, _, logprob, top in entries:
        text, raw = _token_text(tokenizer, token)
        alternatives = []
        for other, other_logprob in top:
            other_text, other_raw = _token_text(tokenizer, other)
            alternatives.append({"token": other_text, "logprob": other_logprob, "bytes": other_raw})
        content.append({"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": alternatives})
    return {"content": content}


def text_logprobs(tokenizer, entries: list[tuple]) -> dict:
    """Completions (legacy) logprobs: parallel lists of tokens, their logprobs, the top alternatives of
    each ({token: logprob}) and each token's character offset in the completion's text."""
    return {"tokens": [_token_text(tokenizer, t)[0] for t, _, _, _ in entries],
            "token_logprobs": [lp for _, _, lp, _ in entries],
            "top_logprobs": [{_token_text(tokenizer, o)[0]: olp for o, olp in top} for _, _, _, top in entries],
            "text_offset": [at for _, at, _, _ in entries]}
