"""Per-step metadata: set by the engine before a forward pass, read by the attention of every layer.

A step's integer metadata travels to the device in one copy (`step_meta` lays it out, `from_meta`
slices it). A decode step (every chunk one token) also carries the cache's write plan, so the cache
writes need no host-side index work and the whole step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepContext:
    cache: object  # the cache the layers attend over (tqinfer.cache.*)
    slots: list[int]  # cache sequence slot of each batch entry
    prefix_lens: list[int]  # tokens already cached per entry (the chunk starts there)
    chunk_lens: list[int]  # new tokens per entry; the step's T = sum(chunk_lens)
    cu_q: torch.Tensor  # int32 [B+1] chunk boundaries in the flat token batch (device)
    prefix_lens_t: torch.Tensor  # int32 [B] (device)
    seq_slot_t: torch.Tensor  # int32 [B] cache slot of each entry (device)
    positions_t: torch.Tensor  # int64 [T] position of every token (device)
    seq_index: torch.Tensor | None = None  # int64 [B]: the same slots, for indexing (device)
    plan: torch.Tensor | None = None  # int64 [rows, B]: the cache's decode write plan; None when prefilling
    block_rows: torch.Tensor | None = None  # int32 [B, max_blocks]: block-table rows (paged cache)
    masks: dict = field(default_factory=dict)  # attention masks every layer of the step shares, by shape

    @property
    def decode(self) -> bool:
        return self.plan is not None

    @classmethod
    def build(cls, cache, slots, prefix_lens, chunk_lens, device) -> "StepContext":
        meta, _ = step_meta(cache, slots, prefix_lens, chunk_lens)
        return cls.from_meta(cache, slots, prefix_lens, chunk_lens, torch.tensor(meta, dtype=torch.long, device=device))

    @classmethod
    def from_meta(cls, cache, slots, prefix_lens, chunk_lens, meta: torch.Tensor) -> "StepContext":
        """Slice `meta` (int64, on the device, laid out by step_meta) into the step's tensors. Pure
        device work: a CUDA graph captures it, and replays it over new contents of the same buffer."""
        t, b = sum(chunk_lens), len(slots)
        o = 0
        positions = meta[o:o + t]
        o += t
        prefix = meta[o:o + b].to(torch.int32)
        o += b
        seq_index = meta[o:o + b]
        o += b
        cu = meta[o:o + b + 1].to(torch.int32)
        o += b + 1
        plan = meta[o:].view(-1, b) if meta.shape[0] > o else None
        table = getattr(cache, "block_table", None)
        rows = table[seq_index] if table is not None else None
        return cls(cache, list(slots), list(prefix_lens), list(chunk_lens), cu, prefix, seq_index.to(torch.int32),
                   positions, seq_index, plan, rows)


def is_decode(chunk_lens: list[int]) -> bool:
    return len(chunk_lens) > 0 and all(n == 1 for n in chunk_lens)


def step_meta(cache, slots, prefix_lens, chunk_lens) -> tuple[list[int], bool]:
    """Host integers of a step, in from_meta's layout: positions [T], prefix lengths [B], slots [B],
    chunk boundaries [B+1], then (decode steps the cache plans) the cache's write plan; and whether
    the plan is there."""
    positions = [p + i for p, n in zip(prefix_lens, chunk_lens) for i in range(n)]
    cu = [0]
    for n in chunk_lens:
        cu.append(cu[-1] + n)
    plan = None
    if is_decode(chunk_lens):
        plan = cache.decode_plan(slots, prefix_lens)
    return positions + list(prefix_lens) + list(slots) + cu + (plan or []), plan is not None


_current: StepContext | None = None


def set_context(ctx: StepContext | None) -> None:
    global _current
    _current = ctx


def get_context() -> StepContext:
    if _current is None:
        raise RuntimeError("attention called outside an engine step (no StepContext set)")
    return _current
