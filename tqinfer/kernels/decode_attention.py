"""Split-KV decode attention over a paged cache of packed codes (or dense pages), GQA-grouped, plus the
merge stage that un-rotates once and adds the full-precision sink / recent tokens and the new token.

Stage 1 (grid B x H x (splits + hot chunks)): one program per KV head and split; all G query heads of
the group share each tile's codes. Scores come from the rotated query against centroids (tl.dot), times
the token's norm (+ the QJL term); softmax is online in fp32 (base 2, the scale folded into q); values
accumulate in the codec's rotated space. The last programs of the grid each take a chunk of the bf16
sink / recent tokens (original space), so they run beside the tiles. Stage 2 (grid B x H x G x NCS:
NCS programs per query head, each for a share of the output columns): a log-sum-exp reduction over the
splits that have work (a bound computed from the prefix length on the device) and the hot chunks, the
un-rotation of the program's columns, the new token. The grids depend
only on the batch size, head counts and the cache's sink / window sizes, so a decode step can be
captured in a CUDA graph.

Codes are never put back into channel order. A part's plane is read as NC columns of whole units
(unit c holds the codes of channels c*NS .. c*NS + NS - 1, NS = dim / NC); sub-tile S is the code at
shift S of every unit, i.e. channels c*NS + S. The order of channels inside a dot product is free, so
scores are sum_S q_S . c_S with q_S the matching columns of the rotated query (permuted once on the host,
folded into the rotation matrix), and values accumulate into one [rows, NC] accumulator per sub-tile,
stored to their channels at the end. NC >= 16 (tl.dot's smallest K).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import reference
from .decode_bounds import hot_count, hot_slot, split_bounds

try:  # Gluon (triton.experimental.gluon) with Ampere mma: triton 3.6 and 3.9 have it; without it, Triton only
    from . import decode_gluon
except ImportError:  # pragma: no cover - depends on the installed triton
    decode_gluon = None
from .quantize import CodePart, RecordLayout, record_layout, supports

LOG2E = 1.4426950408889634
# the interpreter's tl.dot mishandles bf16 operands (triton 3.9): it multiplies dense tiles in fp32
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_HEAD_DIM = 128  # wider heads: out of shared memory on an H200 (d = 256 needs 272 KB); torch twin
NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima, so empty splits merge without NaN
# centroid lookup: fp16 table in L1, in registers (shuffles), fp16x2 per byte, PRMT (the CUDA default)
LOOKUPS = {"mem": 0, "lut": 1, "pair": 2, "asm": 3}


def runnable(lookup):
    """The lookup that runs here: "asm" (inline PTX) is compiled GPU code only, the interpreter runs "pair"."""
    return "pair" if lookup == "asm" and INTERPRET else lookup


# ----------------------------------------------------------------------------------------------------
# reading codes: whole units, sub-tiles by shift, no channel reordering


@triton.jit
def _words(row, OFF: tl.constexpr, WB: tl.constexpr, NW: tl.constexpr):
    """[N, NW] int32: words of WB bits (8, 16 or 32) of the plane at byte OFF of each record row[N]."""
    c = tl.arange(0, NW)
    if WB == 32:
        w = tl.load((row + OFF).to(tl.pointer_type(tl.uint32))[:, None] + c[None, :]).to(tl.int32)
    elif WB == 16:
        w = tl.load((row + OFF).to(tl.pointer_type(tl.uint16))[:, None] + c[None, :]).to(tl.int32)
    else:
        w = tl.load((row + OFF)[:, None] + c[None, :]).to(tl.int32)
    return w


@triton.jit
def _spread(w, UB: tl.constexpr, K: tl.constexpr, J: tl.constexpr, STEP: tl.constexpr):
    """Units J, J + STEP, J + 2 STEP, ... (< K) of each word, as [N, NW * K / STEP] in that order. The
    bits above a unit are not cleared: the codes' shifts and masks stay inside it."""
    if K // STEP == 1:
        out = w >> (J * UB)
    else:
        out = tl.reshape(tl.join(_spread(w, UB, K, J, 2 * STEP), _spread(w, UB, K, J + STEP, 2 * STEP)),
                         [w.shape[0], w.shape[1] * (K // STEP)])
    return out


@triton.jit
def swap3(x, ON: tl.constexpr = True):
    """packing.swap3 (where ON): the bytes of the 1-bit plane of 3-bit codes (packing.PERM3's order) in
    plain order, code j at bit j % 8."""
    if ON:
        t = ((x >> 2) ^ x) & 0x0C0C0C0C
        x = x ^ t ^ (t << 2)
    return x


@triton.jit
def _units(row, OFF: tl.constexpr, UB: tl.constexpr, NC: tl.constexpr, WB: tl.constexpr, PERM3: tl.constexpr = False):
    """[N, NC] int32: unit c (UB bits) of the plane at byte OFF of each record row[N] in the low bits,
    read as words of WB bits (one load per word, split in registers). PERM3: the 1-bit plane of 3-bit
    codes, its bytes put in plain order (swap3) as loaded. Unmasked: every tile lies in allocated
    blocks."""
    if WB > UB:
        w = _spread(swap3(_words(row, OFF, WB, (NC * UB) // WB), PERM3), UB, WB // UB, 0, 1)
    elif UB >= 8:
        w = swap3(_words(row, OFF, UB, NC), PERM3)
    else:  # units under a byte, read alone: the byte holding each, shifted
        c = tl.arange(0, NC)
        w = tl.load((row + OFF)[:, None] + ((c * UB) // 8)[None, :]).to(tl.int32)
        w = swap3(w, PERM3) >> ((c * UB) % 8)[None, :]
    return w


@triton.jit
def _codes(w, w2, S: tl.constexpr, BITS: tl.constexpr):
    """Codes at shift S of every unit (3-bit codes: 2-bit plane w, 1-bit plane w2)."""
    if BITS == 4:
        code = (w >> (4 * S)) & 15
    elif BITS == 2:
        code = (w >> (2 * S)) & 3
    elif BITS == 1:
        code = (w >> S) & 1
    else:
        code = ((w >> (2 * S)) & 3) | (((w2 >> S) & 1) << 2)
    return code


@triton.jit
def _cent(code, tab, tabr, TB: tl.constexpr, MODE: tl.constexpr):
    if MODE == 1:  # the table in registers, looked up by warp shuffles
        c = tl.gather(tabr, code, 1)
    else:  # fp16 table, gathered through L1
        c = tl.load(tab + TB + code)
    return c


@triton.jit
def pair_centroids(w, w2, tab2, S: tl.constexpr, BITS: tl.constexpr):
    """The centroids of the 4- or 3-bit codes at shifts S and S + 1 of units w (3-bit: w2 the 1-bit
    plane's units) as one fp16x2 int32, from a part's pair table at tab2 (_tables): 4-bit codes index it
    by their byte, 3-bit codes by their 2-bit fields (bits 0-3) and their high bits (bits 4, 5)."""
    if BITS == 4:
        idx = (w >> (4 * S)) & 255
    else:
        idx = ((w >> (2 * S)) & 15) | (((w2 >> S) & 3) << 4)
    return tl.load(tab2 + idx)


# "asm" lookups (MODE 3, compiled GPU code only: the interpreter runs "pair"): the centroid table lives
# in the instruction stream. PRMT picks bytes out of a register pair by the nibbles of a selector, so
# the four codes of a selector's nibbles map to their centroids' low and high bytes by one PRMT each
# (8 entries; 16 entries: two PRMTs and a per-byte choice on bit 3), and a last PRMT packs code S's two
# bytes. Every step is elementwise on the loaded units and takes no loaded operand, so Triton builds
# the key sub-tiles straight in the dot operand's layout (no shared-memory round trip, no L1 gathers);
# ptxas shares the common steps of a unit's sub-tiles. LT: the table as PRMT words (lut_words).
_PICK = tl.constexpr(("0x40", "0x51", "0x62", "0x73"))


@triton.jit
def _lut4(w, S: tl.constexpr, LT: tl.constexpr):
    """fp16 centroids of the 4-bit codes at shift S of units w (four codes a selector: S >= 4 reads the
    unit's high half)."""
    pre: tl.constexpr = "shr.u32 u, $1, 16;" if S >= 4 else "mov.b32 u, $1;"
    return tl.inline_asm_elementwise(
        "{.reg .b32 u, s, t, m, la, lb, ha, hb, lo, hi, o; .reg .b16 z; " + pre
        + "and.b32 s, u, 0x7777; shr.u32 t, u, 1; or.b32 t, t, 0x8888; prmt.b32 m, 0, 0x80808080, t;"
        + "prmt.b32 la, " + LT[0] + ", " + LT[1] + ", s; prmt.b32 lb, " + LT[2] + ", " + LT[3] + ", s;"
        + "prmt.b32 ha, " + LT[4] + ", " + LT[5] + ", s; prmt.b32 hb, " + LT[6] + ", " + LT[7] + ", s;"
        + "lop3.b32 lo, la, lb, m, 0xD8; lop3.b32 hi, ha, hb, m, 0xD8; prmt.b32 o, lo, hi, " + _PICK[S % 4] + ";"
        + "mov.b32 {$0, z}, o;}",
        "=h,r", [w], dtype=tl.float16, is_pure=True, pack=1)


@triton.jit
def _lut3(w, w2, S: tl.constexpr, LT: tl.constexpr):
    """fp16 centroids of the 3-bit codes at shift S of units w (2-bit fields) and w2 (high bits): the
    fields are spread to nibbles (selector bits 0-1 and 2) for one PRMT per byte plane."""
    pre: tl.constexpr = "shr.u32 a, $1, 8; shr.u32 b, $2, 4;" if S >= 4 else "mov.b32 a, $1; mov.b32 b, $2;"
    return tl.inline_asm_elementwise(
        "{.reg .b32 a, b, x, y, s, lo, hi, o; .reg .b16 z; " + pre
        + "and.b32 a, a, 0xFF; shl.b32 x, a, 4; or.b32 x, x, a; and.b32 x, x, 0x0F0F;"
        + "shl.b32 y, x, 2; or.b32 x, x, y; and.b32 x, x, 0x3333;"
        + "and.b32 b, b, 0xF; shl.b32 y, b, 6; or.b32 y, y, b; and.b32 y, y, 0x0303;"
        + "shl.b32 s, y, 3; or.b32 y, y, s; and.b32 y, y, 0x1111; shl.b32 y, y, 2; or.b32 s, x, y;"
        + "prmt.b32 lo, " + LT[0] + ", " + LT[1] + ", s; prmt.b32 hi, " + LT[2] + ", " + LT[3] + ", s;"
        + "prmt.b32 o, lo, hi, " + _PICK[S % 4] + "; mov.b32 {$0, z}, o;}",
        "=h,r,r", [w, w2], dtype=tl.float16, is_pure=True, pack=1)


@triton.jit
def _sub2(w, w2, tab, tab2, tabr, S: tl.constexpr, BITS: tl.constexpr, TB: tl.constexpr, TP: tl.constexpr,
          MODE: tl.constexpr, LT: tl.constexpr):
    """Centroids (fp16) of sub-tiles S and S + 1; 4- and 3-bit codes in 'pair' mode: one fp16x2 lookup for
    both (pair_centroids); in 'asm' mode (LT given): PRMT lookups (_lut4, _lut3)."""
    if MODE == 3 and BITS == 4:
        c0 = _lut4(w, S, LT)
        c1 = _lut4(w, S + 1, LT)
    elif MODE == 3 and BITS == 3:
        c0 = _lut3(w, w2, S, LT)
        c1 = _lut3(w, w2, S + 1, LT)
    elif MODE >= 2 and (BITS == 4 or BITS == 3):
        x = pair_centroids(w, w2, tab2 + TP, S, BITS)
        c0 = x.to(tl.int16).to(tl.float16, bitcast=True)
        c1 = (x >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        c0 = _cent(_codes(w, w2, S, BITS), tab, tabr, TB, MODE)
        c1 = _cent(_codes(w, w2, S + 1, BITS), tab, tabr, TB, MODE)
    return c0, c1


@triton.jit
def _part_units(row, tab, DP: tl.constexpr, BITS: tl.constexpr, PL: tl.constexpr, TB: tl.constexpr,
                NC: tl.constexpr, MODE: tl.constexpr, WIDE: tl.constexpr):
    NS: tl.constexpr = DP // NC
    PB: tl.constexpr = 4 if BITS == 4 else (2 if BITS >= 2 else 1)
    # WIDE: bytes per load of the primary plane + 16 x those of the 1-bit plane (0: units as they are)
    w = _units(row, PL, NS * PB, NC, (WIDE % 16) * 8)
    w2 = w
    if BITS == 3:
        w2 = _units(row, PL + DP // 4, NS, NC, (WIDE // 16) * 8, True)
    if MODE == 1:
        tabr = tl.broadcast_to(tl.load(tab + TB + tl.arange(0, 1 << BITS))[None, :], [row.shape[0], 1 << BITS])
    else:
        tabr = tab
    return w, w2, tabr


@triton.jit
def record_scale(row, tmask, OFF: tl.constexpr):
    """The fp16 scale (norm or gamma) at byte OFF of each record -> float32 [N]."""
    return tl.load((row + OFF).to(tl.pointer_type(tl.float16)), mask=tmask, other=0.0).to(tl.float32)


@triton.jit
def _qdot(qrow, CO: tl.constexpr, NC: tl.constexpr, c, acc):
    q = tl.load(qrow[:, None] + CO + tl.arange(0, NC)[None, :])
    return tl.dot(q, tl.trans(c), acc)


@triton.jit
def part_scores(qrow, row, tab, tab2, tmask, CH: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr,
                PL: tl.constexpr, SC: tl.constexpr, TB: tl.constexpr, TP: tl.constexpr, NC: tl.constexpr,
                WD: tl.constexpr, MODE: tl.constexpr, LT: tl.constexpr):
    """[rows, N] = scale * sum_S q_S . c_S^T over one part's sub-tiles (q columns permuted on the host:
    sub-tile S at CH + S * NC)."""
    NS: tl.constexpr = DP // NC
    w, w2, tabr = _part_units(row, tab, DP, BITS, PL, TB, NC, MODE, WD)
    s = tl.zeros([qrow.shape[0], row.shape[0]], dtype=tl.float32)
    c0, c1 = _sub2(w, w2, tab, tab2, tabr, 0, BITS, TB, TP, MODE, LT)
    s = _qdot(qrow, CH, NC, c0, s)
    if NS > 1:
        s = _qdot(qrow, CH + NC, NC, c1, s)
    if NS > 2:
        c2, c3 = _sub2(w, w2, tab, tab2, tabr, 2, BITS, TB, TP, MODE, LT)
        s = _qdot(qrow, CH + 2 * NC, NC, c2, s)
        s = _qdot(qrow, CH + 3 * NC, NC, c3, s)
    if NS > 4:
        c4, c5 = _sub2(w, w2, tab, tab2, tabr, 4, BITS, TB, TP, MODE, LT)
        s = _qdot(qrow, CH + 4 * NC, NC, c4, s)
        s = _qdot(qrow, CH + 5 * NC, NC, c5, s)
        c6, c7 = _sub2(w, w2, tab, tab2, tabr, 6, BITS, TB, TP, MODE, LT)
        s = _qdot(qrow, CH + 6 * NC, NC, c6, s)
        s = _qdot(qrow, CH + 7 * NC, NC, c7, s)
    return s * record_scale(row, tmask, SC)[None, :]


@triton.jit
def part_load(row, tab, tmask, DP: tl.constexpr, BITS: tl.constexpr, PL: tl.constexpr, SC: tl.constexpr,
              TB: tl.constexpr, NC: tl.constexpr, WD: tl.constexpr, MODE: tl.constexpr):
    """One part's units (and register table) and scales of a tile, for part_values."""
    w, w2, tabr = _part_units(row, tab, DP, BITS, PL, TB, NC, MODE, WD)
    return w, w2, tabr, record_scale(row, tmask, SC)


@triton.jit
def part_values(p, alpha, a0, a1, a2, a3, a4, a5, a6, a7, w, w2, tabr, scale, tab, tab2,
                DP: tl.constexpr, BITS: tl.constexpr, TB: tl.constexpr, TP: tl.constexpr, NC: tl.constexpr,
                MODE: tl.constexpr, LT: tl.constexpr):
    """a_S[rows, NC] = alpha * a_S + p . (scale * c_S) for one part's sub-tiles (units from part_load)."""
    NS: tl.constexpr = DP // NC
    pn = (p * scale[None, :]).to(tl.float16)
    al = alpha[:, None]
    c0, c1 = _sub2(w, w2, tab, tab2, tabr, 0, BITS, TB, TP, MODE, LT)
    a0 = tl.dot(pn, c0, a0 * al)
    if NS > 1:
        a1 = tl.dot(pn, c1, a1 * al)
    if NS > 2:
        c2, c3 = _sub2(w, w2, tab, tab2, tabr, 2, BITS, TB, TP, MODE, LT)
        a2 = tl.dot(pn, c2, a2 * al)
        a3 = tl.dot(pn, c3, a3 * al)
    if NS > 4:
        c4, c5 = _sub2(w, w2, tab, tab2, tabr, 4, BITS, TB, TP, MODE, LT)
        a4 = tl.dot(pn, c4, a4 * al)
        a5 = tl.dot(pn, c5, a5 * al)
        c6, c7 = _sub2(w, w2, tab, tab2, tabr, 6, BITS, TB, TP, MODE, LT)
        a6 = tl.dot(pn, c6, a6 * al)
        a7 = tl.dot(pn, c7, a7 * al)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def store_part(ptr, rmask, a0, a1, a2, a3, a4, a5, a6, a7, CH: tl.constexpr, DP: tl.constexpr, NC: tl.constexpr):
    """Store the sub-tile accumulators to their channels: ptr[rows] + CH + c * NS + S (rows where rmask)."""
    NS: tl.constexpr = DP // NC
    col = ptr[:, None] + CH + tl.arange(0, NC)[None, :] * NS
    m = rmask[:, None]
    tl.store(col, a0, mask=m)
    if NS > 1:
        tl.store(col + 1, a1, mask=m)
    if NS > 2:
        tl.store(col + 2, a2, mask=m)
        tl.store(col + 3, a3, mask=m)
    if NS > 4:
        tl.store(col + 4, a4, mask=m)
        tl.store(col + 5, a5, mask=m)
        tl.store(col + 6, a6, mask=m)
        tl.store(col + 7, a7, mask=m)


@triton.jit
def _mat_dot(a, m_ptr, ROW0: tl.constexpr, NS: tl.constexpr, NC: tl.constexpr, D: tl.constexpr, acc):
    rows = ROW0 + tl.arange(0, NC) * NS
    m = tl.load(m_ptr + rows[:, None] * D + tl.arange(0, D)[None, :])
    return tl.dot(a, m, acc, input_precision="ieee")


@triton.jit
def unrotate_part(acc, a0, a1, a2, a3, a4, a5, a6, a7, m_ptr, CH: tl.constexpr, DP: tl.constexpr,
                  NC: tl.constexpr, D: tl.constexpr):
    """acc[rows, D] += sum_S a_S @ m[CH + c * NS + S, :] (m: [*, D] row-major)."""
    NS: tl.constexpr = DP // NC
    acc = _mat_dot(a0, m_ptr, CH, NS, NC, D, acc)
    if NS > 1:
        acc = _mat_dot(a1, m_ptr, CH + 1, NS, NC, D, acc)
    if NS > 2:
        acc = _mat_dot(a2, m_ptr, CH + 2, NS, NC, D, acc)
        acc = _mat_dot(a3, m_ptr, CH + 3, NS, NC, D, acc)
    if NS > 4:
        acc = _mat_dot(a4, m_ptr, CH + 4, NS, NC, D, acc)
        acc = _mat_dot(a5, m_ptr, CH + 5, NS, NC, D, acc)
        acc = _mat_dot(a6, m_ptr, CH + 6, NS, NC, D, acc)
        acc = _mat_dot(a7, m_ptr, CH + 7, NS, NC, D, acc)
    return acc


@triton.jit
def tile_scores(qrow, k_pool, tab_k, tab_k2, tok_base, tmask,
                D: tl.constexpr, K_DENSE: tl.constexpr, REC_K: tl.constexpr,
                KA_CH: tl.constexpr, KA_DP: tl.constexpr, KA_BT: tl.constexpr, KA_PL: tl.constexpr,
                KA_SC: tl.constexpr, KA_TB: tl.constexpr, KA_TP: tl.constexpr, KA_NC: tl.constexpr, KA_WD: tl.constexpr,
                KA_LT: tl.constexpr,
                KB_CH: tl.constexpr, KB_DP: tl.constexpr, KB_BT: tl.constexpr, KB_PL: tl.constexpr,
                KB_SC: tl.constexpr, KB_TB: tl.constexpr, KB_TP: tl.constexpr, KB_NC: tl.constexpr, KB_WD: tl.constexpr,
                KB_LT: tl.constexpr,
                KQ_CH: tl.constexpr, KQ_DP: tl.constexpr, KQ_BT: tl.constexpr, KQ_PL: tl.constexpr,
                KQ_SC: tl.constexpr, KQ_TB: tl.constexpr, KQ_TP: tl.constexpr, KQ_NC: tl.constexpr, KQ_WD: tl.constexpr,
                KQ_LT: tl.constexpr,
                MODE: tl.constexpr, DOT_F32: tl.constexpr):
    """Scores [rows, N] (log2 units) of the prepared queries (rows at qrow) against one tile of cached
    keys; tok_base[N] is the slot index (block * H + h) * BS + offset of each token."""
    if K_DENSE:
        d = tl.arange(0, D)
        q = tl.load(qrow[:, None] + d[None, :])
        k = tl.load(k_pool + tok_base[:, None] * D + d[None, :], mask=tmask[:, None], other=0.0)
        if DOT_F32:
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
        else:
            qk = tl.dot(q, tl.trans(k))
    else:
        row = k_pool + tok_base * REC_K
        qk = part_scores(qrow, row, tab_k, tab_k2, tmask, KA_CH, KA_DP, KA_BT, KA_PL, KA_SC, KA_TB, KA_TP,
                         KA_NC, KA_WD, MODE, KA_LT)
        if KB_DP > 0:
            qk += part_scores(qrow, row, tab_k, tab_k2, tmask, KB_CH, KB_DP, KB_BT, KB_PL, KB_SC, KB_TB, KB_TP,
                              KB_NC, KB_WD, MODE, KB_LT)
        if KQ_DP > 0:
            qk += part_scores(qrow, row, tab_k, tab_k2, tmask, KQ_CH, KQ_DP, KQ_BT, KQ_PL, KQ_SC, KQ_TB, KQ_TP,
                              KQ_NC, KQ_WD, MODE, KQ_LT)
    return qk


@triton.jit
def dense_values(p, alpha, acc, v_pool, tok_base, tmask, D: tl.constexpr, DOT_F32: tl.constexpr):
    d = tl.arange(0, D)
    v = tl.load(v_pool + tok_base[:, None] * D + d[None, :], mask=tmask[:, None], other=0.0)
    if DOT_F32:
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc * alpha[:, None])
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc


@triton.jit
def tile_tokens(bt_ptr, b, s_bt, ti, tok, c_end, h, H: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Slot index (block * H + h) * BS + offset of each token of tile ti (BLOCK_N divides BS)."""
    blk = tl.load(bt_ptr + b * s_bt + (ti * BLOCK_N) // BS).to(tl.int64)
    return (blk * H + h) * BS + (ti * BLOCK_N) % BS + tl.arange(0, BLOCK_N)


@triton.jit
def hot_tokens(k_hot, v_hot, hot_base, s_hs, sinks, window, i0, n_hot, n_sink, w_lo,
               D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Hot tokens i0 .. i0 + BLOCK_H - 1 of one sequence in order (sinks, then the window, read from
    their ring slots): K and V [BLOCK_H, D] in fp32 (zeros past n_hot) and the mask of real ones."""
    d = tl.arange(0, D)
    i = i0 + tl.arange(0, BLOCK_H)
    hmask = i < n_hot
    ptr = hot_base + hot_slot(i, n_sink, w_lo, sinks, window)[:, None] * s_hs + d[None, :]
    kh = tl.load(k_hot + ptr, mask=hmask[:, None], other=0.0).to(tl.float32)
    vh = tl.load(v_hot + ptr, mask=hmask[:, None], other=0.0).to(tl.float32)
    return kh, vh, hmask


@triton.jit
def hot_chunk(q_row, s_qh, k_hot, v_hot, hot_base, s_hs, L, sinks, window, i0, ws_m, ws_l, ws_acc,
              G: tl.constexpr, RW: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Softmax state of query rows r < G (fp32, log2-scaled, at q_row + r * s_qh) over hot tokens i0 ..
    i0 + BLOCK_H - 1 of one sequence (the sinks, then the recent window in order; past the end: m = NEG,
    l = 0, acc = 0), stored at ws_m / ws_l + r and ws_acc + r * RW. Row by row in fp32 on the CUDA
    cores: no fp32 tl.dot, so the split kernel keeps the registers of its tile loop."""
    n_hot, n_sink, w_lo = hot_count(L, sinks, window)
    kh, vh, hmask = hot_tokens(k_hot, v_hot, hot_base, s_hs, sinks, window, i0, n_hot, n_sink, w_lo, D, BLOCK_H)
    d = tl.arange(0, D)
    for r in range(0, G):
        q = tl.load(q_row + r * s_qh + d)
        sc = tl.where(hmask, tl.sum(kh * q[None, :], axis=1), float("-inf"))
        m = tl.maximum(tl.max(sc, axis=0), NEG)
        p = tl.exp2(sc - m)
        tl.store(ws_m + r, m)
        tl.store(ws_l + r, tl.sum(p, axis=0))
        tl.store(ws_acc + r * RW + d, tl.sum(p[:, None] * vh, axis=0))


@triton.jit(do_not_specialize=["NSPLIT"])  # one compile whatever the split count
def _decode_split_kernel(
    q_ptr, k_pool, v_pool, tab_k, tab_k2, tab_v, tab_v2, bt_ptr, prefix_ptr, ws_m, ws_l, ws_acc,
    qs_ptr, k_hot, v_hot, slot_ptr,
    sinks, window, s_bt, s_qb, s_qh, s_qsb, s_qsh, s_hb, s_hh, s_hs,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BLOCK_N: tl.constexpr, NSPLIT, NHOT: tl.constexpr, BLOCK_H: tl.constexpr,
    K_DENSE: tl.constexpr, REC_K: tl.constexpr,
    KA_CH: tl.constexpr, KA_DP: tl.constexpr, KA_BT: tl.constexpr, KA_PL: tl.constexpr,
    KA_SC: tl.constexpr, KA_TB: tl.constexpr, KA_TP: tl.constexpr, KA_NC: tl.constexpr, KA_WD: tl.constexpr,
                KA_LT: tl.constexpr,
    KB_CH: tl.constexpr, KB_DP: tl.constexpr, KB_BT: tl.constexpr, KB_PL: tl.constexpr,
    KB_SC: tl.constexpr, KB_TB: tl.constexpr, KB_TP: tl.constexpr, KB_NC: tl.constexpr, KB_WD: tl.constexpr,
                KB_LT: tl.constexpr,
    KQ_CH: tl.constexpr, KQ_DP: tl.constexpr, KQ_BT: tl.constexpr, KQ_PL: tl.constexpr,
    KQ_SC: tl.constexpr, KQ_TB: tl.constexpr, KQ_TP: tl.constexpr, KQ_NC: tl.constexpr, KQ_WD: tl.constexpr,
                KQ_LT: tl.constexpr,
    V_DENSE: tl.constexpr, REC_V: tl.constexpr,
    VA_CH: tl.constexpr, VA_DP: tl.constexpr, VA_BT: tl.constexpr, VA_PL: tl.constexpr,
    VA_SC: tl.constexpr, VA_TB: tl.constexpr, VA_TP: tl.constexpr, VA_NC: tl.constexpr, VA_WD: tl.constexpr,
    VA_LT: tl.constexpr,
    VB_CH: tl.constexpr, VB_DP: tl.constexpr, VB_BT: tl.constexpr, VB_PL: tl.constexpr,
    VB_SC: tl.constexpr, VB_TB: tl.constexpr, VB_TP: tl.constexpr, VB_NC: tl.constexpr, VB_WD: tl.constexpr,
    VB_LT: tl.constexpr,
    VQ_CH: tl.constexpr, VQ_DP: tl.constexpr, VQ_BT: tl.constexpr, VQ_PL: tl.constexpr,
    VQ_SC: tl.constexpr, VQ_TB: tl.constexpr, VQ_TP: tl.constexpr, VQ_NC: tl.constexpr, VQ_WD: tl.constexpr,
    VQ_LT: tl.constexpr,
    MODE: tl.constexpr, EARLY_V: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr = False,
    MIN_TILES: tl.constexpr = 1,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)  # splits 0 .. NSPLIT - 1 of the compressed tiles, then NHOT chunks of hot tokens
    L = tl.load(prefix_ptr + b)
    c_end, n_tiles_lo, n_tiles_hi, per, n_act = split_bounds(L, sinks, window, BLOCK_N, NSPLIT, MIN_TILES, NSPLIT, 0)
    if PDL:  # launched while the query kernel ran: its queries are read after it completes
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    t_start = n_tiles_lo + s * per
    t_end = tl.minimum(t_start + per, n_tiles_hi)  # empty for hot programs and splits >= n_act

    g = tl.arange(0, GP)
    qrow = q_ptr + b * s_qb + (h * G + tl.minimum(g, G - 1)) * s_qh

    m_i = tl.full([GP], NEG, dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    a0 = tl.zeros([GP, D if V_DENSE else VA_NC], dtype=tl.float32)
    a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
    b0 = tl.zeros([GP, VB_NC], dtype=tl.float32)
    b1, b2, b3, b4, b5, b6, b7 = b0, b0, b0, b0, b0, b0, b0
    q0 = tl.zeros([GP, VQ_NC], dtype=tl.float32)
    q1, q2, q3, q4, q5, q6, q7 = q0, q0, q0, q0, q0, q0, q0
    n = tl.arange(0, BLOCK_N)
    for ti in range(t_start, t_end):
        tok = ti * BLOCK_N + n
        tmask = (tok >= sinks) & (tok < c_end)
        tok_base = tile_tokens(bt_ptr, b, s_bt, ti, tok, c_end, h, H, BS, BLOCK_N)
        rowv = v_pool + tok_base * REC_V
        if not V_DENSE and EARLY_V:  # the value tile's loads go out with the keys' (one-part values)
            wa, wa2, ta, sa = part_load(rowv, tab_v, tmask, VA_DP, VA_BT, VA_PL, VA_SC, VA_TB, VA_NC, VA_WD, MODE)
        qk = tile_scores(qrow, k_pool, tab_k, tab_k2, tok_base, tmask, D, K_DENSE, REC_K,
                         KA_CH, KA_DP, KA_BT, KA_PL, KA_SC, KA_TB, KA_TP, KA_NC, KA_WD, KA_LT,
                         KB_CH, KB_DP, KB_BT, KB_PL, KB_SC, KB_TB, KB_TP, KB_NC, KB_WD, KB_LT,
                         KQ_CH, KQ_DP, KQ_BT, KQ_PL, KQ_SC, KQ_TB, KQ_TP, KQ_NC, KQ_WD, KQ_LT, MODE, DOT_F32)
        qk = tl.where(tmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if V_DENSE:
            a0 = dense_values(p, alpha, a0, v_pool, tok_base, tmask, D, DOT_F32)
        else:
            if not EARLY_V:
                wa, wa2, ta, sa = part_load(rowv, tab_v, tmask, VA_DP, VA_BT, VA_PL, VA_SC, VA_TB, VA_NC, VA_WD, MODE)
            a0, a1, a2, a3, a4, a5, a6, a7 = part_values(
                p, alpha, a0, a1, a2, a3, a4, a5, a6, a7, wa, wa2, ta, sa, tab_v, tab_v2,
                VA_DP, VA_BT, VA_TB, VA_TP, VA_NC, MODE, VA_LT)
            if VB_DP > 0:
                wb, wb2, tb, sb = part_load(rowv, tab_v, tmask, VB_DP, VB_BT, VB_PL, VB_SC, VB_TB, VB_NC, VB_WD, MODE)
                b0, b1, b2, b3, b4, b5, b6, b7 = part_values(
                    p, alpha, b0, b1, b2, b3, b4, b5, b6, b7, wb, wb2, tb, sb, tab_v, tab_v2,
                    VB_DP, VB_BT, VB_TB, VB_TP, VB_NC, MODE, VB_LT)
            if VQ_DP > 0:  # prod-type values: the QJL residual term, sign space, scaled by gamma
                wq, wq2, tq, sq = part_load(rowv, tab_v, tmask, VQ_DP, VQ_BT, VQ_PL, VQ_SC, VQ_TB, VQ_NC, VQ_WD, MODE)
                q0, q1, q2, q3, q4, q5, q6, q7 = part_values(
                    p, alpha, q0, q1, q2, q3, q4, q5, q6, q7, wq, wq2, tq, sq, tab_v, tab_v2,
                    VQ_DP, VQ_BT, VQ_TB, VQ_TP, VQ_NC, MODE, VQ_LT)
        m_i = m_new

    # the workspace holds the G real rows of each split (the merge reads only splits < n_act)
    ws = (b * H + h) * (NSPLIT + NHOT) + s
    rm = g < tl.where(s < n_act, G, 0)  # no rows of an empty split or a hot program
    tl.store(ws_m + ws * G + g, m_i, mask=rm)
    tl.store(ws_l + ws * G + g, l_i, mask=rm)
    acc_row = ws_acc + (ws * G + g) * (D + VQ_DP)
    if V_DENSE:
        tl.store(acc_row[:, None] + tl.arange(0, D)[None, :], a0, mask=rm[:, None])
    else:
        store_part(acc_row, rm, a0, a1, a2, a3, a4, a5, a6, a7, VA_CH, VA_DP, VA_NC)
        if VB_DP > 0:
            store_part(acc_row, rm, b0, b1, b2, b3, b4, b5, b6, b7, VB_CH, VB_DP, VB_NC)
        if VQ_DP > 0:
            store_part(acc_row, rm, q0, q1, q2, q3, q4, q5, q6, q7, D, VQ_DP, VQ_NC)
    if NHOT > 0:
        if s >= NSPLIT:  # a chunk of the bf16 sink / recent tokens, in the original space
            seq = tl.load(slot_ptr + b).to(tl.int64)
            w0 = (b * H + h) * (NSPLIT + NHOT) + s
            hot_chunk(qs_ptr + b * s_qsb + h * G * s_qsh, s_qsh, k_hot, v_hot, seq * s_hb + h * s_hh, s_hs,
                      L, sinks, window, (s - NSPLIT) * BLOCK_H, ws_m + w0 * G, ws_l + w0 * G,
                      ws_acc + w0 * G * (D + VQ_DP), G, D + VQ_DP, D, BLOCK_H)


@triton.jit
def hot_attention(q, m_i, l_i, acc, k_hot, v_hot, hot_base, s_hh, s_hs, L, sinks, window,
                  D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Fold the full-precision sink and recent-window tokens of one sequence (prefix length L) into the
    running softmax of q[rows, D] (fp32, log2-scaled); hot_base points at this sequence's KV head."""
    n_hot, n_sink, w_lo = hot_count(L, sinks, window)
    for i0 in range(0, n_hot, BLOCK_H):
        kh, vh, hmask = hot_tokens(k_hot, v_hot, hot_base, s_hs, sinks, window, i0, n_hot, n_sink, w_lo,
                                   D, BLOCK_H)
        sc = tl.dot(q, tl.trans(kh), input_precision="ieee")
        sc = tl.where(hmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, vh, input_precision="ieee")
        m_i = m_new
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["NSPLIT", "FILL", "SPREAD"])
def _decode_merge_kernel(
    q_ptr, k_ptr, v_ptr, prefix_ptr, ws_m, ws_l, ws_acc, rot_v, qjl_rot, out_ptr,
    sinks, window, s_qt, s_qh, s_kt, s_kh, s_ot, s_oh,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT,
    SB: tl.constexpr, NHOT: tl.constexpr, HP: tl.constexpr, CJ: tl.constexpr,
    V_ROTATED: tl.constexpr, DVQ: tl.constexpr, PDL: tl.constexpr = False, MIN_TILES: tl.constexpr = 1, FILL=1,
    WAVE_TILES: tl.constexpr = 0, SPREAD=1, HOT_EARLY: tl.constexpr = False, NCS: tl.constexpr = 1,
    k_hot=None, v_hot=None, seq_slot=None, enter_ptr=None, s_hs=0, s_hh=0, s_hr=0, ENTER: tl.constexpr = False,
):
    """NCS programs per query head, each for output columns c0 .. c0 + D / NCS: a log-sum-exp reduction over
    the splits with work (online, SB at a time; every program reduces the whole accumulator, which each
    output column needs), un-rotation of its columns in chunks of CJ, the hot chunks and the new token
    added in the original space. The workspace loads of the first SB splits, the hot chunks' (their
    accumulators too with HOT_EARLY: one column chunk covers the program's columns, a small [HP, CJ] tile)
    and the query issue together, and under PDL the program's columns of the rotation are prefetched to
    L2 before the wait (H200, tq3.5, graph replay: the merge's share of the call 4.5-4.8 -> 3.4-4.3 us;
    the hot accumulators with the rest, 2026-12-01 10:21 UTC, tq3.5 / tq4: 8B B1 8k 22.8 -> 22.7 / 24.0 ->
    23.6 us, 128k 86.4 -> 86.1 / 91.8 -> 91.3, 135M 4k 13.6 -> 13.3 / 13.5 -> 13.3). ENTER: once the
    splits are done (every hot row read), the new token takes hot row enter[b] of sequence seq_slot[b]
    (the cache's decode write; the programs of the group's first query row store their columns)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.program_id(2) // NCS
    DC: tl.constexpr = D // NCS
    c0 = (tl.program_id(2) % NCS) * DC
    dc = c0 + tl.arange(0, DC)
    d = tl.arange(0, D)
    RW: tl.constexpr = D + DVQ
    L = tl.load(prefix_ptr + b)
    n_act = split_bounds(L, sinks, window, BLOCK_N, NSPLIT, MIN_TILES, FILL, WAVE_TILES, SPREAD)[4]
    base = (b * H + h) * (NSPLIT + NHOT)
    k_new = tl.load(k_ptr + b * s_kt + h * s_kh + d).to(tl.float32)
    if PDL:  # launched while the split kernel ran: the queries and the workspace read after it completes
        if V_ROTATED:  # meanwhile the rotation (an input) fetched to L2
            LPR: tl.constexpr = (DC + 31) // 32  # 128-byte lines of this program's columns in a row
            ln = tl.arange(0, D * LPR)
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.b32 $0, 0;", "=r,l",
                                      [rot_v + h * D * D + (ln // LPR) * D + c0 + (ln % LPR) * 32],
                                      dtype=tl.int32, is_pure=False, pack=1)
        tl.extra.cuda.gdc_wait()
    if ENTER:
        if g == 0:
            hot = (tl.load(seq_slot + b).to(tl.int64) * s_hs + h * s_hh + tl.load(enter_ptr + b).to(tl.int64) * s_hr
                   + dc)
            tl.store(k_hot + hot, tl.load(k_ptr + b * s_kt + h * s_kh + dc))
            tl.store(v_hot + hot, tl.load(v_ptr + b * s_kt + h * s_kh + dc))
    # every load that needs only the workspace issued before any of them is used: one wait for memory
    q = tl.load(q_ptr + b * s_qt + (h * G + g) * s_qh + d)
    hj = tl.arange(0, HP)
    hmask = hj < NHOT
    m_h = tl.load(ws_m + (base + NSPLIT + hj) * G + g, mask=hmask, other=NEG)
    l_h = tl.load(ws_l + (base + NSPLIT + hj) * G + g, mask=hmask, other=0.0)
    hrow = ws_acc + ((base + NSPLIT + hj) * G + g) * RW
    if HOT_EARLY:  # one column chunk (CJ == D / NCS) and a small [HP, CJ] tile: the hot chunks' accumulators too
        a_hot = tl.load(hrow[:, None] + dc[None, :], mask=hmask[:, None], other=0.0)
    mx = tl.full([], NEG, tl.float32)
    l_i = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([D], dtype=tl.float32)
    DQ: tl.constexpr = DVQ if DVQ > 0 else 16
    dq = tl.arange(0, DQ)
    acc_q = tl.zeros([DQ], dtype=tl.float32)
    for s0 in range(0, n_act, SB):  # online over chunks of SB splits
        s = s0 + tl.arange(0, SB)
        smask = s < n_act
        m_s = tl.load(ws_m + (base + s) * G + g, mask=smask, other=NEG)
        l_s = tl.load(ws_l + (base + s) * G + g, mask=smask, other=0.0)
        row = ws_acc + ((base + s) * G + g) * RW
        a = tl.load(row[:, None] + d[None, :], mask=smask[:, None], other=0.0)
        m_new = tl.maximum(mx, tl.max(m_s, axis=0))
        alpha = tl.exp2(mx - m_new)
        w = tl.exp2(m_s - m_new)
        l_i = l_i * alpha + tl.sum(l_s * w, axis=0)
        acc = acc * alpha + tl.sum(a * w[:, None], axis=0)
        if DVQ > 0:
            aq = tl.load(row[:, None] + D + dq[None, :], mask=smask[:, None], other=0.0)
            acc_q = acc_q * alpha + tl.sum(aq * w[:, None], axis=0)
        mx = m_new
    sc = tl.sum(q * k_new, axis=0)  # the new token, then the hot chunks
    m_f = tl.maximum(tl.maximum(mx, sc), tl.max(m_h, axis=0))
    alpha = tl.exp2(mx - m_f)
    acc = acc * alpha
    acc_q = acc_q * alpha
    p_new = tl.exp2(sc - m_f)
    w_h = tl.exp2(m_h - m_f)
    l_i = l_i * alpha + p_new + tl.sum(l_h * w_h, axis=0)

    o_ptr = out_ptr + b * s_ot + (h * G + g) * s_oh
    for j0 in tl.static_range(0, DC, CJ):
        j = c0 + j0 + tl.arange(0, CJ)
        if V_ROTATED:  # x = Πᵀ y, as rows: y @ Π; QJL residual of prod-type values: + y_q @ (scale S Π)
            rot = tl.load(rot_v + h * D * D + d[:, None] * D + j[None, :])
            o = tl.sum(acc[:, None] * rot, axis=0)
            if DVQ > 0:
                sv = tl.load(qjl_rot + h * DVQ * D + dq[:, None] * D + j[None, :])
                o += tl.sum(acc_q[:, None] * sv, axis=0)
        else:
            o = acc
        if NHOT > 0:
            if HOT_EARLY:
                a_h = a_hot
            else:
                a_h = tl.load(hrow[:, None] + j[None, :], mask=hmask[:, None], other=0.0)
            o += tl.sum(a_h * w_h[:, None], axis=0)
        o += p_new * tl.load(v_ptr + b * s_kt + h * s_kh + j).to(tl.float32)
        tl.store(o_ptr + j, (o / l_i).to(out_ptr.dtype.element_ty))


@triton.jit
def _decode_queries_kernel(q_ptr, rot_ptr, qk_ptr, qs_ptr, scale, s_qb, s_qh, s_kb, s_kh, s_sb, s_sh,
                           G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, CJ: tl.constexpr,
                           ROTATE: tl.constexpr, PDL: tl.constexpr = False):
    """Grid (sequence, KV head, column chunk): the group's queries scaled (fp32, for the hot tokens and
    the merge; stored by chunk 0) and, for the key tiles, CJ columns of their rotation by the key
    codec's (column-permuted) rotation in fp32, stored as fp16; or, dense keys, cast to the pool's
    dtype. One launch instead of the scale, cast, rotate and copy kernels of `prepare_queries` (each
    ~2-3 µs in a CUDA graph); the chunks keep each program to one [CJ, d] load of the rotation."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    j0 = tl.program_id(2) * CJ
    if PDL:  # the split kernel may launch now: it waits for this one before reading the queries
        tl.extra.cuda.gdc_launch_dependents()
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    gm = (g < G)[:, None]
    rows = h * G + g
    x = tl.load(q_ptr + b * s_qb + rows[:, None] * s_qh + d[None, :], mask=gm, other=0.0).to(tl.float32) * scale
    if j0 == 0:
        tl.store(qs_ptr + b * s_sb + rows[:, None] * s_sh + d[None, :], x, mask=gm)
    if ROTATE:  # q_rot[g, o] = sum_i x[g, i] rot[h, o, i] for o in this chunk
        j = j0 + tl.arange(0, CJ)
        r = tl.load(rot_ptr + h * D * D + j[:, None] * D + d[None, :])
        y = tl.sum(x[:, None, :] * r[None, :, :], axis=2)
        tl.store(qk_ptr + b * s_kb + rows[:, None] * s_kh + j[None, :], y.to(qk_ptr.dtype.element_ty), mask=gm)
    else:
        tl.store(qk_ptr + b * s_kb + rows[:, None] * s_kh + d[None, :], x.to(qk_ptr.dtype.element_ty), mask=gm)


# ----------------------------------------------------------------------------------------------------
# host side

MIN_COLS = 32
# keys in 'asm' mode: four codes a selector (16-bit units of 4-bit codes, 8-bit units of 2-bit fields);
# values keep MIN_COLS (16 columns split a [rows, 16] product over 4 warps: each warp redoes the lookups)
ASM_COLS = 16
PART_KEYS = ("CH", "DP", "BT", "PL", "SC", "TB", "TP", "NC", "WD", "LT")
WIDE_LOADS = False  # measured slower on the H200 (the split goes through shared memory): a variant


def early_values(layout: RecordLayout | None) -> bool:
    """Issue a tile's value loads with its keys' only for one-part values without QJL (tq4: faster on
    the H200; tq3.5's two parts: more registers, slower)."""
    return layout is not None and len(layout.parts) == 1 and layout.qjl is None


def _align(layout: RecordLayout, offset: int) -> int:
    """Widest load (bytes, <= 4) every record's byte `offset` is aligned to."""
    a = 4
    while a > 1 and (layout.record_bytes % a or offset % a):
        a //= 2
    return a


def part_columns(layout: RecordLayout, part: CodePart, min_cols: int = MIN_COLS) -> int:
    """NC, the columns (units) a part's plane is read as: >= min_cols (tl.dot's smallest K is 16), units
    of at most 32 bits that the records' alignment allows; NS = dim / NC sub-tiles."""
    pb = 4 if part.bits == 4 else (2 if part.bits >= 2 else 1)
    nc = min(min_cols, part.dim)
    while nc < part.dim:
        ns = part.dim // nc
        ok = ns * pb <= 32 and (ns * pb < 8 or ns * pb // 8 <= _align(layout, part.planes))
        if part.bits == 3:  # the 1-bit plane, units of ns bits
            ok = ok and (ns < 8 or ns // 8 <= _align(layout, part.planes + part.dim // 4))
        if ok:
            break
        nc *= 2
    return nc


def part_words(layout: RecordLayout, part: CodePart, nc: int) -> int:
    """Load widths of a part's planes (bytes of the primary + 16 x bytes of the 1-bit plane of 3-bit
    codes; 0 = one load per unit): the widest word (<= 4 bytes) the alignment allows that holds whole
    units, split into units in registers."""
    if not WIDE_LOADS:
        return 0
    pb = 4 if part.bits == 4 else (2 if part.bits >= 2 else 1)
    ns = part.dim // nc

    def width(offset, ub):
        wb = min(32, 8 * _align(layout, offset), nc * ub)
        return wb // 8 if wb > ub and wb >= 8 else 0

    out = width(part.planes, ns * pb)
    if part.bits == 3:
        out += 16 * width(part.planes + part.dim // 4, ns)
    return out


def _parts(layout: RecordLayout) -> tuple:
    return (layout.parts[0], layout.parts[1] if len(layout.parts) > 1 else None, layout.qjl)


def _tables(layout: RecordLayout) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(centroids as fp16, fp16x2 pair tables of the 4- and 3-bit parts as int32 (256 / 64 entries each),
    pair offsets), kept on the layout. A 4-bit pair's index is the byte of its two codes; a 3-bit pair's
    is the two codes' 2-bit fields (bits 0-3) and their high bits (bits 4, 5)."""
    if "_kernel_tables" not in layout.__dict__:
        tab16 = layout.tables.to(torch.float16).contiguous()
        bits16 = tab16.view(torch.int16).to(torch.int64) & 0xFFFF
        pairs, offs, at = [], {}, 0
        for p in _parts(layout):
            if p is not None and p.bits in (3, 4):
                c = bits16[p.table:p.table + (1 << p.bits)]
                i = torch.arange(1 << (2 * p.bits), device=tab16.device)
                if p.bits == 4:
                    first, second = i & 15, i >> 4
                else:
                    first, second = (i & 3) | ((i >> 2) & 4), ((i >> 2) & 3) | ((i >> 3) & 4)
                v = c[first] | (c[second] << 16)
                offs[id(p)] = at
                at += v.numel()
                pairs.append(torch.where(v >= 2 ** 31, v - 2 ** 32, v))
        tab2 = (torch.cat(pairs) if pairs else torch.zeros(1, dtype=torch.int64, device=tab16.device)).to(torch.int32)
        layout.__dict__["_kernel_tables"] = (tab16, tab2.contiguous(), offs)
    return layout.__dict__["_kernel_tables"]


def lut_words(layout: RecordLayout, part: CodePart) -> tuple:
    """A 4- or 3-bit part's centroids (fp16) as the PRMT tables of 'asm' lookups (_lut4, _lut3): the low
    bytes of entries 4i .. 4i + 3 in word i, then the high bytes; 0 for other parts."""
    if part.bits not in (3, 4):
        return 0
    cache = layout.__dict__.setdefault("_kernel_luts", {})  # host copies: not while a graph is captured
    if part.table not in cache:
        c = _tables(layout)[0][part.table:part.table + (1 << part.bits)].view(torch.int16).to(torch.int64).cpu()
        words = []
        for plane in (c & 0xFF, (c >> 8) & 0xFF):
            for i in range(0, len(c), 4):
                words.append(sum(int(plane[i + j]) << (8 * j) for j in range(4)))
        cache[part.table] = tuple(f"0x{w:08x}" for w in words)
    return cache[part.table]


def lut_symmetric(layout: RecordLayout, part: CodePart) -> bool:
    """Whether a part's fp16 centroids are symmetric bit for bit (centroid n - 1 - i = -centroid i: equal
    low bytes, high bytes apart in the sign bit), as the Gluon kernel's 4-bit lookups take them (the
    Lloyd-Max codebooks of a symmetric density are; a table that is not goes to the Triton kernel). Kept on
    the layout with the words it was read from (a decode call asks every layer)."""
    words = lut_words(layout, part)
    cache = layout.__dict__.setdefault("_lut_symmetric", {})
    if cache.get(part.table, (None,))[0] is not words:
        w = [int(x, 16) for x in words] if words else []
        n = len(w) // 2 * 4
        lo = [(w[i // 4] >> (8 * (i % 4))) & 0xFF for i in range(n)]
        hi = [(w[len(w) // 2 + i // 4] >> (8 * (i % 4))) & 0xFF for i in range(n)]
        cache[part.table] = (words, bool(w) and all(lo[i] == lo[n - 1 - i] and hi[i] == hi[n - 1 - i] ^ 0x80
                                                    for i in range(n)))
    return cache[part.table][1]


def _columns(layout: RecordLayout, part: CodePart, lut: bool, cols: int) -> int:
    """A part's columns: `cols` at least where it is read by PRMT lookups (4- and 3-bit codes), else
    MIN_COLS (part_columns)."""
    return part_columns(layout, part, cols if lut and part.bits in (3, 4) else MIN_COLS)


def _part(layout: RecordLayout | None, part: CodePart | None, min_cols: int = MIN_COLS, lut: bool = False) -> tuple:
    """(channel, dim, bits, planes, scale, table, pair table, columns, load widths, PRMT tables) of a
    part; dim 0 when absent. lut: 4- and 3-bit parts carry their PRMT tables (lut_words) and are read
    in min_cols columns."""
    if part is None:
        return 0, 0, 1, 0, 0, 0, 0, 16, 0, 0
    tp = _tables(layout)[2].get(id(part), 0)
    words = lut_words(layout, part) if lut else 0
    nc = _columns(layout, part, lut, min_cols)
    return (part.channel, part.dim, part.bits, part.planes, part.scale, part.table, tp, nc,
            part_words(layout, part, nc), words)


def _side_args(layout: RecordLayout | None, side: str, lut: bool = False, cols: int = MIN_COLS) -> dict:
    """Kernel constants of one side ('K' or 'V'): dense, or parts A/B (+ QJL) of a layout; lut: the
    4- and 3-bit parts read by PRMT lookups (_part), in `cols` columns."""
    out = {f"{side}_DENSE": layout is None, f"REC_{side}": 0 if layout is None else layout.record_bytes}
    parts = (None, None, None) if layout is None else _parts(layout)
    for tag, part in zip("ABQ", parts):
        out.update(zip((f"{side}{tag}_{x}" for x in PART_KEYS), _part(layout, part, cols, lut)))
    return out


def _k_args(layout: RecordLayout | None, d: int, lut: bool = False) -> dict:
    return _side_args(layout, "K", lut, ASM_COLS)


def _v_args(layout: RecordLayout | None, d: int, lut: bool = False) -> dict:
    return _side_args(layout, "V", lut)


def _q_perm(layout: RecordLayout, lut: bool = False) -> torch.Tensor:
    """Column order of the prepared query: new channel CH + S * NC + c <- rotated channel CH + c * NS + S
    for every part (the QJL part over the channels after d); lut: the key columns of 'asm' lookups."""
    key = "_kernel_qperm_lut" if lut else "_kernel_qperm"
    if key not in layout.__dict__:
        perm = list(range(layout.dim + (layout.qjl.dim if layout.qjl is not None else 0)))
        for part in _parts(layout):
            if part is None:
                continue
            nc = _columns(layout, part, lut, ASM_COLS)
            ns = part.dim // nc
            for s in range(ns):
                for c in range(nc):
                    perm[part.channel + s * nc + c] = part.channel + c * ns + s
        p = torch.tensor(perm, device=layout.rotation.device)
        rot = layout.rotation[:, p[:layout.dim], :].contiguous() if layout.qjl is None else None
        layout.__dict__[key] = (p, rot)
    return layout.__dict__[key]


def prepare_queries(q: torch.Tensor, kv_heads: int, scale: float, k_layout: RecordLayout | None,
                    dense_dtype: torch.dtype, permute: bool = True, lut: bool = False) -> torch.Tensor:
    """q[T, Hq, d] -> the queries the compressed-key tiles read: scaled by scale·log2(e), rotated by
    the key codec (with S q_rot appended for QJL keys), fp16, columns in sub-tile order (_q_perm) or,
    with permute=False, in channel order; or in the dense pool's dtype."""
    t, hq, d = q.shape
    qs = q.float() * (scale * LOG2E)
    if k_layout is None:
        return qs.to(dense_dtype).contiguous()
    g = hq // kv_heads
    if not permute:
        q_rot = torch.einsum("thgi,hoi->thgo", qs.view(t, kv_heads, g, d), k_layout.rotation)
        if k_layout.qjl is not None:
            qq = torch.einsum("thgi,hmi->thgm", q_rot, k_layout.qjl_matrix) * k_layout.qjl_scale
            q_rot = torch.cat([q_rot, qq], -1)
        return q_rot.reshape(t, hq, -1).to(torch.float16).contiguous()
    perm, rot = _q_perm(k_layout, lut)
    if rot is not None:  # the permutation folded into the rotation's rows
        q_rot = torch.einsum("thgi,hoi->thgo", qs.view(t, kv_heads, g, d), rot)
        return q_rot.reshape(t, hq, -1).to(torch.float16).contiguous()
    q_rot = torch.einsum("thgi,hoi->thgo", qs.view(t, kv_heads, g, d), k_layout.rotation)
    qq = torch.einsum("thgi,hmi->thgm", q_rot, k_layout.qjl_matrix) * k_layout.qjl_scale
    q_rot = torch.cat([q_rot, qq], -1)[..., perm]
    return q_rot.reshape(t, hq, -1).to(torch.float16).contiguous()


def decode_queries(q: torch.Tensor, kv_heads: int, scale: float, k_layout: RecordLayout | None,
                   dense_dtype: torch.dtype, lut: bool = False,
                   permute: bool = True, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(the key tiles' queries as `prepare_queries` makes them, q scaled by scale·log2(e) in fp32) for
    decode queries q[B, Hq, d], in one launch (QJL keys: the torch path); lut: columns for 'asm' keys;
    permute=False: rotated queries in channel order (the Gluon kernel permutes them as it loads);
    pdl: the kernel lets the next one launch early (a programmatic dependent launch that waits for it)."""
    if k_layout is not None and k_layout.qjl is not None:
        return (prepare_queries(q, kv_heads, scale, k_layout, dense_dtype, lut=lut),
                (q.float() * (scale * LOG2E)).contiguous())
    bsz, hq, d = q.shape
    g = hq // kv_heads
    q = q if q.stride(2) == 1 else q.contiguous()
    qs = torch.empty(bsz, hq, d, device=q.device, dtype=torch.float32)
    qk = torch.empty(bsz, hq, d, device=q.device, dtype=torch.float16 if k_layout is not None else dense_dtype)
    rot = qs if k_layout is None else (_q_perm(k_layout, lut)[1] if permute else k_layout.rotation)
    gp = triton.next_power_of_2(g)
    cj = max(1, min(d, QUERY_TILE // (gp * d))) if k_layout is not None else d
    _decode_queries_kernel[(bsz, kv_heads, d // cj)](
        q, rot, qk, qs, scale * LOG2E, q.stride(0), q.stride(1), qk.stride(0), qk.stride(1), qs.stride(0),
        qs.stride(1), G=g, GP=gp, D=d, CJ=cj, ROTATE=k_layout is not None, PDL=pdl)
    return qk, qs


def _layouts(view, device):
    k_lay = None if view.k_codec is None else record_layout(view.k_codec, device)
    v_lay = None if view.v_codec is None else record_layout(view.v_codec, device)
    return k_lay, v_lay


def _tabs(layout: RecordLayout | None, like: torch.Tensor):
    if layout is None:
        return like, like
    t16, t2, _ = _tables(layout)
    return t16, t2


def kernel_reads(view, head_dim: int) -> bool:
    """Whether the fused kernels serve this layer: head_dim <= 128 (wider: the [d, d] un-rotation
    exceeds shared memory) and codecs whose records they read (not polar, q8, q4, qjl, *-paper)."""
    return head_dim <= MAX_HEAD_DIM and supports(view.k_codec) and supports(view.v_codec)


def _qjl_unrotation(layout: RecordLayout) -> torch.Tensor:
    """qjl_scale * S[h] @ Π[h] ([H, m, d] float32), kept on the layout: the QJL residual of prod-type
    values, summed in sign space, goes straight to the original space."""
    if "_kernel_qjl_rot" not in layout.__dict__:
        m = torch.matmul(layout.qjl_scaled.double(), layout.rotation.double()).float().contiguous()
        layout.__dict__["_kernel_qjl_rot"] = m
    return layout.__dict__["_kernel_qjl_rot"]


def default_splits(batch: int, kv_heads: int, sms: int = 132, per_sm: int | None = None) -> int:
    """Splits per (sequence, KV head), fixed per batch size. With the split kernel's occupancy known
    (per_sm programs resident on each of `sms` multiprocessors), the count whose programs fill whole
    waves: a split of n tiles costs about n / splits * waves, and a last wave left part-empty is paid
    in full (H200, tq3.5, B = 1, 8 KV heads, 3 programs per SM: 48 splits 308 µs, 64 splits 342 µs,
    96 splits 314 µs at 128k). The fewest splits within 2% of the best, at most about 8 waves' worth
    (a large batch fills the SMs without splitting). Before the occupancy is known:
    about 4 programs per SM for one sequence, 8 for more."""
    if per_sm is None:
        waves = 4 if batch == 1 else 8
        return max(1, min(MAX_SPLITS, -(-waves * sms // (batch * kv_heads))))
    slots, progs = sms * per_sm, batch * kv_heads
    most = min(MAX_SPLITS, -(-8 * slots // progs))  # at most ~8 waves: more only grow the workspace and merge
    return min(_whole_waves(progs, slots, 1, most))


def _whole_waves(progs: int, slots: int, lo: int, hi: int) -> list[int]:
    """The split counts in lo .. hi whose programs (progs a split) fill their waves of `slots` within 2%
    of the best: a split costs 1 / n of the work, a wave started is paid in full."""
    cost = {n: -(-progs * n // slots) / n for n in range(lo, hi + 1)}
    best = min(cost.values())
    return [n for n, c in cost.items() if c <= best * 1.02]


def wave_splits(batch: int, kv_heads: int, block_n: int = 64, sms: int = 132,
                per_sm: int | None = None) -> tuple[int, int]:
    """(grid splits, fill) of the Gluon split kernel, whose splits size themselves on the device
    (decode_bounds.split_bounds with WAVE_TILES): `fill` splits a sequence while a split stays under
    WAVE_TILES tiles, about one wave of the resident programs (per_sm on each of `sms` multiprocessors;
    4 before the occupancy is known): default_splits' count, at most one wave (so where default_splits'
    count fits one wave, as for one sequence of 8 KV heads on the H200, the grid, the fill and the splits
    are default_splits'); longer contexts take more splits of WAVE_TILES tiles (of block_n tokens), up to
    the grid's count: at least the fill, beyond it enough for WAVE_GRID_TOKENS tokens but at most
    WAVE_GRID_WAVES waves' worth (a split without work costs a launch: ~2 ns a program measured), and
    whole waves (the splits of longer contexts are even over the grid).
    Fixed per batch size, so a CUDA graph replays at any context length."""
    slots, progs = sms * (per_sm or 4), batch * kv_heads
    fill = max(1, min(default_splits(batch, kv_heads, sms, per_sm), slots // progs))
    most = min(-(-WAVE_GRID_WAVES * slots // progs), -(-WAVE_GRID_TOKENS // (block_n * WAVE_TILES)))
    most = min(MAX_SPLITS, max(fill, most))
    # past that context the splits are even over the grid: the largest count whose last wave is about full
    return max(_whole_waves(progs, slots, fill, most)), fill


def split_spread(batch: int, kv_heads: int, sms: int = 132) -> int:
    """Splits of one (sequence, KV head) that one program a multiprocessor allows (decode_bounds.split_bounds'
    SPREAD): a context whose splits of fewer than SPLIT_MIN_TOKENS tokens still number at most this many
    takes the smaller ones, so that a short context spreads over the idle multiprocessors. A heuristic:
    the hot-token chunks' programs are not counted (measured: docs/BENCHMARKS.md, 2026-12-01)."""
    return max(1, sms // (batch * kv_heads))


def merge_column_programs(rows: int, head_dim: int, sms: int = 132) -> int:
    """Merge programs per query row (each un-rotates head_dim / n output columns, after the reduction every
    one of them repeats): the largest power of two up to MERGE_COLUMNS whose programs (rows of them) still
    number at most one a multiprocessor, and whose columns stay at least 16."""
    n = 1
    while n < MERGE_COLUMNS and rows * n * 2 <= sms and head_dim // (n * 2) >= 16:
        n *= 2
    return n


def wave_programs(batch: int, kv_heads: int, sms: int = 132, per_sm: int | None = None) -> int:
    """Programs of each (sequence, KV head) in one wave of the resident ones (per_sm on each of `sms`
    multiprocessors, 4 before the occupancy is known): where a sequence's splits with work and its hot
    chunks fit, the Gluon split kernel runs the hot chunks first."""
    return sms * (per_sm or 4) // (batch * kv_heads)


def resident_programs(kernel, num_warps: int, device) -> int | None:
    """Programs of a compiled kernel resident on one multiprocessor at once, limited by its registers
    and shared memory (the CUDA occupancy rules: registers allocated per warp in units of 256); None
    when the launch returned no compiled kernel (the interpreter)."""
    regs = getattr(kernel, "n_regs", None)
    if not regs:
        return None
    props = torch.cuda.get_device_properties(device)
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (per_warp * num_warps)
    smem = getattr(kernel, "metadata", None)
    smem = getattr(smem, "shared", 0) + 1024  # the driver reserves 1 KB a block
    by_smem = getattr(props, "shared_memory_per_multiprocessor", 233472) // smem
    by_warps = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps)
    return max(1, min(by_regs, by_smem, by_warps, 32))


_RESIDENT: dict = {}  # split kernel configuration -> programs resident per SM (measured at first launch)


def _hot(view, like):
    if view.k_hot is None or (view.sinks == 0 and view.window == 0):
        return False, like, like, (0, 0, 0)
    kh = view.k_hot
    if kh.stride(3) != 1 or view.v_hot.stride() != kh.stride():
        raise ValueError("k_hot and v_hot must share strides with a contiguous head_dim")
    return True, kh, view.v_hot, (kh.stride(0), kh.stride(1), kh.stride(2))


def paged_decode_attention(q, k, v, cu_q, prefix_lens, view, scale: float, num_splits: int | None = None,
                           block_n: int | None = None, out: torch.Tensor | None = None,
                           num_warps: int | None = None, lookup: str | None = None,
                           num_stages: int = 1, early_v: bool | None = None,
                           max_registers: int | None = None, kernel: str | None = None,
                           enter: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention (every chunk one token: cu_q == arange(B + 1)) over a paged, possibly compressed
    cache: q[B, Hq, d], k/v[B, H, d] the new tokens -> [B, Hq, d] in q's dtype. See kernels/reference.py.
    num_splits fixes the grid (default: by batch size); `out` may be given (written, never read).
    The first call per codec builds its RecordLayout and tables (host work and copies): call once before
    capturing a CUDA graph. lookup / num_stages / block_n / num_warps / early_v / max_registers (ptxas's
    register cap for the Triton split kernel) select measured variants of the Triton kernel
    (docs/BENCHMARKS.md); kernel: "gluon" (decode_gluon, where `gluon_reads`; an error elsewhere) or
    "triton" for the splits, default Gluon where it reads (the Triton kernel's knobs do not apply to it).
    enter (int64 [B]): once attention has read the window, the new tokens k / v take hot rows enter of
    their sequences (the cache's decode write, done by the merge kernel)."""
    bsz, hq, d = q.shape
    h = k.shape[1]
    if hq % h:
        raise ValueError(f"{hq} query heads do not group over {h} KV heads")
    if kernel not in (None, "gluon", "triton"):
        raise ValueError(f"kernel must be 'gluon', 'triton' or None, not {kernel!r}")
    if kernel == "gluon" and not kernel_reads(view, d):
        raise ValueError("the Gluon decode kernel does not read these records (see gluon_layouts)")
    if enter is not None and view.k_hot is None:
        raise ValueError("enter names hot rows of a view without hot buffers")
    if not kernel_reads(view, d):  # the twin serves what no kernel reads
        res = reference.paged_attention(q, k, v, cu_q, prefix_lens, view, scale, enter=enter)
        return res if out is None else out.copy_(res)
    if prefix_lens.shape[0] != bsz:
        raise ValueError(f"decode takes one token per sequence: {bsz} queries, {prefix_lens.shape[0]} sequences")
    g = hq // h
    gp = max(16, triton.next_power_of_2(g))
    bs = view.block_size
    block_n = block_n or min(bs, DEFAULT_BLOCK_N)
    if bs % block_n:
        raise ValueError(f"block_n {block_n} must divide the block size {bs}")
    num_warps = num_warps or DEFAULT_WARPS
    k_lay, v_lay = _layouts(view, q.device)
    lookup = runnable(lookup or DEFAULT_LOOKUP)
    lut = lookup == "asm"
    early_v = early_values(v_lay) if early_v is None else early_v
    kv_args = {**_k_args(k_lay, d, lut), **_v_args(v_lay, d, lut)}
    max_registers = max_registers or DEFAULT_MAX_REGISTERS
    regs = {"maxnreg": max_registers} if torch.version.hip is None else {}  # a CUDA-only option
    if v.stride() != k.stride() or k.stride(2) != 1:
        k, v = k.contiguous(), v.contiguous()
    has_hot, k_hot, v_hot, hs = _hot(view, k)
    fused_enter = enter is not None and has_hot and k.dtype == k_hot.dtype  # (else torch rounds, after)
    sms = q.device.type == "cuda" and torch.cuda.get_device_properties(q.device).multi_processor_count
    gluon = gluon_reads(k_lay, v_lay, d, g, bs, q.device)
    if kernel == "gluon" and not gluon:
        raise ValueError("the Gluon decode kernel does not read these records here (see gluon_reads)")
    gluon = gluon and kernel != "triton"
    hot_block = decode_gluon.HOT_TOKENS if gluon else max(8, HOT_TILE // d)
    nhot = -(-(view.sinks + view.window) // hot_block) if has_hot else 0
    # what the compiled split kernel (its registers, hence its occupancy) depends on
    config = (tuple(kv_args.items()), h, d, g, bs, block_n, nhot, num_warps, num_stages, lookup, early_v,
              max_registers, q.dtype, view.k_pool.dtype, k_hot.dtype, q.device)
    if gluon:  # its constants, register cap and what its occupancy depends on
        gargs = {**_gluon_args(k_lay, "K"), **_gluon_args(v_lay, "V")}
        cap = GLUON_MAXNREG if GLUON_MAXNREG is not None else gluon_register_cap(k_lay, v_lay)
        # two-part records at d 64 (the 135M shape's tq3.5) ran slower with one copy (H200, 2026-11-30 20:19-20:20 UTC:
        # 4k 16.6 -> 17.3 us, 32k 21.3 -> 22.5); d 128 tq3.5 faster from 32k (128k B1 107.2 -> 105.3, 32k B8
        # 214.3 -> 205.5; 4 programs an SM instead of 3), slower at 8k (26.8 -> 29.7); one part within 1-3%
        two_part_64 = len(k_lay.parts) == 2 and d < 128
        same = GLUON_SAME_TABLES and gluon_same_tables(k_lay, v_lay) and not two_part_64
        pipeline = two_part_64 if GLUON_PIPELINE is None else GLUON_PIPELINE
        config = ("gluon", tuple(gargs.items()), h, d, g, bs, nhot, k_hot.dtype, cap, GLUON_PREFETCH, same, pipeline,
                  GLUON_SMEM_MERGE, q.device)
        block_n = decode_gluon.WARP_TOKENS * GLUON_WARPS
    wave_tiles = WAVE_TILES if gluon and not num_splits else 0
    if wave_tiles:
        nsplit, fill = wave_splits(bsz, h, block_n, sms or 132, _RESIDENT.get(config))
        spread = split_spread(bsz, h, sms or 132)
    else:
        nsplit = num_splits or default_splits(bsz, h, sms or 132, _RESIDENT.get(config))
        fill, spread = 1, 1  # unused without WAVE_TILES; splits of MIN_TILES tiles at least
    wave = wave_programs(bsz, h, sms or 132, _RESIDENT.get(config))
    pdl = programmatic_launch(q.device)
    min_tiles = max(1, SPLIT_MIN_TOKENS // block_n) if gluon else 1
    qk, qs = decode_queries(q, h, scale, k_lay, view.k_pool.dtype, lut, permute=not gluon, pdl=pdl)
    seq_slot = view.seq_slot if has_hot else prefix_lens
    dev = q.device
    dvq = v_lay.qjl.dim if v_lay is not None and v_lay.qjl is not None else 0
    # workspace: per (sequence, KV head) NSPLIT splits then nhot hot chunks, G rows each
    ws_m = torch.empty(bsz * h * (nsplit + nhot) * g, device=dev, dtype=torch.float32)
    ws_l = torch.empty_like(ws_m)
    ws_acc = torch.empty(ws_m.numel() * (d + dvq), device=dev, dtype=torch.float32)
    bt = view.block_table
    if gluon:
        regs = {"maxnreg": cap} if cap else {}
        launched = decode_gluon._decode_split_gluon[(bsz, h, nsplit + nhot)](
            qk, view.k_pool, view.v_pool, gluon_table(k_lay), gluon_table(v_lay), bt, prefix_lens,
            ws_m, ws_l, ws_acc, qs, k_hot, v_hot, seq_slot,
            view.sinks, view.window, bt.stride(0), qk.stride(0), qk.stride(1), qs.stride(0), qs.stride(1), *hs,
            0, nsplit, fill, wave, spread, H=h, G=g, D=d, BS=bs, NHOT=nhot, BLOCK_H=hot_block, **gargs, NW=GLUON_WARPS,
            PREFETCH=GLUON_PREFETCH, PDL=pdl, MIN_TILES=min_tiles, WAVE_TILES=wave_tiles, SAME_TABLES=same,
            PIPELINE=pipeline, SMEM_MERGE=GLUON_SMEM_MERGE,
            num_warps=GLUON_WARPS,
            launch_pdl=pdl, **regs)
        num_warps = GLUON_WARPS
    else:
        tab_k, tab_k2 = _tabs(k_lay, ws_m)
        tab_v, tab_v2 = _tabs(v_lay, ws_m)
        launched = _decode_split_kernel[(bsz, h, nsplit + nhot)](
            qk, view.k_pool, view.v_pool, tab_k, tab_k2, tab_v, tab_v2, bt, prefix_lens, ws_m, ws_l, ws_acc,
            qs, k_hot, v_hot, seq_slot,
            view.sinks, view.window, bt.stride(0), qk.stride(0), qk.stride(1), qs.stride(0), qs.stride(1), *hs,
            H=h, G=g, GP=gp, D=d, BS=bs, BLOCK_N=block_n, NSPLIT=nsplit, NHOT=nhot, BLOCK_H=hot_block,
            **kv_args, MODE=LOOKUPS[lookup], DOT_F32=INTERPRET, EARLY_V=early_v, PDL=pdl, MIN_TILES=min_tiles,
            num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl, **regs)
    if sms and config not in _RESIDENT:
        _RESIDENT[config] = resident_programs(launched, num_warps, q.device)
    out = torch.empty_like(q) if out is None else out
    rot_v = v_lay.rotation if v_lay is not None else ws_m
    qjl_rot = _qjl_unrotation(v_lay) if dvq else ws_m
    sp = triton.next_power_of_2(max(nsplit, MAX_SPLITS))  # fixed: one merge compile whatever the count
    chunk = max(16, (MERGE_TILE_QJL if dvq else MERGE_TILE) // d)  # elements of an [SB, D] / [D, CJ] tile
    hp = triton.next_power_of_2(max(nhot, 1))
    ncs = merge_column_programs(bsz * h * g, d, sms or 132) if v_lay is not None else 1  # (unrotated: nothing to split)
    cj = min(d // ncs, chunk) if v_lay is not None else d
    _decode_merge_kernel[(bsz, h, g * ncs)](
        qs, k, v, prefix_lens, ws_m, ws_l, ws_acc, rot_v, qjl_rot, out,
        view.sinks, view.window, qs.stride(0), qs.stride(1), k.stride(0), k.stride(1),
        out.stride(0), out.stride(1),
        H=h, G=g, D=d, BLOCK_N=block_n, NSPLIT=nsplit, SB=min(sp, chunk), NHOT=nhot, HP=hp, CJ=cj,
        V_ROTATED=v_lay is not None, DVQ=dvq, PDL=pdl, MIN_TILES=min_tiles, FILL=fill, WAVE_TILES=wave_tiles,
        SPREAD=spread, HOT_EARLY=cj == d // ncs and nhot > 0 and hp * cj <= MERGE_HOT_TILE, NCS=ncs,
        k_hot=k_hot, v_hot=v_hot, seq_slot=seq_slot, enter_ptr=enter, s_hs=hs[0], s_hh=hs[1], s_hr=hs[2],
        ENTER=fused_enter, num_warps=MERGE_WARPS,
        launch_pdl=pdl)
    if enter is not None and not fused_enter:
        reference.enter_window(view.k_hot, view.v_hot, k, v, view.seq_slot.long(), enter)
    return out


# programmatic dependent launch of the split and merge kernels (None: where it runs; True / False: forced).
# H200, graph replay (.bench/w/s12_pdl2.py, 2026-11-30 14:36-14:38 UTC, merge tile 8192, 256 tokens a split),
# tq3.5, off -> on: 8B shape B1 8k 31.6 -> 30.4 us, 32k 50.2 -> 47.6, 128k 117.7 -> 114.8, B8 32k 239.8 ->
# 239.7, B16 32k 422.7 -> 420.9; 135M 4k 19.7 -> 17.3, 32k 24.4 -> 21.5 (tq4 alike, B16 32k 439.2 -> 442.7).
# The split kernel lets the merge launch once its queries are in (letting it launch at the split's end
# instead: 0.2-1.3 us slower at B1). PDL slowed some split counts other than the defaults (14:33-14:34: 16
# splits at 128k B1 183 -> 236 us, 32 splits 129 -> 165); cause not measured.
DECODE_PDL = None
# compressed tokens a split of the Gluon kernel takes at least: short contexts use fewer of the grid's
# splits (the rest exit at once; the merge reads as many). H200, PDL on, 14:36-14:38: tq3.5 8B B1 8k 32.4
# (64) / 30.4 (256) / 33.6 us (512), 135M 4k 17.3 / 17.3 / 20.7, 32k 21.3 / 21.5 / 22.8; 8B 32k and 128k
# within 0.2 us. Not for the Triton kernel: bf16 pages 135M 4k 16.8 with it against 12.0 without, 8B 8k
# 26.0 against 22.7 (14:50). Where splits of fewer tiles still number at most split_spread's count (one
# program a multiprocessor), a short context takes them (2026-12-01 10:02 UTC, graph replay, same process,
# tq3.5 / tq4, without -> with: 135M shape B1 1k 15.0 -> 13.0 / 15.1 -> 12.7 us, 2k 14.9 -> 13.1 / 14.9 ->
# 12.8, 4k 15.1 -> 13.8 / 15.2 -> 13.8, 8k 15.2 -> 14.9 / 15.3 -> 14.8; 8B B1 2k 19.3 -> 18.3 / 19.6 -> 18.5;
# 8B 4k to 128k, B8 32k and 135M 32k within 0.3 us: their splits unchanged). A lower floor for every
# shape slowed the 8B shape (09:55: 128 tokens 8B B1 8k 23.0 -> 26.3, 4k 20.0 -> 20.6)
SPLIT_MIN_TOKENS = 256
# the Gluon kernel's splits by context length (wave_splits; 0: the even split over default_splits' count).
# H200, graph replay, tq3.5 / tq4, even splits of the count given (.bench/w/s13_splits.py, 2026-11-30 16:20
# UTC): the best count fills about one wave of programs until a split would pass ~40-48 tiles, then adds
# waves of such splits: 8B shape B8 8k 4 splits 82.5 us (default 37: 115.0), B8 32k 12-16 219.7-219.4 (default 37: 236.0),
# B16 32k 8-12 413-417 (3: 420.7; tq4 33: 441.2), B4 32k 12 120.2, B2 32k 24 70.7, B1 128k 48 115.8 (96: 119.5).
# The rule against the even split (.bench/w/s13_wave.py, 16:44 UTC, same process): tq3.5 B2 32k 72.8 -> 68.0,
# B8 32k 230.3 -> 209.6, B16 32k 406.8 -> 404.8; tq4 B8 32k 227.3 -> 221.5, B16 32k 439.9 -> 411.0; one
# sequence unchanged (the same splits); 16:38: B8 8k 107.0 -> 85.7 (tq4 109.5 -> 89.3), B16 8k tq4 203.3 -> 156.4,
# B32 8k 288.5 -> 291.6 (tq4 283.0 -> 295.5), B8 128k 719.6 -> 728.5 (docs/BENCHMARKS.md)
WAVE_TILES = 48
WAVE_GRID_TOKENS = 131072
WAVE_GRID_WAVES = 4


def programmatic_launch(device: torch.device) -> bool:
    """Whether decode attention's kernels launch the next one early (griddepcontrol, Hopper and later):
    the split kernel's start and first tile overlap the query kernel, the merge's start the splits'."""
    if DECODE_PDL is not None:
        return DECODE_PDL
    if INTERPRET or device.type != "cuda" or torch.version.hip is not None:
        return False
    return _capability(device) >= (9, 0)


# the Gluon split kernel merges its warps' states through shared memory, one barrier (decode_gluon._merge_warps;
# False: cross-warp reductions in registers, 15 barriers at tq3.5 d 128). H200, graph replay, same process
# (scripts/bench_decode_variants.py, 2026-12-01 12:46 UTC), False -> True, tq3.5 / tq4: 8B B1 8k 21.7 -> 19.6 /
# 22.6 -> 20.5 us (SDPA 22.1), 128k 85.2 -> 82.8 / 90.7 -> 86.3, B8 32k 161.1 -> 167.5 / 167.9 -> 161.1 (tq3.5
# slower, not explained), 135M 4k 13.4 -> 12.2 / 13.8 -> 12.8
GLUON_SMEM_MERGE = True
GLUON_WARPS = 4  # warps of the Gluon split kernel: 16 tokens each of a 64-token tile
GLUON_SAME_TABLES = True  # a variant switch: False loads the value tables even where they are the keys'
# each tile's scores computed beside the previous tile's softmax and values (two independent chains for the
# scheduler; None: for two-part records at head_dim 64, the default model's tq3.5). H200, graph replay, same
# process (.bench/w/flags.py), off -> on: with the 16-entry 4-bit tables (2026-12-01 03:14 UTC) tq3.5 8B B1 8k
# 29.7 -> 26.0 us, 128k 95.7 -> 93.1 (155 registers: three programs an SM), B8 32k 180.4 -> 177.2, 135M 4k 18.0
# -> 16.7, 32k 22.1 -> 21.0; tq4 128k 106.4 -> 107.7 (capped at 128). With the symmetric 4-bit lookups (03:39;
# tq3.5 at d 128 then 128 registers either way): tq3.5 8B 128k 89.3 -> 91.0, B8 32k 168.3 -> 184.3, 32k 40.9 ->
# 42.0, 8k 29.4 -> 29.3; 135M 4k 17.0 -> 16.3; tq4 / tq3 within 1-3%, mostly slower
GLUON_PIPELINE = None
GLUON_MAXNREG = None  # a variant: ptxas's register cap for the Gluon kernel (0: none; None: gluon_register_cap)


def gluon_register_cap(k_lay: RecordLayout, v_lay: RecordLayout) -> int:
    """ptxas's register cap for the Gluon split kernel: 128 (four programs a multiprocessor) for one-part
    records, none for two parts. H200, 8B shape, prefetch on, the kernel of d4ac372 (.bench/w/gbench.py,
    2026-11-30 12:59 UTC, same process): tq4 uncapped (141 registers here, three programs a SM) 134.8 us at
    B1 128k, 271.3 at B8 32k, 57.1 at B1 32k; capped at 128 127.7 / 235.2 / 54.4 (the kernel before that
    commit's refactor ran 127.1 / 234.4 / 54.2 uncapped at 12:48: the allocation moves with the code);
    tq3.5 (160 registers) capped ran slower: 133.6 against 120.4 at 128k."""
    return 128 if len(k_lay.parts) == 1 and len(v_lay.parts) == 1 else 0


# each warp prefetches its next tile's record lines: 0 off, 1 to L1, 2 to L2. H200, 8B shape (.bench/w/gbench.py,
# 2026-11-30 12:48 UTC, the kernel of 31ee9d1): tq3.5 B1 128k 129.6 (off) / 120.2 (L1) / 120.3 us (L2), B8 32k
# 261.6 / 238.9 / 238.9; tq4 134.8 / 127.2 / 127.1, 272.0 / 234.5 / 234.4 (that kernel gained nothing from a
# register cap with prefetch on: 127.2 / 235.8); two tiles ahead (12:51): slower (tq3.5 135.3 / 277.6)
GLUON_PREFETCH = 2
# value units of 4 codes for 3-bit parts of 32 channels (tq3.5 at head_dim 64, the default model's default
# cache) through the Gluon kernel; False sends those records to the Triton kernel. H200 (2026-11-30 14:22,
# scripts/bench_decode_kernels.py --gluon-3bit-32): 135M shape tq3.5 32k 41.5 -> 25.1 us, 4k 19.4 -> 20.0
GLUON_3BIT_32 = True


def gluon_reads(k_lay: RecordLayout | None, v_lay: RecordLayout | None, d: int, g: int, block_size: int,
                device) -> bool:
    """Whether decode_gluon's split kernel serves these records here: compiled CUDA code (not the
    interpreter, not ROCm) and records it reads (gluon_layouts)."""
    if decode_gluon is None or INTERPRET or torch.version.hip is not None or torch.device(device).type != "cuda":
        return False
    return _capability(torch.device(device)) >= (8, 0) and gluon_layouts(k_lay, v_lay, d, g, block_size)


_CAPABILITY: dict = {}


def _capability(device: torch.device) -> tuple[int, int]:
    """A CUDA device's compute capability, kept per device (8.0+: mma.sync m16n8k16; 9.0+: griddepcontrol)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def gluon_layouts(k_lay: RecordLayout | None, v_lay: RecordLayout | None, d: int, g: int, block_size: int) -> bool:
    """Whether decode_gluon's split kernel reads these records: head_dim 64 or 128, at most 8 query heads
    a group, blocks of whole 64-token tiles, and keys and values of one or two equal MSE parts (no QJL)
    of 4 bits and at least 32 channels (a symmetric codebook: lut_symmetric) or 3 bits and at least 32 (64
    with GLUON_3BIT_32 off), 16-bit aligned: tq4, tq3.5 and tq3 at head_dim 64 and 128 (tq3.5 at 64 not with
    GLUON_3BIT_32 off)."""
    if decode_gluon is None or d not in (64, 128) or g > 8 or block_size % (decode_gluon.WARP_TOKENS * GLUON_WARPS):
        return False

    def ok(lay):
        least = {4: 32, 3: 32 if GLUON_3BIT_32 else 64}
        return (lay is not None and lay.qjl is None and lay.record_bytes % 2 == 0
                and len({p.dim for p in lay.parts}) == 1 and sum(p.dim for p in lay.parts) == d
                and all(p.bits in least and p.dim >= least[p.bits] and p.planes % 2 == 0 and p.scale % 2 == 0
                        and (p.bits != 4 or lut_symmetric(lay, p)) for p in lay.parts))
    return ok(k_lay) and ok(v_lay)


def _gluon_args(layout: RecordLayout, side: str) -> dict:
    """decode_gluon's constants of one side: record bytes and parts A and B (dim, bits, planes, scale)."""
    a, b = layout.parts[0], (layout.parts[1] if len(layout.parts) > 1 else None)
    out = {f"REC_{side}": layout.record_bytes}
    for tag, p in (("A", a), ("B", b)):
        vals = (p.dim, p.bits, p.planes, p.scale) if p is not None else (0, 4, 0, 0)
        out.update(zip((f"{side}{tag}_{x}" for x in ("DP", "BT", "PL", "SC")), vals))
    return out


def gluon_same_tables(k_lay: RecordLayout, v_lay: RecordLayout) -> bool:
    """Whether the value parts' PRMT tables are the key parts' (the codebook depends on a part's bits and
    width only, so tq3.5 / tq4 / tq3 keys and values share theirs): the Gluon kernel then holds one copy."""
    return (len(k_lay.parts) == len(v_lay.parts)
            and all(a.bits == b.bits and a.dim == b.dim and lut_words(k_lay, a) == lut_words(v_lay, b)
                    for a, b in zip(k_lay.parts, v_lay.parts)))


def gluon_table(layout: RecordLayout) -> torch.Tensor:
    """The parts' PRMT table words (lut_words; part A at 0, part B at 8, zero-padded) as int32 on the
    layout's device, kept on the layout (call once before capturing a CUDA graph)."""
    if "_gluon_table" not in layout.__dict__:
        words = [0] * 16
        for i, part in enumerate(layout.parts):
            w = [int(x, 16) for x in lut_words(layout, part)]
            words[8 * i:8 * i + len(w)] = [x - (1 << 32) if x >= 1 << 31 else x for x in w]
        layout.__dict__["_gluon_table"] = torch.tensor(words, dtype=torch.int32, device=layout.rotation.device)
    return layout.__dict__["_gluon_table"]


DEFAULT_BLOCK_N = 64
# H200, 8B shape, B 1 128k: "asm" tq3.5 211.6 µs, tq4 168.7 against "pair" 232.1, 202.1 (pair against
# "mem": 270.8 / 342.3 before other changes); B 8 32k 385.1 / 299.4 against 439.9 / 381.4
DEFAULT_LOOKUP = "asm"
MAX_SPLITS = 128
DEFAULT_WARPS = 4
# ptxas's register cap for the split kernel: tq3.5 at d 128 needs ~140-150 (3 programs a SM), capped it
# runs 4 with a few spills. H200, 8B shape: 128k B 1 247 µs against 262, 32k B 8 457 against 494,
# 32k B 1 90.5 against 96.0; tq4 (128 already) and the 135M shape unchanged
DEFAULT_MAX_REGISTERS = 128
HOT_TILE = 2048  # [tokens, d] elements of hot K (and V) per program: 32 tokens at d 64, 16 at d 128
# fp32 elements per register tile of the merge stage: [SB, D] splits at a time, [D, CJ] of the un-rotation.
# H200, graph replay, tq3.5 8B shape (.bench/w/s12_pdl*.py, 2026-11-30): 4096 -> 8192 (14:33-14:34) B1 8k
# 36.9 -> 32.7 us, 32k 52.7 -> 48.6, 128k 119.9 -> 115.2, B8 32k 250.7 -> 242.7; 8192 -> 16384 (14:36-14:38)
# 30.4 -> 29.5, 47.6 -> 46.3, 114.8 -> 114.3, 239.7 -> 236.6, B16 32k 420.9 -> 423.4; 8 warps: slower
MERGE_TILE = 16384
MERGE_TILE_QJL = 4096  # values with a QJL part: a second [DVQ, CJ] tile; at 16384 ptxas spills (2760 B at d 128)
MERGE_WARPS = 4
# most merge programs per query row (merge_column_programs; 1: one a row), each un-rotating its share of the
# columns: the [D, D] rotation's loads were ~1.3 us of the merge at 8k (scripts/trace_decode.py). H200, graph
# replay, same process (scripts/bench_decode_variants.py, 2026-12-01 12:33 UTC), 1 -> 4 (-> 2), tq3.5 / tq4:
# 8B B1 8k 22.8 -> 21.9 / 23.3 -> 22.5 us (SDPA 22.1), 2k 18.0 -> 17.3 / 18.5 -> 17.7, 32k 36.4 -> 36.3 (35.8)
# / 38.3 -> 38.1 (37.7), 128k 85.9 -> 85.5 / 91.7 -> 91.0, B2 8k (2 a row) 30.8 -> 30.1 / 31.7 -> 31.4; 135M
# 4k and 32k within 0.1 (4 a row at 4k: 13.7 -> 13.8 / 13.7 -> 13.7). Under the interpreter 1: each program
# costs CPU time there (a CPU test of the decode ran 8.8 s with 4, 5.3 s with 1); tests set it where they need it
MERGE_COLUMNS = 1 if INTERPRET else 4
# the merge loads the hot chunks' accumulators with the split workspace's where they fit this many elements
# ([HP, CJ], CJ a program's columns; the default window's at d 128: 16 x 128 with one program a row): larger
# tiles stay live through the reduction (a 2044-token window at d 128 and one program a row: 255 registers and
# a spill)
MERGE_HOT_TILE = 2048
QUERY_TILE = 4096  # fp32 elements of a program's [G, CJ, d] product tile of the query rotation
