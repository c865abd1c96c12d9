"""Per-step metadata: set by the engine before a forward pass, read by the attention of every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepContext:
    cache: object  # the cache the layers attend over (tqinfer.cache.*)
    slots: list[int]  # cache sequence slot of each batch entry
    prefix_lens: list[int]  # tokens already cached per entry (the chunk starts there)
    chunk_lens: list[int]  # new tokens per entry; the step's T = sum(chunk_lens)
    cu_q: torch.Tensor  # int32 [B+1] chunk boundaries in the flat token batch (device)
    prefix_lens_t: torch.Tensor  # int32 [B] (device)

    @classmethod
    def build(cls, cache, slots, prefix_lens, chunk_lens, device) -> "StepContext":
        cu = [0]
        for n in chunk_lens:
            cu.append(cu[-1] + n)
        return cls(
            cache=cache,
            slots=list(slots),
            prefix_lens=list(prefix_lens),
            chunk_lens=list(chunk_lens),
            cu_q=torch.tensor(cu, dtype=torch.int32, device=device),
            prefix_lens_t=torch.tensor(prefix_lens, dtype=torch.int32, device=device),
        )

    def positions(self, device) -> torch.Tensor:
        return torch.cat(
            [torch.arange(p, p + n, device=device) for p, n in zip(self.prefix_lens, self.chunk_lens)]
        )


_current: StepContext | None = None


def set_context(ctx: StepContext | None) -> None:
    global _current
    _current = ctx


def get_context() -> StepContext:
    if _current is None:
        raise RuntimeError("attention called outside an engine step (no StepContext set)")
    return _current
