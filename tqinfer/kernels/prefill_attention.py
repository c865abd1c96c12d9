"""Chunked-prefill attention: a chunk of new tokens attends to its sequence's compressed prefix (codes
dequantized tile by tile in registers/SRAM and multiplied on tensor cores, never a dequantized copy in
HBM), to the full-precision sink / recent tokens, and causally to itself; one online softmax (fp32,
base 2) across the three parts, so the merge is a log-sum-exp by construction.

One program per (sequence, tile of BLOCK_M chunk tokens, KV head): its rows are the BLOCK_M tokens x
G query heads of the group, so each tile of codes is read and dequantized once for all of them.
Values of the compressed prefix accumulate in the codec's rotated space and are un-rotated once at
the end of that part.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .decode_attention import (INTERPRET, LOG2E, NEG, _hot, _layouts, _lut3, _lut4, _tables, hot_attention,
                               kernel_reads, lut_words, pair_centroids, prepare_queries, runnable, swap3)
from .quantize import CodePart, RecordLayout

# ----------------------------------------------------------------------------------------------------
# tiles of centroids in channel order (codes split by shift, interleaved back): the decode kernel reads
# sub-tiles without reordering (decode_attention.py); here the [rows, d] tiles feed one tl.dot each,
# which measured faster for the many query rows of a prefill program (docs/BENCHMARKS.md)


@triton.jit
def _unit_codes(wp, ws, tab_ptr, S: tl.constexpr, BITS: tl.constexpr, TAB: tl.constexpr):
    """Centroids of sub-tile S: codes at shift S of the primary plane's units wp (and the 1-bit
    plane's units ws, pre-shifted, for 3-bit codes). BITS // 16: 0 gathers the centroid table from
    memory (L1), 2 from a register copy (tab_ptr is then the table broadcast over rows), 1 is a
    diagnostic that uses the codes themselves as values (3, pairs of codes, is _leaf's)."""
    if BITS % 16 == 4:
        code = (wp >> (4 * S)) & 15
    elif BITS % 16 == 2:
        code = (wp >> (2 * S)) & 3
    elif BITS % 16 == 1:
        code = (wp >> S) & 1
    else:
        code = ((wp >> (2 * S)) & 3) | (((ws >> S) & 1) << 2)
    if BITS // 16 == 1:
        out = code.to(tl.float32)
    elif BITS // 16 == 2:
        out = tl.gather(tab_ptr, code, 1)
    else:
        out = tl.load(tab_ptr + TAB + code)
    return out


@triton.jit
def _leaf(wp, ws, tab_ptr, S: tl.constexpr, BITS: tl.constexpr, TAB: tl.constexpr):
    """A tree's leaf: sub-tile S's centroids, or in pair mode (BITS // 16 == 3) sub-tiles S and S + 1 as
    fp16x2 pairs from the part's pair table (decode_attention.pair_centroids); in asm mode (4) PRMT
    lookups with the table as immediates (TAB: decode_attention.lut_words)."""
    if BITS // 16 == 3:
        out = pair_centroids(wp, ws, tab_ptr + TAB, S, BITS % 16)
    elif BITS // 16 == 4 and BITS % 16 == 4:
        out = _lut4(wp, S, TAB).to(tl.float32)
    elif BITS // 16 == 4:
        out = _lut3(wp, ws, S, TAB).to(tl.float32)
    else:
        out = _unit_codes(wp, ws, tab_ptr, S, BITS, TAB)
    return out


@triton.jit
def _split_pairs(x):
    """fp16x2 pairs [N, U] -> [N, 2U]: each pair's low half, then its high half. Through fp32: with the
    fp16 halves interleaved straight into the dot, triton 3.6's TritonGPUOptimizeDotOperands pass fails
    (scripts/check_kernels_compile.py)."""
    lo = x.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (x >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return tl.interleave(lo, hi)


@triton.jit
def _tree2(wp, ws, tab_ptr, S0: tl.constexpr, ST: tl.constexpr, BITS: tl.constexpr, TAB: tl.constexpr):
    return tl.interleave(_leaf(wp, ws, tab_ptr, S0, BITS, TAB), _leaf(wp, ws, tab_ptr, S0 + ST, BITS, TAB))


@triton.jit
def _tree4(wp, ws, tab_ptr, S0: tl.constexpr, ST: tl.constexpr, BITS: tl.constexpr, TAB: tl.constexpr):
    return tl.interleave(_tree2(wp, ws, tab_ptr, S0, 2 * ST, BITS, TAB),
                         _tree2(wp, ws, tab_ptr, S0 + ST, 2 * ST, BITS, TAB))


@triton.jit
def _tree8(wp, ws, tab_ptr, S0: tl.constexpr, ST: tl.constexpr, BITS: tl.constexpr, TAB: tl.constexpr):
    return tl.interleave(_tree4(wp, ws, tab_ptr, S0, 2 * ST, BITS, TAB),
                         _tree4(wp, ws, tab_ptr, S0 + ST, 2 * ST, BITS, TAB))


@triton.jit
def _load_units(ptr, idx, UNIT: tl.constexpr):
    """Units of UNIT bytes at byte pointer ptr[N] (UNIT-aligned), unit indices idx[U] -> int32 [N, U]."""
    if UNIT == 4:
        w = tl.load(ptr.to(tl.pointer_type(tl.uint32))[:, None] + idx[None, :]).to(tl.int32)
    elif UNIT == 2:
        w = tl.load(ptr.to(tl.pointer_type(tl.uint16))[:, None] + idx[None, :]).to(tl.int32)
    else:
        w = tl.load(ptr[:, None] + idx[None, :]).to(tl.int32)
    return w


@triton.jit
def _unit_tile(row, tab_ptr, D: tl.constexpr, BITS: tl.constexpr, UNIT: tl.constexpr, PLANE: tl.constexpr,
               TAB: tl.constexpr):
    """centroid_tile from whole units (UNIT bytes) of the planes: a unit of the primary plane (width
    P) holds NS = 8 * UNIT / P codes, split by shifts into NS sub-tiles [N, D / NS] and interleaved
    back into channel order. Unmasked: every tile lies in an allocated block."""
    NS: tl.constexpr = 8 if (BITS % 16 == 1 and UNIT == 2) else (8 * UNIT) // (
        4 if BITS % 16 == 4 else (2 if BITS % 16 >= 2 else 1))
    u = tl.arange(0, D // NS)
    if BITS % 16 == 1 and UNIT == 2:  # 1-bit codes: 16-bit units, each split in two halves of 8 codes
        wp = _load_units(row + PLANE, u // 2, UNIT) >> ((u % 2) * 8)[None, :]
    else:
        wp = _load_units(row + PLANE, u, UNIT)
    if BITS % 16 == 3:  # 1-bit plane after the 2-bit one, in plain order (swap3): unit u // 2, from bit (u % 2) * NS
        ws = swap3(_load_units(row + (PLANE + D // 4), u // 2, UNIT)) >> ((u % 2) * NS)[None, :]
    else:
        ws = wp
    if BITS // 16 == 2:  # centroids in registers, looked up by tl.gather
        NC: tl.constexpr = 1 << (BITS % 16)
        tab = tl.broadcast_to(tl.load(tab_ptr + TAB + tl.arange(0, NC))[None, :], [row.shape[0], NC])
    else:
        tab = tab_ptr
    if BITS // 16 == 3:  # fp16x2 pairs (sub-tiles S, S + 1) from the pair table: the top interleave
        if NS == 8:
            out = _split_pairs(_tree4(wp, ws, tab, 0, 2, BITS, TAB))
        elif NS == 4:
            out = _split_pairs(_tree2(wp, ws, tab, 0, 2, BITS, TAB))
        else:
            out = _split_pairs(_leaf(wp, ws, tab, 0, BITS, TAB))
    elif NS == 8:
        out = _tree8(wp, ws, tab, 0, 1, BITS, TAB)
    elif NS == 4:
        out = _tree4(wp, ws, tab, 0, 1, BITS, TAB)
    else:
        out = _tree2(wp, ws, tab, 0, 1, BITS, TAB)
    return out


@triton.jit
def centroid_tile(row, tmask, tab_ptr, D: tl.constexpr, BU: tl.constexpr, PLANE: tl.constexpr,
                  TAB: tl.constexpr, BLOCK_N: tl.constexpr):
    """row[N] record pointers -> [N, D] float32 centroids of one part's codes, channel order natural.
    BU = bits + 16 * unit + 256 * mode (see _unit_codes); planes are read in whole units of 1, 2 or 4
    bytes, unmasked (tmask is applied to the scale instead)."""
    return _unit_tile(row, tab_ptr, D, BU % 16 + 16 * (BU // 256), (BU // 16) % 16, PLANE, TAB)


@triton.jit
def record_scale(row, tmask, OFF: tl.constexpr):
    """The fp16 scale (norm or gamma) at byte OFF of each record -> float32 [N]."""
    return tl.load((row + OFF).to(tl.pointer_type(tl.float16)), mask=tmask, other=0.0).to(tl.float32)


@triton.jit
def tile_scores(q_a, q_b, q_q, k_pool, tab_k, tok_base, tmask, h,
                H: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                K_DENSE: tl.constexpr, REC_K: tl.constexpr,
                DKA: tl.constexpr, BKA: tl.constexpr, PKA: tl.constexpr, SKA: tl.constexpr, TKA: tl.constexpr,
                DKB: tl.constexpr, BKB: tl.constexpr, PKB: tl.constexpr, SKB: tl.constexpr, TKB: tl.constexpr,
                DKQ: tl.constexpr, BKQ: tl.constexpr, PKQ: tl.constexpr, SKQ: tl.constexpr, TKQ: tl.constexpr,
                DOT_F32: tl.constexpr):
    """Scores [rows, BLOCK_N] (log2 units) of the prepared queries against one tile of cached keys;
    tok_base[N] is the slot index (block * H + h) * BS + offset of each token."""
    if K_DENSE:
        d = tl.arange(0, D)
        k = tl.load(k_pool + tok_base[:, None] * D + d[None, :], mask=tmask[:, None], other=0.0)
        if DOT_F32:
            qk = tl.dot(q_a.to(tl.float32), tl.trans(k.to(tl.float32)))
        else:
            qk = tl.dot(q_a, tl.trans(k))
    else:
        row = k_pool + tok_base * REC_K
        c = centroid_tile(row, tmask, tab_k, DKA, BKA, PKA, TKA, BLOCK_N).to(tl.float16)
        qk = tl.dot(q_a, tl.trans(c)) * record_scale(row, tmask, SKA)[None, :]
        if DKB > 0:
            c = centroid_tile(row, tmask, tab_k, DKB, BKB, PKB, TKB, BLOCK_N).to(tl.float16)
            qk += tl.dot(q_b, tl.trans(c)) * record_scale(row, tmask, SKB)[None, :]
        if DKQ > 0:
            c = centroid_tile(row, tmask, tab_k, DKQ, BKQ, PKQ, TKQ, BLOCK_N).to(tl.float16)
            qk += tl.dot(q_q, tl.trans(c)) * record_scale(row, tmask, SKQ)[None, :]
    return qk


@triton.jit
def tile_values(p, acc, v_pool, tab_v, tok_base, tmask,
                D: tl.constexpr, BLOCK_N: tl.constexpr, V_DENSE: tl.constexpr, REC_V: tl.constexpr,
                DV: tl.constexpr, BV: tl.constexpr, PV: tl.constexpr, SV: tl.constexpr, TV: tl.constexpr,
                DOT_F32: tl.constexpr):
    """acc[rows, DV] += p[rows, N] @ (one part of) the tile's values, in the codec's rotated space."""
    if V_DENSE:
        d = tl.arange(0, D)
        v = tl.load(v_pool + tok_base[:, None] * D + d[None, :], mask=tmask[:, None], other=0.0)
        if DOT_F32:
            acc += tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
        else:
            acc += tl.dot(p.to(v.dtype), v)
    else:
        row = v_pool + tok_base * REC_V
        c = centroid_tile(row, tmask, tab_v, DV, BV, PV, TV, BLOCK_N).to(tl.float16)
        pn = p * record_scale(row, tmask, SV)[None, :]
        acc += tl.dot(pn.to(tl.float16), c)
    return acc




@triton.jit
def _unrotate_part(acc, rot_ptr, h, CH: tl.constexpr, DP: tl.constexpr, D: tl.constexpr):
    """acc[rows, DP] over rotated channels [CH, CH + DP) -> its share of x = Πᵀ y, [rows, D]."""
    rows = CH + tl.arange(0, DP)
    m = tl.load(rot_ptr + h * D * D + rows[:, None] * D + tl.arange(0, D)[None, :])
    return tl.dot(acc, m, input_precision="ieee")


@triton.jit
def _prefill_kernel(
    qk_ptr, q_ptr, k_ptr, v_ptr, k_pool, v_pool, tab_k, tab_v, bt_ptr, cu_ptr, prefix_ptr,
    k_hot, v_hot, slot_ptr, rot_v, qjl_v, out_ptr,
    sinks, window, s_bt, s_kb, s_kh, s_qt, s_qh, s_kt, s_kth, s_hb, s_hh, s_hs, s_ot, s_oh,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, HAS_HOT: tl.constexpr,
    K_DENSE: tl.constexpr, REC_K: tl.constexpr,
    CKA: tl.constexpr, DKA: tl.constexpr, BKA: tl.constexpr, PKA: tl.constexpr, SKA: tl.constexpr, TKA: tl.constexpr,
    CKB: tl.constexpr, DKB: tl.constexpr, BKB: tl.constexpr, PKB: tl.constexpr, SKB: tl.constexpr, TKB: tl.constexpr,
    CKQ: tl.constexpr, DKQ: tl.constexpr, BKQ: tl.constexpr, PKQ: tl.constexpr, SKQ: tl.constexpr, TKQ: tl.constexpr,
    V_DENSE: tl.constexpr, REC_V: tl.constexpr,
    CVA: tl.constexpr, DVA: tl.constexpr, BVA: tl.constexpr, PVA: tl.constexpr, SVA: tl.constexpr, TVA: tl.constexpr,
    CVB: tl.constexpr, DVB: tl.constexpr, BVB: tl.constexpr, PVB: tl.constexpr, SVB: tl.constexpr, TVB: tl.constexpr,
    DVQ: tl.constexpr, BVQ: tl.constexpr, PVQ: tl.constexpr, SVQ: tl.constexpr, TVQ: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    b = tl.program_id(0)
    mt = tl.program_id(1)
    h = tl.program_id(2)
    s0 = tl.load(cu_ptr + b)
    n_chunk = tl.load(cu_ptr + b + 1) - s0
    if mt * BLOCK_M >= n_chunk:
        return
    L = tl.load(prefix_ptr + b)
    R: tl.constexpr = BLOCK_M * GP
    r = tl.arange(0, R)
    i = mt * BLOCK_M + r // GP  # chunk token of each row
    g = r % GP
    rmask = (i < n_chunk) & (g < G)
    tok = s0 + tl.minimum(i, n_chunk - 1)
    head = h * G + tl.minimum(g, G - 1)
    d = tl.arange(0, D)

    # part 1: the compressed prefix [sinks, c_end), rotated space
    qrow = qk_ptr + tok.to(tl.int64) * s_kb + head * s_kh
    q_a = tl.load(qrow[:, None] + CKA + tl.arange(0, DKA)[None, :])
    q_b = q_a
    q_q = q_a
    if DKB > 0:
        q_b = tl.load(qrow[:, None] + CKB + tl.arange(0, DKB)[None, :])
    if DKQ > 0:
        q_q = tl.load(qrow[:, None] + CKQ + tl.arange(0, DKQ)[None, :])
    m_i = tl.full([R], NEG, dtype=tl.float32)
    l_i = tl.zeros([R], dtype=tl.float32)
    acc_a = tl.zeros([R, DVA], dtype=tl.float32)
    acc_b = tl.zeros([R, DVB if DVB > 0 else 16], dtype=tl.float32)
    acc_q = tl.zeros([R, DVQ if DVQ > 0 else 16], dtype=tl.float32)
    c_end = tl.where(window > 0, L - window, L)
    t_lo = sinks // BLOCK_N
    t_hi = tl.where(c_end > sinks, (c_end + BLOCK_N - 1) // BLOCK_N, t_lo)
    n = tl.arange(0, BLOCK_N)
    for ti in range(t_lo, t_hi):
        t = ti * BLOCK_N + n
        tmask = (t >= sinks) & (t < c_end)
        blk = tl.load(bt_ptr + b * s_bt + (ti * BLOCK_N) // BS).to(tl.int64)
        tok_base = (blk * H + h) * BS + (ti * BLOCK_N) % BS + n
        qk = tile_scores(q_a, q_b, q_q, k_pool, tab_k, tok_base, tmask, h, H, BS, D, BLOCK_N,
                         K_DENSE, REC_K, DKA, BKA, PKA, SKA, TKA, DKB, BKB, PKB, SKB, TKB,
                         DKQ, BKQ, PKQ, SKQ, TKQ, DOT_F32)
        qk = tl.where(tmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc_a = tile_values(p, acc_a * alpha[:, None], v_pool, tab_v, tok_base, tmask, D, BLOCK_N,
                            V_DENSE, REC_V, DVA, BVA, PVA, SVA, TVA, DOT_F32)
        if DVB > 0:
            acc_b = tile_values(p, acc_b * alpha[:, None], v_pool, tab_v, tok_base, tmask, D, BLOCK_N,
                                V_DENSE, REC_V, DVB, BVB, PVB, SVB, TVB, DOT_F32)
        if DVQ > 0:
            acc_q = tile_values(p, acc_q * alpha[:, None], v_pool, tab_v, tok_base, tmask, D, BLOCK_N,
                                V_DENSE, REC_V, DVQ, BVQ, PVQ, SVQ, TVQ, DOT_F32)
        m_i = m_new
    if V_DENSE:
        acc = acc_a
    else:
        acc = _unrotate_part(acc_a, rot_v, h, CVA, DVA, D)
        if DVB > 0:
            acc += _unrotate_part(acc_b, rot_v, h, CVB, DVB, D)
        if DVQ > 0:  # QJL residual: Sᵀ in rotated space, then un-rotate
            dq = tl.arange(0, DVQ)
            sv = tl.load(qjl_v + h * DVQ * D + dq[:, None] * D + d[None, :])
            yq = tl.dot(acc_q, sv, input_precision="ieee")
            acc += _unrotate_part(yq, rot_v, h, 0, D, D)

    # part 2: full-precision sinks and recent window, original space
    qo = tl.load(q_ptr + tok.to(tl.int64)[:, None] * s_qt + head[:, None] * s_qh + d[None, :]).to(tl.float32)
    qs = qo
    if HAS_HOT:
        seq = tl.load(slot_ptr + b).to(tl.int64)
        m_i, l_i, acc = hot_attention(qs, m_i, l_i, acc, k_hot, v_hot, seq * s_hb + h * s_hh, s_hh, s_hs,
                                      L, sinks, window, D, BLOCK_H)

    # part 3: the chunk itself, causal
    j_hi = tl.minimum((mt + 1) * BLOCK_M, n_chunk)
    for j0 in range(0, j_hi, BLOCK_N):
        j = j0 + n
        jmask = j < j_hi
        kv_off = (s0 + j).to(tl.int64)[:, None] * s_kt + h * s_kth + d[None, :]
        kc = tl.load(k_ptr + kv_off, mask=jmask[:, None], other=0.0)
        vc = tl.load(v_ptr + kv_off, mask=jmask[:, None], other=0.0)
        if DOT_F32:
            sc = tl.dot(qs, tl.trans(kc.to(tl.float32)), input_precision="ieee")
        else:  # tensor cores in the model dtype, like flash attention
            sc = tl.dot(qs.to(kc.dtype), tl.trans(kc))
        causal = (j[None, :] <= i[:, None]) & jmask[None, :]
        sc = tl.where(causal, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, vc.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vc.dtype), vc)
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(out_ptr + tok.to(tl.int64)[:, None] * s_ot + head[:, None] * s_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _dequant_kernel(pool, tab, bt_ptr, out_ptr, t0, n, s_oh, s_ot,
                    H: tl.constexpr, BS: tl.constexpr, REC: tl.constexpr, BLOCK_N: tl.constexpr,
                    CA: tl.constexpr, DA: tl.constexpr, BA: tl.constexpr, PA: tl.constexpr, SA: tl.constexpr,
                    TA: tl.constexpr,
                    CB: tl.constexpr, DB: tl.constexpr, BB: tl.constexpr, PB: tl.constexpr, SB: tl.constexpr,
                    TB: tl.constexpr):
    """The records of tokens t0 .. t0 + n - 1 of one sequence (its block-table row at bt_ptr), KV head
    program_id(1), decoded in the codec's rotated space (norm x centroid, each part at its channels):
    out[h, i, :] in out's dtype, i = t - t0."""
    h = tl.program_id(1)
    i = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tmask = i < n
    t = t0 + tl.minimum(i, n - 1)  # rows past n re-read the last token (allocated), never stored
    blk = tl.load(bt_ptr + t // BS).to(tl.int64)
    row = pool + ((blk * H + h) * BS + t % BS) * REC
    dst = out_ptr + h.to(tl.int64) * s_oh + i.to(tl.int64)[:, None] * s_ot
    c = centroid_tile(row, tmask, tab, DA, BA, PA, TA, BLOCK_N) * record_scale(row, tmask, SA)[:, None]
    tl.store(dst + CA + tl.arange(0, DA)[None, :], c.to(out_ptr.dtype.element_ty), mask=tmask[:, None])
    if DB > 0:
        c = centroid_tile(row, tmask, tab, DB, BB, PB, TB, BLOCK_N) * record_scale(row, tmask, SB)[:, None]
        tl.store(dst + CB + tl.arange(0, DB)[None, :], c.to(out_ptr.dtype.element_ty), mask=tmask[:, None])


# ----------------------------------------------------------------------------------------------------
# host side


def _unit(layout: RecordLayout, part: CodePart, unit_loads) -> int:
    """Widest unit (bytes: 4 for 4-bit codes, 2 for 2- and 3-bit, 2 for 1-bit) every plane of the part
    can be read in, rows, plane offsets and plane sizes aligned to it; unit_loads=False reads bytes."""
    if not unit_loads:
        return 1
    if unit_loads == "nogather":  # diagnostic only: codes stand in for centroids (wrong results)
        return 16 + _unit(layout, part, True)
    if unit_loads == "lut":  # centroid table in registers (tl.gather) instead of L1 gathers
        return 32 + _unit(layout, part, True)
    if unit_loads == "pair":  # fp16x2 pairs of 4- and 3-bit codes (decode_attention._tables)
        return 48 + _unit(layout, part, True)
    if unit_loads == "asm":  # PRMT lookups of 4- and 3-bit codes (decode_attention._lut4 / _lut3)
        return 64 + _unit(layout, part, True)
    primary = 4 if part.bits == 4 else (2 if part.bits >= 2 else 1)
    sizes = [part.dim * w // 8 for w in ((2, 1) if part.bits == 3 else (primary,))]
    unit = max(primary, 2)
    while unit > 1 and (layout.record_bytes % unit or part.planes % unit or any(z % unit for z in sizes)):
        unit //= 2
    return unit


def _part(layout: RecordLayout | None, part: CodePart | None, unit_loads: bool) -> tuple:
    """(channel, dim, bits + 16 * unit, planes, scale, table) of a part; zeros when absent. In pair
    mode the table offset is the part's in the pair table."""
    if part is None:
        return 0, 0, 1, 0, 0, 0
    if unit_loads == "pair":
        table = _tables(layout)[2][id(part)]
    elif unit_loads == "asm":
        table = lut_words(layout, part)
    else:
        table = part.table
    return (part.channel, part.dim, part.bits + 16 * _unit(layout, part, unit_loads), part.planes,
            part.scale, table)


def _mode(layout: RecordLayout, unit_loads) -> bool | str:
    """unit_loads="pair" or "asm" where every part of the side has 4- or 3-bit codes ("asm" only with a
    3-bit part: over 4-bit codes alone it measured 4% slower than pairs on the H200);
    "lut" where the side has no QJL signs (triton 3.6 fails to compile the register table's gather next
    to them for sm_90: a TritonGPUOptimizeThreadLocality assertion, 2026-11-30); plain units (True)
    otherwise. Other values are kept."""
    if unit_loads in ("pair", "asm") and not (layout.qjl is None and all(p.bits in (3, 4) for p in layout.parts)):
        return True
    if unit_loads == "asm" and all(p.bits == 4 for p in layout.parts):  # measured slower there (tq4)
        return "pair"
    if unit_loads == "lut" and layout.qjl is not None:
        return True
    return unit_loads


def _table(layout: RecordLayout | None, unit_loads, none: torch.Tensor) -> torch.Tensor:
    """The centroid table a side's tiles read: the pair table in pair mode, the fp32 centroids else."""
    if layout is None:
        return none
    return _tables(layout)[1] if _mode(layout, unit_loads) == "pair" else layout.tables


def _tile_k_args(layout: RecordLayout | None, d: int, unit_loads: bool = True) -> dict:
    """Kernel constants for the key side: dense, or parts A/B (+ QJL) of a layout."""
    if layout is None:
        return dict(K_DENSE=True, REC_K=0, CKA=0, DKA=d, BKA=1, PKA=0, SKA=0, TKA=0,
                    CKB=0, DKB=0, BKB=1, PKB=0, SKB=0, TKB=0, CKQ=0, DKQ=0, BKQ=1, PKQ=0, SKQ=0, TKQ=0)
    out = dict(K_DENSE=False, REC_K=layout.record_bytes)
    unit_loads = _mode(layout, unit_loads)
    parts = (layout.parts[0], layout.parts[1] if len(layout.parts) > 1 else None, layout.qjl)
    for tag, part in zip("ABQ", parts):
        out.update(zip((f"CK{tag}", f"DK{tag}", f"BK{tag}", f"PK{tag}", f"SK{tag}", f"TK{tag}"),
                       _part(layout, part, unit_loads)))
    return out


def _tile_v_args(layout: RecordLayout | None, d: int, unit_loads: bool = True) -> dict:
    if layout is None:
        return dict(V_DENSE=True, REC_V=0, CVA=0, DVA=d, BVA=1, PVA=0, SVA=0, TVA=0,
                    CVB=0, DVB=0, BVB=1, PVB=0, SVB=0, TVB=0, DVQ=0, BVQ=1, PVQ=0, SVQ=0, TVQ=0)
    out = dict(V_DENSE=False, REC_V=layout.record_bytes)
    unit_loads = _mode(layout, unit_loads)
    parts = (layout.parts[0], layout.parts[1] if len(layout.parts) > 1 else None, layout.qjl)
    for tag, part in zip("ABQ", parts):
        out.update(zip((f"CV{tag}", f"DV{tag}", f"BV{tag}", f"PV{tag}", f"SV{tag}", f"TV{tag}"),
                       _part(layout, part, unit_loads)))
    del out["CVQ"]
    return out


# sdpa_prefill's decoded keys + values at most, in the model dtype: a segment of the prefix with flash
# attention, the whole prefix without (256k tokens of the Llama-3-8B shape in bf16). The buffer is not
# in the memory plan (tqinfer/estimate.py): where it cannot be allocated, the fused kernel serves
SCRATCH_BYTES = 1 << 30
DEQUANT_TOKENS = 64  # tokens per program of _dequant_kernel
# "auto" takes sdpa_prefill when a row's prefix has at least this many tokens: faster than the fused
# kernel at 8k-128k on the H200 in GPU time (3.3-4.4x), and eagerly, host ops included, at every shape
# but the small model's (0.85-0.93x there at 8k + 2048; docs/BENCHMARKS.md, "Where the path pays")
PATH_MIN_PREFIX = 8192
# ... or at least PATH_WIDE_PREFIX tokens under a chunk of PATH_WIDE_CHUNK query elements or more (n x Hq
# x d: a 2048-token chunk of the Llama-3-8B shape): there the path measured 1.6-2.6x faster than the
# fused kernel eagerly from a 512-token prefix up (2048-token chunks; with cuDNN for the prefix, where
# these prefixes now take flash attention), while 512-token chunks of that shape and every chunk of the
# small model's shape (2048 x 9 x 64) ran faster fused below 8192: the path's ~1 ms of host ops a call
PATH_WIDE_PREFIX = 512
PATH_WIDE_CHUNK = 2048 * 32 * 128


def dequantize_records(pool: torch.Tensor, layout: RecordLayout, table_row: torch.Tensor, t0: int, n: int,
                       out: torch.Tensor, unit_loads: bool | str = "asm") -> None:
    """Decode the records of tokens [t0, t0 + n) of one sequence (its block-table row) into out[H, n, d]
    (last dim contiguous) in the codec's rotated space: norm x centroid per part, MSE parts only."""
    cache = layout.__dict__.setdefault("_dequant_args", {})  # built once: the path's calls are host-bound
    if unit_loads not in cache:
        mode = runnable(unit_loads)
        a = _tile_k_args(layout, layout.dim, mode)
        consts = {f"{x}{tag}": a[f"{x}K{tag}"] for x in "CDBPST" for tag in "AB"}
        cache[unit_loads] = (_table(layout, mode, layout.tables),
                             dict(REC=layout.record_bytes, BLOCK_N=DEQUANT_TOKENS, **consts))
    tab, consts = cache[unit_loads]
    h = pool.shape[1]
    _dequant_kernel[(triton.cdiv(n, DEQUANT_TOKENS), h)](
        pool, tab, table_row, out, t0, n, out.stride(0), out.stride(1), H=h, BS=pool.shape[2], **consts)


def _turn(layout: RecordLayout, dtype: torch.dtype) -> torch.Tensor:
    """The codec's rotation transposed, [H, d, d] in dtype (kept on the layout): x @ it turns rows x[H, L, d]
    into the rotated space on the tensor cores."""
    cache = layout.__dict__.setdefault("_turn", {})
    if dtype not in cache:
        cache[dtype] = layout.rotation.transpose(1, 2).to(dtype).contiguous()
    return cache[dtype]


# attention ops that return each row's log-sum-exp. cuDNN's fused attention measured 1.6x torch's flash
# attention (FlashAttention-2) over the folded prefix on the H200 (943 vs 1536 µs, 32k keys, 4096 rows),
# but it builds an execution plan for every new shape (~50-70 ms, and ~0.6-0.9 s for its first call in
# a process per kernel kind; flash attention: none, docs/BENCHMARKS.md). So cuDNN takes only calls of
# one bucketed shape: SEG_KEYS keys of the prefix against the folded queries padded to a multiple of
# SEG_ROWS rows; flash attention takes the chunk's causal call and the prefix's last partial segment.
# Flash attention is checked at the first call of a (device, dtype, head size); cuDNN at its first
# bucketed call, and only in the non-causal form it runs, so prefixes under SEG_KEYS never load it
SEG_KEYS = 8192
SEG_ROWS = 2048
# Segments get longer (SEG_KEYS x 2^k, at most SEG_SCALE_MAX x) while a call's query work (rows x KV heads
# x head dim) is at most a quarter of SEG_WORK, the 8B shape's 4096-token chunk's: there segments of
# 8192 keys measured best (16384: +7% GPU time), while the default model's 4096-token chunk, whose path
# calls are bound by host work, ran 10-14% faster with 16384-65536 (fewer calls and merges; 11:08 UTC,
# .bench/ab_path.py, docs/BENCHMARKS.md)
SEG_WORK = 16384 * 8 * 128
SEG_SCALE_MAX = 8
_FLASH: dict = {}  # key -> the ops checked for every call: ("flash",), or ("cudnn",) where flash fails
_CUDNN: dict = {}  # key -> whether cuDNN takes the bucketed calls (checked at the first)


def _attention_lse(op: str, q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if op == "cudnn":
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    else:
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return r[0], r[1].reshape(q.shape[:3]).float()


def segment_keys(rows: int, heads: int, d: int) -> int:
    """Prefix keys a fused attention call of sdpa_prefill takes (the cuDNN bucket's key count)."""
    f = 1
    while f < SEG_SCALE_MAX and 4 * rows * heads * d * f <= SEG_WORK:
        f *= 2
    return SEG_KEYS * f


def _flash_lse(q, k, v, causal: bool, scale: float, seg_keys: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention q [1, h, L, d] over k, v [1, h, S, d] (as many heads; last dims contiguous):
    (out [1, h, L, d], natural log-sum-exp of each row's scores, float32 [1, h, L]). Causal: top-left
    aligned (used with L == S). cuDNN for the bucketed shape (S == seg_keys, default SEG_KEYS; L a
    multiple of SEG_ROWS; no mask) where it checks out, flash attention otherwise (_flash_ok). A cuDNN
    call that fails (no plan for the shape) leaves flash attention to it and every later call."""
    if not _flash_ok(q):
        raise RuntimeError(f"no fused attention op with log-sum-exps runs for {_key(q)}")
    ops = _FLASH[_key(q)]
    if not causal and k.shape[2] == (seg_keys or SEG_KEYS) and q.shape[2] % SEG_ROWS == 0 and ops == ("flash",) \
            and _cudnn_ok(q):
        try:
            return _attention_lse("cudnn", q, k, v, causal, scale)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:
            _CUDNN[_key(q)] = False
    return _attention_lse(ops[0], q, k, v, causal, scale)


def _key(q: torch.Tensor) -> tuple:
    return q.device, q.dtype, q.shape[-1]


def _fused_capable(q: torch.Tensor) -> bool:
    """CUDA and a half type: where torch's fused attention ops may run."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _checked(op: str, q: torch.Tensor, modes: tuple) -> bool | None:
    """Whether op agrees with float32 in the given causal modes (False where it raises); None inside a
    CUDA graph capture (not checked: asked again later). An out-of-memory error propagates."""
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    try:
        return all(_agrees(op, q.device, q.dtype, q.shape[-1], causal) for causal in modes)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError:  # not built for this GPU, dtype or head size
        return False


def _flash_ok(q: torch.Tensor) -> bool:
    """Whether a fused attention op with log-sum-exps runs for q's device, dtype and head size: flash
    attention (or, where it does not, cuDNN) checked once against float32 on random inputs laid out as
    sdpa_prefill lays them out, causal and not."""
    if not _fused_capable(q):
        return False
    key = _key(q)
    if key not in _FLASH:
        for op in ("flash", "cudnn"):
            ok = _checked(op, q, (False, True))
            if ok is None:
                return False
            if ok:
                _FLASH[key] = (op,)
                if op == "cudnn":
                    _CUDNN[key] = True
                break
        else:
            _FLASH[key] = ()
    return bool(_FLASH[key])


def _cudnn_ok(q: torch.Tensor) -> bool:
    """Whether cuDNN takes the bucketed (non-causal) calls: checked at the first."""
    key = _key(q)
    if key not in _CUDNN:
        ok = _checked("cudnn", q, (False,))
        if ok is None:
            return False
        _CUDNN[key] = ok
    return _CUDNN[key]


def _agrees(op: str, device, dtype, d: int, causal: bool) -> bool:
    """op against float32 on random inputs: 80 query rows over 48 keys of a token-major buffer (the
    prefix calls' layout), or a causal 48 x 48 call (the chunk's)."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=gen).to(dtype)

    if causal:
        q, k, v = rand(1, 2, 48, d), rand(1, 2, 48, d), rand(1, 2, 48, d)
    else:
        q, k, v = rand(1, 2, 80, d), rand(48, 2, d).transpose(0, 1)[None], rand(48, 2, d).transpose(0, 1)[None]
    out, lse = _attention_lse(op, q, k, v, causal, 0.3)
    s = torch.einsum("bhld,bhsd->bhls", q.float(), k.float()) * 0.3
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    ref = torch.softmax(s, -1) @ v.float()
    return bool((out.float() - ref).abs().max() < 2e-2 and (lse - torch.logsumexp(s, -1)).abs().max() < 1e-2)


def _merge_lse(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor):
    """Two normalized attention outputs o [..., rows, d] over disjoint key sets, with their log-sum-exps l
    [..., rows]: the output over both (float32; o1 weighted by sigmoid(l1 - l2)) and its log-sum-exp."""
    return torch.lerp(o2.float(), o1.float(), torch.sigmoid(l1 - l2)[..., None]), torch.logaddexp(l1, l2)


def sdpa_prefill(q, k, v, view, scale: float, prefix_list: list[int], chunk_list: list[int], out: torch.Tensor,
                 unit_loads: bool | str = "asm") -> torch.Tensor | None:
    """Chunked prefill as the dense cache runs it, over the compressed prefix decoded once per chunk and
    layer (dequantize_records) into a transient buffer of the model dtype, all in the codecs' rotated
    spaces: the queries rotated by the key codec's rotation (scores are unchanged when queries and keys
    turn alike), the hot rows and the chunk's own tokens rotated, the output un-rotated by the value
    codec's rotation. The queries are laid out by KV head, [H, G x n, d] (the group's query heads folded
    into the rows, which as [H G, n, d] are the per-head layout too). Where a fused attention op with
    log-sum-exps runs (_flash_ok: CUDA, half types): one call for the chunk (causal, its keys repeated
    per query head) and one per segment of the prefix [hot rows | records] of at most SCRATCH_BYTES
    decoded (no mask, the folded rows), merged by their log-sum-exps, so a prefix of any length takes
    bounded memory. Else one SDPA call with the causal mask over [hot | records | chunk] (every prefix
    token precedes the chunk, so the prefix's order does not matter), for prefixes within SCRATCH_BYTES.
    Unlike the fused kernel this writes a decoded prefix to memory, where the fused kernel decodes every
    tile of it once per tile of query rows (docs/BENCHMARKS.md). None where it does not apply: dense
    layers, QJL (prod) types, a prefix over SCRATCH_BYTES without the fused op, or no memory for the
    buffers; the fused kernel serves."""
    from tqinfer.cache.dense import causal_mask, sdpa

    if view.k_hot is None or view.k_codec is None or view.v_codec is None:
        return None
    k_lay, v_lay = _layouts(view, q.device)
    if k_lay.qjl is not None or v_lay.qjl is not None:
        return None
    hq, d = q.shape[1], q.shape[2]
    h = k.shape[1]
    g = hq // h
    try:
        flash = _flash_ok(q)
    except torch.cuda.OutOfMemoryError:
        return None
    per_token = 2 * h * d * q.element_size()  # decoded keys + values
    if not flash and max((p + n) * per_token for p, n in zip(prefix_list, chunk_list)) > SCRATCH_BYTES:
        return None
    seg = max(1, SCRATCH_BYTES // per_token)
    seg_keys = segment_keys(g * max(chunk_list), h, d)
    if seg >= seg_keys:  # whole cuDNN segments in each decoded piece
        seg -= seg % seg_keys
    sides = ((view.k_hot, k, k_lay, view.k_pool), (view.v_hot, v, v_lay, view.v_pool))
    s0 = 0
    try:
        for row, (p, n) in enumerate(zip(prefix_list, chunk_list)):
            # the hot rows in use are rows [0, nh) of the buffer (sinks, then the window's ring, filled from
            # its start), in ring order: the prefix's order does not matter. Tokens [sinks, sinks + p - nh)
            # have records
            nh = min(p, view.sinks + view.window)
            seq, table = view.seq_slot[row:row + 1], view.block_table[row]
            hot, own = [], []
            for buf, new, lay, _ in sides:
                rows = buf.index_select(0, seq)[0, :, :nh]  # few: rotated in float32 (sinks carry large logits)
                hot.append(torch.matmul(rows.float(), _turn(lay, torch.float32)).to(q.dtype))
                own.append(torch.matmul(new[s0:s0 + n].transpose(0, 1), _turn(lay, q.dtype)))
            qf = torch.matmul(q[s0:s0 + n].view(n, h, g, d).permute(1, 2, 0, 3).reshape(h, g * n, d),
                              _turn(k_lay, q.dtype))

            def prefix(a: int, b: int) -> list[torch.Tensor]:
                """Keys and values of entries [a, b) of the prefix as [hot rows | records], decoded: [H, b - a,
                d] views of token-major buffers, so slices of seg_keys tokens share their strides."""
                kv = [torch.empty(b - a, h, d, dtype=q.dtype, device=q.device).transpose(0, 1) for _ in sides]
                for x, hx, (_, _, lay, pool) in zip(kv, hot, sides):
                    if a < min(b, nh):
                        x[:, :min(b, nh) - a] = hx[:, a:min(b, nh)]
                    if b > max(a, nh):  # records r0 .. b - nh - 1, i.e. tokens sinks + r0 ...
                        r0 = max(a, nh) - nh
                        dequantize_records(pool, lay, table, view.sinks + r0, b - nh - r0, x[:, max(a, nh) - a:],
                                           unit_loads)
                return kv

            if flash:  # rows in the folded order, h * G * n + g * n + i
                kc, vc = (x[:, None].expand(h, g, n, d).reshape(1, hq, n, d) for x in own)  # keys a query head
                o, lse = _flash_lse(qf.view(1, hq, n, d), kc, vc, True, scale)
                o, lse = o.view(h, g * n, d), lse.view(h, g * n)
                qpad = None
                # pad to the bucket only where it adds at most a quarter of the rows (cuDNN saves ~1.6x):
                # a short chunk (a chat turn) keeps its rows and takes flash attention
                padded = -(-g * n // SEG_ROWS) * SEG_ROWS
                bucket = 4 * padded <= 5 * g * n
                for a in range(0, p, seg):
                    kp, vp = prefix(a, min(p, a + seg))
                    for j in range(0, kp.shape[1], seg_keys):
                        kj, vj = kp[None, :, j:j + seg_keys], vp[None, :, j:j + seg_keys]
                        qj = qf
                        if kj.shape[2] == seg_keys and bucket and g * n % SEG_ROWS:  # the bucketed shape
                            if qpad is None:
                                qpad = qf.new_zeros(h, padded, d)
                                qpad[:, :g * n] = qf
                            qj = qpad
                        o2, l2 = _flash_lse(qj[None], kj, vj, False, scale, seg_keys)
                        o, lse = _merge_lse(o, lse, o2[0, :, :g * n], l2[0, :, :g * n])
                o = o.float()
            else:
                kp, vp = prefix(0, p)
                keys, values = torch.cat([kp, own[0]], 1), torch.cat([vp, own[1]], 1)
                qr = qf.view(h, g, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)
                o = sdpa(qr, keys, values, causal_mask(p, n, None, q.device), scale).float()
                o = o.view(n, h, g, d).permute(1, 2, 0, 3).reshape(h, g * n, d)
            x = torch.matmul(o, v_lay.rotation)  # un-rotated: x = y @ rotation, per KV head, float32
            out[s0:s0 + n].view(n, h, g, d).copy_(x.view(h, g, n, d).permute(2, 0, 1, 3))
            s0 += n
    except torch.cuda.OutOfMemoryError:
        return None
    return out


def paged_prefill_attention(q, k, v, cu_q, prefix_lens, view, scale: float, block_m: int | None = None,
                            block_n: int | None = None, out: torch.Tensor | None = None,
                            num_warps: int | None = None, unit_loads: bool | str = "asm", method: str = "auto",
                            prefix_list: list[int] | None = None, chunk_list: list[int] | None = None) -> torch.Tensor:
    """Chunked-prefill attention with the paged_attention signature (kernels/reference.py):
    q[T, Hq, d], k/v[T, H, d] the chunks' own tokens, cu_q[B + 1] chunk bounds, prefix_lens[B].
    method "auto" (the default): sdpa_prefill where it applies and a row's prefix has PATH_MIN_PREFIX
    tokens or more (PATH_WIDE_PREFIX under a chunk of PATH_WIDE_CHUNK query elements), else the fused
    kernel; "fused": the fused kernel. prefix_list / chunk_list: prefix_lens and
    the chunk lengths on the host (read from the device when not given).
    Default tiles: 128 query rows (chunk tokens x padded group) and 8 warps over a compressed prefix,
    64 rows and 4 warps over a dense one (the faster of those measured on the H200). unit_loads: "asm"
    (the default: PRMT lookups of 4- and 3-bit codes, decode_attention._lut4 / _lut3, on sides with a
    3-bit part, pairs on 4-bit-only sides; H200, 32k prefix + 1024 chunk: tq3.5 5485 -> 4700 µs against
    pairs; the interpreter runs pairs), "pair" (fp16x2 pairs of 4- and 3-bit codes from L1), True (codes
    read in whole units, centroids gathered through L1), False (bytes), "lut" (a register table); sides
    with other parts read whole units."""
    t, hq, d = q.shape
    h = k.shape[1]
    if hq % h:
        raise ValueError(f"{hq} query heads do not group over {h} KV heads")
    if not kernel_reads(view, d):  # the twin serves what no kernel reads
        res = reference.paged_attention(q, k, v, cu_q, prefix_lens, view, scale)
        return res if out is None else out.copy_(res)
    out = torch.empty_like(q) if out is None else out
    if method == "auto":
        if prefix_list is None or chunk_list is None:
            cu = cu_q.tolist()
            prefix_list, chunk_list = prefix_lens.tolist(), [b - a for a, b in zip(cu[:-1], cu[1:])]
        wide = any(p >= PATH_MIN_PREFIX or (p >= PATH_WIDE_PREFIX and n * hq * d >= PATH_WIDE_CHUNK)
                   for p, n in zip(prefix_list, chunk_list))
        if wide and sdpa_prefill(q, k, v, view, scale, prefix_list, chunk_list, out, unit_loads) is not None:
            return out
    elif method != "fused":
        raise ValueError(f"method must be 'auto' or 'fused', got {method!r}")
    bsz = prefix_lens.shape[0]
    g = hq // h
    gp = triton.next_power_of_2(g)
    dense = view.k_codec is None and view.v_codec is None
    block_m = block_m or max(16, (64 if dense else 128) // gp)
    num_warps = num_warps or (4 if dense else 8)
    unit_loads = runnable(unit_loads)
    bs = view.block_size
    block_n = block_n or min(bs, 64)
    if bs % block_n:
        raise ValueError(f"block_n {block_n} must divide the block size {bs}")
    k_lay, v_lay = _layouts(view, q.device)
    qk = prepare_queries(q, h, scale, k_lay, view.k_pool.dtype, permute=False)
    qs = (q.float() * (scale * LOG2E)).contiguous()
    if v.stride() != k.stride() or k.stride(2) != 1:
        k, v = k.contiguous(), v.contiguous()
    has_hot, k_hot, v_hot, hs = _hot(view, k)
    dvq = v_lay.qjl.dim if v_lay is not None and v_lay.qjl is not None else 0
    rot_v = v_lay.rotation if v_lay is not None else qs
    qjl_v = v_lay.qjl_scaled if dvq else qs
    tab_k, tab_v = _table(k_lay, unit_loads, qs), _table(v_lay, unit_loads, qs)
    seq_slot = view.seq_slot if has_hot else prefix_lens
    bt = view.block_table
    grid = (bsz, triton.cdiv(t, block_m), h)
    _prefill_kernel[grid](
        qk, qs, k, v, view.k_pool, view.v_pool, tab_k, tab_v, bt, cu_q, prefix_lens,
        k_hot, v_hot, seq_slot, rot_v, qjl_v, out,
        view.sinks, view.window, bt.stride(0), qk.stride(0), qk.stride(1), qs.stride(0), qs.stride(1),
        k.stride(0), k.stride(1), *hs, out.stride(0), out.stride(1),
        H=h, G=g, GP=gp, D=d, BS=bs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_H=32, HAS_HOT=has_hot,
        **_tile_k_args(k_lay, d, unit_loads), **_tile_v_args(v_lay, d, unit_loads), DOT_F32=INTERPRET,
        num_warps=num_warps, num_stages=1)
    return out
