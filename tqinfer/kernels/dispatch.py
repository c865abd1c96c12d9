"""Chooses the fused Triton kernel on CUDA and the torch twin elsewhere (same signature, same math)."""

from __future__ import annotations

import os
from dataclasses import replace
from itertools import accumulate

import torch

from tqinfer.kernels import reference


def kernels_enabled() -> bool:
    """False when TQINFER_KERNELS=torch asks for the torch twins everywhere."""
    return os.environ.get("TQINFER_KERNELS", "triton") != "torch"


def use_triton(t) -> bool:
    return t.is_cuda and kernels_enabled()


def paged_attention(q, k, v, cu_q, prefix_lens, view, scale, window=None, prefix_list=None, chunk_list=None,
                    enter=None):
    """Attention of the step's queries over the view (and the chunks' own tokens). enter (decode steps,
    one token a sequence): then the new tokens take hot rows enter of their sequences (the decode
    kernel's merge writes them; the other paths after attention)."""
    if use_triton(q) and window is None:
        try:
            from tqinfer.kernels.decode_attention import paged_decode_attention as decode
            from tqinfer.kernels.prefill_attention import paged_prefill_attention as prefill
        except ImportError:
            decode = prefill = None
        if decode is not None:
            if chunk_list is not None and all(n == 1 for n in chunk_list):
                return decode(q, k, v, cu_q, prefix_lens, view, scale, enter=enter)
            if enter is not None:
                raise ValueError("enter is for decode steps (one token a sequence)")
            if chunk_list is not None and prefix_list is not None and 1 in chunk_list:
                return mixed_attention(decode, prefill, q, k, v, prefix_lens, view, scale, prefix_list, chunk_list)
            return prefill(q, k, v, cu_q, prefix_lens, view, scale, prefix_list=prefix_list, chunk_list=chunk_list)
    return reference.paged_attention(q, k, v, cu_q, prefix_lens, view, scale, window, prefix_list, chunk_list,
                                     enter)


def mixed_attention(decode, prefill, q, k, v, prefix_lens, view, scale, prefix_list: list[int],
                    chunk_list: list[int]) -> torch.Tensor:
    """A step of single tokens (decoding sequences) beside prefill chunks (continuous batching): the
    single tokens through the split-KV decode kernel, the chunks through prefill, each group over its
    own rows of the view. (The prefill kernel would walk each single token's prefix in one program
    per KV head; the decode kernel splits it over the GPU.)"""
    out = torch.empty_like(q)
    for single, (rows, idx, toks, cu) in zip((True, False), _mixed_rows(tuple(chunk_list), q.device)):
        if not rows:
            continue
        sub = replace(view, block_table=view.block_table[idx], seq_slot=view.seq_slot[idx])
        args = (q[toks], k[toks], v[toks], cu, prefix_lens[idx], sub, scale)
        if single:
            out[toks] = decode(*args)
        else:
            out[toks] = prefill(*args, prefix_list=[prefix_list[i] for i in rows],
                                chunk_list=[chunk_list[i] for i in rows])
    return out


_MIXED: dict = {}


def _mixed_rows(chunk_list: tuple, device) -> tuple:
    """For the single tokens, then the chunks, of a step: (rows, row index, token index, cu) with the
    indices on the device; kept for the step's chunk lengths, so the copies (each waits for the stream)
    happen once a step rather than once a layer."""
    key = (chunk_list, str(device))
    if key not in _MIXED:
        _MIXED.clear()
        starts = list(accumulate((0,) + chunk_list[:-1]))
        groups = []
        for single in (True, False):
            rows = [i for i, n in enumerate(chunk_list) if (n == 1) == single]
            toks = [t for i in rows for t in range(starts[i], starts[i] + chunk_list[i])]
            cu = [0] + list(accumulate(chunk_list[i] for i in rows))
            groups.append((rows, torch.tensor(rows, device=device), torch.tensor(toks, device=device),
                           torch.tensor(cu, dtype=torch.int32, device=device)))
        _MIXED[key] = tuple(groups)
    return _MIXED[key]


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


def retire_window(layers, seq, src_hot, rec_dst):
    """Records of the tokens leaving the window, in every layer (see reference.retire_window)."""
    kernel = _quantize_kernel("retire_window") if use_triton(seq) else None
    return kernel(layers, seq, src_hot, rec_dst) if kernel is not None else reference.retire_window(
        layers, seq, src_hot, rec_dst)


def prepare_retire(layers) -> list:
    """What retire_window's kernel reads besides the layers (their address tables), made ahead of a
    CUDA graph capture, for the graph to hold; nothing for the twin."""
    kernel = _quantize_kernel("prepare_retire") if layers and use_triton(layers[0][2]) else None
    return kernel(layers) if kernel is not None else []
