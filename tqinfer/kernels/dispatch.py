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
        if kernel is not None and kernel.__name__ == "paged_prefill_attention":
            return kernel(q, k, v, cu_q, prefix_lens, view, scale, prefix_list=prefix_list, chunk_list=chunk_list)
        if kernel is not None:
            return kernel(q, k, v, cu_q, prefix_lens, view, scale)
    return reference.paged_attention(q, k, v, cu_q, prefix_lens, view, scale, window, prefix_list, chunk_list)


def _quantize_kernel(name: str):
    """quantize.<name> where Triton imports, else None (the twin runs)."""
    try:
        from tqinfer.kernels import quantize
    except ImportError:
        return None
    return getattr(quantize, name)


def write_tokens(codec, x, pool, slots):
    kernel = _quantize_kernel("write_tokens") if use_triton(x) else None
    if kernel is not None:
        return kernel(codec, x, pool, slots)
    return reference.write_tokens(codec, x, pool, slots)


def write_kv_tokens(k_codec, k, k_pool, v_codec, v, v_pool, slots):
    """K and V records of the same tokens (one launch on CUDA where their layouts agree)."""
    kernel = _quantize_kernel("write_kv_tokens") if use_triton(k) else None
    if kernel is not None:
        return kernel(k_codec, k, k_pool, v_codec, v, v_pool, slots)
    reference.write_tokens(k_codec, k, k_pool, slots)
    reference.write_tokens(v_codec, v, v_pool, slots)


def shift_window(k_codec, v_codec, k_hot, v_hot, k_pool, v_pool, k, v, seq, src_hot, hot_new, rec_dst):
    """The window's oldest tokens to records, the new tokens into their hot rows (see reference)."""
    args = (k_codec, v_codec, k_hot, v_hot, k_pool, v_pool, k, v, seq, src_hot, hot_new, rec_dst)
    kernel = _quantize_kernel("shift_window") if use_triton(k) else None
    return kernel(*args) if kernel is not None else reference.shift_window(*args)
