"""Split-KV decode attention over a paged cache of packed codes (or dense pages), GQA-grouped, plus the
merge stage that adds the full-precision sink / recent tokens and the new token and un-rotates once.

Stage 1 (grid B x H x splits): one program per KV head and split; all G query heads of the group share
each tile's codes. Scores come from the rotated query against centroids (tl.dot), times the token's
norm (+ the QJL term); softmax is online in fp32 (base 2, the scale folded into q); values accumulate
in the codec's rotated space. Stage 2 (grid B x H): log-sum-exp merge of the splits, un-rotation, then
the hot tokens and the token itself in the original space. The grid depends only on the batch size
and head count, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import reference
from .quantize import CodePart, RecordLayout, record_layout, supports

LOG2E = 1.4426950408889634
# the interpreter's tl.dot mishandles bf16 operands (triton 3.9): it multiplies dense tiles in fp32
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_HEAD_DIM = 128  # wider heads: out of shared memory on an H200 (d = 256 needs 272 KB); torch twin
NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima, so empty splits merge without NaN


@triton.jit
def _unit_codes(wp, ws, tab_ptr, S: tl.constexpr, BITS: tl.constexpr, TAB: tl.constexpr):
    """Centroids of sub-tile S: codes at shift S of the primary plane's units wp (and the 1-bit
    plane's units ws, pre-shifted, for 3-bit codes). BITS // 16: 0 gathers the centroid table from
    memory (L1), 2 from a register copy (tab_ptr is then the table broadcast over rows), 1 is a
    diagnostic that uses the codes themselves as values."""
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
def _tree2(wp, ws, tab_ptr, S0: tl.constexpr, ST: tl.constexpr, BITS: tl.constexpr, TAB: tl.constexpr):
    return tl.interleave(_unit_codes(wp, ws, tab_ptr, S0, BITS, TAB),
                         _unit_codes(wp, ws, tab_ptr, S0 + ST, BITS, TAB))


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
    if BITS % 16 == 3:  # the 1-bit plane after the 2-bit one: unit u // 2, codes from bit (u % 2) * NS
        ws = _load_units(row + (PLANE + D // 4), u // 2, UNIT) >> ((u % 2) * NS)[None, :]
    else:
        ws = wp
    if BITS // 16 == 2:  # centroids in registers, looked up by tl.gather
        NC: tl.constexpr = 1 << (BITS % 16)
        tab = tl.broadcast_to(tl.load(tab_ptr + TAB + tl.arange(0, NC))[None, :], [row.shape[0], NC])
    else:
        tab = tab_ptr
    if NS == 8:
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
def _decode_split_kernel(
    q_ptr, k_pool, v_pool, tab_k, tab_v, bt_ptr, prefix_ptr, ws_m, ws_l, ws_acc,
    sinks, window, s_bt, s_qb, s_qh,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
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
    h = tl.program_id(1)
    s = tl.program_id(2)
    L = tl.load(prefix_ptr + b)
    c_end = tl.where(window > 0, L - window, L)
    n_tiles_lo = sinks // BLOCK_N
    n_tiles_hi = tl.where(c_end > sinks, (c_end + BLOCK_N - 1) // BLOCK_N, n_tiles_lo)
    per = (n_tiles_hi - n_tiles_lo + NSPLIT - 1) // NSPLIT
    t_start = n_tiles_lo + s * per
    t_end = tl.minimum(t_start + per, n_tiles_hi)

    g = tl.arange(0, GP)
    qrow = q_ptr + b * s_qb + (h * G + tl.minimum(g, G - 1)) * s_qh
    q_a = tl.load(qrow[:, None] + CKA + tl.arange(0, DKA)[None, :])
    q_b = q_a
    q_q = q_a
    if DKB > 0:
        q_b = tl.load(qrow[:, None] + CKB + tl.arange(0, DKB)[None, :])
    if DKQ > 0:
        q_q = tl.load(qrow[:, None] + CKQ + tl.arange(0, DKQ)[None, :])

    m_i = tl.full([GP], NEG, dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc_a = tl.zeros([GP, DVA], dtype=tl.float32)
    acc_b = tl.zeros([GP, DVB if DVB > 0 else 16], dtype=tl.float32)
    acc_q = tl.zeros([GP, DVQ if DVQ > 0 else 16], dtype=tl.float32)
    n = tl.arange(0, BLOCK_N)
    for ti in range(t_start, t_end):
        tok = ti * BLOCK_N + n
        tmask = (tok >= sinks) & (tok < c_end)
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
        if DVQ > 0:  # prod-type values: the QJL residual term, sign space, scaled by gamma
            acc_q = tile_values(p, acc_q * alpha[:, None], v_pool, tab_v, tok_base, tmask, D, BLOCK_N,
                                V_DENSE, REC_V, DVQ, BVQ, PVQ, SVQ, TVQ, DOT_F32)
        m_i = m_new

    ws = (b * H + h) * NSPLIT + s
    tl.store(ws_m + ws * GP + g, m_i)
    tl.store(ws_l + ws * GP + g, l_i)
    acc_row = ws_acc + (ws * GP + g) * (D + DVQ)
    tl.store(acc_row[:, None] + CVA + tl.arange(0, DVA)[None, :], acc_a)
    if DVB > 0:
        tl.store(acc_row[:, None] + CVB + tl.arange(0, DVB)[None, :], acc_b)
    if DVQ > 0:
        tl.store(acc_row[:, None] + D + tl.arange(0, DVQ)[None, :], acc_q)


@triton.jit
def hot_attention(q, m_i, l_i, acc, k_hot, v_hot, hot_base, s_hh, s_hs, L, sinks, window,
                  D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Fold the full-precision sink and recent-window tokens of one sequence (prefix length L) into the
    running softmax of q[rows, D] (fp32, log2-scaled); hot_base points at this sequence's KV head."""
    n_sink = tl.minimum(sinks, L)
    w_lo = tl.where(window > 0, tl.maximum(sinks, L - window), L)
    n_hot = n_sink + tl.maximum(L - w_lo, 0)
    w_safe = tl.maximum(window, 1)
    d = tl.arange(0, D)
    for i0 in range(0, n_hot, BLOCK_H):
        i = i0 + tl.arange(0, BLOCK_H)
        hmask = i < n_hot
        t = tl.where(i < n_sink, i, w_lo + i - n_sink)
        slot = tl.where(i < n_sink, i, sinks + (t - sinks) % w_safe)
        ptr = hot_base + slot[:, None] * s_hs + d[None, :]
        kh = tl.load(k_hot + ptr, mask=hmask[:, None], other=0.0).to(tl.float32)
        vh = tl.load(v_hot + ptr, mask=hmask[:, None], other=0.0).to(tl.float32)
        sc = tl.dot(q, tl.trans(kh), input_precision="ieee")
        sc = tl.where(hmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, vh, input_precision="ieee")
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _decode_merge_kernel(
    q_ptr, k_ptr, v_ptr, k_hot, v_hot, slot_ptr, prefix_ptr, ws_m, ws_l, ws_acc, rot_v, qjl_v, out_ptr,
    sinks, window, s_qt, s_qh, s_kt, s_kh, s_hb, s_hh, s_hs, s_ot, s_oh,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, NSPLIT: tl.constexpr,
    BLOCK_H: tl.constexpr, V_ROTATED: tl.constexpr, HAS_HOT: tl.constexpr, DVQ: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    ws = (b * H + h) * NSPLIT
    m_i = tl.full([GP], NEG, dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    DQ: tl.constexpr = DVQ if DVQ > 0 else 16
    dq = tl.arange(0, DQ)
    acc_q = tl.zeros([GP, DQ], dtype=tl.float32)
    for s in range(NSPLIT):
        m_s = tl.load(ws_m + (ws + s) * GP + g)
        l_s = tl.load(ws_l + (ws + s) * GP + g)
        row = ws_acc + ((ws + s) * GP + g) * (D + DVQ)
        a_s = tl.load(row[:, None] + d[None, :])
        m_new = tl.maximum(m_i, m_s)
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(m_s - m_new)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        if DVQ > 0:
            q_s = tl.load(row[:, None] + D + dq[None, :])
            acc_q = acc_q * alpha[:, None] + q_s * beta[:, None]
        m_i = m_new
    if DVQ > 0:  # QJL residual of prod-type values: + scale * Sᵀ (Σ p gamma signs), rotated space
        sv = tl.load(qjl_v + h * DVQ * D + dq[:, None] * D + d[None, :])
        acc += tl.dot(acc_q, sv, input_precision="ieee")
    if V_ROTATED:  # x = Πᵀ y, as rows: acc @ Π
        rot = tl.load(rot_v + h * D * D + d[:, None] * D + d[None, :])
        acc = tl.dot(acc, rot, input_precision="ieee")

    gq = tl.minimum(g, G - 1)
    q = tl.load(q_ptr + b * s_qt + (h * G + gq)[:, None] * s_qh + d[None, :])
    if HAS_HOT:
        L = tl.load(prefix_ptr + b)
        seq = tl.load(slot_ptr + b).to(tl.int64)
        m_i, l_i, acc = hot_attention(q, m_i, l_i, acc, k_hot, v_hot, seq * s_hb + h * s_hh, s_hh, s_hs,
                                      L, sinks, window, D, BLOCK_H)
    kn = tl.load(k_ptr + b * s_kt + h * s_kh + d).to(tl.float32)
    vn = tl.load(v_ptr + b * s_kt + h * s_kh + d).to(tl.float32)
    sc = tl.sum(q * kn[None, :], axis=1)
    m_new = tl.maximum(m_i, sc)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(sc - m_new)
    l_i = l_i * alpha + p
    acc = acc * alpha[:, None] + p[:, None] * vn[None, :]
    o = acc / l_i[:, None]
    tl.store(out_ptr + b * s_ot + (h * G + g)[:, None] * s_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=(g < G)[:, None])


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
    primary = 4 if part.bits == 4 else (2 if part.bits >= 2 else 1)
    sizes = [part.dim * w // 8 for w in ((2, 1) if part.bits == 3 else (primary,))]
    unit = max(primary, 2)
    while unit > 1 and (layout.record_bytes % unit or part.planes % unit or any(z % unit for z in sizes)):
        unit //= 2
    return unit


def _part(layout: RecordLayout | None, part: CodePart | None, unit_loads: bool) -> tuple:
    """(channel, dim, bits + 16 * unit, planes, scale, table) of a part; zeros when absent."""
    if part is None:
        return 0, 0, 1, 0, 0, 0
    return (part.channel, part.dim, part.bits + 16 * _unit(layout, part, unit_loads), part.planes,
            part.scale, part.table)


def _k_args(layout: RecordLayout | None, d: int, unit_loads: bool = True) -> dict:
    """Kernel constants for the key side: dense, or parts A/B (+ QJL) of a layout."""
    if layout is None:
        return dict(K_DENSE=True, REC_K=0, CKA=0, DKA=d, BKA=1, PKA=0, SKA=0, TKA=0,
                    CKB=0, DKB=0, BKB=1, PKB=0, SKB=0, TKB=0, CKQ=0, DKQ=0, BKQ=1, PKQ=0, SKQ=0, TKQ=0)
    out = dict(K_DENSE=False, REC_K=layout.record_bytes)
    parts = (layout.parts[0], layout.parts[1] if len(layout.parts) > 1 else None, layout.qjl)
    for tag, part in zip("ABQ", parts):
        out.update(zip((f"CK{tag}", f"DK{tag}", f"BK{tag}", f"PK{tag}", f"SK{tag}", f"TK{tag}"),
                       _part(layout, part, unit_loads)))
    return out


def _v_args(layout: RecordLayout | None, d: int, unit_loads: bool = True) -> dict:
    if layout is None:
        return dict(V_DENSE=True, REC_V=0, CVA=0, DVA=d, BVA=1, PVA=0, SVA=0, TVA=0,
                    CVB=0, DVB=0, BVB=1, PVB=0, SVB=0, TVB=0, DVQ=0, BVQ=1, PVQ=0, SVQ=0, TVQ=0)
    out = dict(V_DENSE=False, REC_V=layout.record_bytes)
    parts = (layout.parts[0], layout.parts[1] if len(layout.parts) > 1 else None, layout.qjl)
    for tag, part in zip("ABQ", parts):
        out.update(zip((f"CV{tag}", f"DV{tag}", f"BV{tag}", f"PV{tag}", f"SV{tag}", f"TV{tag}"),
                       _part(layout, part, unit_loads)))
    del out["CVQ"]
    return out


def prepare_queries(q: torch.Tensor, kv_heads: int, scale: float, k_layout: RecordLayout | None,
                    dense_dtype: torch.dtype) -> torch.Tensor:
    """q[T, Hq, d] -> the queries the compressed-key tiles read: scaled by scale·log2(e), rotated by
    the key codec (with S q_rot appended for QJL keys), fp16; or in the dense pool's dtype."""
    t, hq, d = q.shape
    qs = q.float() * (scale * LOG2E)
    if k_layout is None:
        return qs.to(dense_dtype).contiguous()
    g = hq // kv_heads
    q_rot = torch.einsum("thgi,hoi->thgo", qs.view(t, kv_heads, g, d), k_layout.rotation)
    if k_layout.qjl is not None:
        qq = torch.einsum("thgi,hmi->thgm", q_rot, k_layout.qjl_matrix) * k_layout.qjl_scale
        q_rot = torch.cat([q_rot, qq], -1)
    return q_rot.reshape(t, hq, -1).to(torch.float16).contiguous()


def _layouts(view, device):
    k_lay = None if view.k_codec is None else record_layout(view.k_codec, device)
    v_lay = None if view.v_codec is None else record_layout(view.v_codec, device)
    return k_lay, v_lay


def kernel_reads(view, head_dim: int) -> bool:
    """Whether the fused kernels serve this layer: head_dim <= 128 (wider: the [d, d] un-rotation
    exceeds shared memory) and codecs whose records they read (not polar, q8, q4, qjl, *-paper)."""
    return head_dim <= MAX_HEAD_DIM and supports(view.k_codec) and supports(view.v_codec)


def default_splits(batch: int, kv_heads: int, sms: int = 132) -> int:
    """Splits per (sequence, KV head): about four programs per SM in total, fixed per batch size."""
    return max(1, min(64, -(-4 * sms // (batch * kv_heads))))


def _hot(view, like):
    if view.k_hot is None or (view.sinks == 0 and view.window == 0):
        return False, like, like, (0, 0, 0)
    kh = view.k_hot
    if kh.stride(3) != 1 or view.v_hot.stride() != kh.stride():
        raise ValueError("k_hot and v_hot must share strides with a contiguous head_dim")
    return True, kh, view.v_hot, (kh.stride(0), kh.stride(1), kh.stride(2))


def paged_decode_attention(q, k, v, cu_q, prefix_lens, view, scale: float, num_splits: int | None = None,
                           block_n: int | None = None, out: torch.Tensor | None = None,
                           num_warps: int = 4, unit_loads: bool | str = True,
                           num_stages: int = 1) -> torch.Tensor:
    """Decode attention (every chunk one token: cu_q == arange(B + 1)) over a paged, possibly compressed
    cache: q[B, Hq, d], k/v[B, H, d] the new tokens -> [B, Hq, d] in q's dtype. See kernels/reference.py.
    num_splits fixes the grid (default: by batch size); `out` may be given (written, never read).
    The first call per codec builds its RecordLayout (host work and copies): call once before capturing
    a CUDA graph. unit_loads / num_stages / block_n / num_warps select measured variants (docs/BENCHMARKS.md)."""
    bsz, hq, d = q.shape
    h = k.shape[1]
    if hq % h:
        raise ValueError(f"{hq} query heads do not group over {h} KV heads")
    if not kernel_reads(view, d):  # the twin serves what no kernel reads
        res = reference.paged_attention(q, k, v, cu_q, prefix_lens, view, scale)
        return res if out is None else out.copy_(res)
    if prefix_lens.shape[0] != bsz:
        raise ValueError(f"decode takes one token per sequence: {bsz} queries, {prefix_lens.shape[0]} sequences")
    g = hq // h
    gp = max(16, triton.next_power_of_2(g))
    bs = view.block_size
    block_n = block_n or min(bs, 64)
    if bs % block_n:
        raise ValueError(f"block_n {block_n} must divide the block size {bs}")
    k_lay, v_lay = _layouts(view, q.device)
    nsplit = num_splits or default_splits(bsz, h)
    qk = prepare_queries(q, h, scale, k_lay, view.k_pool.dtype)
    dev = q.device
    ws_m = torch.empty(bsz * h * nsplit * gp, device=dev, dtype=torch.float32)
    ws_l = torch.empty_like(ws_m)
    dvq = v_lay.qjl.dim if v_lay is not None and v_lay.qjl is not None else 0
    ws_acc = torch.empty(bsz * h * nsplit * gp * (d + dvq), device=dev, dtype=torch.float32)
    bt = view.block_table
    tab_k = k_lay.tables if k_lay is not None else ws_m
    tab_v = v_lay.tables if v_lay is not None else ws_m
    _decode_split_kernel[(bsz, h, nsplit)](
        qk, view.k_pool, view.v_pool, tab_k, tab_v, bt, prefix_lens, ws_m, ws_l, ws_acc,
        view.sinks, view.window, bt.stride(0), qk.stride(0), qk.stride(1),
        H=h, G=g, GP=gp, D=d, BS=bs, BLOCK_N=block_n, NSPLIT=nsplit,
        **_k_args(k_lay, d, unit_loads), **_v_args(v_lay, d, unit_loads), DOT_F32=INTERPRET, num_warps=num_warps,
        num_stages=num_stages)  # pipelining turns L1 centroid gathers into 4-byte cp.async copies
    if v.stride() != k.stride() or k.stride(2) != 1:
        k, v = k.contiguous(), v.contiguous()
    out = torch.empty_like(q) if out is None else out
    qs = (q.float() * (scale * LOG2E)).contiguous()
    has_hot, k_hot, v_hot, hs = _hot(view, k)
    rot_v = v_lay.rotation if v_lay is not None else ws_m
    qjl_v = v_lay.qjl_scaled if dvq else ws_m
    seq_slot = view.seq_slot if has_hot else prefix_lens
    _decode_merge_kernel[(bsz, h)](
        qs, k, v, k_hot, v_hot, seq_slot, prefix_lens, ws_m, ws_l, ws_acc, rot_v, qjl_v, out,
        view.sinks, view.window, qs.stride(0), qs.stride(1), k.stride(0), k.stride(1), *hs,
        out.stride(0), out.stride(1),
        H=h, G=g, GP=gp, D=d, NSPLIT=nsplit, BLOCK_H=32, V_ROTATED=v_lay is not None, HAS_HOT=has_hot, DVQ=dvq,
        num_warps=4)
    return out
