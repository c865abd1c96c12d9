"""One request's generation state: sampling, stop conditions and streaming detokenization."""

from __future__ import annotations

from tqinfer.sampling import Sampler, SamplingParams


def first_stop(text: str, stops: list[str], start: int) -> int | None:
    """Index of the earliest stop string in text[start:], or None."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


class Generation:
    """Feed it logits, it samples a token and says what text to stream and whether to stop.

    Text that could be the start of a stop string is held back until it is known not to be."""

    def __init__(self, params: SamplingParams, tokenizer, prompt_ids: list[int], vocab_size: int, device):
        self.params = params
        self.sampler = Sampler(params, vocab_size, device)
        self.sampler.observe(prompt_ids)
        eos = set() if params.ignore_eos else set(tokenizer.eos_ids)
        self.stop_ids = set(params.stop_token_ids) | eos
        self.decoder = tokenizer.stream_decoder()
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.text, self.emitted = "", 0
        self.tokens: list[int] = []
        self.finish: str | None = None
        self._by_string = False

    def check_limits(self, context_len: int, max_context: int, cancel=None) -> str | None:
        """A finish reason that applies before the next token is sampled, or None."""
        if self.finish is not None:
            return self.finish
        if cancel is not None and cancel.is_set():
            self.finish = "cancelled"
        elif self.params.max_tokens is not None and len(self.tokens) >= self.params.max_tokens:
            self.finish = "length"
        elif context_len >= max_context:
            self.finish = "context"
        return self.finish

    def step(self, logits) -> tuple[int, str]:
        """Sample from logits; returns (token, text delta) and sets finish on a stop."""
        token = self.sampler(logits)
        self.tokens.append(token)
        delta = ""
        if token in self.stop_ids:
            self.finish = "stop"
            return token, delta
        self.text += self.decoder.push(token)
        hit = first_stop(self.text, self.params.stop, max(0, self.emitted - self.holdback))
        if hit is not None:
            self.text, self.finish, self._by_string = self.text[:hit], "stop", True
            delta = self.text[self.emitted:]
        else:
            safe = len(self.text) - self.holdback if self.params.stop else len(self.text)
            delta = self.text[self.emitted:max(self.emitted, safe)]
        self.emitted += len(delta)
        self.sampler.observe([token]) if self.finish is None else None
        return token, delta

    def tail(self) -> str:
        """The held-back text once generation has ended."""
        if not self._by_string:
            self.text += self.decoder.flush()
        rest = self.text[self.emitted:]
        self.emitted = len(self.text)
        return rest
