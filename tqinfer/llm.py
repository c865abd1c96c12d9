"""LLM and sessions: the face over the engine that the CLI, the chat and the server share."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    """Running statistics of one request, carried by every streamed event."""

    prompt_tokens: int = 0  # tokens prefilled for this request (reused prefix excluded)
    prompt_seconds: float = 0.0
    generation_tokens: int = 0
    generation_seconds: float = 0.0
    context_tokens: int = 0  # tokens in the sequence's cache now
    context_max: int = 0
    kv_bytes: int = 0  # bytes the cache holds for this sequence
    kv_bytes_bf16: int = 0  # what a bf16 cache would hold for the same tokens
    peak_memory: int = 0  # bytes, device peak (CUDA) or process RSS peak (CPU)
    reused_tokens: int = 0  # prompt tokens served from the cached prefix

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


@dataclass
class StreamEvent:
    """The one streamed response type: a text delta and/or a token, stats, and finish_reason when done.

    finish_reason: None while streaming, then "stop" (EOS or stop string), "length" (max_tokens),
    "context" (context full) or "cancelled" (the caller asked to stop)."""

    text: str = ""
    token: int | None = None
    stats: Stats = field(default_factory=Stats)
    finish_reason: str | None = None
