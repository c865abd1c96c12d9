"""The decode split kernel in Gluon for 4- and 3-bit MSE records (tq4, tq3.5, tq3): codes decoded in
registers straight into the tensor cores' operand layouts, each warp its own stream of 16-token slices.

`decode_attention._decode_split_kernel` (plain Triton) lets the compiler place a tile's codes: the
dequantized keys and values reach the dot operands through shared memory or through per-element
lookups. Here the layouts are explicit (triton.experimental.gluon), so a thread loads exactly the codes
its mma fragments need and decodes them where they are used:

- keys: S^T[16 tokens, 8 rows] = K . Q^T with K the A operand [16 tokens, d] of mma.m16n8k16 (the 16
  tokens fill its 16 rows; the group's G <= 8 query rows are the 8 columns, so no row of the mma is
  padding). Thread (lane l, t = l % 4) holds, for tokens l // 4 and l // 4 + 8, the channels 16 kb + 2 t
  + {0, 1, 8, 9} of each k-block kb. The order of channels inside the dot product is free, so k-block kb's
  four channels are taken to be four codes of the record read together: thread t reads codes t * d / 4 +
  4 kb + e of a part of d channels and the query's rows are permuted to match (once per program).
- values: O^T[d, 8 rows] = V^T . P with V^T the A operand [d, 16 tokens]; thread (g = l // 4) holds rows
  16 mb + 8 mh + g for tokens 2 t + {0, 1, 8, 9}: per token d / 8 channels, again one unit per four
  (codes g * d / 8 + 4 j + e -> row 32 j + 16 (e >> 1) + 8 (e & 1) + g), stored to their channels at
  the end. P [16 tokens, 8 rows] is the B operand: the scores' accumulator layout with each 8 x 8 half
  transposed by movmatrix. (The tile loop compiles with no shared-memory instruction: every layout
  change in it stays in registers.)
- eight 4-bit codes become eight fp16 by PRMT lookups of their magnitudes in the upper half of the
  symmetric 16-entry table (four registers: low bytes of centroids 8 .. 15, then high bytes) and a sign
  flip of the high bytes (_lut4x8, 19 integer instructions and one multiply for eight codes); 3-bit
  codes, sixteen at a time (32 bits of 2-bit fields, two bytes of high bits in packing.PERM3's order),
  become two PRMT selectors by a byte shuffle, shifts and masks (_lut3x16), then one PRMT per byte plane
  and four codes. Values are looked up two tokens at a time, so that a channel's two tokens
  leave in one register (the value mma's A operand). Where the key and value parts' tables are equal,
  one copy serves both (SAME_TABLES). Records of two parts (tq3.5: 64 channels of 4 bits, 64 of 3) take
  one mma per part and scale, on the same scores and probabilities.
- warps never synchronize: warp w takes tokens 16 w .. 16 w + 15 of every 16 * num_warps-token tile with
  its own online softmax; the warps' states merge once at the end of the split. Each warp prefetches the
  lines of its next tile's records (PREFETCH) while it works on this one, and may compute a tile's scores
  beside the previous tile's softmax and values (PIPELINE).

The workspace it writes (m, l, un-normalized accumulator per split and query row, values in the
codec's rotated space; then the hot-token chunks') is the Triton kernel's, so the
merge stage is shared. Compiled GPU code only (inline PTX, explicit layouts): the interpreter and other devices run
the Triton kernel.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .decode_bounds import hot_count, hot_slot, split_bounds

NEG = gl.constexpr(-1.0e30)
WARP_TOKENS = 16
TOKENS = gl.constexpr(WARP_TOKENS)  # tokens a warp takes from each tile: the n of the key mma, the k of the value mma
HOT_TOKENS = 16  # hot tokens a program (_hot_chunk: the 16 lanes of its score layout)


# 4-bit codes: the codebook is symmetric (centroid 15 - i = -centroid i, bit for bit in fp16; decode_attention
# checks it), so code i is the magnitude j = i & 7 (i >= 8) or 7 - (i & 7) (i < 8), negated for i < 8: j picks
# the low and high bytes from the table of centroids 8 .. 15 (two words each, the halves t2, t3, t6, t7 of
# lut_words' eight) and a PRMT in sign-replicate mode turns bit 3 into a byte mask that flips the high byte's
# sign. Eight codes (w: code e at bits 4 e) a call: x = 1 in each nibble of a negative code, s = the
# magnitudes (w ^ 7 x), t = 0xC | x selects byte 0 (0x00) or 1 (0x80) of the second source, 0x8000, with the
# sign replicated (an immediate there: ptxas materializes one in the first source at every use).
_SYM4 = gl.constexpr(
    "shr.u32 x, w, 3; not.b32 x, x; and.b32 x, x, 0x11111111; mul.lo.u32 z, x, 7; xor.b32 s, w, z;"
    "and.b32 s, s, 0x77777777; or.b32 t, x, 0xCCCCCCCC;"
    "prmt.b32 la, $10, $11, s; prmt.b32 ha, $12, $13, s; prmt.b32 m, 0, 0x8000, t;"
    "lop3.b32 ha, ha, m, 0x80808080, 0x78; shr.u32 s, s, 16; shr.u32 t, t, 16;"
    "prmt.b32 lb, $10, $11, s; prmt.b32 hb, $12, $13, s; prmt.b32 m, 0, 0x8000, t;"
    "lop3.b32 hb, hb, m, 0x80808080, 0x78;")
# keys: w = codes 0-3 (a), 4-7 (b) of one token; outputs pair codes (0, 1), (2, 3), ...
_SYM4_KEY = gl.constexpr(
    "prmt.b32 w, $8, $9, 0x5410;" + _SYM4.value
    + "prmt.b32 p, la, ha, 0x5140; mov.b32 {$0, $1}, p; prmt.b32 p, la, ha, 0x7362; mov.b32 {$2, $3}, p;"
    + "prmt.b32 p, lb, hb, 0x5140; mov.b32 {$4, $5}, p; prmt.b32 p, lb, hb, 0x7362; mov.b32 {$6, $7}, p;}")
# values: a, b four codes of two tokens, bytes interleaved (nibbles a0 a1 b0 b1 | a2 a3 b2 b3); outputs pair
# the tokens' code e at 2 e, 2 e + 1
_SYM4_VALUE = gl.constexpr(
    "prmt.b32 w, $8, $9, 0x5140;" + _SYM4.value
    + "prmt.b32 p, la, ha, 0x6240; mov.b32 {$0, $1}, p; prmt.b32 p, la, ha, 0x7351; mov.b32 {$2, $3}, p;"
    + "prmt.b32 p, lb, hb, 0x6240; mov.b32 {$4, $5}, p; prmt.b32 p, lb, hb, 0x7351; mov.b32 {$6, $7}, p;}")


@gluon.jit
def _lut4x8(a, b, l2, l3, h2, h3, KEY: gl.constexpr):
    """Eight fp16 centroids of 4-bit codes (low 16 bits of a and b, code e at bits 4 e) from the symmetric
    table's upper half (l2, l3: low bytes of centroids 8 .. 15, h2, h3: high bytes). Keys (KEY): a, b the
    codes 0-3 and 4-7 of one token, output e = code e. Values: a, b four codes of tokens 2P and 2P + 1,
    code e of a at output 2 e, of b at 2 e + 1 (a channel's two tokens leave in one register, the value
    mma's A operand)."""
    ASM: gl.constexpr = _SYM4_KEY if KEY else _SYM4_VALUE
    return gl.inline_asm_elementwise(
        "{.reg .b32 w, x, z, s, t, m, la, lb, ha, hb, p;" + ASM,
        "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r", [a, b, l2, l3, h2, h3],
        dtype=(gl.float16,) * 8, is_pure=True, pack=1)


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
def _tokens_as_k(p, POP: gl.constexpr):
    """P [W, 16 tokens, 8 rows] (fp16, the score accumulator's layout: lane (g, t) holds tokens g, g + 8 of
    rows 2 t, 2 t + 1) as the value mma's B operand [k = 16 tokens, n = 8 rows] (lane (g, t) holds row g of
    tokens 2 t, 2 t + 1, 2 t + 8, 2 t + 9): each 8 x 8 half transposed in registers by movmatrix. Its
    output in p's layout holds at [8 h + g, 2 t + e] the probability of token 8 h + 2 t + e, row g; the
    reshape and permute name that, and the conversion to POP moves nothing."""
    y = gl.inline_asm_elementwise("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", "=r,r", [p],
                                  dtype=gl.float16, is_pure=True, pack=2)
    w: gl.constexpr = p.shape[0]
    y = gl.reshape(gl.permute(gl.reshape(y, [w, 2, 8, 8]), [0, 1, 3, 2]), [w, 16, 8])
    return gl.convert_layout(y, POP)


@gluon.jit
def _prefetch(ptr, LEVEL: gl.constexpr):
    """prefetch.global.L1 (LEVEL 1) or .L2 (2) of the line holding each address; returns zeros."""
    if LEVEL == 1:
        out = gl.inline_asm_elementwise("prefetch.global.L1 [$1]; mov.b32 $0, 0;", "=r,l", [ptr], dtype=gl.int32,
                                        is_pure=False, pack=1)
    else:
        out = gl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.b32 $0, 0;", "=r,l", [ptr], dtype=gl.int32,
                                        is_pure=False, pack=1)
    return out


@gluon.jit
def _grid_wait(x):
    """griddepcontrol.wait (the previous kernel complete, its writes visible), then launch_dependents
    (the next kernel may launch); x: any scalar, returned, so that what uses it comes after."""
    return gl.inline_asm_elementwise("griddepcontrol.wait; griddepcontrol.launch_dependents; mov.b32 $0, $1;",
                                     "=r,r", [x], dtype=gl.int32, is_pure=False, pack=1)


def _ptx_select(shift: int, up: int, tab: int, outs: tuple) -> str:
    """PTX of one selector and its lookups: s = ((w >> shift) & 0x33333333) | ((y << up) & 0x44444444),
    each half of s looked up in the table at operands $tab .. $tab + 3 (low bytes, then high bytes) and
    nibbles n, n + 2 paired: the low half's pairs to outputs outs[0], the high half's to outs[1]."""
    out = (f"shr.u32 x, w, {shift}; and.b32 x, x, 0x33333333;" if shift else "and.b32 x, w, 0x33333333;")
    out += f"shl.b32 z, y, {up}; and.b32 z, z, 0x44444444; or.b32 s, x, z;"
    for half, (o1, o2) in enumerate(outs):
        out += "shr.u32 s, s, 16;" if half else ""
        out += (f"prmt.b32 lo, ${tab}, ${tab + 1}, s; prmt.b32 hi, ${tab + 2}, ${tab + 3}, s;"
                f"prmt.b32 p, lo, hi, 0x6240; mov.b32 {{${o1}, ${o1 + 1}}}, p;"
                f"prmt.b32 p, lo, hi, 0x7351; mov.b32 {{${o2}, ${o2 + 1}}}, p;")
    return out


# 3-bit codes (packing.py: a plane of 2-bit fields, code j at bit 2 j, then a 1-bit plane in PERM3's
# order, codes 0-7 of a byte at bits 0, 1, 4, 5, 2, 3, 6, 7). Two tokens a, b (keys: two halves of one
# token's codes) become PRMT selectors of eight nibbles, the 2-bit field in bits 0-1 and the high bit in
# bit 2, by byte shuffles, shifts and masks: w = fields with a byte of a, a byte of b, a byte of a, a byte
# of b, so that w & 0x33333333 holds codes (a0 a2 b0 b2 a4 a6 b4 b6) and (w >> 2) & 0x33333333 codes
# (a1 a3 b1 b3 a5 a7 b5 b7); y = the high-bit bytes of a, b, a >> 2, b >> 2, whose bits 4 n and 4 n + 1
# are those codes' high bits (PERM3 puts them there), moved to bit 2 by << 2 and << 1. One PRMT per byte
# plane looks up four codes (table: low bytes in t0, t1, high bytes in t2, t3); the last PRMTs pair
# nibbles n and n + 2, so code e of a and of b leave in one register, at outputs 2 e and 2 e + 1.
_W3_KEY = gl.constexpr("prmt.b32 w, $16, $17, 0x5410; shr.u32 y, $18, 2; prmt.b32 y, $18, y, 0x5140;")
_W3_VALUE = gl.constexpr("prmt.b32 w, $16, $17, 0x5140; prmt.b32 h, $18, $19, 0x0040; shr.u32 y, h, 2;"
                         "prmt.b32 y, h, y, 0x5410;")
_SEL16 = gl.constexpr(_ptx_select(0, 2, 20, ((0, 4), (8, 12))) + _ptx_select(2, 1, 20, ((2, 6), (10, 14))) + "}")


@gluon.jit
def _lut3x16(a, b, c, d, t0, t1, t2, t3, KEY: gl.constexpr):
    """Sixteen fp16 centroids of 3-bit codes, code e of token a at output 2 e, of token b at 2 e + 1.
    Values (KEY False): a, b: the 2-bit fields of eight codes of each token (16 bits), c, d: their
    high-bit bytes. Keys: sixteen codes of one token, a: fields of codes 0-7, b: of 8-15, c: the two
    high-bit bytes (d unused); a_e is code (e & 3) + 8 (e >> 2), b_e code 4 + (e & 3) + 8 (e >> 2)."""
    PRE: gl.constexpr = _W3_KEY if KEY else _W3_VALUE
    return gl.inline_asm_elementwise(
        "{.reg .b32 w, h, x, y, z, s, lo, hi, p;" + PRE + _SEL16,
        "=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r", [a, b, c, d, t0, t1, t2, t3],
        dtype=(gl.float16,) * 16, is_pure=True, pack=1)


_X3_KEY = gl.constexpr("shr.u32 x, $8, 2; prmt.b32 w, $8, x, 0x5410; shr.u32 h, $10, 2; prmt.b32 h, $10, h, 0x0040;")
_X3_VALUE = gl.constexpr("prmt.b32 f, $8, $9, 0x0040; shr.u32 x, f, 2; prmt.b32 w, f, x, 0x5410;"
                         "prmt.b32 h, $10, $11, 0x0040;")
_SEL8 = gl.constexpr("shr.u32 y, h, 1; prmt.b32 y, h, y, 0x5410;" + _ptx_select(0, 2, 12, ((0, 4), (2, 6))) + "}")


@gluon.jit
def _lut3x8(a, b, c, d, t0, t1, t2, t3, KEY: gl.constexpr):
    """_lut3x16 for four codes of each token (parts of 32 channels): values: a, b the fields' bytes, c, d
    the high bits of those codes at bits 0, 1, 4, 5 (PERM3's places of codes 0-3); keys: a the fields
    of eight codes of one token (16 bits), c their high-bit byte (b, d unused): a_e is code e, b_e code
    4 + e. w = fields bytes a, b, a >> 2, b >> 2 (codes a0 a2 b0 b2 a1 a3 b1 b3), y = high bits a, b,
    a >> 1, b >> 1 (the same codes' at bits 4 n)."""
    PRE: gl.constexpr = _X3_KEY if KEY else _X3_VALUE
    return gl.inline_asm_elementwise(
        "{.reg .b32 f, w, h, x, y, z, s, lo, hi, p;" + PRE + _SEL8,
        "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r", [a, b, c, d, t0, t1, t2, t3],
        dtype=(gl.float16,) * 8, is_pure=True, pack=1)


@gluon.constexpr_function
def _key_units(DP, BITS):
    """Units a thread reads of each of a key part's tokens: of 8 codes (4-bit), 16 (3-bit), or one of 8
    (3-bit parts of 32 channels)."""
    return DP // 32 if BITS == 4 else max(DP // 64, 1)


@gluon.constexpr_function
def _key_layout(DP, BITS, NW):
    """[NW, units, t, token] of a key part (see _key_fragment)."""
    return gl.BlockedLayout([1, _key_units(DP, BITS), 1, 1], [1, 1, 4, 8], [NW, 1, 1, 1], [2, 3, 1, 0])


@gluon.jit
def _key_tables(lut, zero, DP: gl.constexpr, BITS: gl.constexpr, NW: gl.constexpr):
    """One key part's table words, shaped [1, 1, 4, 1] in its unit layout (see _key_fragment)."""
    return _table(lut, _idx4(4, 2, _key_layout(DP, BITS, NW)) * zero)


@gluon.jit
def _key_fragment(base, t0, t1, t2, t3, t4, t5, t6, t7, REC: gl.constexpr, DP: gl.constexpr, BITS: gl.constexpr,
                  PL: gl.constexpr, NW: gl.constexpr):
    """K^T [NW, DP, 16] (fp16) of one key part for each warp's 16 tokens of the tile whose first record is
    at `base`. Thread t of a quad reads codes t DP / 4 .. (t + 1) DP / 4 of its tokens (tokens l // 4 and
    l // 4 + 8) in units: 4-bit, eight codes (two 16-bit words); code t DP / 4 + 8 c + e lands on row
    32 c + 16 (e >> 2) + 8 ((e >> 1) & 1) + 2 t + (e & 1) (= 16 c' + 8 (e' >> 1) + 2 t + (e' & 1) for the
    four-code units c' = 2 c + (e >> 2), e' = e & 3 that _part_queries counts in). 3-bit, sixteen codes
    (32 bits of fields, two bytes of high bits;
    eight codes in parts of 32 channels); output i of unit c (_lut3x16 / _lut3x8's order) lands on row
    64 c + 32 (i >> 3) + 16 ((i >> 2) & 1) + 8 ((i >> 1) & 1) + 2 t + (i & 1). _part_queries permutes
    the query's columns to match."""
    KU: gl.constexpr = _key_layout(DP, BITS, NW)
    row = base + (_idx4(NW, 0, KU) * TOKENS + _idx4(TOKENS, 3, KU)) * REC + PL
    t = _idx4(4, 2, KU)
    c = _idx4(_key_units(DP, BITS), 1, KU)
    if BITS == 4:
        u = (row + t * (DP // 8) + c * 4).to(gl.pointer_type(gl.uint16))
        o0, o1, o2, o3, o4, o5, o6, o7 = _lut4x8(gl.load(u).to(gl.int32), gl.load(u + 1).to(gl.int32), t2, t3, t6, t7,
                                                 True)
        x = _pairs4(o0, o1, o2, o3, o4, o5, o6, o7)  # [NW, U, t, n, e & 1, (e >> 1) & 1, e >> 2]
        frag = gl.reshape(gl.permute(x, [0, 1, 6, 5, 2, 4, 3]), [NW, DP, TOKENS])
    elif DP == 32:
        f = gl.load((row + t * 2).to(gl.pointer_type(gl.uint16))).to(gl.int32)
        hb = gl.load(row + 8 + t).to(gl.int32)
        o0, o1, o2, o3, o4, o5, o6, o7 = _lut3x8(f, f, hb, hb, t0, t1, t2, t3, True)
        x = _pairs4(o0, o1, o2, o3, o4, o5, o6, o7)  # [NW, 1, t, n, i & 1, (i >> 1) & 1, i >> 2]
        frag = gl.reshape(gl.permute(x, [0, 1, 6, 5, 2, 4, 3]), [NW, DP, TOKENS])
    else:
        fp = (row + t * (DP // 16) + c * 4).to(gl.pointer_type(gl.uint16))
        hb = gl.load((row + DP // 4 + t * (DP // 32) + c * 2).to(gl.pointer_type(gl.uint16))).to(gl.int32)
        o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15 = _lut3x16(
            gl.load(fp).to(gl.int32), gl.load(fp + 1).to(gl.int32), hb, hb, t0, t1, t2, t3, True)
        x = gl.join(_pairs4(o0, o1, o2, o3, o4, o5, o6, o7), _pairs4(o8, o9, o10, o11, o12, o13, o14, o15))
        frag = gl.reshape(gl.permute(x, [0, 1, 7, 6, 5, 2, 4, 3]), [NW, DP, TOKENS])  # x: [.., t, n, i0..i3]
    return frag


@gluon.jit
def _pairs4(o0, o1, o2, o3, o4, o5, o6, o7):
    """Eight outputs (code e of token 2P + k at 2e + k) joined as [.., P, k, e & 1, e >> 1]."""
    return gl.join(gl.join(gl.join(o0, o1), gl.join(o2, o3)), gl.join(gl.join(o4, o5), gl.join(o6, o7)))


@gluon.constexpr_function
def _value_units(DP, BITS):
    """Units a thread reads of each of a value part's tokens: of 4 codes (4-bit, 3-bit parts of 32
    channels), else of 8."""
    return DP // 32 if BITS == 4 or DP == 32 else DP // 64


@gluon.constexpr_function
def _value_layout(DP, BITS, NW):
    """[NW, units, g, P] with the pair of tokens 2P, 2P + 1 of each thread (see _value_fragment)."""
    return gl.BlockedLayout([1, _value_units(DP, BITS), 1, 1], [1, 1, 8, 4], [NW, 1, 1, 1], [3, 2, 1, 0])


@gluon.jit
def _value_tables(lut, zero, DP: gl.constexpr, BITS: gl.constexpr, NW: gl.constexpr):
    """One value part's table words, shaped [1, 1, 1, 8] in its unit layout (see _value_fragment), each
    thread's two elements (and the key tables' one) loaded from word (lane & 3) * zero: the same address
    as _key_tables', so that where they are one table ptxas loads it once."""
    return _table(lut, (_idx4(8, 3, _value_layout(DP, BITS, NW)) & 3) * zero)


@gluon.jit
def _value_fragment(base, t0, t1, t2, t3, t4, t5, t6, t7, REC: gl.constexpr, DP: gl.constexpr, BITS: gl.constexpr,
                    PL: gl.constexpr, NW: gl.constexpr):
    """V^T [NW, DP, 16] (fp16) of one value part for each warp's 16 tokens of the tile at `base`. Thread
    g = l // 4 reads codes g DP / 8 .. (g + 1) DP / 8 of its four tokens (2 t, 2 t + 1, 2 t + 8, 2 t + 9:
    token pairs P = t, t + 4) in units of 4 codes (4-bit, and 3-bit parts of 32 channels) or 8 (3-bit):
    code g DP / 8 + 4 c + e of 4-code unit c lands on row 32 c + 16 (e >> 1) + 8 (e & 1) + g, code
    g DP / 8 + 8 c + e of 8-code unit c on row 64 c + 32 (e >> 2) + 16 ((e >> 1) & 1) + 8 (e & 1) + g:
    either way row m holds code g DP / 8 + 4 (m >> 5) + 2 ((m >> 4) & 1) + ((m >> 3) & 1) (_store_part).
    The operand holds a channel's two tokens 2P, 2P + 1 in one register: both tokens' units are looked
    up together (_lut4x8, _lut3x16, _lut3x8), so no register is re-packed before the mma."""
    VP: gl.constexpr = _value_layout(DP, BITS, NW)
    ra = base + (_idx4(NW, 0, VP) * TOKENS + 2 * _idx4(8, 3, VP)) * REC + PL  # token 2P; 2P + 1 at ra + REC
    g = _idx4(8, 2, VP)
    c = _idx4(_value_units(DP, BITS), 1, VP)
    if BITS == 4 or DP == 32:
        if BITS == 4:
            off = g * (DP // 16) + c * 2
            ua = gl.load((ra + off).to(gl.pointer_type(gl.uint16))).to(gl.int32)
            ub = gl.load((ra + REC + off).to(gl.pointer_type(gl.uint16))).to(gl.int32)
            o0, o1, o2, o3, o4, o5, o6, o7 = _lut4x8(ua, ub, t2, t3, t6, t7, False)
        else:  # a 3-bit part of 32 channels: codes 4 g .. 4 g + 3, a byte of fields, four high bits (PERM3:
            sh = (g & 1) * 2  # at bits 0, 1, 4, 5 of byte g // 2 for even g, 2, 3, 6, 7 for odd)
            hp = ra + DP // 4 + g // 2
            o0, o1, o2, o3, o4, o5, o6, o7 = _lut3x8(
                gl.load(ra + g).to(gl.int32), gl.load(ra + REC + g).to(gl.int32), gl.load(hp).to(gl.int32) >> sh,
                gl.load(hp + REC).to(gl.int32) >> sh, t0, t1, t2, t3, False)
        y = _pairs4(o0, o1, o2, o3, o4, o5, o6, o7)  # [NW, J, g, P, k, e & 1, e >> 1]
        frag = gl.reshape(gl.permute(y, [0, 1, 6, 5, 2, 3, 4]), [NW, DP, TOKENS])
    else:
        off = g * (DP // 32) + c * 2
        hoff = DP // 4 + g * (DP // 64) + c
        o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15 = _lut3x16(
            gl.load((ra + off).to(gl.pointer_type(gl.uint16))).to(gl.int32),
            gl.load((ra + REC + off).to(gl.pointer_type(gl.uint16))).to(gl.int32),
            gl.load(ra + hoff).to(gl.int32), gl.load(ra + REC + hoff).to(gl.int32), t0, t1, t2, t3, False)
        y = gl.join(_pairs4(o0, o1, o2, o3, o4, o5, o6, o7), _pairs4(o8, o9, o10, o11, o12, o13, o14, o15))
        frag = gl.reshape(gl.permute(y, [0, 1, 7, 6, 5, 2, 3, 4]), [NW, DP, TOKENS])  # y: [.., P, k, e0, e1, e2]
    return frag


@gluon.jit
def _part_queries(q_row, s_qh, G: gl.constexpr, CH: gl.constexpr, DP: gl.constexpr, BITS: gl.constexpr,
                  QOP: gl.constexpr, NW: gl.constexpr):
    """The group's rotated queries, Q^T [NW, DP, 8] (the key mma's B operand) for one key part (channels
    CH ..), rows permuted to _key_fragment's channel order: row k <- code t DP / 4 + x, t = (k >> 1) & 3,
    x = 4 (k >> 4) + 2 ((k >> 3) & 1) + (k & 1) for 4-bit codes, 16 (k >> 6) + 8 ((k >> 5) & 1) + 4 (k & 1)
    + 2 ((k >> 4) & 1) + ((k >> 3) & 1) for 3-bit ones (output i = (k & 1) + 2 ((k >> 3) & 1) + 4 ((k >> 4) & 1)
    + 8 ((k >> 5) & 1) of unit k >> 6 is code (e & 3) + 4 (i & 1) + 8 (e >> 2), e = i >> 1). Loaded in the
    operand's own layout (no conversion); columns >= G are zeros."""
    r = _idx3(8, 2, QOP)
    k = _idx3(DP, 1, QOP)
    w = _idx3(NW, 0, QOP)
    if BITS == 4:
        x = (k >> 4) * 4 + ((k >> 3) & 1) * 2 + (k & 1)
    else:
        x = (k >> 6) * 16 + ((k >> 5) & 1) * 8 + (k & 1) * 4 + ((k >> 4) & 1) * 2 + ((k >> 3) & 1)
    ch = CH + ((k >> 1) & 3) * (DP // 4) + x
    return gl.load(q_row + gl.minimum(r, G - 1) * s_qh + ch + w * 0, mask=(r < G) & (w >= 0), other=0.0)


@gluon.jit
def _store_part(acc, ws_row, RW: gl.constexpr, rows, CH: gl.constexpr, DP: gl.constexpr, NW: gl.constexpr):
    """Store a value part's accumulator [DP, 8] (rows < `rows` of the query group) to the workspace rows
    at ws_row (stride RW), channel CH + (m & 7) DP / 8 + 4 (m >> 5) + 2 ((m >> 4) & 1) + ((m >> 3) & 1)
    for accumulator row m (_value_fragment's order)."""
    ST: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [NW, 1], [0, 1])
    m = _idx2(DP, 0, ST)
    r = _idx2(8, 1, ST)
    ch = CH + (m & 7) * (DP // 8) + (m >> 5) * 4 + ((m >> 4) & 1) * 2 + ((m >> 3) & 1)
    gl.store(ws_row + r * RW + ch, gl.convert_layout(acc, ST), mask=(r < rows) & (m >= 0))


@gluon.jit
def _hot_slots(i, n_hot, n_sink, w_lo, sinks, window):
    """(ring slot, mask) of hot tokens i: the sinks, then the recent window from its ring slots."""
    return hot_slot(i, n_sink, w_lo, sinks, window), i < n_hot


@gluon.jit
def _hot_lines(k_hot, v_hot, hot_base, s_hs, i0, n_hot, n_sink, w_lo, sinks, window, D: gl.constexpr,
               BLOCK_H: gl.constexpr, NW: gl.constexpr, LEVEL: gl.constexpr):
    """Prefetch (LEVEL 1: to L1, 2: to L2) the 128-byte lines of hot tokens i0 .. i0 + BLOCK_H - 1's keys
    and values (tokens past the sequence's hot ones: row 0's, always in the buffer)."""
    EPL: gl.constexpr = 1024 // k_hot.dtype.element_ty.primitive_bitwidth  # elements a line
    LPT: gl.constexpr = D // EPL
    x = gl.arange(0, BLOCK_H * LPT, layout=gl.BlockedLayout([1], [32], [NW], [0]))
    slot, real = _hot_slots(i0 + x // LPT, n_hot, n_sink, w_lo, sinks, window)
    row = gl.where(real, slot, 0) * s_hs + (x % LPT) * EPL
    _prefetch(k_hot + hot_base + row, LEVEL)
    _prefetch(v_hot + hot_base + row, LEVEL)


@gluon.jit
def _hot_chunk(q_row, s_qh, k_hot, v_hot, hot_base, s_hs, n_hot, n_sink, w_lo, sinks, window, i0, ws_m, ws_l,
               ws_acc, G: gl.constexpr, D: gl.constexpr, BLOCK_H: gl.constexpr, NW: gl.constexpr):
    """decode_attention.hot_chunk: the softmax state of query rows r < G (fp32, log2-scaled, at q_row +
    r * s_qh) over hot tokens i0 .. i0 + BLOCK_H - 1 of one sequence (the sinks, then the recent window
    from its ring slots; past the end m = NEG, l = 0, acc = 0), in fp32 on the CUDA cores, all rows at
    once. The lines of the keys, values and queries are prefetched to L1 first, so that the loops over
    channel chunks (few registers) wait for memory once: scores [tokens, 8 rows] with the tokens over 16
    lanes and 16 channels a chunk summed in each thread; values [tokens, 8 rows, 32 channels] with 4
    tokens and 4 channels a thread, the tokens over 4 lanes."""
    SD: gl.constexpr = 16
    DC: gl.constexpr = 32
    S3: gl.constexpr = gl.BlockedLayout([BLOCK_H // 16, 1, SD], [16, 2, 1], [1, NW, 1], [2, 1, 0])
    O3: gl.constexpr = gl.BlockedLayout([BLOCK_H // 4, 8 // NW, 4], [4, 1, 8], [1, NW, 1], [2, 1, 0])
    SC: gl.constexpr = gl.SliceLayout(2, S3)
    _hot_lines(k_hot, v_hot, hot_base, s_hs, i0, n_hot, n_sink, w_lo, sinks, window, D, BLOCK_H, NW, 1)
    x = gl.arange(0, D // 4, layout=gl.BlockedLayout([1], [32], [NW], [0]))  # 128-byte lines of 8 fp32 rows
    _prefetch(q_row + gl.minimum(x // (D // 32), G - 1) * s_qh + (x % (D // 32)) * 32, 1)

    slot, hmask = _hot_slots(i0 + _idx3(BLOCK_H, 0, S3), n_hot, n_sink, w_lo, sinks, window)
    c = _idx3(SD, 2, S3)
    kp = k_hot + hot_base + slot * s_hs + c
    qp = q_row + gl.minimum(_idx3(8, 1, S3), G - 1) * s_qh + c
    sc = gl.zeros([BLOCK_H, 8], gl.float32, SC)
    for j in range(0, D // SD):
        kh = gl.load(kp + j * SD, mask=hmask & (c >= 0), other=0.0).to(gl.float32)
        sc += gl.sum(kh * gl.load(qp + j * SD), 2)
    sc = gl.where((i0 + _idx2(BLOCK_H, 0, SC)) < n_hot, sc, float("-inf"))
    m = gl.maximum(gl.max(sc, 0), NEG)
    p = gl.exp2(sc - gl.expand_dims(m, 0))
    r = gl.arange(0, 8, layout=gl.SliceLayout(0, SC))
    gl.store(ws_m + r, m, mask=r < G)
    gl.store(ws_l + r, gl.sum(p, 0), mask=r < G)
    p3 = gl.expand_dims(gl.convert_layout(p, gl.SliceLayout(2, O3)), 2)
    slot, hmask = _hot_slots(i0 + _idx3(BLOCK_H, 0, O3), n_hot, n_sink, w_lo, sinks, window)
    c = _idx3(DC, 2, O3)
    vp = v_hot + hot_base + slot * s_hs + c
    AC: gl.constexpr = gl.SliceLayout(0, O3)
    ro = _idx2(8, 0, AC)
    ap = ws_acc + ro * D + _idx2(DC, 1, AC)
    for j in range(0, D // DC):
        vh = gl.load(vp + j * DC, mask=hmask & (c >= 0), other=0.0).to(gl.float32)
        gl.store(ap + j * DC, gl.sum(p3 * vh, 0), mask=ro < G)


@gluon.jit
def _prefetch_tile(k_pool, v_pool, bt_ptr, b, s_bt, h, ti, t_end, pw, line, H: gl.constexpr, BS: gl.constexpr,
                   BLOCK_N: gl.constexpr, REC_K: gl.constexpr, REC_V: gl.constexpr, LEVEL: gl.constexpr):
    """Prefetch the lines of each warp's key and value records of tile ti (if ti < t_end); `line`: each
    lane's byte offset (lane * 128), clamped to the warp's records of each side."""
    nb = gl.load(bt_ptr + b * s_bt + (ti * BLOCK_N) // BS, mask=ti < t_end, other=-1).to(gl.int64)
    if nb >= 0:
        slot = (nb * H + h) * BS + (ti * BLOCK_N) % BS + pw * TOKENS
        _prefetch(k_pool + slot * REC_K + gl.minimum(line, TOKENS * REC_K - 1), LEVEL)
        _prefetch(v_pool + slot * REC_V + gl.minimum(line, TOKENS * REC_V - 1), LEVEL)


@gluon.jit
def _slice_base(k_pool, v_pool, bt_ptr, b, s_bt, h, ti, sn, sinks, c_end, H: gl.constexpr, BS: gl.constexpr,
                BLOCK_N: gl.constexpr, REC_K: gl.constexpr, REC_V: gl.constexpr):
    """(first key record, first value record, token mask [W, 16]) of tile ti < t_end."""
    blk = gl.load(bt_ptr + b * s_bt + (ti * BLOCK_N) // BS).to(gl.int64)
    slot0 = (blk * H + h) * BS + (ti * BLOCK_N) % BS
    tok = ti * BLOCK_N + sn
    return k_pool + slot0 * REC_K, v_pool + slot0 * REC_V, (tok >= sinks) & (tok < c_end)


@gluon.jit
def _slice_scores(k_base, sn, tmask, qa, qb, zs, kta, ktb, REC_K: gl.constexpr, KA_DP: gl.constexpr,
                  KA_BT: gl.constexpr, KA_PL: gl.constexpr, KA_SC: gl.constexpr, KB_DP: gl.constexpr,
                  KB_BT: gl.constexpr, KB_PL: gl.constexpr, KB_SC: gl.constexpr, KOP: gl.constexpr, NW: gl.constexpr):
    """Scores S^T [W, 16 tokens, 8 rows] (log2 units; -inf past the slice's real tokens) of each warp's 16
    tokens: per key part one mma with the keys as the A operand (16 tokens fill its 16 rows; the group's
    rows are the 8 columns), times the part's scale."""
    k_sc = k_base + sn * REC_K
    kf = _key_fragment(k_base, kta[0], kta[1], kta[2], kta[3], kta[4], kta[5], kta[6], kta[7], REC_K, KA_DP, KA_BT,
                       KA_PL, NW)
    kf = gl.convert_layout(gl.permute(kf, [0, 2, 1]), KOP)
    sk = gl.load((k_sc + KA_SC).to(gl.pointer_type(gl.float16)), mask=tmask, other=0.0).to(gl.float32)
    sc = mma_v2(kf, qa, zs) * gl.expand_dims(sk, 2)
    if KB_DP > 0:
        kf = _key_fragment(k_base, ktb[0], ktb[1], ktb[2], ktb[3], ktb[4], ktb[5], ktb[6], ktb[7], REC_K, KB_DP,
                           KB_BT, KB_PL, NW)
        kf = gl.convert_layout(gl.permute(kf, [0, 2, 1]), KOP)
        sk = gl.load((k_sc + KB_SC).to(gl.pointer_type(gl.float16)), mask=tmask, other=0.0).to(gl.float32)
        sc += mma_v2(kf, qb, zs) * gl.expand_dims(sk, 2)
    return gl.where(gl.expand_dims(tmask, 2), sc, float("-inf"))


@gluon.jit
def _slice_values(v_base, sn, tmask, p, acc_a, acc_b, vta, vtb, REC_V: gl.constexpr, VA_DP: gl.constexpr,
                  VA_BT: gl.constexpr, VA_PL: gl.constexpr, VA_SC: gl.constexpr, VB_DP: gl.constexpr,
                  VB_BT: gl.constexpr, VB_PL: gl.constexpr, VB_SC: gl.constexpr, POP: gl.constexpr,
                  VOP: gl.constexpr, NW: gl.constexpr):
    """acc_X += V_X^T . (p * scale_X) for each value part X of each warp's 16 tokens (p: [W, 16 tokens, 8
    rows], the scores' layout)."""
    v_sc = v_base + sn * REC_V
    sv = gl.load((v_sc + VA_SC).to(gl.pointer_type(gl.float16)), mask=tmask, other=0.0).to(gl.float32)
    pt = _tokens_as_k((p * gl.expand_dims(sv, 2)).to(gl.float16), POP)
    vf = gl.convert_layout(_value_fragment(v_base, vta[0], vta[1], vta[2], vta[3], vta[4], vta[5], vta[6], vta[7],
                                           REC_V, VA_DP, VA_BT, VA_PL, NW), VOP)
    acc_a = mma_v2(vf, pt, acc_a)
    if VB_DP > 0:
        sv = gl.load((v_sc + VB_SC).to(gl.pointer_type(gl.float16)), mask=tmask, other=0.0).to(gl.float32)
        pt = _tokens_as_k((p * gl.expand_dims(sv, 2)).to(gl.float16), POP)
        vf = gl.convert_layout(_value_fragment(v_base, vtb[0], vtb[1], vtb[2], vtb[3], vtb[4], vtb[5], vtb[6],
                                               vtb[7], REC_V, VB_DP, VB_BT, VB_PL, NW), VOP)
        acc_b = mma_v2(vf, pt, acc_b)
    return acc_a, acc_b


@gluon.jit
def _tile_scores(k_pool, v_pool, bt_ptr, b, s_bt, h, ti, t_end, sn, sinks, c_end, pw, line, qa, qb, zs, kta, ktb,
                 H: gl.constexpr, BS: gl.constexpr, BLOCK_N: gl.constexpr, REC_K: gl.constexpr, REC_V: gl.constexpr,
                 KA_DP: gl.constexpr, KA_BT: gl.constexpr, KA_PL: gl.constexpr, KA_SC: gl.constexpr,
                 KB_DP: gl.constexpr, KB_BT: gl.constexpr, KB_PL: gl.constexpr, KB_SC: gl.constexpr,
                 KOP: gl.constexpr, NW: gl.constexpr, PREFETCH: gl.constexpr):
    """Tile ti < t_end: its first value record, token mask and scores (_slice_scores), after each warp
    prefetches the lines of its records of tile ti + 1 (PREFETCH 1: to L1, 2: to L2)."""
    if PREFETCH > 0:
        _prefetch_tile(k_pool, v_pool, bt_ptr, b, s_bt, h, ti + 1, t_end, pw, line, H, BS, BLOCK_N, REC_K, REC_V,
                       PREFETCH)
    k_base, v_base, tmask = _slice_base(k_pool, v_pool, bt_ptr, b, s_bt, h, ti, sn, sinks, c_end, H, BS, BLOCK_N,
                                        REC_K, REC_V)
    return v_base, tmask, _slice_scores(k_base, sn, tmask, qa, qb, zs, kta, ktb, REC_K, KA_DP, KA_BT, KA_PL, KA_SC,
                                        KB_DP, KB_BT, KB_PL, KB_SC, KOP, NW)


@gluon.jit
def _slice_update(st, v_base, sn, tmask, m_i, l_t, acc_a, acc_b, vta, vtb, REC_V: gl.constexpr,
                  VA_DP: gl.constexpr, VA_BT: gl.constexpr, VA_PL: gl.constexpr, VA_SC: gl.constexpr,
                  VB_DP: gl.constexpr, VB_BT: gl.constexpr, VB_PL: gl.constexpr, VB_SC: gl.constexpr,
                  POP: gl.constexpr, VOP: gl.constexpr, NW: gl.constexpr):
    """The online softmax over one tile's scores st [W, 16 tokens, 8 rows] and its values: the new (row
    maxima, lanes' row sums, accumulators)."""
    m_new = gl.maximum(m_i, gl.max(st, 1))
    al = gl.expand_dims(gl.exp2(m_i - m_new), 1)  # [W, 1, 8]: scales the values' columns as it is
    p = gl.exp2(st - gl.expand_dims(m_new, 1))
    acc_a, acc_b = _slice_values(v_base, sn, tmask, p, acc_a * al, acc_b * al, vta, vtb, REC_V, VA_DP, VA_BT,
                                 VA_PL, VA_SC, VB_DP, VB_BT, VB_PL, VB_SC, POP, VOP, NW)
    return m_new, l_t * al + p, acc_a, acc_b


@gluon.jit
def _merge_warps(m_i, l_i, acc_a, acc_b, m_out, l_out, acc_out, rows, D: gl.constexpr, VA_DP: gl.constexpr,
                 VB_DP: gl.constexpr, NW: gl.constexpr, SMEM: gl.constexpr):
    """Merge the warps' softmax states (row maxima m_i and sums l_i [W, 8], accumulators [W, DP, 8] of each
    value part, the mma layout) and store rows < `rows`. SMEM: every warp writes its state to shared memory
    once, then each thread merges the W values of its own elements, one barrier (_merge_warps_registers'
    cross-warp reductions and layout changes compiled to 15 at tq3.5, d 128: ~500 instructions after the
    tile loop against ~180 here); else _merge_warps_registers."""
    if not SMEM:
        _merge_warps_registers(m_i, l_i, acc_a, acc_b, m_out, l_out, acc_out, rows, D, VA_DP, VB_DP, NW)
        return
    SH2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    SH3: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[2, 1, 0])
    sm = gl.allocate_shared_memory(gl.float32, [NW, 8], SH2, m_i)
    sl = gl.allocate_shared_memory(gl.float32, [NW, 8], SH2, l_i)
    sa = gl.allocate_shared_memory(gl.float32, [NW, VA_DP, 8], SH3, acc_a)
    if VB_DP > 0:
        sb = gl.allocate_shared_memory(gl.float32, [NW, VB_DP, 8], SH3, acc_b)
    # [W, DP, 8] with a thread's W values in its registers; dims 1, 2 as _store_part's layout
    L3: gl.constexpr = gl.BlockedLayout([NW, 1, 1], [1, 4, 8], [1, NW, 1], [1, 2, 0])
    LW: gl.constexpr = gl.SliceLayout(1, L3)
    mw = sm.load(LW)
    m_t = gl.max(mw, 0)
    wgt = gl.exp2(mw - gl.expand_dims(m_t, 0))
    r = gl.arange(0, 8, layout=gl.SliceLayout(0, LW))
    gl.store(m_out + r, m_t, mask=r < rows)
    gl.store(l_out + r, gl.sum(sl.load(LW) * wgt, 0), mask=r < rows)
    wo = gl.expand_dims(wgt, 1)
    _store_part(gl.sum(sa.load(L3) * wo, 0), acc_out, D, rows, 0, VA_DP, NW)
    if VB_DP > 0:
        _store_part(gl.sum(sb.load(L3) * wo, 0), acc_out, D, rows, VA_DP, VB_DP, NW)


@gluon.jit
def _merge_warps_registers(m_i, l_i, acc_a, acc_b, m_out, l_out, acc_out, rows, D: gl.constexpr,
                           VA_DP: gl.constexpr, VB_DP: gl.constexpr, NW: gl.constexpr):
    """_merge_warps by reductions over the warp dimension of the register tensors (the compiler's
    shared-memory exchanges, one or more barriers each): the variant before it."""
    RL: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
    m_t = gl.max(m_i, 0)
    wgt = gl.exp2(m_i - gl.expand_dims(m_t, 0))
    wo = gl.expand_dims(wgt, 1)
    rr = gl.arange(0, 8, layout=RL)
    gl.store(m_out + rr, gl.convert_layout(m_t, RL), mask=rr < rows)
    gl.store(l_out + rr, gl.convert_layout(gl.sum(l_i * wgt, 0), RL), mask=rr < rows)
    _store_part(gl.sum(acc_a * wo, 0), acc_out, D, rows, 0, VA_DP, NW)
    if VB_DP > 0:
        _store_part(gl.sum(acc_b * wo, 0), acc_out, D, rows, VA_DP, VB_DP, NW)


@gluon.jit(do_not_specialize=["WAVE", "SPREAD"])  # run-time bounds: one compile whatever their values
def _decode_split_gluon(
    q_ptr, k_pool, v_pool, lut_k, lut_v, bt_ptr, prefix_ptr, ws_m, ws_l, ws_acc, qs_ptr, k_hot, v_hot, slot_ptr,
    sinks, window, s_bt, s_qb, s_qh, s_qsb, s_qsh, s_hb, s_hh, s_hs, zero, NSPLIT, FILL, WAVE, SPREAD,
    H: gl.constexpr, G: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, NHOT: gl.constexpr, BLOCK_H: gl.constexpr,
    REC_K: gl.constexpr, KA_DP: gl.constexpr, KA_BT: gl.constexpr, KA_PL: gl.constexpr, KA_SC: gl.constexpr,
    KB_DP: gl.constexpr, KB_BT: gl.constexpr, KB_PL: gl.constexpr, KB_SC: gl.constexpr,
    REC_V: gl.constexpr, VA_DP: gl.constexpr, VA_BT: gl.constexpr, VA_PL: gl.constexpr, VA_SC: gl.constexpr,
    VB_DP: gl.constexpr, VB_BT: gl.constexpr, VB_PL: gl.constexpr, VB_SC: gl.constexpr, NW: gl.constexpr,
    PREFETCH: gl.constexpr = 0, PDL: gl.constexpr = False, MIN_TILES: gl.constexpr = 1,
    WAVE_TILES: gl.constexpr = 0, SAME_TABLES: gl.constexpr = False, PIPELINE: gl.constexpr = False,
    SMEM_MERGE: gl.constexpr = True,
):
    """Grid (B, H, NSPLIT + NHOT), the workspace of decode_attention._decode_split_kernel: split s <
    NSPLIT of sequence b's compressed tiles for KV head h, then NHOT chunks of BLOCK_H hot tokens. The
    grid dispatches them in that order, except where a sequence's programs with work (its n_act splits
    and the hot chunks) fit in WAVE (one wave of the resident programs, per sequence and head): then the
    hot chunks come first, so that they start first (H200, 8B shape, tq3.5, graph replay, the tree before
    4a080ab with the order forced, last -> first: 8k 28.4 -> 27.0 us; past a wave they delay splits: 32k
    40.7 -> 41.9, 128k 89.0 -> 92.9). A hot-chunk program does nothing else (_hot_chunk after the wait).
    Keys and values: one or two parts (A over channels 0 .. A_DP, B after it; B_DP = 0 when absent) of BT
    bits (4 or 3), planes at byte PL,
    fp16 scale at byte SC of records of REC bytes; lut_k / lut_v: each part's table words (A at 0, B at
    8; SAME_TABLES: the value parts' are the key parts', read from lut_k at the same per-thread
    addresses, so ptxas keeps one copy), loaded before the wait. q_ptr: the rotated queries (fp16, log2
    units, channel order); qs_ptr: the scaled queries (fp32, original space) for the hot tokens. Split
    sizes: decode_bounds.split_bounds (MIN_TILES, FILL, WAVE_TILES, SPREAD); a split without work but the first
    returns at once (it writes nothing: the merge reads the first n_act). PDL: launched while the query
    kernel runs (griddepcontrol), so nothing it wrote is read before the wait; split 0 of every
    (sequence, head) waits even without work, so that the split grid ends after the query kernel and the
    merge, which waits for the split grid, reads the queries after it too. PIPELINE: the loop computes
    tile ti's scores beside tile ti - 1's softmax and values (the same arithmetic in the same order; two
    independent chains for the scheduler, at the cost of registers). SMEM_MERGE: the warps' states merged
    through shared memory with one barrier (_merge_warps), else by reductions in registers."""
    BLOCK_N: gl.constexpr = TOKENS * NW
    MS: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1, 1], instr_shape=[1, 16, 8])
    KOP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MS, k_width=2)  # K [W, 16 tokens, DP]
    QOP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MS, k_width=2)  # Q^T [W, DP, 8 rows]
    VOP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MS, k_width=2)  # V^T [W, DP, 16 tokens]
    POP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MS, k_width=2)  # P [W, 16 tokens, 8 rows]
    TS: gl.constexpr = gl.SliceLayout(2, MS)  # [W, tokens] of the score tile

    b = gl.program_id(0)
    h = gl.program_id(1)
    L = gl.load(prefix_ptr + b)
    c_end, lo_t, hi_t, per, n_act = split_bounds(L, sinks, window, BLOCK_N, NSPLIT, MIN_TILES, FILL, WAVE_TILES,
                                                 SPREAD)
    s = gl.program_id(2)
    if n_act + NHOT <= WAVE:  # all in one wave: the hot-token programs first (dispatched first), else last
        s = (s + NSPLIT) % (NSPLIT + NHOT)
    if (s >= n_act) & (s > 0) & (s < NSPLIT):  # split 0 always waits: the merge's wait then covers the queries
        return
    if NHOT > 0:
        if s >= NSPLIT:  # a chunk of the bf16 sink / recent tokens, in the original space; nothing else
            seq = gl.load(slot_ptr + b).to(gl.int64)
            hot_base = seq * s_hb + h * s_hh
            i0 = (s - NSPLIT) * BLOCK_H
            n_hot, n_sink, w_lo = hot_count(L, sinks, window)
            if PDL:  # launched while the query kernel ran: the chunk's lines fetched to L2 meanwhile
                _hot_lines(k_hot, v_hot, hot_base, s_hs, i0, n_hot, n_sink, w_lo, sinks, window, D, BLOCK_H, NW, 2)
                b = _grid_wait(b)
            ws = (b * H + h) * (NSPLIT + NHOT) + s
            _hot_chunk(qs_ptr + b * s_qsb + h * G * s_qsh, s_qsh, k_hot, v_hot, hot_base, s_hs, n_hot, n_sink, w_lo,
                       sinks, window, i0, ws_m + ws * G, ws_l + ws * G, ws_acc + ws * G * D, G, D, BLOCK_H, NW)
            return
    # the tables (inputs) loaded before the wait
    kta = _key_tables(lut_k, zero, KA_DP, KA_BT, NW)
    ktb = kta  # (part B absent: placeholders, never read)
    if KB_DP > 0:
        ktb = _key_tables(lut_k + 8, zero, KB_DP, KB_BT, NW)
    lut_vv = lut_k if SAME_TABLES else lut_v  # the value parts' tables are the key parts': the same loads
    vta = _value_tables(lut_vv, zero, VA_DP, VA_BT, NW)
    vtb = vta
    if VB_DP > 0:
        vtb = _value_tables(lut_vv + 8, zero, VB_DP, VB_BT, NW)
    t_start = lo_t + s * per
    t_end = gl.minimum(t_start + per, hi_t)
    PL: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [NW, 1], [1, 0])
    pw = _idx2(NW, 0, PL)
    line = _idx2(32, 1, PL) * 128
    if PDL:  # launched while the query kernel ran: the first tile fetched meanwhile, the queries after it
        if PREFETCH > 0:
            _prefetch_tile(k_pool, v_pool, bt_ptr, b, s_bt, h, t_start, t_end, pw, line, H, BS, BLOCK_N, REC_K,
                           REC_V, PREFETCH)
        b = _grid_wait(b)
    ws = (b * H + h) * (NSPLIT + NHOT) + s
    q_row = q_ptr + b * s_qb + h * G * s_qh
    qa = _part_queries(q_row, s_qh, G, 0, KA_DP, KA_BT, QOP, NW)
    qb = qa
    if KB_DP > 0:
        qb = _part_queries(q_row, s_qh, G, KA_DP, KB_DP, KB_BT, QOP, NW)
    sn = _idx2(NW, 0, TS) * TOKENS + _idx2(TOKENS, 1, TS)  # token of the tile, [W, 16] as the scores hold it

    zs = gl.zeros([NW, TOKENS, 8], gl.float32, MS)
    m_i = gl.max(zs, 1) + NEG  # [W, 8 rows]
    l_t = zs  # each lane's share of the row sums, summed over the tokens after the loop
    acc_a = gl.zeros([NW, VA_DP, 8], gl.float32, MS)
    acc_b = gl.zeros([NW, VB_DP if VB_DP > 0 else 16, 8], gl.float32, MS)
    if PIPELINE:  # the scores of tile ti beside the softmax and values of tile ti - 1: two independent chains
        if t_start < t_end:
            v_base, tmask, st = _tile_scores(k_pool, v_pool, bt_ptr, b, s_bt, h, t_start, t_end, sn, sinks, c_end, pw,
                                             line, qa, qb, zs, kta, ktb, H, BS, BLOCK_N, REC_K, REC_V, KA_DP, KA_BT,
                                             KA_PL, KA_SC, KB_DP, KB_BT, KB_PL, KB_SC, KOP, NW, PREFETCH)
            for ti in range(t_start + 1, t_end):
                v_next, t_next, s_next = _tile_scores(k_pool, v_pool, bt_ptr, b, s_bt, h, ti, t_end, sn, sinks, c_end,
                                                      pw, line, qa, qb, zs, kta, ktb, H, BS, BLOCK_N, REC_K, REC_V,
                                                      KA_DP, KA_BT, KA_PL, KA_SC, KB_DP, KB_BT, KB_PL, KB_SC, KOP, NW,
                                                      PREFETCH)
                m_i, l_t, acc_a, acc_b = _slice_update(st, v_base, sn, tmask, m_i, l_t, acc_a, acc_b, vta, vtb,
                                                       REC_V, VA_DP, VA_BT, VA_PL, VA_SC, VB_DP, VB_BT, VB_PL, VB_SC,
                                                       POP, VOP, NW)
                st = s_next
                v_base = v_next
                tmask = t_next
            m_i, l_t, acc_a, acc_b = _slice_update(st, v_base, sn, tmask, m_i, l_t, acc_a, acc_b, vta, vtb, REC_V,
                                                   VA_DP, VA_BT, VA_PL, VA_SC, VB_DP, VB_BT, VB_PL, VB_SC, POP, VOP, NW)
    else:
        for ti in range(t_start, t_end):
            v_base, tmask, st = _tile_scores(k_pool, v_pool, bt_ptr, b, s_bt, h, ti, t_end, sn, sinks, c_end, pw,
                                             line, qa, qb, zs, kta, ktb, H, BS, BLOCK_N, REC_K, REC_V, KA_DP, KA_BT,
                                             KA_PL, KA_SC, KB_DP, KB_BT, KB_PL, KB_SC, KOP, NW, PREFETCH)
            m_i, l_t, acc_a, acc_b = _slice_update(st, v_base, sn, tmask, m_i, l_t, acc_a, acc_b, vta, vtb, REC_V,
                                                   VA_DP, VA_BT, VA_PL, VA_SC, VB_DP, VB_BT, VB_PL, VB_SC, POP, VOP, NW)

    # the warps' states merged; rows < G of splits with work stored
    g_real = gl.where(s < n_act, G, 0)
    _merge_warps(m_i, gl.sum(l_t, 1), acc_a, acc_b, ws_m + ws * G, ws_l + ws * G, ws_acc + ws * G * D, g_real,
                 D, VA_DP, VB_DP, NW, SMEM_MERGE)
