"""Small fused kernels of the decoder layer, so a decode step is a few kernels per layer rather than
dozens (each kernel of a CUDA graph costs its launch slot even when its work is tiny):

- `add_rms_norm`: the residual add and the next RMSNorm in one pass;
- `rope_split`: the fused q/k/v projection's output split into q, k (rotary-embedded) and v;
- `silu_mul`: SiLU(gate) * up from the fused gate/up projection.

Each has a torch twin, used off CUDA and as the tests' oracle; the twins are the model's math as
written in models/llama.py before fusion (rotate_half RoPE, RMSNorm in fp32).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def use_triton(t: torch.Tensor, kernel: bool | None) -> bool:
    """The Triton kernel on CUDA (unless TQINFER_KERNELS=torch); kernel=True forces it (the
    interpreter's tests), False the twin."""
    if kernel is not None:
        return kernel
    return t.is_cuda and os.environ.get("TQINFER_KERNELS", "triton") != "torch"


# --- residual add + RMSNorm -------------------------------------------------------------------------
@triton.jit
def _add_rms_norm_kernel(x_ptr, h_ptr, w_ptr, out_x_ptr, out_n_ptr, D, eps, HAS_H: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)
    if HAS_H:  # the sum is rounded to the residual's dtype, as the unfused add would store it
        x = (x.to(tl.float32) + tl.load(h_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(out_x_ptr.dtype.element_ty)
        tl.store(out_x_ptr + row * D + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_n_ptr + row * D + cols, (xf * rstd * w).to(out_n_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 kernel: bool | None = None):
    """(x + h, RMSNorm(x + h) * weight) for x, h [T, D]; h None: (x, RMSNorm(x) * weight)."""
    if not use_triton(x, kernel):
        if h is not None:
            x = x + h
        return x, F.rms_norm(x, (x.shape[-1],), weight, eps)
    t, d = x.shape
    x = x.contiguous()
    out_x = torch.empty_like(x) if h is not None else x
    out_n = torch.empty_like(x)
    if t:
        _add_rms_norm_kernel[(t,)](x, h.contiguous() if h is not None else x, weight, out_x, out_n, d, eps,
                                   HAS_H=h is not None, BLOCK=triton.next_power_of_2(d), num_warps=4)
    return out_x, out_n


# --- q/k/v split + rotary embedding ---------------------------------------------------------------------
@triton.jit
def _rope_split_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, s_t, s_cos,
                       NQ: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    HALF: tl.constexpr = HD // 2
    i = tl.arange(0, HALF)
    src = qkv_ptr + t * s_t + h * HD
    x1 = tl.load(src + i)
    x2 = tl.load(src + HALF + i)
    if h < NQ + NKV:
        pos = tl.load(pos_ptr + t)
        c = tl.load(cos_ptr + pos * s_cos + i).to(tl.float32)
        s = tl.load(sin_ptr + pos * s_cos + i).to(tl.float32)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        o1 = (a * c - b * s).to(x1.dtype)
        o2 = (b * c + a * s).to(x1.dtype)
        if h < NQ:
            dst = q_ptr + (t * NQ + h) * HD
        else:
            dst = k_ptr + (t * NKV + h - NQ) * HD
        tl.store(dst + i, o1)
        tl.store(dst + HALF + i, o2)
    else:
        dst = v_ptr + (t * NKV + h - NQ - NKV) * HD
        tl.store(dst + i, x1)
        tl.store(dst + HALF + i, x2)


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d] rotated (rotate_half convention); cos/sin [T, 1, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_split(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
               nq: int, nkv: int, hd: int, kernel: bool | None = None):
    """qkv [T, (nq + 2 nkv) * hd] -> q [T, nq, hd], k [T, nkv, hd] with RoPE at `positions` (tables
    [max_pos, hd], halves duplicated), v [T, nkv, hd]; all contiguous."""
    t = qkv.shape[0]
    if not use_triton(qkv, kernel) or hd % 2 or (hd // 2) & (hd // 2 - 1):  # halves of 2^n lanes
        q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd], dim=-1)
        cos, sin = cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)
        return (rope_torch(q.view(t, nq, hd), cos, sin), rope_torch(k.view(t, nkv, hd), cos, sin),
                v.reshape(t, nkv, hd))
    if qkv.stride(1) != 1:
        qkv = qkv.contiguous()
    q = qkv.new_empty(t, nq, hd)
    k = qkv.new_empty(t, nkv, hd)
    v = qkv.new_empty(t, nkv, hd)
    if t:
        _rope_split_kernel[(t, nq + 2 * nkv)](qkv, positions, cos_table, sin_table, q, k, v, qkv.stride(0),
                                              cos_table.stride(0), NQ=nq, NKV=nkv, HD=hd, num_warps=1)
    return q, k, v


# --- SiLU(gate) * up --------------------------------------------------------------------------------
@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, H, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    g = tl.load(gu_ptr + row * 2 * H + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * H + H + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded like F.silu's output
    tl.store(out_ptr + row * H + cols, (silu * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gu: torch.Tensor, kernel: bool | None = None) -> torch.Tensor:
    """gu [T, 2H] (gate then up) -> SiLU(gate) * up [T, H]."""
    t, h2 = gu.shape
    h = h2 // 2
    if not use_triton(gu, kernel):
        g, u = gu.split([h, h], dim=-1)
        return F.silu(g) * u
    gu = gu.contiguous()
    out = gu.new_empty(t, h)
    block = 1024
    if t:
        _silu_mul_kernel[(t, triton.cdiv(h, block))](gu, out, h, BLOCK=block, num_warps=4)
    return out
