"""The decode split kernel in Gluon for one-part 4-bit records (tq4): codes decoded in registers straight
into the tensor cores' operand layouts, each warp its own stream of 16-token slices.

`decode_attention._decode_split_kernel` (plain Triton) lets the compiler place a tile's codes: the
dequantized keys and values reach the dot operands through shared memory or through per-element
lookups. Here the layouts are explicit (triton.experimental.gluon), so a thread loads exactly the codes
its mma fragments need and decodes them where they are used:

- keys: S[G, n] = q . K^T with K^T the B operand [d, 16 tokens] of mma.m16n8k16. Thread (lane l, t =
  l % 4) holds, for tokens l // 4 and l // 4 + 8, the channels 16 kb + 2 t + {0, 1, 8, 9} of each
  k-block kb. The order of channels inside the dot product is free, so k-block kb's four channels are
  taken to be the four codes of one 16-bit unit of the record: thread t reads units t * d / 16 + kb
  (codes t * d / 4 + 4 kb + e) and the query's columns are permuted to match (once per program).
- values: O^T[d, G] = V^T . P^T with V^T the A operand [d, 16 tokens]; thread (g = l // 4) holds rows
  16 mb + 8 mh + g for tokens 2 t + {0, 1, 8, 9}: per token 2 d / 8 channels, again one unit per four
  (codes g * d / 8 + 4 j + e -> row 32 j + 16 (e >> 1) + 8 (e & 1) + g), stored to their channels at
  the end. P^T is the B operand and S's accumulator layout restricted to 8 rows: no data movement.
- a unit's four codes become four fp16 by PRMT lookups in a 16-entry table held in eight registers
  (low bytes of entries 4i .. 4i + 3 in word i, high bytes in word 4 + i), 12 instructions a unit.
- warps never synchronize: warp w takes tokens 16 w .. 16 w + 15 of every 16 * num_warps-token tile with
  its own online softmax; the warps' states merge once at the end of the split.

The workspace it writes (m, l, un-normalized accumulator per split and query row, values in the
codec's rotated space) is the Triton kernel's, so the merge stage and the hot-token programs are
shared. Compiled GPU code only (inline PTX, explicit layouts): the interpreter and other devices run
the Triton kernel.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

NEG = gl.constexpr(-1.0e30)
WARP_TOKENS = 16
TOKENS = gl.constexpr(WARP_TOKENS)  # tokens a warp takes from each tile: the n of the key mma, the k of the value mma


@gluon.jit
def _lut4(u, l0, l1, l2, l3, h0, h1, h2, h3):
    """The fp16 centroids of the four 4-bit codes in the low 16 bits of u (code e at bits 4e): a 3-bit
    index picks bytes from two 8-entry halves of the table, bit 3 chooses the half byte by byte."""
    return gl.inline_asm_elementwise(
        "{.reg .b32 s, t, m, la, lb, ha, hb, lo, hi, p, r;"
        "and.b32 s, $4, 0x7777; shr.u32 t, $4, 1; or.b32 t, t, 0x8888; prmt.b32 m, 0, 0x80808080, t;"
        "prmt.b32 la, $5, $6, s; prmt.b32 lb, $7, $8, s; prmt.b32 ha, $9, $10, s; prmt.b32 hb, $11, $12, s;"
        "lop3.b32 lo, la, lb, m, 0xD8; lop3.b32 hi, ha, hb, m, 0xD8;"
        "prmt.b32 p, lo, hi, 0x5140; prmt.b32 r, lo, hi, 0x7362; mov.b32 {$0, $1}, p; mov.b32 {$2, $3}, r;}",
        "=h,=h,=h,=h,r,r,r,r,r,r,r,r,r", [u, l0, l1, l2, l3, h0, h1, h2, h3],
        dtype=(gl.float16, gl.float16, gl.float16, gl.float16), is_pure=True, pack=1)


@gluon.jit
def _table(lut_ptr, at):
    """The eight table words at lut_ptr, each as a tensor shaped like `at` (an all-zero index tensor with
    one element a thread, computed from a run-time zero): loaded through per-thread addresses, so they
    live in ordinary registers (not uniform ones moved before every use) and broadcast against units."""
    return (gl.load(lut_ptr + at), gl.load(lut_ptr + 1 + at), gl.load(lut_ptr + 2 + at), gl.load(lut_ptr + 3 + at),
            gl.load(lut_ptr + 4 + at), gl.load(lut_ptr + 5 + at), gl.load(lut_ptr + 6 + at), gl.load(lut_ptr + 7 + at))


@gluon.jit
def _idx4(N: gl.constexpr, AXIS: gl.constexpr, L: gl.constexpr):
    """arange(N) along AXIS of a rank-4 layout L, the other dimensions of size 1."""
    if AXIS == 0:
        x = gl.arange(0, N, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L))))
        x = gl.expand_dims(gl.expand_dims(gl.expand_dims(x, 1), 2), 3)
    elif AXIS == 1:
        x = gl.arange(0, N, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L))))
        x = gl.expand_dims(gl.expand_dims(gl.expand_dims(x, 0), 2), 3)
    elif AXIS == 2:
        x = gl.arange(0, N, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L))))
        x = gl.expand_dims(gl.expand_dims(gl.expand_dims(x, 0), 1), 3)
    else:
        x = gl.arange(0, N, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L))))
        x = gl.expand_dims(gl.expand_dims(gl.expand_dims(x, 0), 1), 2)
    return x


@gluon.jit
def _idx3(N: gl.constexpr, AXIS: gl.constexpr, L: gl.constexpr):
    """arange(N) along AXIS of a rank-3 layout L, the other dimensions of size 1."""
    if AXIS == 0:
        x = gl.expand_dims(gl.expand_dims(gl.arange(0, N, layout=gl.SliceLayout(1, gl.SliceLayout(2, L))), 1), 2)
    elif AXIS == 1:
        x = gl.expand_dims(gl.expand_dims(gl.arange(0, N, layout=gl.SliceLayout(0, gl.SliceLayout(2, L))), 0), 2)
    else:
        x = gl.expand_dims(gl.expand_dims(gl.arange(0, N, layout=gl.SliceLayout(0, gl.SliceLayout(1, L))), 0), 1)
    return x


@gluon.jit
def _idx2(N: gl.constexpr, AXIS: gl.constexpr, L: gl.constexpr):
    """arange(N) along AXIS of a rank-2 layout L, the other dimension of size 1."""
    if AXIS == 0:
        x = gl.expand_dims(gl.arange(0, N, layout=gl.SliceLayout(1, L)), 1)
    else:
        x = gl.expand_dims(gl.arange(0, N, layout=gl.SliceLayout(0, L)), 0)
    return x


@gluon.jit
def _rows8(x):
    """Rows 0-7 of an mma accumulator [W, 16, N] (row bit 3 is a register bit: no data movement)."""
    y = gl.permute(gl.reshape(x, [x.shape[0], 2, 8, x.shape[2]]), [0, 2, 3, 1])
    lo, hi = gl.split(y)
    return lo


@gluon.jit
def _fragment(x0, x1, x2, x3, ORDER: gl.constexpr, ROWS: gl.constexpr, COLS: gl.constexpr):
    """The four decoded codes of every unit ([W, a, b, c] each) joined along two new last axes
    (code e = e0 + 2 e1 -> axes 4, 5), permuted by ORDER and flattened to [W, ROWS, COLS]."""
    x = gl.join(gl.join(x0, x1), gl.join(x2, x3))
    return gl.reshape(gl.permute(x, ORDER), [x0.shape[0], ROWS, COLS])


@gluon.jit
def _tile_loads(k_pool, v_pool, bt_ptr, b, s_bt, h, ti, t_end, sinks, c_end, kn, k_off, vn, v_off, sn,
                H: gl.constexpr, BS: gl.constexpr, BLOCK_N: gl.constexpr, REC_K: gl.constexpr, SC_K: gl.constexpr,
                REC_V: gl.constexpr, SC_V: gl.constexpr):
    """Tile ti's key and value units, scales and token mask (nothing read when ti >= t_end)."""
    live = ti < t_end
    blk = gl.load(bt_ptr + b * s_bt + (ti * BLOCK_N) // BS, mask=live, other=0).to(gl.int64)
    slot0 = (blk * H + h) * BS + (ti * BLOCK_N) % BS
    ku = gl.load((k_pool + (slot0 + kn) * REC_K + k_off).to(gl.pointer_type(gl.uint16)), mask=live, other=0)
    vu = gl.load((v_pool + (slot0 + vn) * REC_V + v_off).to(gl.pointer_type(gl.uint16)), mask=live, other=0)
    tok = ti * BLOCK_N + sn
    tmask = (tok >= sinks) & (tok < c_end) & live
    sk = gl.load((k_pool + (slot0 + sn) * REC_K + SC_K).to(gl.pointer_type(gl.float16)), mask=tmask, other=0.0)
    sv = gl.load((v_pool + (slot0 + sn) * REC_V + SC_V).to(gl.pointer_type(gl.float16)), mask=tmask, other=0.0)
    return ku, vu, sk, sv, tmask


@gluon.jit
def _hot_chunk(q_row, s_qh, k_hot, v_hot, hot_base, s_hs, L, sinks, window, i0, ws_m, ws_l, ws_acc,
               G: gl.constexpr, D: gl.constexpr, BLOCK_H: gl.constexpr, NW: gl.constexpr):
    """decode_attention.hot_chunk: the softmax state of query rows r < G (fp32, log2-scaled, at q_row +
    r * s_qh) over hot tokens i0 .. i0 + BLOCK_H - 1 of one sequence (the sinks, then the recent window
    from its ring slots; past the end m = NEG, l = 0, acc = 0), in fp32 on the CUDA cores."""
    HL: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [NW, 1], [1, 0])
    n_sink = gl.minimum(sinks, L)
    w_lo = gl.where(window > 0, gl.maximum(sinks, L - window), L)
    n_hot = n_sink + gl.maximum(L - w_lo, 0)
    i = i0 + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, HL))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, HL))
    hmask = i < n_hot
    t = gl.where(i < n_sink, i, w_lo + i - n_sink)
    slot = gl.where(i < n_sink, i, sinks + (t - sinks) % gl.maximum(window, 1))
    ptr = hot_base + gl.expand_dims(slot, 1) * s_hs + gl.expand_dims(d, 0)
    hm = gl.expand_dims(hmask, 1) & gl.expand_dims(d >= 0, 0)
    kh = gl.load(k_hot + ptr, mask=hm, other=0.0).to(gl.float32)
    vh = gl.load(v_hot + ptr, mask=hm, other=0.0).to(gl.float32)
    for r in range(0, G):
        q = gl.load(q_row + r * s_qh + d)
        sc = gl.where(hmask, gl.sum(kh * gl.expand_dims(q, 0), 1), float("-inf"))
        m = gl.maximum(gl.max(sc, 0), NEG)
        p = gl.exp2(sc - m)
        gl.store(ws_m + r, m)
        gl.store(ws_l + r, gl.sum(p, 0))
        gl.store(ws_acc + r * D + d, gl.sum(gl.expand_dims(p, 1) * vh, 0))


@gluon.jit
def _decode_split_gluon(
    q_ptr, k_pool, v_pool, lut_k, lut_v, bt_ptr, prefix_ptr, ws_m, ws_l, ws_acc, qs_ptr, k_hot, v_hot, slot_ptr,
    sinks, window, s_bt, s_qb, s_qh, s_qsb, s_qsh, s_hb, s_hh, s_hs, zero, NSPLIT,
    H: gl.constexpr, G: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, NHOT: gl.constexpr, BLOCK_H: gl.constexpr,
    REC_K: gl.constexpr, SC_K: gl.constexpr, REC_V: gl.constexpr, SC_V: gl.constexpr, NW: gl.constexpr,
    PREFETCH: gl.constexpr = False,
):
    """Grid (B, H, NSPLIT + NHOT), the workspace of decode_attention._decode_split_kernel: program
    (b, h, s < NSPLIT) runs split s of sequence b's compressed tiles for KV head h, the last NHOT take
    chunks of BLOCK_H hot tokens. q_ptr: the rotated queries (fp16, log2 units, channel order); qs_ptr:
    the scaled queries (fp32, original space) the hot tokens are scored with."""
    BLOCK_N: gl.constexpr = TOKENS * NW
    KB: gl.constexpr = D // 16  # key k-blocks: units a thread reads per token
    J: gl.constexpr = D // 32  # value units a thread reads per token
    MS: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1, 1], instr_shape=[1, 16, 8])
    QOP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MS, k_width=2)
    KOP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MS, k_width=2)
    MO: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1, 1], instr_shape=[1, 16, 8])
    VOP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MO, k_width=2)
    POP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MO, k_width=2)
    # key units [W, KB, t, n] and value units [W, J, g, token]: lanes as the fragments need them
    KU: gl.constexpr = gl.BlockedLayout([1, KB, 1, 1], [1, 1, 4, 8], [NW, 1, 1, 1], [2, 3, 1, 0])
    VU: gl.constexpr = gl.BlockedLayout([1, J, 1, 2], [1, 1, 8, 4], [NW, 1, 1, 1], [3, 2, 1, 0])
    TS: gl.constexpr = gl.SliceLayout(1, MS)  # [W, tokens] of the score tile

    b = gl.program_id(0)
    h = gl.program_id(1)
    s = gl.program_id(2)
    L = gl.load(prefix_ptr + b)
    c_end = gl.where(window > 0, L - window, L)
    lo_t = sinks // BLOCK_N
    hi_t = gl.where(c_end > sinks, (c_end + BLOCK_N - 1) // BLOCK_N, lo_t)
    per = (hi_t - lo_t + NSPLIT - 1) // NSPLIT
    n_act = gl.where(per > 0, (hi_t - lo_t + per - 1) // gl.maximum(per, 1), 0)
    t_start = lo_t + s * per
    t_end = gl.minimum(t_start + per, hi_t)

    # the group's queries, columns permuted to the key fragments' channels: k -> t D/4 + 4 kb + 2 h + el
    # (loaded in the operand's own layout: rows >= 8 are known zeros, registers the compiler can drop)
    r = _idx3(16, 1, QOP)
    k = _idx3(D, 2, QOP)
    kch = ((k >> 1) & 3) * (D // 4) + (k >> 4) * 4 + ((k >> 3) & 1) * 2 + (k & 1)
    qw = _idx3(NW, 0, QOP)
    qp = q_ptr + b * s_qb + (h * G + gl.minimum(r, G - 1)) * s_qh + kch + qw * 0
    q = gl.load(qp, mask=(r < G) & (qw >= 0), other=0.0)

    # unit offsets inside a record and the tables, in registers
    kw = _idx4(NW, 0, KU)
    kt = _idx4(4, 2, KU)
    kn = kw * TOKENS + _idx4(TOKENS, 3, KU)  # token in the tile
    k_off = kt * (D // 8) + _idx4(KB, 1, KU) * 2
    ka, kb_, kc, kd, ke, kf, kg, kh = _table(lut_k, kt * zero)
    vw = _idx4(NW, 0, VU)
    vg = _idx4(8, 2, VU)
    vn = vw * TOKENS + _idx4(TOKENS, 3, VU)
    v_off = vg * (D // 16) + _idx4(J, 1, VU) * 2
    va, vb, vc, vd, ve, vf, vg_, vh = _table(lut_v, vg * zero)
    sw = _idx2(NW, 0, TS)
    sn = sw * TOKENS + _idx2(TOKENS, 1, TS)

    zs = gl.zeros([NW, 16, TOKENS], gl.float32, MS)
    m_i = gl.max(_rows8(zs), 2) + NEG
    l_i = gl.max(_rows8(zs), 2)
    acc = gl.zeros([NW, D, 8], gl.float32, MO)
    if PREFETCH:
        ku, vu, sk, sv, tmask = _tile_loads(k_pool, v_pool, bt_ptr, b, s_bt, h, t_start, t_end, sinks, c_end, kn,
                                            k_off, vn, v_off, sn, H, BS, BLOCK_N, REC_K, SC_K, REC_V, SC_V)
    for ti in range(t_start, t_end):
        if PREFETCH:  # the next tile's loads go out before this tile's work (masked past the split)
            nku, nvu, nsk, nsv, ntm = _tile_loads(k_pool, v_pool, bt_ptr, b, s_bt, h, ti + 1, t_end, sinks, c_end, kn,
                                                  k_off, vn, v_off, sn, H, BS, BLOCK_N, REC_K, SC_K, REC_V, SC_V)
        else:
            ku, vu, sk, sv, tmask = _tile_loads(k_pool, v_pool, bt_ptr, b, s_bt, h, ti, t_end, sinks, c_end, kn,
                                                k_off, vn, v_off, sn, H, BS, BLOCK_N, REC_K, SC_K, REC_V, SC_V)

        x0, x1, x2, x3 = _lut4(ku.to(gl.int32), ka, kb_, kc, kd, ke, kf, kg, kh)
        kt_ = gl.convert_layout(_fragment(x0, x1, x2, x3, [0, 1, 5, 2, 4, 3], D, TOKENS), KOP)
        sc = mma_v2(q, kt_, zs)
        sc = gl.where(gl.expand_dims(tmask, 1), sc * gl.expand_dims(sk.to(gl.float32), 1), float("-inf"))
        s8 = _rows8(sc)
        m_new = gl.maximum(m_i, gl.max(s8, 2))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s8 - gl.expand_dims(m_new, 2))
        l_i = l_i * alpha + gl.sum(p, 2)
        p = p * _rows8(zs + gl.expand_dims(sv.to(gl.float32), 1))
        pt = gl.convert_layout(gl.permute(p.to(gl.float16), [0, 2, 1]), POP)

        y0, y1, y2, y3 = _lut4(vu.to(gl.int32), va, vb, vc, vd, ve, vf, vg_, vh)
        vt = gl.convert_layout(_fragment(y0, y1, y2, y3, [0, 1, 5, 4, 2, 3], D, TOKENS), VOP)
        al = gl.convert_layout(alpha, gl.SliceLayout(1, MO))
        acc = mma_v2(vt, pt, acc * gl.expand_dims(al, 1))
        m_i = m_new
        if PREFETCH:
            ku, vu, sk, sv, tmask = nku, nvu, nsk, nsv, ntm

    # the warps' states merged; rows < G stored (channel of value row m: g D/8 + 4 j + e0 + 2 e1)
    ST: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [NW, 1], [0, 1])
    RL: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
    m_t = gl.max(m_i, 0)
    wgt = gl.exp2(m_i - gl.expand_dims(m_t, 0))
    l_t = gl.sum(l_i * wgt, 0)
    a_t = gl.sum(acc * gl.expand_dims(gl.convert_layout(wgt, gl.SliceLayout(1, MO)), 1), 0)
    ws = (b * H + h) * (NSPLIT + NHOT) + s
    g_real = gl.where(s < n_act, G, 0)
    rr = gl.arange(0, 8, layout=RL)
    gl.store(ws_m + ws * G + rr, gl.convert_layout(m_t, RL), mask=rr < g_real)
    gl.store(ws_l + ws * G + rr, gl.convert_layout(l_t, RL), mask=rr < g_real)
    m = _idx2(D, 0, ST)
    rc = _idx2(8, 1, ST)
    ch = (m & 7) * (D // 8) + (m >> 5) * 4 + ((m >> 3) & 1) + ((m >> 4) & 1) * 2
    gl.store(ws_acc + (ws * G + rc) * D + ch, gl.convert_layout(a_t, ST), mask=(rc < g_real) & (m >= 0))
    if NHOT > 0:
        if s >= NSPLIT:  # a chunk of the bf16 sink / recent tokens, in the original space
            seq = gl.load(slot_ptr + b).to(gl.int64)
            _hot_chunk(qs_ptr + b * s_qsb + h * G * s_qsh, s_qsh, k_hot, v_hot, seq * s_hb + h * s_hh, s_hs, L,
                       sinks, window, (s - NSPLIT) * BLOCK_H, ws_m + ws * G, ws_l + ws * G, ws_acc + ws * G * D,
                       G, D, BLOCK_H, NW)
