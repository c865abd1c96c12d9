"""Chunked-prefill kernel == float64 attention (== the torch twin): ragged chunks over compressed and
dense prefixes, chunks longer than a block, GQA 1/3/4/8."""

import math
import zlib

import pytest
import torch

from tqinfer.kernels import reference
from tqinfer.kernels.prefill_attention import paged_prefill_attention

from .cachegen import BS, DEV, attention64, build_cache, rel_err


CASES = [  # k type, v type, head_dim, KV heads, group size
    ("bf16", "bf16", 64, 2, 4),
    ("tq4", "tq4", 64, 1, 8),
    ("tq3", "tq3", 64, 3, 3),
    ("tq3.5", "tq3.5", 128, 2, 4),
    ("tq2.5", "tq2.5", 64, 1, 1),
    ("tqp3", "tqp3", 64, 1, 4),
    ("bf16", "tq3.5", 64, 1, 2),
]


@pytest.mark.parametrize("kt,vt,d,h,g", CASES, ids=[f"{c[0]}-{c[1]}-d{c[2]}-h{c[3]}-g{c[4]}" for c in CASES])
def test_prefill_matches_float64(kt, vt, d, h, g):
    prefixes = [0, 17, 40, 5]
    chunks = [19, 1, 37, 3]  # a chunk longer than two query tiles, single tokens, ragged
    seed = zlib.crc32(f"{kt}{vt}{d}{h}{g}".encode()) % 1000
    view, kd, vd = build_cache(kt, vt, prefixes, heads=h, d=d, sinks=4, window=8, block_size=BS,
                               dtype=torch.float32, device=DEV, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    t = sum(chunks)
    q = torch.randn(t, h * g, d, generator=gen).to(DEV)
    k = (torch.randn(t, h, d, generator=gen) * 2).to(DEV)
    v = torch.randn(t, h, d, generator=gen).to(DEV)
    cu = torch.tensor([0] + list(torch.tensor(chunks).cumsum(0)), dtype=torch.int32, device=DEV)
    pl = torch.tensor(prefixes, dtype=torch.int32, device=DEV)
    scale = 1 / math.sqrt(d)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, k, v, cu, pl, view, scale, block_m=16 if g < 4 else 8, out=out)
    ref = attention64(q, k, v, cu, prefixes, kd, vd, scale)
    assert torch.isfinite(out).all(), "unwritten or non-finite outputs"
    tol = 1e-5 if (kt, vt) == ("bf16", "bf16") and DEV == "cpu" else 3e-3
    assert rel_err(out, ref) < tol
    twin = reference.paged_attention(q, k, v, cu, pl, view, scale)
    assert rel_err(out, twin) < tol


@pytest.mark.parametrize("unit_loads", [True, False, "lut", "pair", "asm"], ids=["units", "bytes", "lut", "pairs", "asm"])
@pytest.mark.parametrize("kt,vt,d", [("tq3.5", "tq4", 64), ("tq3", "tq3.5", 128), ("tq2.5", "tqp3", 64)])
def test_prefill_lookups_agree(unit_loads, kt, vt, d):
    """Codes read in whole units with L1 gathers, byte by byte, through a register table, by fp16x2 pairs
    (4- and 3-bit parts; a side with other parts keeps whole units) or by PRMT lookups (the default;
    compiled code only: the interpreter runs pairs): the same attention, against float64."""
    prefixes, chunks = [45, 30], [9, 20]
    view, kd, vd = build_cache(kt, vt, prefixes, heads=2, d=d, sinks=4, window=8, block_size=BS,
                               dtype=torch.float32, device=DEV, seed=11)
    gen = torch.Generator().manual_seed(12)
    t = sum(chunks)
    q = torch.randn(t, 8, d, generator=gen).to(DEV)
    k = torch.randn(t, 2, d, generator=gen).to(DEV)
    v = torch.randn(t, 2, d, generator=gen).to(DEV)
    cu = torch.tensor([0, chunks[0], t], dtype=torch.int32, device=DEV)
    pl = torch.tensor(prefixes, dtype=torch.int32, device=DEV)
    out = torch.full_like(q, float("nan"))
    scale = 1 / math.sqrt(d)
    paged_prefill_attention(q, k, v, cu, pl, view, scale, block_m=8, out=out, unit_loads=unit_loads)
    assert torch.isfinite(out).all()
    assert rel_err(out, attention64(q, k, v, cu, prefixes, kd, vd, scale)) < 3e-3
