"""LLMEngine: runs forward steps of a model over a cache for a batch of sequence chunks."""

from __future__ import annotations

import threading

import torch

from tqinfer.engine.context import StepContext, set_context


class LLMEngine:
    def __init__(self, model, cache, device):
        self.model = model
        self.cache = cache
        self.device = torch.device(device)
        self.lock = threading.Lock()  # several streams may share the engine; steps run one at a time

    @torch.inference_mode()
    def forward(self, slots: list[int], prefix_lens: list[int], chunks: list[list[int]],
                all_logits: bool = False) -> torch.Tensor:
        """Run one step: chunk i (token ids) of sequence `slots[i]` starts at prefix_lens[i].

        Returns fp32 logits: for every token when all_logits, else for each chunk's last token."""
        ctx = StepContext.build(self.cache, slots, prefix_lens, [len(c) for c in chunks], self.device)
        ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=self.device)
        positions = ctx.positions(self.device)
        index = None if all_logits else (ctx.cu_q[1:] - 1).long()
        with self.lock:
            set_context(ctx)
            try:
                logits = self.model(ids, positions, index, max(p + len(c) for p, c in zip(prefix_lens, chunks)) - 1)
            finally:
                set_context(None)
            for slot, prefix, chunk in zip(slots, prefix_lens, chunks):
                self.cache.set_len(slot, prefix + len(chunk))
        return logits
