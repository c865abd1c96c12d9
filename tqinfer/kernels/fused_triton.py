"""Triton kernels of tqinfer/kernels/fused.py (imported on first use, so the CPU path never loads
Triton): one program per row (norm), per (token, head) (RoPE + split), per (row, 1024 columns) (SiLU)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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


def add_rms_norm(x, h, weight, eps):
    t, d = x.shape
    x = x.contiguous()
    out_x = torch.empty_like(x) if h is not None else x
    out_n = torch.empty_like(x)
    if t:
        _add_rms_norm_kernel[(t,)](x, h.contiguous() if h is not None else x, weight, out_x, out_n, d, eps,
                                   HAS_H=h is not None, BLOCK=triton.next_power_of_2(d), num_warps=4)
    return out_x, out_n


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


def rope_split(qkv, positions, cos_table, sin_table, nq, nkv, hd):
    t = qkv.shape[0]
    if qkv.stride(1) != 1:
        qkv = qkv.contiguous()
    q = qkv.new_empty(t, nq, hd)
    k = qkv.new_empty(t, nkv, hd)
    v = qkv.new_empty(t, nkv, hd)
    if t:
        _rope_split_kernel[(t, nq + 2 * nkv)](qkv, positions, cos_table, sin_table, q, k, v, qkv.stride(0),
                                              cos_table.stride(0), NQ=nq, NKV=nkv, HD=hd, num_warps=1)
    return q, k, v


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, H, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    g = tl.load(gu_ptr + row * 2 * H + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * H + H + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded like F.silu's output
    tl.store(out_ptr + row * H + cols, (silu * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gu):
    t, h2 = gu.shape
    h = h2 // 2
    gu = gu.contiguous()
    out = gu.new_empty(t, h)
    block = 1024
    if t:
        _silu_mul_kernel[(t, triton.cdiv(h, block))](gu, out, h, BLOCK=block, num_warps=4)
    return out
