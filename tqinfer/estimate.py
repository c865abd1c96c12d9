"""Memory planning: weights, KV cache and activations for a context, and the largest context that fits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tqinfer.cache.config import CacheConfig, bytes_per_token, fixed_bytes
from tqinfer.cache.dense import MASK_ELEMENTS, allocated_len
from tqinfer.kernels.reference import TILE_TOKENS
from tqinfer.models import build_model


def parameter_count(args) -> int:
    D, I, L = args.hidden_size, args.intermediate_size, args.num_hidden_layers
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    per_layer = D * q + 2 * D * kv + q * D + 3 * D * I + 2 * D
    if args.attention_bias:
        per_layer += q + 2 * kv
    if args.qk_norm:
        per_layer += 2 * args.head_dim
    embed = args.vocab_size * D
    return L * per_layer + embed * (1 if args.tie_word_embeddings else 2) + D


@dataclass
class Estimate:
    context: int
    weights: int
    kv_cache: int
    kv_cache_bf16: int
    activations: int
    memory: int  # what is available to fit into

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.memory


def activation_bytes(args, chunk: int, dtype: torch.dtype) -> int:
    """Peak of one prefill chunk: hidden states, the MLP, attention scores of one tile, the logits."""
    elt = torch.finfo(dtype).bits // 8
    hidden = chunk * (4 * args.hidden_size + 3 * args.intermediate_size) * elt
    scores = chunk * args.num_attention_heads * TILE_TOKENS * 4 * 3
    return hidden + scores + args.vocab_size * 4 * 2


def mask_bytes(args, cache: CacheConfig, chunk: int, context: int, dtype: torch.dtype, device="cuda") -> int:
    """The dense cache's prefill masks at most (DenseCache.attend: a step keeps MASK_ELEMENTS, a call
    builds one more of as many): additive in dtype + its boolean source, and on the CPU a copy per query
    head of a group (dense.sdpa folds the group's heads into rows there)."""
    if not cache.dense:
        return 0
    group = args.num_attention_heads // args.num_key_value_heads
    repeat = group if torch.device(device).type == "cpu" and group > 1 else 0
    return 2 * min(chunk * (context + chunk), MASK_ELEMENTS) * (torch.finfo(dtype).bits // 8 + 1 + repeat)


def estimate(config: dict, cache: CacheConfig, context: int, dtype: torch.dtype, memory: int,
             max_seqs: int = 1, chunk: int = 512, device="cuda") -> Estimate:
    _, args = build_model(config)
    elt = torch.finfo(dtype).bits // 8
    per_token = bytes_per_token(args, cache, dtype)
    if cache.dense:  # DenseCache: each sequence's rows in whole tiles
        kv = max_seqs * allocated_len(context) * per_token
    else:  # PagedCache: whole blocks, one scratch block, sinks + window buffers per sequence
        blocks = max_seqs * -(-context // cache.block_size) + 1
        kv = blocks * cache.block_size * per_token + max_seqs * fixed_bytes(args, cache, dtype)
    kv_bf16 = max_seqs * context * bytes_per_token(args, cache.dense_twin())
    act = activation_bytes(args, chunk, dtype) + mask_bytes(args, cache, chunk, context, dtype, device)
    return Estimate(context, parameter_count(args) * elt, kv, kv_bf16, act, memory)


def largest_context(config: dict, cache: CacheConfig, dtype: torch.dtype, memory: int, limit: int | None = None,
                    chunk: int = 512, device="cuda") -> int:
    """The longest context (a multiple of the block size) whose weights + cache + activations fit."""
    _, args = build_model(config)
    base = estimate(config, cache, 0, dtype, memory, chunk=chunk, device=device)
    per_token = bytes_per_token(args, cache, dtype)
    bs = cache.block_size
    hi = max(0, memory - base.total) // per_token // bs + 1  # in blocks: every term grows with the context
    lo = 0
    while hi - lo > 1:  # estimate(lo) fits (or lo is 0), estimate(hi) does not
        mid = (lo + hi) // 2
        if estimate(config, cache, mid * bs, dtype, memory, chunk=chunk, device=device).fits:
            lo = mid
        else:
            hi = mid
    n = lo * bs
    return min(n, limit) if limit else n
