"""decode_gluon's inline PTX on the CPU: the lookups' PTX strings (_lut4x8 for keys and values, _lut3x16, _lut3x8) run
by a small PTX interpreter (prmt with its sign-replicate mode, shifts, and / or / xor / not, lop3, mul, mov into
halves), the fragment
assembly (join / permute / reshape) mirrored in numpy, on records packed by tqinfer.quant.packing: every key row
k holds the centroid of the channel _part_queries' formula gives it, every value row m the channel _store_part's
gives it. The Gluon kernel runs on CUDA only; its GPU test checks it against float64, this one keeps its bit
manipulation under test where there is no GPU. (From helper-27's review emulation, 2026-11-30.)"""

from __future__ import annotations

import ast
import inspect
import re

import numpy as np
import pytest
import torch

from tqinfer.kernels import decode_attention
from tqinfer.quant.packing import pack, swap3

G = decode_attention.decode_gluon
pytestmark = pytest.mark.skipif(G is None, reason="triton without Gluon")
M32 = 0xFFFFFFFF
T = 16  # a warp's tokens


def prmt(a, b, c):
    src, out = (b << 32) | a, 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        out |= ((0xFF if byte & 0x80 else 0) if sel & 8 else byte) << (8 * i)
    return out


def lop3(a, b, c, imm):
    return sum(((imm >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1))) & 1) << i for i in range(32))


OPS = {"prmt.b32": prmt, "shr.u32": lambda a, s: a >> s, "shl.b32": lambda a, s: (a << s) & M32,
       "and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b, "xor.b32": lambda a, b: a ^ b,
       "not.b32": lambda a: ~a & M32, "mul.lo.u32": lambda a, b: (a * b) & M32, "lop3.b32": lop3,
       "mov.b32": lambda a: a}


def run(asm: str, inputs: dict, nout: int) -> list:
    """The PTX block asm with operands $nout.. = inputs; its nout 16-bit outputs."""
    regs, outs = {}, {}

    def val(tok):
        tok = tok.strip()
        if tok.startswith("$"):
            return inputs[int(tok[1:])] & M32
        return int(tok, 0) if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", tok) else regs[tok]

    for ins in asm.strip().lstrip("{").rstrip("}").split(";"):
        ins = ins.strip()
        if not ins or ins.startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        m = re.fullmatch(r"\{\s*\$(\d+)\s*,\s*\$(\d+)\s*\}\s*,\s*(\w+)", rest)
        if op == "mov.b32" and m:
            v = val(m.group(3))
            outs[int(m.group(1))], outs[int(m.group(2))] = v & 0xFFFF, v >> 16
            continue
        d, *args = [x.strip() for x in rest.split(",")]
        regs[d] = OPS[op](*[val(x) for x in args]) & M32
    assert sorted(outs) == list(range(nout))
    return [outs[i] for i in range(nout)]


def _asm_literal(fn) -> str:
    call = next(n for n in ast.walk(ast.parse(inspect.getsource(fn.fn)))
                if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "inline_asm_elementwise")
    return ast.literal_eval(call.args[0])


def _lut3_asm(wide: bool, key: bool) -> str:  # the strings _lut3x16 / _lut3x8 assemble
    pre = (G._W3_KEY if key else G._W3_VALUE) if wide else (G._X3_KEY if key else G._X3_VALUE)
    regs = "{.reg .b32 w, h, x, y, z, s, lo, hi, p;" if wide else "{.reg .b32 f, w, h, x, y, z, s, lo, hi, p;"
    return regs + str(pre.value) + str((G._SEL16 if wide else G._SEL8).value)


def _lut4_asm(key: bool) -> str:  # the string _lut4x8 assembles
    return "{.reg .b32 w, x, z, s, t, m, la, lb, ha, hb, p;" + str((G._SYM4_KEY if key else G._SYM4_VALUE).value)


def words_of(table):  # lut_words: low bytes of entries 4i .. 4i + 3 in word i, then the high bytes
    return [sum(((table[i + j] >> sh) & 0xFF) << (8 * j) for j in range(4)) for sh in (0, 8)
            for i in range(0, len(table), 4)]


def join(*xs):
    return np.stack(xs, -1)


def pairs4(o):
    return join(join(join(o[0], o[1]), join(o[2], o[3])), join(join(o[4], o[5]), join(o[6], o[7])))


def u16(rec, tok, off):
    return int(rec[tok, off]) | (int(rec[tok, off + 1]) << 8)


def key_fragment(dp, bits, rec, tw):
    """_key_fragment's K^T [dp, 16] of one warp."""
    if bits == 4:  # the upper half of the symmetric table: words 2, 3 (low bytes), 6, 7 (high bytes)
        xs = np.zeros((1, dp // 32, 4, T, 8), dtype=np.int64)
        for c in range(dp // 32):
            for t in range(4):
                for n in range(T):
                    off = t * (dp // 8) + c * 4
                    xs[0, c, t, n] = run(_lut4_asm(True), {8: u16(rec, n, off), 9: u16(rec, n, off + 2), 10: tw[2],
                                                           11: tw[3], 12: tw[6], 13: tw[7]}, 8)
        return np.transpose(pairs4([xs[..., i] for i in range(8)]), [0, 1, 6, 5, 2, 4, 3]).reshape(dp, T)
    if dp == 32:
        o = np.zeros((1, 1, 4, T, 8), dtype=np.int64)
        for t in range(4):
            for n in range(T):
                f, hb = u16(rec, n, t * 2), int(rec[n, 8 + t])
                o[0, 0, t, n] = run(_lut3_asm(False, True), {8: f, 9: f, 10: hb, 11: hb,
                                                            **{12 + i: tw[i] for i in range(4)}}, 8)
        return np.transpose(pairs4([o[..., i] for i in range(8)]), [0, 1, 6, 5, 2, 4, 3]).reshape(dp, T)
    o = np.zeros((1, dp // 64, 4, T, 16), dtype=np.int64)
    for c in range(dp // 64):
        for t in range(4):
            for n in range(T):
                fp = t * (dp // 16) + c * 4
                hb = u16(rec, n, dp // 4 + t * (dp // 32) + c * 2)
                o[0, c, t, n] = run(_lut3_asm(True, True), {16: u16(rec, n, fp), 17: u16(rec, n, fp + 2), 18: hb,
                                                           19: hb, **{20 + i: tw[i] for i in range(4)}}, 16)
    x = join(pairs4([o[..., i] for i in range(8)]), pairs4([o[..., i] for i in range(8, 16)]))
    return np.transpose(x, [0, 1, 7, 6, 5, 2, 4, 3]).reshape(dp, T)


def value_fragment(dp, bits, rec, tw):
    """_value_fragment's V^T [dp, 16] of one warp (tokens 2P, 2P + 1 looked up together)."""
    units = dp // 32 if bits == 4 or dp == 32 else dp // 64
    nout = 8 if bits == 4 or dp == 32 else 16
    o = np.zeros((1, units, 8, 8, nout), dtype=np.int64)
    for c in range(units):
        for g in range(8):
            for p in range(8):
                a, b = 2 * p, 2 * p + 1
                if bits == 4:
                    off = g * (dp // 16) + c * 2
                    o[0, c, g, p] = run(_lut4_asm(False), {8: u16(rec, a, off), 9: u16(rec, b, off), 10: tw[2],
                                                           11: tw[3], 12: tw[6], 13: tw[7]}, 8)
                elif dp == 32:
                    sh, hp = (g & 1) * 2, dp // 4 + g // 2
                    o[0, c, g, p] = run(_lut3_asm(False, False), {8: int(rec[a, g]), 9: int(rec[b, g]),
                                                                 10: int(rec[a, hp]) >> sh, 11: int(rec[b, hp]) >> sh,
                                                                 **{12 + i: tw[i] for i in range(4)}}, 8)
                else:
                    off, hoff = g * (dp // 32) + c * 2, dp // 4 + g * (dp // 64) + c
                    o[0, c, g, p] = run(_lut3_asm(True, False), {16: u16(rec, a, off), 17: u16(rec, b, off),
                                                                18: int(rec[a, hoff]), 19: int(rec[b, hoff]),
                                                                **{20 + i: tw[i] for i in range(4)}}, 16)
    if nout == 8:
        return np.transpose(pairs4([o[..., i] for i in range(8)]), [0, 1, 6, 5, 2, 3, 4]).reshape(dp, T)
    y = join(pairs4([o[..., i] for i in range(8)]), pairs4([o[..., i] for i in range(8, 16)]))
    return np.transpose(y, [0, 1, 7, 6, 5, 2, 3, 4]).reshape(dp, T)


def query_channel(k, dp, bits):  # _part_queries
    if bits == 4:
        x = (k >> 4) * 4 + ((k >> 3) & 1) * 2 + (k & 1)
    else:
        x = (k >> 6) * 16 + ((k >> 5) & 1) * 8 + (k & 1) * 4 + ((k >> 4) & 1) * 2 + ((k >> 3) & 1)
    return ((k >> 1) & 3) * (dp // 4) + x


def store_channel(m, dp):  # _store_part
    return (m & 7) * (dp // 8) + (m >> 5) * 4 + ((m >> 4) & 1) * 2 + ((m >> 3) & 1)


@pytest.mark.parametrize("bits,dp", [(3, 32), (3, 64), (3, 128), (4, 32), (4, 64), (4, 128)])
def test_gluon_lookups_give_each_row_its_channels_centroid(bits, dp):
    g = torch.Generator().manual_seed(bits * 1000 + dp)
    codes = torch.randint(0, 1 << bits, (T, dp), generator=g, dtype=torch.uint8)
    rec = pack(codes, bits).numpy().astype(np.int64)
    table = torch.randperm(1 << 16, generator=g)[: 1 << bits].tolist()  # distinct 16-bit entries
    if bits == 4:  # symmetric, as the 4-bit lookups take it: entry 7 - j is entry 8 + j with the sign flipped;
        # random signs in the upper half too, so that setting the sign bit (or) is told from flipping it (xor)
        signs = torch.randint(0, 2, (8,), generator=g).tolist()
        upper = [m | (s << 15) for m, s in zip(torch.randperm(1 << 15, generator=g)[:8].tolist(), signs)]
        assert 0 < sum(signs) < 8
        table = [u ^ 0x8000 for u in reversed(upper)] + upper
    tw = words_of(table)
    qch = [query_channel(k, dp, bits) for k in range(dp)]
    sch = [store_channel(m, dp) for m in range(dp)]
    assert sorted(qch) == sorted(sch) == list(range(dp))
    codes = codes.numpy()
    assert np.array_equal(key_fragment(dp, bits, rec, tw), np.array(table)[codes[:, qch].T])
    assert np.array_equal(value_fragment(dp, bits, rec, tw), np.array(table)[codes[:, sch].T])
    if bits == 3:  # the 1-bit plane in plain order (the previous format) reads other codes
        plain = rec.copy()
        plain[:, dp // 4:] = swap3(torch.from_numpy(plain[:, dp // 4:])).numpy()
        assert not np.array_equal(key_fragment(dp, bits, plain, tw), np.array(table)[codes[:, qch].T])
