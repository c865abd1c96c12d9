"""SamplingParams and the sampler: greedy, temperature, top-k, top-p, min-p, penalties, seeds."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

BUILTIN_DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0)


@dataclass
class SamplingParams:
    """None means "the model's generation_config.json, else the built-in default" (see resolve)."""

    temperature: float | None = None  # 0 = greedy
    top_k: int | None = None  # 0 = off
    top_p: float | None = None  # 1 = off
    min_p: float | None = None  # 0 = off
    repetition_penalty: float | None = None  # 1 = off (CTRL-style, on every token seen)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 256  # None: until the context is full
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        checks = [
            (self.temperature is None or self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k is None or self.top_k >= 0, "top_k must be >= 0"),
            (self.top_p is None or 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.min_p is None or 0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty is None or self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_tokens is None or self.max_tokens >= 0, "max_tokens must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @classmethod
    def greedy(cls, **kw) -> "SamplingParams":
        return cls(temperature=0.0, **kw)

    def resolve(self, generation_config: dict | None = None) -> "SamplingParams":
        """Fill unset fields from generation_config (do_sample false means greedy), then built-ins."""
        gc = generation_config or {}
        filled = {}
        for name, default in BUILTIN_DEFAULTS.items():
            if getattr(self, name) is None:
                value = gc.get(name, default)
                filled[name] = default if value is None else value
        if self.temperature is None and gc.get("do_sample") is False:
            filled["temperature"] = 0.0
        return replace(self, **filled)

    def with_updates(self, **kw) -> "SamplingParams":
        valid = {f.name for f in fields(self)}
        unknown = set(kw) - valid
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {sorted(unknown)}; valid: {sorted(valid)}")
        return replace(self, **kw)


class Sampler:
    """Samples one sequence's next token from fp32 logits; holds its RNG and token counts."""

    def __init__(self, params: SamplingParams, vocab_size: int, device):
        self.p = params
        self.generator = None
        if params.temperature and params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.penalized = (params.repetition_penalty not in (None, 1.0) or params.presence_penalty
                          or params.frequency_penalty)

    def observe(self, token_ids) -> None:
        """Tokens the penalties should count (the prompt and each generated token)."""
        if self.penalized and len(token_ids):
            ids = torch.as_tensor(token_ids, device=self.counts.device)
            self.counts.index_add_(0, ids, torch.ones(len(ids), device=self.counts.device))

    def __call__(self, logits: torch.Tensor) -> int:
        p = self.p
        logits = logits.float()
        if self.penalized:
            seen = self.counts > 0
            rp = p.repetition_penalty or 1.0
            if rp != 1.0:
                logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
            logits = logits - p.presence_penalty * seen.float() - p.frequency_penalty * self.counts
        if not p.temperature:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.min_p:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p is not None and p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_probs, dim=-1)
            drop = cum - sorted_probs > p.top_p * cum[-1]  # keep the smallest prefix reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))
