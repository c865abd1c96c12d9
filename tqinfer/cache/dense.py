"""Dense KV cache in the model's own dtype: the numerical reference, and the fast CPU path for bf16.

Static and preallocated: per layer K and V of shape [max_seqs, H, max_len, d], so one sequence's
tokens are contiguous and attention is one SDPA call per sequence with no gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(prefix: int, n: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean [n, prefix + n]: query i (position prefix + i) sees key j iff j <= prefix + i
    (and j > prefix + i - window for a sliding-window layer). None when every key is visible."""
    if n == 1 and (window is None or prefix < window):
        return None
    qpos = torch.arange(prefix, prefix + n, device=device)[:, None]
    kpos = torch.arange(prefix + n, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def step_mask(ctx, prefix: int, n: int, window: int | None, q: torch.Tensor) -> torch.Tensor | None:
    """causal_mask for a chunk, built once per step and shape (the step's layers share it, in
    ctx.masks). On CUDA as the additive mask in q's dtype that SDPA turns a boolean mask into at every
    call: on the H200 the two [n, prefix + n] passes took ~0.6 ms a layer at 4096 x 32k (default model,
    bf16 cache, docs/BENCHMARKS.md). The masks a step keeps hold at most MASK_ELEMENTS elements in all
    (the pieces of a split chunk, or the chunks of several sequences, past that are built per call)."""
    masks = getattr(ctx, "masks", None)
    key = (prefix, n, window)
    if masks is not None and key in masks:
        return masks[key]
    mask = causal_mask(prefix, n, window, q.device)
    if mask is not None and q.is_cuda:
        mask = torch.full(mask.shape, float("-inf"), dtype=q.dtype, device=q.device).masked_fill_(mask, 0.0)
    if masks is not None and mask is not None \
            and sum(m.numel() for m in masks.values()) + mask.numel() <= MASK_ELEMENTS:
        masks[key] = mask
    return mask


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """q [n, Hq, d], k/v [H, L, d] -> [n, Hq, d] with grouped-query heads.

    The G query heads of a KV head become G*n rows of one attention call, so K and V are read in
    place (no per-step repeat of the cache)."""
    n, Hq, d = q.shape
    H = k.shape[0]
    G = Hq // H
    if q.is_cuda:  # 4-D with enable_gqa picks the split-KV (flash-decoding) kernels on the GPU
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask,
                                             scale=scale, enable_gqa=G > 1)
        return out[0].transpose(0, 1)
    # 4-D inputs select the CPU flash kernel (fp32 accumulation over bf16 tiles); 3-D ones fall back
    # to the math path, which upcasts K and V every call (measured 1.5-2x slower at 2k-6k context)
    qg = q.view(n, H, G, d).permute(1, 2, 0, 3).reshape(1, H, G * n, d)
    if mask is not None and G > 1:
        mask = mask.repeat(G, 1)
    out = F.scaled_dot_product_attention(qg, k[None], v[None], attn_mask=mask, scale=scale)
    return out.view(H, G, n, d).permute(2, 0, 1, 3).reshape(n, Hq, d)


# a chunk's queries attend in calls whose mask [rows, keys] holds at most this many elements (2^28: a
# 4096-token chunk in one call up to a 64k context; at 1M tokens, 256 rows a call), so a mask takes at
# most 512 MiB (bf16) at any context; a step keeps at most this many elements of masks (step_mask)
MASK_ELEMENTS = 1 << 28
TOKEN_TILE = 64  # a sequence's rows are allocated in whole tiles of the decode kernel (CUDA)


def allocated_len(max_len: int) -> int:
    return -(-max_len // TOKEN_TILE) * TOKEN_TILE


class DenseCache:
    kind = "dense"

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_seqs: int, max_len: int,
                 dtype: torch.dtype, device):
        alloc = allocated_len(max_len)
        shape = (max_seqs, kv_heads, alloc, head_dim)
        need = 2 * num_layers * max_seqs * kv_heads * alloc * head_dim * torch.finfo(dtype).bits // 8
        from tqinfer.cache.paged import available_memory

        free = available_memory(torch.device(device))
        if need > free:
            from tqinfer.errors import CacheMemoryError

            raise CacheMemoryError(
                f"the dense KV cache for {max_seqs} x {max_len} tokens needs {need / 2**20:.1f} MiB but only "
                f"{free / 2**20:.1f} MiB is free on {device}; use a smaller -c or a compressed cache type "
                "(-ctk/-ctv; tqinfer estimate shows the options)")
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.max_seqs = max_seqs
        self.lens = [0] * max_seqs

    def attend(self, layer, q, k, v, ctx, scale, window):
        if ctx.decode and window is None and self.graph_ready(q.shape[-1]):
            return self._attend_decode(layer, q, k, v, ctx, scale)
        out = torch.empty_like(q)
        K, V = self.k[layer], self.v[layer]
        start = 0
        for slot, prefix, n in zip(ctx.slots, ctx.prefix_lens, ctx.chunk_lens):
            end = prefix + n
            K[slot, :, prefix:end] = k[start:start + n].transpose(0, 1)
            V[slot, :, prefix:end] = v[start:start + n].transpose(0, 1)
            rows = max(1, MASK_ELEMENTS // max(1, end))  # query rows a call takes: its mask stays bounded
            for i in range(0, n, rows):
                m = min(rows, n - i)
                mask = step_mask(ctx, prefix + i, m, window, q)
                out[start + i:start + i + m] = sdpa(q[start + i:start + i + m], K[slot, :, :prefix + i + m],
                                                    V[slot, :, :prefix + i + m], mask, scale)
            start += n
        return out

    # --- decode steps on CUDA: the paged decode kernel (one block of max_len per sequence), then
    # the new token's K/V written by device indices alone, so the step can be captured in a graph
    def decode_plan(self, slots: list[int], prefix_lens: list[int]) -> list[int]:
        for slot, p in zip(slots, prefix_lens):
            self.reserve(slot, p + 1)
        return list(prefix_lens)

    def kernel_state(self) -> list:
        """No codecs: nothing beside the buffers that a captured step reads (see PagedCache)."""
        return []

    def prepare_graph(self) -> list:
        """Nothing to do ahead of a capture (see PagedCache)."""
        return []

    def graph_ready(self, head_dim: int) -> bool:
        if not self.k[0].is_cuda:  # (and no Triton import on the CPU path)
            return False
        from tqinfer.kernels.decode_attention import MAX_HEAD_DIM

        return head_dim <= MAX_HEAD_DIM and self.k[0].shape[2] % TOKEN_TILE == 0

    def _attend_decode(self, layer, q, k, v, ctx, scale):
        from tqinfer.cache.paged import LayerCacheView
        from tqinfer.kernels import dispatch

        K, V = self.k[layer], self.v[layer]
        seq = ctx.seq_slot_t
        view = LayerCacheView(K, V, None, None, seq[:, None], seq, 0, 0, K.shape[2], None, None)
        out = dispatch.paged_attention(q, k, v, ctx.cu_q, ctx.prefix_lens_t, view, scale,
                                       prefix_list=ctx.prefix_lens, chunk_list=ctx.chunk_lens)
        pos, seq = ctx.plan[0], ctx.seq_index
        K[seq, :, pos] = k.to(K.dtype)
        V[seq, :, pos] = v.to(V.dtype)
        return out

    # sequence bookkeeping shared with the paged cache: a slot holds max_len tokens, no blocks
    def reserve(self, slot: int, n: int) -> None:
        if n > self.max_len:
            from tqinfer.errors import CacheMemoryError

            raise CacheMemoryError(f"{n} tokens exceed the cache's context of {self.max_len}")

    def blocks_needed(self, n: int) -> int:
        return 0

    def free_block_count(self) -> int:
        return 0

    def set_len(self, slot: int, n: int) -> None:
        self.lens[slot] = n

    def step_state(self, slots: list[int]) -> None:
        """Nothing to save before a step that may stop midway: it writes past the sequences' lengths only."""
        return None

    def restore_step_state(self, slots: list[int], saved: None) -> None:
        pass

    def truncate(self, slot: int, n: int) -> None:
        self.lens[slot] = min(n, self.lens[slot])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def seq_nbytes(self, slot: int) -> int:
        per_token = sum(t.shape[1] * t.shape[3] * t.element_size() for t in self.k + self.v)
        return per_token * self.lens[slot]
