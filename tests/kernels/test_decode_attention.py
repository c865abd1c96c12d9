"""Split-KV decode kernel == float64 attention over what the cache holds (== the torch twin), every
kernel-read type, ragged batches around block and window edges, GQA 1/3/4/8, head_dim 64/128/256."""

import math
import random
import zlib

import pytest
import torch
import triton
import triton.language as tl

from tqinfer.kernels import decode_attention, decode_bounds, reference
from tqinfer.kernels.decode_attention import paged_decode_attention
from tqinfer.quant.registry import make_codec

from .cachegen import BS, DEV, attention64, build_cache, rel_err

# lengths 1, 17, BS - 1, BS + 1, and ones whose window has moved past sinks and compressed tokens
LENS = [1, 17, BS - 1, BS + 1, 3 * BS - 3]

CASES = [  # k type, v type, head_dim, KV heads, group size
    ("bf16", "bf16", 64, 2, 4),
    ("bf16", "bf16", 128, 1, 8),
    ("tq4", "tq4", 128, 2, 4),
    ("tq4", "tq4", 64, 3, 3),
    ("tq3", "tq3", 64, 2, 1),
    ("tq3", "tq3", 128, 1, 8),
    ("tq3.5", "tq3.5", 128, 2, 4),
    ("tq3.5", "tq3.5", 64, 3, 3),
    ("tq3.5", "tq3.5", 256, 1, 4),  # head_dim > 128: served by the torch twin
    ("tq2.5", "tq2.5", 64, 2, 4),
    ("tq2", "tq1", 64, 1, 4),
    ("tq4", "tq2", 64, 2, 2),
    ("tqp3", "tq3", 64, 2, 4),
    ("tqp4", "tq4", 128, 1, 4),
    ("tqp2", "tq2", 64, 1, 1),
    ("tq3", "tqp3", 64, 2, 4),
    ("tqp4", "tqp4", 128, 1, 2),
    ("bf16", "tq3.5", 64, 1, 4),
    ("tq3.5", "bf16", 64, 1, 4),
]


def _run(kt, vt, d, h, g, lens, sinks, window, dtype, splits, seed, **kw):
    view, kd, vd = build_cache(kt, vt, lens, heads=h, d=d, sinks=sinks, window=window, block_size=BS,
                               dtype=dtype, device=DEV, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    b = len(lens)
    q = torch.randn(b, h * g, d, generator=gen).to(dtype).to(DEV)
    k = (torch.randn(b, h, d, generator=gen) * 2).to(dtype).to(DEV)
    v = torch.randn(b, h, d, generator=gen).to(dtype).to(DEV)
    cu = torch.arange(b + 1, dtype=torch.int32, device=DEV)
    pl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out = torch.full_like(q, float("nan"))
    scale = 1 / math.sqrt(d)
    paged_decode_attention(q, k, v, cu, pl, view, scale, num_splits=splits, out=out, **kw)
    ref = attention64(q, k, v, cu, lens, kd, vd, scale)
    return out, ref, (q, k, v, cu, pl, view, scale)


@pytest.mark.parametrize("kt,vt,d,h,g", CASES, ids=[f"{c[0]}-{c[1]}-d{c[2]}-h{c[3]}-g{c[4]}" for c in CASES])
def test_decode_matches_float64(kt, vt, d, h, g):
    out, ref, args = _run(kt, vt, d, h, g, LENS, sinks=4, window=8, dtype=torch.float32, splits=3,
                          seed=zlib.crc32(f"{kt}{vt}{d}{h}{g}".encode()) % 1000)
    assert torch.isfinite(out).all(), "unwritten or non-finite outputs"
    # fp16 centroids and queries in the dot products: ~1e-4; fp32 dense: ~1e-6 (tf32 on a GPU: ~1e-3)
    tol = 1e-5 if (kt, vt) == ("bf16", "bf16") and DEV == "cpu" else 2e-3
    assert rel_err(out, ref) < tol
    twin = reference.paged_attention(*args)
    assert rel_err(twin, ref) < 1e-5
    assert rel_err(out, twin) < tol


@pytest.mark.parametrize("sinks,window", [(0, 0), (4, 0), (0, 8), (3, 20), (4, 60)])
def test_decode_hot_layouts(sinks, window):
    """(4, 60): the hot tokens span two programs of the split grid (32 a program at head_dim 64)."""
    lens = [1, 3, 4, 5, 23, 40, 75]
    out, ref, _ = _run("tq3.5", "tq4", 64, 2, 4, lens, sinks, window, torch.float32, splits=2, seed=window)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("splits", [1, 4, 16])
def test_decode_split_counts(splits):
    """More splits than tiles leaves some empty: they must merge as nothing."""
    out, ref, _ = _run("tq4", "tq3", 64, 1, 4, [70, 2], 4, 8, torch.float32, splits=splits, seed=splits)
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("columns", [1, 2, 4])
def test_decode_merge_over_split_chunks(columns, monkeypatch):
    """More splits with work than the merge reduces at once (32 at head_dim 128), hot tokens over 3
    programs (16 a program at head_dim 128), QJL values; and a ragged batch whose short sequences leave
    most splits empty. Up to `columns` merge programs a row (MERGE_COLUMNS; 12 rows here, so all of them):
    one program un-rotates 128 columns in 4 chunks of 32 and adds the hot accumulators chunk by chunk
    (HOT_EARLY off), two take 64 each in 2 chunks, four take 32 each in one chunk with HOT_EARLY."""
    monkeypatch.setattr(decode_attention, "MERGE_COLUMNS", columns)
    out, ref, _ = _run("tq4", "tqp3", 128, 1, 4, [40 * BS + 7, 2 * BS, 1], 4, 36, torch.float32, splits=40,
                       seed=4)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-3


def test_decode_reads_only_written_workspace(monkeypatch):
    """Workspaces come from torch.empty: poisoned with NaN, nothing unwritten may reach the output."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))
    out, ref, _ = _run("tq3.5", "tq4", 64, 2, 3, [3 * BS + 5, BS, 2, 0], 4, 8, torch.float32, splits=8, seed=8)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-3


ON_GPU = pytest.mark.skipif(DEV != "cuda", reason="GPU cases (the interpreter's time goes to the others)")


@pytest.mark.parametrize("kt,vt,d,h,g,kernel", [
    ("tq3.5", "tq3.5", 64, 3, 3, "triton"), ("tq3.5", "tq3.5", 256, 1, 2, None),
    pytest.param("tq4", "tq4", 128, 2, 4, None, marks=ON_GPU), pytest.param("tq3.5", "tq3.5", 128, 2, 4, None, marks=ON_GPU),
    pytest.param("tq3.5", "tq3.5", 64, 3, 3, None, marks=ON_GPU), pytest.param("bf16", "tq3", 64, 1, 4, None, marks=ON_GPU)])
def test_decode_writes_the_new_token_into_its_hot_row_after_reading(kt, vt, d, h, g, kernel):
    """enter (a decode step's cache write): the new tokens take their hot rows (the plan's: the leaving
    token's ring slot, which this attention reads, or a sink) once the splits have read the window:
    outputs bit-identical to the call without it, hot buffers == the twin's scatter. The merge kernel
    writes them (Gluon splits by default on the GPU, Triton splits; d 256: the twin's path)."""
    sinks, window = 3, 20
    lens = [1, 2, 23, 24, 40, 2 * BS + 5]
    view, kd, vd = build_cache(kt, vt, lens, heads=h, d=d, sinks=sinks, window=window, block_size=BS,
                               dtype=torch.float32, device=DEV, seed=d + h)
    gen = torch.Generator().manual_seed(d)
    q = torch.randn(len(lens), h * g, d, generator=gen).to(DEV)
    k = (torch.randn(len(lens), h, d, generator=gen) * 2).to(DEV)
    v = torch.randn(len(lens), h, d, generator=gen).to(DEV)
    cu = torch.arange(len(lens) + 1, dtype=torch.int32, device=DEV)
    pl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    enter = torch.tensor([p if p < sinks else sinks + (p - sinks) % window for p in lens], device=DEV)
    before = [view.k_hot.clone(), view.v_hot.clone()]  # (NaN in the rows no token holds)
    want = [x.clone() for x in before]
    reference.enter_window(*want, k, v, view.seq_slot.long(), enter)
    same = lambda a, b: torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)  # noqa: E731
    splits = 3 if DEV == "cpu" else None  # (the interpreter's time goes with the programs)
    plain = paged_decode_attention(q, k, v, cu, pl, view, 1 / math.sqrt(d), kernel=kernel, num_splits=splits)
    assert same(view.k_hot, before[0]) and same(view.v_hot, before[1])
    out = paged_decode_attention(q, k, v, cu, pl, view, 1 / math.sqrt(d), kernel=kernel, num_splits=splits,
                                 enter=enter)
    assert torch.isfinite(out).all() and torch.equal(out, plain)
    assert same(view.k_hot, want[0]) and same(view.v_hot, want[1])
    assert not same(want[0], before[0])
    assert rel_err(out, attention64(q, k, v, cu, lens, kd, vd, 1 / math.sqrt(d))) < 2e-3


def test_decode_bf16_inputs():
    out, ref, _ = _run("tq3.5", "tq3.5", 128, 2, 4, LENS, 4, 8, torch.bfloat16, splits=2, seed=5)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-2
    out, ref, _ = _run("bf16", "bf16", 64, 2, 4, LENS, 4, 8, torch.bfloat16, splits=2, seed=6)
    assert rel_err(out, ref) < 1e-2


def test_decode_is_not_blind():
    """A corrupted record must move the output: the test above can fail."""
    out, ref, args = _run("tq4", "tq4", 64, 1, 4, [40], 0, 0, torch.float32, splits=1, seed=9)
    q, k, v, cu, pl, view, scale = args
    first = int(view.block_table[0, 0])  # the sequence's own first block (which one depends on BS)
    view.v_pool[first] ^= 0x55
    out2 = paged_decode_attention(q, k, v, cu, pl, view, scale, num_splits=1)
    assert rel_err(out2, ref) > 1e-2


@pytest.mark.parametrize("kw", [dict(lookup="lut"), dict(lookup="pair"), dict(lookup="mem"), dict(lookup="asm"),
                                dict(early_v=True), dict(early_v=False), dict(wide=True)],
                         ids=["lut", "pair", "mem", "asm", "early", "late", "wide"])
@pytest.mark.parametrize("kt,vt,d", [("tq3.5", "tq4", 64), ("tqp3", "tq1", 64), ("tq4", "tq3.5", 128),
                                    ("tq3", "tq2.5", 64)])
def test_decode_variants(kt, vt, d, kw, monkeypatch):
    """The register centroid table, the fp16x2 pair tables (4- and 3-bit codes), L1 gathers, PRMT tables
    (compiled code only: the interpreter runs "pair" for "asm"), value loads issued early or late, and
    planes read in words split in registers all compute the same."""
    kw = dict(kw)
    if kw.pop("wide", False):
        monkeypatch.setattr(decode_attention, "WIDE_LOADS", True)
    out, ref, _ = _run(kt, vt, d, 2, 4, LENS, 4, 8, torch.float32, splits=2, seed=3, **kw)
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("kt", ["polar", "q8", "tq3.5-paper"])
def test_unread_types_fall_back_to_the_twin(kt):
    """Types whose records no kernel reads are served by the torch twin, same call."""
    out, ref, args = _run(kt, "tq4", 64, 1, 4, [1, 30], 4, 8, torch.float32, splits=2, seed=2)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference.paged_attention(*args)) < 1e-6


@pytest.mark.parametrize("kt,d,h,g", [("tq3.5", 128, 2, 4), ("tq4", 64, 3, 3), ("bf16", 64, 2, 1), ("tq3", 64, 1, 8)])
def test_decode_queries_match_float64(kt, d, h, g):
    """The one-launch query preparation == the rotation (permuted as the tiles read it) in float64,
    and the scaled fp32 queries; a strided q is read in place."""
    view, _, _ = build_cache(kt, kt, [5], heads=h, d=d, sinks=4, window=8, block_size=BS,
                             dtype=torch.bfloat16, device=DEV, seed=4)
    k_lay = decode_attention._layouts(view, torch.device(DEV))[0]
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, h * g, 2 * d, generator=gen).to(torch.bfloat16).to(DEV)[..., :d]  # strided rows
    scale = 0.37
    qk, qs = decode_attention.decode_queries(q, h, scale, k_lay, view.k_pool.dtype)
    x = q.double() * (scale * decode_attention.LOG2E)
    assert (qs.double() - x).abs().max() <= 1e-6 * x.abs().max()
    assert torch.equal(qs, q.float() * (scale * decode_attention.LOG2E))  # the same fp32 product
    if k_lay is None:
        # within one bf16 step (the interpreter truncates fp32 -> bf16; the GPU rounds to nearest)
        assert qk.dtype == view.k_pool.dtype
        assert ((qk.float() - qs).abs() <= qs.abs() * 2.0 ** -7).all()
        return
    rot = decode_attention._q_perm(k_lay)[1].double()
    want = torch.einsum("bhgi,hoi->bhgo", x.view(3, h, g, d), rot).reshape(3, h * g, d)
    assert qk.dtype == torch.float16
    assert torch.isfinite(qk).all()
    assert (qk.double() - want).abs().max() <= 1e-3 * want.abs().max()


def test_splits_fill_whole_waves():
    """With the split kernel's occupancy known, the split count fills whole waves of the H200's 132 SMs:
    one sequence of 8 KV heads at 3 programs an SM takes 49 splits (392 of 396 slots, one wave) rather
    than the 64 of the occupancy-blind rule (1.3 waves, a second wave paid almost empty)."""
    assert decode_attention.default_splits(1, 8, 132, 3) == 49
    assert decode_attention.default_splits(1, 8, 132, 4) == 65  # 520 of 528 slots
    assert decode_attention.default_splits(8, 8, 132, 3) == 37  # 2368 programs: 5.98 waves
    for b, h, per_sm in [(1, 8, 3), (1, 3, 4), (8, 8, 4), (16, 8, 3), (3, 2, 5)]:
        n = decode_attention.default_splits(b, h, 132, per_sm)
        slots, progs = 132 * per_sm, b * h * n
        waves = -(-progs // slots)
        assert 1 <= n <= decode_attention.MAX_SPLITS
        # the last wave nearly full, unless even the most splits cannot fill one
        assert progs / (waves * slots) > 0.9 or b * h * decode_attention.MAX_SPLITS < slots
    assert decode_attention.default_splits(1, 8, 132) == 66  # occupancy unknown: ~4 programs an SM


def test_merge_column_programs(monkeypatch):
    """The merge's programs per query row: up to MERGE_COLUMNS, a power of two, while rows x programs stay
    within one a multiprocessor and each keeps 16 columns or more."""
    monkeypatch.setattr(decode_attention, "MERGE_COLUMNS", 4)
    mcp = decode_attention.merge_column_programs
    assert mcp(32, 128) == 4  # 8B shape, one sequence: 128 programs on 132 SMs
    assert mcp(64, 128) == 2 and mcp(128, 128) == 1 and mcp(256, 128) == 1  # B2, B4, B8
    assert mcp(9, 64) == 4 and mcp(9, 32) == 2 and mcp(9, 16) == 1  # columns stay >= 16
    assert mcp(33, 128) == 4 and mcp(34, 128) == 2 and mcp(34, 128, sms=272) == 4
    monkeypatch.setattr(decode_attention, "MERGE_COLUMNS", 1)
    assert mcp(1, 128) == 1


def test_wave_splits():
    """The Gluon kernel's grid and fill (kernels/decode_attention.wave_splits): one sequence of 8 KV heads
    at 3 programs an SM fills one wave with 49 splits (the grid too: 49 splits of 48 tiles reach 150k
    tokens); batches fill a wave with fewer splits and keep a grid of at most 43 splits (128k tokens in
    48-tile splits) and about 4 waves of programs, the largest such count whose last wave is about full;
    the fill never passes the grid or MAX_SPLITS."""
    ws = decode_attention.wave_splits
    assert ws(1, 8, 64, 132, 3) == (49, 49)
    assert ws(4, 8, 64, 132, 3) == (37, 12)  # 1184 programs: 2.99 waves (43: 3.47)
    assert ws(8, 8, 64, 132, 3) == (24, 6)  # 3.88 waves (25, the 4-wave bound: 4.04)
    assert ws(16, 8, 64, 132, 3) == (12, 3)
    assert ws(32, 8, 64, 132, 3) == (6, 1)
    assert ws(1, 3, 64, 132, 3) == (126, 126)  # 135M shape: default_splits' count
    for b in (1, 2, 3, 4, 8, 16, 32, 64, 256):
        for h in (1, 3, 8):
            for per_sm in (None, 1, 3, 4):
                nsplit, fill = ws(b, h, 64, 132, per_sm)
                slots = 132 * (per_sm or 4)
                assert 1 <= fill <= nsplit <= decode_attention.MAX_SPLITS
                assert b * h * fill <= slots or fill == 1  # the fill is one wave at most
                assert fill >= 0.9 * min(decode_attention.MAX_SPLITS, slots // (b * h))  # ... and about a full one
                even = decode_attention.default_splits(b, h, 132, per_sm)
                if b == 1 and h * even <= slots:  # one sequence, one wave: default_splits' count and grid
                    assert nsplit == fill == even
    # the splits one program a multiprocessor allows (split_bounds' SPREAD): 8B shape 16, 135M 44, at least 1
    assert [decode_attention.split_spread(b, h, 132) for b, h in ((1, 8), (1, 3), (2, 8), (17, 8), (64, 8))] == [
        16, 44, 8, 1, 1]


def test_resident_programs(monkeypatch):
    """Occupancy from a compiled kernel's registers and shared memory (H200: 64k registers, 228 KB)."""
    from types import SimpleNamespace
    props = SimpleNamespace(regs_per_multiprocessor=65536, shared_memory_per_multiprocessor=233472,
                            max_threads_per_multi_processor=2048, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)

    def kernel(regs, shared=14336):
        return SimpleNamespace(n_regs=regs, metadata=SimpleNamespace(shared=shared))

    assert decode_attention.resident_programs(kernel(168), 4, "cuda") == 3  # ncu: "Block Limit Registers 3"
    assert decode_attention.resident_programs(kernel(128), 4, "cuda") == 4
    assert decode_attention.resident_programs(kernel(64), 4, "cuda") == 8
    assert decode_attention.resident_programs(kernel(32, shared=100_000), 4, "cuda") == 2  # shared memory
    assert decode_attention.resident_programs(None, 4, "cuda") is None  # the interpreter returns no kernel


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32 (default mode): byte i of the result is byte (nibble i of sel) & 7 of b:a, or that
    byte's sign replicated when the nibble's bit 3 is set."""
    src, out = ((b & 0xFFFFFFFF) << 32) | (a & 0xFFFFFFFF), 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 15
        byte = (src >> (8 * (nib & 7))) & 0xFF
        out |= ((0xFF if byte & 0x80 else 0) if nib & 8 else byte) << (8 * i)
    return out


@pytest.mark.parametrize("kind", ["tq3.5", "tq4", "tq3"])
def test_prmt_tables_give_every_codes_centroid(kind):
    """The 'asm' lookups' tables (lut_words) and their PRMT sequence (_lut4, _lut3, step by step in
    Python) give each code's fp16 centroid bit for bit, whatever lies above the unit's bits."""
    from tqinfer.kernels.quantize import record_layout
    layout = record_layout(make_codec(kind, 64, 2, seed=1), "cpu")
    pick = [0x40, 0x51, 0x62, 0x73]
    rng = random.Random(0)
    for part in layout.parts:
        cent = layout.tables[part.table:part.table + (1 << part.bits)].to(torch.float16).view(torch.int16)
        cent = [int(c) & 0xFFFF for c in cent]
        t = [int(x, 16) for x in decode_attention.lut_words(layout, part)]
        for _ in range(400):
            codes = [rng.randrange(1 << part.bits) for _ in range(8)]
            junk = rng.getrandbits(32)
            if part.bits == 4:
                unit = sum(c << (4 * i) for i, c in enumerate(codes)) | (junk << 32)
            else:
                lo = sum((c & 3) << (2 * i) for i, c in enumerate(codes)) | (junk << 16)
                hi = sum((c >> 2) << i for i, c in enumerate(codes)) | (junk << 8)
            for s in range(8):
                if part.bits == 4:
                    u = (unit >> (16 if s >= 4 else 0)) & 0xFFFFFFFF
                    m = _prmt(0, 0x80808080, (u >> 1) | 0x8888)
                    sel = u & 0x7777
                    la, lb, ha, hb = (_prmt(t[i], t[i + 1], sel) for i in (0, 2, 4, 6))
                    lo_b, hi_b = (la & ~m) | (lb & m), (ha & ~m) | (hb & m)
                else:
                    a = (lo >> (8 if s >= 4 else 0)) & 0xFF
                    b = (hi >> (4 if s >= 4 else 0)) & 0xF
                    x = ((a << 4) | a) & 0x0F0F
                    x = ((x << 2) | x) & 0x3333
                    y = ((b << 6) | b) & 0x0303
                    y = ((y << 3) | y) & 0x1111
                    sel = x | (y << 2)
                    lo_b, hi_b = _prmt(t[0], t[1], sel), _prmt(t[2], t[3], sel)
                assert _prmt(lo_b, hi_b, pick[s % 4]) & 0xFFFF == cent[codes[s]]


GLUON_CASES = [  # k type, v type, head_dim, KV heads, group size
    ("tq4", "tq4", 128, 2, 4), ("tq4", "tq4", 128, 1, 8), ("tq4", "tq4", 64, 3, 3), ("tq4", "tq4", 64, 2, 1),
    ("tq3.5", "tq3.5", 128, 2, 4), ("tq3.5", "tq3.5", 128, 1, 8), ("tq3.5", "tq3.5", 64, 3, 3),
    ("tq3", "tq3", 128, 1, 4), ("tq3", "tq3", 64, 2, 3),
    ("tq3.5", "tq4", 128, 2, 4), ("tq4", "tq3.5", 128, 1, 5), ("tq3", "tq3.5", 64, 3, 3),  # parts differ
]


@pytest.mark.skipif(DEV != "cuda", reason="the Gluon kernel is compiled CUDA code")
@pytest.mark.parametrize("sinks,window,splits,bs", [(4, 8, 3, 64), (0, 0, 1, 64), (3, 20, 40, 64), (66, 20, 5, 128),
                                                   (3, 20, None, 64)])
@pytest.mark.parametrize("kt,vt,d,h,g", GLUON_CASES,
                         ids=[f"{c[0]}-{c[1]}-d{c[2]}-h{c[3]}-g{c[4]}" for c in GLUON_CASES])
def test_gluon_split_kernel_matches_float64(kt, vt, d, h, g, sinks, window, splits, bs, monkeypatch):
    """The Gluon split kernel (decode_gluon) == float64 and == the Triton split kernel on the same cache:
    ragged lengths around tile, block and window edges, empty splits, a first tile past the sinks,
    blocks of two tiles, K and V of different parts, NaN-poisoned workspaces. splits None: the default,
    wave-sized splits, here with a grid of 7 and a fill of 4 splits of at most 3 tiles, two at least
    unless at most 3 splits of one tile cover the context (split_spread), so that past the window of 20
    the lengths take no split (no tile), one, three of one tile (189 tokens: 3 tiles; without the spread
    two, of 2 and 1) or four of 3, 3, 3 and 1 (616 tokens: 10 tiles, the fill)."""
    if splits is None:
        monkeypatch.setattr(decode_attention, "wave_splits", lambda *a: (7, 4))
        monkeypatch.setattr(decode_attention, "WAVE_TILES", 3)
        monkeypatch.setattr(decode_attention, "SPLIT_MIN_TOKENS", 128)
        monkeypatch.setattr(decode_attention, "split_spread", lambda *a: 3)
    lens = [1, 17, bs - 1, bs + 1, 3 * bs - 3, 9 * bs + 40]
    view, kd, vd = build_cache(kt, vt, lens, heads=h, d=d, sinks=sinks, window=window, block_size=bs,
                               dtype=torch.float32, device=DEV, seed=d + g + bs)
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))
    gen = torch.Generator().manual_seed(d + g)
    q = torch.randn(len(lens), h * g, d, generator=gen).to(DEV)
    k = (torch.randn(len(lens), h, d, generator=gen) * 2).to(DEV)
    v = torch.randn(len(lens), h, d, generator=gen).to(DEV)
    cu = torch.arange(len(lens) + 1, dtype=torch.int32, device=DEV)
    pl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = 1 / math.sqrt(d)
    calls = []
    split = decode_attention.decode_gluon._decode_split_gluon

    class Counted:  # the default call (no kernel=) must take the Gluon kernel
        def __getitem__(self, grid):
            calls.append(grid)
            return split[grid]

    monkeypatch.setattr(decode_attention.decode_gluon, "_decode_split_gluon", Counted())
    out = paged_decode_attention(q, k, v, cu, pl, view, scale, num_splits=splits)
    assert len(calls) == 1
    assert torch.isfinite(out).all()
    assert rel_err(out, attention64(q, k, v, cu, lens, kd, vd, scale)) < 2e-3
    tri = paged_decode_attention(q, k, v, cu, pl, view, scale, num_splits=splits, kernel="triton")
    assert len(calls) == 1
    assert rel_err(out, tri) < 5e-4


@pytest.mark.skipif(DEV != "cuda", reason="the Gluon kernel is compiled CUDA code")
@pytest.mark.parametrize("kt,vt,d,h,g", GLUON_CASES,
                         ids=[f"{c[0]}-{c[1]}-d{c[2]}-h{c[3]}-g{c[4]}" for c in GLUON_CASES])
def test_gluon_warps_merged_in_shared_memory_same_as_in_registers(kt, vt, d, h, g, monkeypatch):
    """GLUON_SMEM_MERGE on and off: the split's warps merged through shared memory (_merge_warps) or by
    reductions in registers, the same sums in another order: the same output to fp32 rounding and ==
    float64, the workspaces NaN-poisoned (a row or part left unstored fails); lengths with splits of no
    tile, one tile and several; groups of 1 to 8 rows, one- and two-part records."""
    _gluon_same_under([("GLUON_SMEM_MERGE", False), ("GLUON_SMEM_MERGE", True)], kt, vt, d, h, g,
                      [1, 40, 64 + 1, 2 * 64 + 5, 7 * 64 + 3], sinks=3, window=20, splits=3, seed=d + g + 7,
                      monkeypatch=monkeypatch, poison=True)


@pytest.mark.skipif(DEV != "cuda", reason="the Gluon kernel is compiled CUDA code")
@pytest.mark.parametrize("kt,vt,d,h,g", GLUON_CASES,
                         ids=[f"{c[0]}-{c[1]}-d{c[2]}-h{c[3]}-g{c[4]}" for c in GLUON_CASES])
def test_gluon_pipelined_loop_same_as_plain(kt, vt, d, h, g, monkeypatch):
    """GLUON_PIPELINE on and off: the same arithmetic in the same order (one tile's scores beside the
    previous tile's softmax and values), so the same output to fp32 rounding, and == float64; lengths that
    give splits of no tile, one tile (the loop body never runs) and several."""
    _gluon_same_under([("GLUON_PIPELINE", False), ("GLUON_PIPELINE", True)], kt, vt, d, h, g,
                      [1, 40, 64 + 1, 2 * 64 + 5, 7 * 64 + 3], sinks=3, window=20, splits=3, seed=d + g,
                      monkeypatch=monkeypatch)


@pytest.mark.skipif(DEV != "cuda", reason="the Gluon kernel is compiled CUDA code")
@pytest.mark.parametrize("kt,d,h,g,sinks,window", [("tq3.5", 128, 2, 4, 4, 28), ("tq4", 64, 3, 3, 4, 28),
                                                   ("tq3.5", 128, 2, 4, 4, 0)])
def test_gluon_hot_chunks_first_or_last(kt, d, h, g, sinks, window, monkeypatch):
    """The hot-token programs run first where a sequence's programs fit a wave (wave_programs), else
    last, decided per sequence: the workspace is the same either way, so the outputs agree (< 1e-6) and
    == float64, with NaN-poisoned workspaces. All first, all last, and a wave of 3 programs that puts the
    short sequences' hot chunks first and the longest's last (its 3 splits with work); sinks and a window
    over two hot chunks, or sinks alone (the window 0: hot tokens past the sinks map to no ring slot)."""
    asked = []

    def wave(n):
        return lambda *a: asked.append(a) or n

    settings = [("wave_programs", wave(1 << 20)), ("wave_programs", wave(0)), ("wave_programs", wave(3))]
    _gluon_same_under(settings, kt, kt, d, h, g, [5, 64 + 30, 9 * 64 + 7], sinks=sinks, window=window, splits=5,
                      seed=d + g + 7, monkeypatch=monkeypatch, poison=True)
    assert len(asked) == len(settings)


def _gluon_same_under(settings, kt, vt, d, h, g, lens, sinks, window, splits, seed, monkeypatch, poison=False):
    """The Gluon kernel's outputs under each of `settings` ((decode_attention attribute, value) each) on
    one cache and inputs: finite, the same to fp32 rounding (< 1e-6), and == float64 (< 2e-3); poison:
    the buffers the call allocates (its workspaces) filled with NaN, so that a slot left unwritten fails."""
    view, kd, vd = build_cache(kt, vt, lens, heads=h, d=d, sinks=sinks, window=window, block_size=64,
                               dtype=torch.float32, device=DEV, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(lens), h * g, d, generator=gen).to(DEV)
    k = torch.randn(len(lens), h, d, generator=gen).to(DEV)
    v = torch.randn(len(lens), h, d, generator=gen).to(DEV)
    cu = torch.arange(len(lens) + 1, dtype=torch.int32, device=DEV)
    pl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    ref = attention64(q, k, v, cu, lens, kd, vd, 1 / math.sqrt(d))
    if poison:
        empty, empty_like = torch.empty, torch.empty_like

        def nan(t):
            return t.fill_(float("nan")) if t.is_floating_point() else t

        monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
        monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))
    outs = []
    for name, value in settings:
        monkeypatch.setattr(decode_attention, name, value)
        outs.append(paged_decode_attention(q, k, v, cu, pl, view, 1 / math.sqrt(d), num_splits=splits, kernel="gluon"))
    for out in outs:
        assert torch.isfinite(out).all()
        assert rel_err(out, outs[0]) < 1e-6
        assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("kind,d,ok", [("tq4", 128, True), ("tq4", 64, True), ("tq3.5", 128, True),
                                       ("tq3.5", 64, True), ("tq3", 128, True), ("tq3", 64, True),
                                       ("tq2.5", 64, False), ("tq2", 128, False), ("tqp3", 64, False),
                                       ("tqp4", 128, False)])
def test_gluon_kernel_only_where_it_reads(kind, d, ok, monkeypatch):
    """gluon_layouts: 4- and 3-bit MSE records (not 2-bit parts, not QJL; 3-bit parts of 32 channels not
    with GLUON_3BIT_32 off), at most 8 query heads a group, whole 64-token tiles in a block; gluon_reads: and
    only as compiled CUDA code. Asking for the Gluon kernel where it cannot run is an error."""
    view, _, _ = build_cache(kind, kind, [5], heads=1, d=d, sinks=0, window=0, block_size=BS,
                             dtype=torch.float32, device=DEV, seed=1)
    k_lay, v_lay = decode_attention._layouts(view, DEV)
    assert decode_attention.gluon_layouts(k_lay, v_lay, d, 4, 64) == ok
    assert not decode_attention.gluon_layouts(k_lay, v_lay, d, 9, 64)  # more than 8 query heads a group
    assert not decode_attention.gluon_layouts(k_lay, v_lay, d, 4, 32)  # blocks smaller than a tile
    assert decode_attention.gluon_reads(k_lay, v_lay, d, 4, 64, DEV) == (ok and DEV == "cuda")
    monkeypatch.setattr(decode_attention, "GLUON_3BIT_32", False)
    assert decode_attention.gluon_layouts(k_lay, v_lay, d, 4, 64) == (ok and (kind, d) != ("tq3.5", 64))
    q = torch.randn(1, 4, d, device=DEV)
    args = (q, q[:, :1], q[:, :1], torch.arange(2, dtype=torch.int32, device=DEV),
            torch.tensor([5], dtype=torch.int32, device=DEV), view, 0.1)
    if not (ok and DEV == "cuda"):
        with pytest.raises(ValueError, match="Gluon"):
            paged_decode_attention(*args, kernel="gluon")
    with pytest.raises(ValueError, match="kernel must be"):
        paged_decode_attention(*args, kernel="cuda")


@pytest.mark.parametrize("kt,vt,same", [("tq3.5", "tq3.5", True), ("tq4", "tq4", True), ("tq3", "tq3", True),
                                        ("tq4", "tq3", False), ("tq3.5", "tq4", False)])
def test_gluon_value_tables_shared_only_where_equal(kt, vt, same):
    """gluon_same_tables: the value parts' PRMT tables are the key parts' (one register copy in the
    Gluon kernel) exactly where the words are equal part by part, which the codebooks make true for the
    same type on both sides (each side its own seed) and false across bit widths."""
    view, _, _ = build_cache(kt, vt, [5], heads=1, d=128, sinks=0, window=0, block_size=BS,
                             dtype=torch.float32, device=DEV, seed=1)
    k_lay, v_lay = decode_attention._layouts(view, DEV)
    words = lambda lay: [decode_attention.lut_words(lay, p) for p in lay.parts]  # noqa: E731
    assert decode_attention.gluon_same_tables(k_lay, v_lay) == same == (words(k_lay) == words(v_lay))
    assert (decode_attention.gluon_table(k_lay).tolist() == decode_attention.gluon_table(v_lay).tolist()) == same


@pytest.mark.parametrize("kind,d", [("tq4", 128), ("tq4", 64), ("tq3.5", 128), ("tq3.5", 64)])
def test_gluon_4bit_lookups_only_for_symmetric_codebooks(kind, d):
    """lut_symmetric: the 4-bit Lloyd-Max codebooks are symmetric bit for bit in fp16 (the Gluon kernel
    looks up magnitudes and flips signs); a table with one entry off by a bit is not, and its records go to
    the Triton kernel (gluon_layouts False)."""
    view, _, _ = build_cache(kind, kind, [5], heads=1, d=d, sinks=0, window=0, block_size=BS,
                             dtype=torch.float32, device=DEV, seed=1)
    k_lay, v_lay = decode_attention._layouts(view, DEV)
    four = [p for p in k_lay.parts if p.bits == 4]
    assert four and all(decode_attention.lut_symmetric(k_lay, p) for p in four)
    assert decode_attention.gluon_layouts(k_lay, v_lay, d, 4, 64)
    good = list(decode_attention.lut_words(k_lay, four[0]))
    for word in (1, 5):  # entry 5's low byte (word 1), then its high byte (word 5): no longer entry 10's
        words = list(good)
        words[word] = f"0x{int(words[word], 16) ^ 0x100:08x}"
        k_lay.__dict__["_kernel_luts"][four[0].table] = tuple(words)
        assert not decode_attention.lut_symmetric(k_lay, four[0])
        assert not decode_attention.gluon_layouts(k_lay, v_lay, d, 4, 64)
    assert decode_attention.gluon_layouts(v_lay, v_lay, d, 4, 64)
    k_lay.__dict__["_kernel_luts"][four[0].table] = tuple(good)
    assert decode_attention.lut_symmetric(k_lay, four[0])


def test_gluon_needs_mma_v2_and_gluon(monkeypatch):
    """gluon_reads on CUDA: only on compute capability 8.0 or newer (mma.m16n8k16), asked once per device,
    and never without decode_gluon (a triton without Gluon)."""
    view, _, _ = build_cache("tq4", "tq4", [5], heads=1, d=64, sinks=0, window=0, block_size=BS,
                             dtype=torch.float32, device=DEV, seed=1)
    k_lay, v_lay = decode_attention._layouts(view, DEV)
    asked = []
    monkeypatch.setattr(decode_attention, "INTERPRET", False)
    monkeypatch.setattr(decode_attention, "_CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for cap, expect in (((7, 5), False), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i, cap=cap: asked.append(i) or cap)
        decode_attention._CAPABILITY.clear()
        assert decode_attention.gluon_reads(k_lay, v_lay, 64, 4, 64, "cuda") == expect
        assert decode_attention.gluon_reads(k_lay, v_lay, 64, 4, 64, "cuda:0") == expect
    assert asked == [0, 0]  # once per device and capability setting
    monkeypatch.setattr(decode_attention, "decode_gluon", None)
    assert not decode_attention.gluon_reads(k_lay, v_lay, 64, 4, 64, "cuda")
    assert not decode_attention.gluon_layouts(k_lay, v_lay, 64, 4, 64)


def test_programmatic_launch_only_on_hopper(monkeypatch):
    """Programmatic dependent launch (griddepcontrol) only as compiled CUDA code on compute capability
    9.0 or newer, never on the CPU or under the interpreter; DECODE_PDL forces it either way."""
    monkeypatch.setattr(decode_attention, "INTERPRET", False)
    monkeypatch.setattr(decode_attention, "_CAPABILITY", {})
    assert not decode_attention.programmatic_launch(torch.device("cpu"))
    for cap, expect in (((8, 0), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, cap=cap: cap)
        decode_attention._CAPABILITY.clear()
        assert decode_attention.programmatic_launch(torch.device("cuda", 0)) == expect
    monkeypatch.setattr(decode_attention, "INTERPRET", True)
    assert not decode_attention.programmatic_launch(torch.device("cuda", 0))
    monkeypatch.setattr(decode_attention, "DECODE_PDL", True)
    assert decode_attention.programmatic_launch(torch.device("cpu"))


PDL_CASES = [("tq3.5", 128, 2, 4, "gluon"), ("tq3.5", 64, 3, 3, "gluon"), ("tq4", 128, 2, 4, "triton"),
             ("bf16", 64, 2, 4, None)]


@pytest.mark.skipif(DEV != "cuda" or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch: compute capability 9.0 or newer")
@pytest.mark.parametrize("kind,d,h,g,kernel", PDL_CASES)
def test_programmatic_launch_same_result(kind, d, h, g, kernel, monkeypatch):
    """With programmatic dependent launch (the split kernel started while the query kernel runs, the merge
    while the splits run) decode attention gives the output of the launches without it, bit for bit,
    called eagerly and replayed from a CUDA graph; lengths of one split's worth of tokens and of many."""
    lens = [40, 300, 2000, 9000]
    view, _, _ = build_cache(kind, kind, lens, heads=h, d=d, sinks=4, window=32, block_size=BS,
                             dtype=torch.float32, device=DEV, seed=d + g)
    gen = torch.Generator().manual_seed(d)
    q = torch.randn(len(lens), h * g, d, generator=gen).to(DEV)
    k = torch.randn(len(lens), h, d, generator=gen).to(DEV)
    cu = torch.arange(len(lens) + 1, dtype=torch.int32, device=DEV)
    pl = torch.tensor(lens, dtype=torch.int32, device=DEV)

    def call(out):
        return paged_decode_attention(q, k, k * 0.5, cu, pl, view, 0.1, num_splits=24, out=out, kernel=kernel)

    monkeypatch.setattr(decode_attention, "DECODE_PDL", False)
    ref = call(None)
    monkeypatch.setattr(decode_attention, "DECODE_PDL", True)
    eager = call(None)
    out = torch.full_like(q, float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(out)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(ref).all()
    assert torch.equal(eager, ref)
    assert torch.equal(out, ref)


@triton.jit
def _split_bounds_kernel(lens_ptr, out_ptr, sinks, window, N: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT,
                         MIN_TILES: tl.constexpr, FILL, WAVE_TILES: tl.constexpr, SPREAD):
    i = tl.arange(0, N)
    c_end, lo, hi, per, n_act = decode_bounds.split_bounds(tl.load(lens_ptr + i), sinks, window, BLOCK_N,
                                                           NSPLIT, MIN_TILES, FILL, WAVE_TILES, SPREAD)
    tl.store(out_ptr + i * 5, c_end)
    tl.store(out_ptr + i * 5 + 1, lo + i * 0)
    tl.store(out_ptr + i * 5 + 2, hi)
    tl.store(out_ptr + i * 5 + 3, per + i * 0)
    tl.store(out_ptr + i * 5 + 4, n_act)


@pytest.mark.parametrize("block_n,nsplit,min_tiles,fill,wave", [
    (16, 1, 1, 1, 0), (16, 40, 1, 40, 0), (16, 40, 16, 40, 0), (64, 49, 4, 49, 0), (64, 128, 4, 128, 0),
    (32, 7, 3, 7, 0), (16, 43, 1, 6, 5), (64, 25, 4, 3, 2), (16, 40, 2, 40, 3), (32, 13, 1, 1, 9),
    (16, 13, 1, 4, 5)])  # the last: one wave, more waves, then the even split over the grid (FILL < NSPLIT)
@pytest.mark.parametrize("sinks,window", [(0, 0), (4, 32), (70, 20)])
@pytest.mark.parametrize("spread", [1, 5])
def test_split_bounds_cover_every_tile_once(block_n, nsplit, min_tiles, fill, wave, sinks, window, spread):
    """split_bounds (kernels/decode_bounds.py), which every split kernel and the merge call:
    the first n_act <= NSPLIT splits take at least MIN_TILES tiles each (the last what is left), or fewer
    where SPREAD splits of fewer cover the tiles, and cover the compressed tiles exactly once, the rest
    none; no tiles, no split; MIN_TILES 1 is the even split. With WAVE_TILES (the Gluon kernel's
    wave_splits): FILL splits while a split stays within WAVE_TILES tiles, splits of WAVE_TILES tiles past
    that, the even split over NSPLIT once those would be more."""
    lens = torch.arange(0, 2048, 4, dtype=torch.int32, device=DEV)  # 512: a power of two for tl.arange
    out = torch.full((lens.numel(), 5), -7, dtype=torch.int32, device=DEV)
    _split_bounds_kernel[(1,)](lens, out, sinks, window, N=lens.numel(), BLOCK_N=block_n, NSPLIT=nsplit, FILL=fill,
                               MIN_TILES=min_tiles, WAVE_TILES=wave, SPREAD=spread)
    for length, (c_end, lo, hi, per, n_act) in zip(lens.tolist(), out.tolist()):
        assert c_end == (length - window if window else length)
        assert lo == sinks // block_n and hi == (max(lo, -(-c_end // block_n)) if c_end > sinks else lo)
        tiles = hi - lo
        floor = min(min_tiles, max(1, -(-tiles // spread)))  # fewer tiles where SPREAD splits cover them
        want = max(-(-tiles // nsplit), floor)
        if wave:
            want = max(want, min(-(-tiles // fill), wave))
        assert per >= floor and per == want and (per >= min_tiles or -(-tiles // per) <= spread)
        if wave and tiles <= fill * wave:  # one wave: at most FILL splits
            assert n_act <= fill
        elif wave and tiles <= nsplit * wave and min_tiles <= wave:  # more waves of WAVE_TILES-tile splits
            assert per == wave and n_act > fill
        assert n_act <= nsplit and (n_act == 0) == (tiles == 0)
        spans = [range(lo + s * per, min(lo + (s + 1) * per, hi)) for s in range(nsplit)]
        assert all(len(r) > 0 for r in spans[:n_act]) and all(len(r) == 0 for r in spans[n_act:])
        assert [t for r in spans for t in r] == list(range(lo, hi))
