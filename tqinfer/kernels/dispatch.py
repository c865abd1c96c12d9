"""Chooses the fused Triton kernel on CUDA and the torch twin elsewhere (same signature, same math)."""

from __future__ import annotations

import os

from tqinfer.kernels import reference


def kernels_enabled() -> bool:
    """False when TQINFER_KERNELS=torch asks for the torch twins everywhere."""
    return os.environ.get("TQINFER_KERNELS", "triton") != "torch"


def use_triton(t) -> bool:
    return t.is_cuda and kernels_enabled()


def paged_attention(q, k, v, cu_q, prefix_lens, view, scale, window=None, prefix_list=None, chunk_list=None):
    if use_triton(q) and window is None:
        try:
            if chunk_list is not None and all(n == 1 for n in chunk_list):
                from tqinfer.kernels.decode_attention import paged_decode_attention as kernel
            else:
                from tqinfer.kernels.prefill_attention import paged_prefill_attention as kernel
        except ImportError:
            kernel = None
        if kernel is not None:
            return kernel(q, k, v, cu_q, prefix_lens, view, scale)
    return reference.paged_attention(q, k, v, cu_q, prefix_lens, view, scale, window, prefix_list, chunk_list)


def write_tokens(codec, x, pool, slots):
    if use_triton(x):
        try:
            from tqinfer.kernels.quantize import write_tokens as kernel
        except ImportError:
            kernel = None
        if kernel is not None:
            return kernel(codec, x, pool, slots)
    return reference.write_tokens(codec, x, pool, slots)


def write_kv_tokens(k_codec, k, k_pool, v_codec, v, v_pool, slots):
    """K and V records of the same tokens (one launch on CUDA where their layouts agree)."""
    if use_triton(k):
        try:
            from tqinfer.kernels.quantize import write_kv_tokens as kernel
        except ImportError:
            kernel = None
        if kernel is not None:
            return kernel(k_codec, k, k_pool, v_codec, v, v_pool, slots)
    reference.write_tokens(k_codec, k, k_pool, slots)
    reference.write_tokens(v_codec, v, v_pool, slots)
