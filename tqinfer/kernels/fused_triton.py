"""Triton kernels of tqinfer/kernels/fused.py (imported on first use, so the CPU path never loads
Triton): one program per row (norm), per (token, head) (RoPE + split), per (row, 1024 columns) (SiLU),
per tile of weight rows (decode projections)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tqinfer.kernels.decode_attention import INTERPRET, _capability

# programmatic dependent launch (Hopper and later): each kernel may launch while the one before it runs, waits
# for it (griddepcontrol.wait) before reading or writing anything, then lets the next one launch; the
# projection kernel prefetches its first weight columns to L2 before its wait. None: on where the device has it.
PDL = None
# H200, 2026-12-01 17:24-17:27 (docs/BENCHMARKS.md, "Decode projections by a Triton kernel"), tok/s of the default
# model (4k, tq3.5) / the 8B shape (32k, tq3.5): no PDL 1130.3-1130.6 / 193.3-193.5; the projection kernel
# releasing the next one at its end, without / with the prefetch of up to 2048 columns: 1208.8 / 1267.9-1273.0
# and 194.8 / 188.8-189.1 (the 8B weights, 33-117 MB, compete with the kernel before); releasing at its start,
# with the prefetch for every weight 1295.8 / 191.2; as committed (the prefetch for weights <= PREFETCH_BYTES),
# 17:30: 1295.1 / 197.8 (no PDL in that call: 1123.5 / 193.1)
PREFETCH_BYTES = 16 << 20
# the projection kernel's devices: compute capability 9.0+ with shared memory for its four stages (up to 144 KB
# a program): Hopper and data-center Blackwell; it was tuned and measured on an H200 only
SKINNY_SHARED_BYTES = 200 << 10
_SKINNY: dict = {}


def _hopper(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.version.hip is None and _capability(t.device) >= (9, 0)


def pdl(t: torch.Tensor) -> bool:
    """Whether this module's kernels launch early on t's device: never under the interpreter, else PDL where
    set, else on CUDA devices of compute capability 9.0+."""
    if INTERPRET:
        return False
    if PDL is not None:
        return PDL
    return _hopper(t)


def skinny_device(t: torch.Tensor) -> bool:
    """Whether fused.linear sends decode rows on t's device to the projection kernel (SKINNY_SHARED_BYTES);
    off CUDA (the interpreter's tests) always."""
    if t.device.type != "cuda":
        return True
    if t.device not in _SKINNY:
        shared = getattr(torch.cuda.get_device_properties(t.device), "shared_memory_per_multiprocessor", 0)
        _SKINNY[t.device] = _hopper(t) and shared >= SKINNY_SHARED_BYTES  # (unknown memory: cuBLAS)
    return _SKINNY[t.device]


@triton.jit
def _wait_and_release(PDL: tl.constexpr):
    """With PDL: wait for the kernel before (its writes visible), then let the next one launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _add_rms_norm_kernel(x_ptr, h_ptr, w_ptr, out_x_ptr, out_n_ptr, D, eps, HAS_H: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
    _wait_and_release(PDL)
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
        early = pdl(x)
        _add_rms_norm_kernel[(t,)](x, h.contiguous() if h is not None else x, weight, out_x, out_n, d, eps,
                                   HAS_H=h is not None, BLOCK=triton.next_power_of_2(d), PDL=early, num_warps=4,
                                   launch_pdl=early)
    return out_x, out_n


@triton.jit
def _rope_split_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, s_t, s_cos,
                       NQ: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr, PDL: tl.constexpr):
    _wait_and_release(PDL)
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
        early = pdl(qkv)
        _rope_split_kernel[(t, nq + 2 * nkv)](qkv, positions, cos_table, sin_table, q, k, v, qkv.stride(0),
                                              cos_table.stride(0), NQ=nq, NKV=nkv, HD=hd, PDL=early,
                                              num_warps=1, launch_pdl=early)
    return q, k, v


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, H, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _wait_and_release(PDL)
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
        early = pdl(gu)
        _silu_mul_kernel[(t, triton.cdiv(h, block))](gu, out, h, BLOCK=block, PDL=early, num_warps=4,
                                                      launch_pdl=early)
    return out


def skinny_config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, stages) of _skinny_linear_kernel for a [n, k] weight (n < fused.SKINNY_MAX_OUT):
    tiles of 16 rows below n = 2048 (so that small projections still spread over the SMs), else 32;
    128 / 256 / 512 columns as k grows; four stages (at most 144 KB of shared memory: 32 x 512 tiles of w
    and x's 16 rows, three buffered). From a sweep on the H200 (docs/BENCHMARKS.md, "Decode projections by
    a Triton kernel")."""
    bn = 32 if n >= 2048 else 16
    bk = 128 if k <= 1024 else 512 if k >= 8192 else 256
    return bn, bk, 4


@triton.jit
def _skinny_linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, s_xm, s_wn, s_ym, HAS_BIAS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr,
                          PREFETCH_K: tl.constexpr):
    """y [M, N] = x [M, K] . w [N, K]^T (+ b), M <= 16: program n streams rows n * BLOCK_N .. of w once,
    the rows of x padded to the mma's 16, fp32 accumulation. DOT_F32: operands cast to fp32 first (the
    interpreter, whose tl.dot mishandles bf16). PDL: the lines of the first PREFETCH_K weight columns (if
    any) prefetched to L2 (weights are no kernel's output) before the wait for the kernel before."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, 16)
    kk = tl.arange(0, BLOCK_K)
    wp = w_ptr + n[:, None].to(tl.int64) * s_wn + kk[None, :]
    if PDL and PREFETCH_K > 0:
        PER_LINE: tl.constexpr = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth  # elements a 128-byte line
        rows = w_ptr + tl.minimum(n, N - 1)[:, None].to(tl.int64) * s_wn
        lp = rows + tl.arange(0, PREFETCH_K // PER_LINE)[None, :] * PER_LINE
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.b32 $0, 0;", "=r,l", [lp], dtype=tl.int32,
                                  is_pure=False, pack=1)
    _wait_and_release(PDL)
    xp = x_ptr + m[:, None].to(tl.int64) * s_xm + kk[None, :]
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = tl.load(wp + k0, mask=(n[:, None] < N) & (kk[None, :] < K - k0), other=0.0)
        x = tl.load(xp + k0, mask=(m[:, None] < M) & (kk[None, :] < K - k0), other=0.0)
        if DOT_F32:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None] * s_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(m[:, None] < M) & (n[None, :] < N))


def skinny_linear(x, weight, bias):
    """x [m, k] . weight [n, k]^T (+ bias) for 1 <= m <= 16 (the mma's rows), rows of x and weight unit-strided
    (fused.linear checks the shapes, dtypes and strides it sends here)."""
    m, k = x.shape
    n = weight.shape[0]
    if not 0 < m <= 16:
        raise ValueError(f"the projection kernel takes 1 to 16 rows, not {m}")
    y = x.new_empty(m, n)
    bn, bk, stages = skinny_config(n, k)
    early = pdl(x)
    # prefetch while the kernel before runs: small weights only (larger ones compete with it for bandwidth)
    small = n * k * weight.element_size() <= PREFETCH_BYTES
    ahead = min(max(triton.next_power_of_2(k) // 2, 64), 2048) if early and small else 0
    _skinny_linear_kernel[(triton.cdiv(n, bn),)](x, weight, bias if bias is not None else weight, y, m, n, k,
                                                 x.stride(0), weight.stride(0), y.stride(0), HAS_BIAS=bias is not None,
                                                 BLOCK_N=bn, BLOCK_K=bk, DOT_F32=INTERPRET, PDL=early,
                                                 PREFETCH_K=ahead, num_warps=4,
                                                 num_stages=stages, launch_pdl=early)
    return y
