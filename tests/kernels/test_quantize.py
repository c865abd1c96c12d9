"""The fused quantize-on-write kernel stores exactly the bytes tqinfer.quant's codecs encode."""

import pytest
import torch

from tqinfer.kernels import quantize, reference
from tqinfer.kernels.quantize import record_layout, supports, write_kv_tokens, write_tokens

from .cachegen import codec_for

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TYPES = ["tq1", "tq2", "tq3", "tq4", "tq2.5", "tq3.5", "tqp2", "tqp3", "tqp4"]


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("d", [64, 128])
def test_records_equal_codec_encode(name, d):
    h, bs, n = 3, 16, 37
    codec = codec_for(name, d, h, seed=d + len(name))
    g = torch.Generator().manual_seed(d)
    x = (torch.randn(n, h, d, generator=g) * 3).to(torch.bfloat16)
    nblocks = 6
    slots = torch.randperm(nblocks * bs, generator=g)[:n]
    pool = torch.randint(0, 256, (nblocks, h, bs, codec.record_bytes), generator=g, dtype=torch.uint8)
    untouched = pool.clone()
    pool = pool.to(DEV)
    write_tokens(codec, x.to(DEV), pool, slots.to(DEV))
    want = untouched.clone()
    want[slots // bs, :, slots % bs] = codec.encode(x)
    diff = (pool.cpu() != want).any(-1)
    if DEV == "cpu":
        assert not diff.any(), f"{int(diff.sum())} records differ"
    else:  # a different summation order may move a coordinate across a boundary, rarely
        assert diff.float().mean() < 1e-2


@pytest.mark.parametrize("kt,vt", [("tq3.5", "tq3.5"), ("tq4", "tq4"), ("tqp3", "tqp3"), ("tq4", "tq3"),
                                   ("tq2.5", "polar")])
def test_kv_write_equals_two_writes(kt, vt, monkeypatch):
    """One launch for K and V (same layout; K and V codecs with their own rotations and calibration)
    stores the bytes two write_tokens calls store; other pairs fall back to two calls."""
    h, d, bs, n = 3, 64, 16, 21
    kc, vc = codec_for(kt, d, h, seed=4), codec_for(vt, d, h, seed=5)
    g = torch.Generator().manual_seed(7)
    if kt == "tq3.5":  # different outlier channels for K and V: per-codec rotations in one launch
        kc.calibrate(torch.randn(64, h, d, generator=g) * torch.linspace(0.1, 5, d))
        vc.calibrate(torch.randn(64, h, d, generator=g) * torch.linspace(5, 0.1, d))
    k = (torch.randn(n, h, d, generator=g) * 3).to(DEV)
    v = torch.randn(n, h, d, generator=g).to(DEV)
    slots = torch.randperm(4 * bs, generator=g)[:n].to(DEV)
    pools = [torch.randint(0, 256, (4, h, bs, c.record_bytes), generator=g, dtype=torch.uint8).to(DEV)
             for c in (kc, vc)]
    want = [p.clone() for p in pools]
    write_tokens(kc, k, want[0], slots)
    write_tokens(vc, v, want[1], slots)
    launches = []
    monkeypatch.setattr(quantize, "_quantize_kv_kernel", _Counting(quantize._quantize_kv_kernel, launches))
    write_kv_tokens(kc, k, pools[0], vc, v, pools[1], slots)
    # one launch of 2H programs for K and V of one type; else one of H per codec the kernel writes
    assert [grid[1] for grid in launches] == ([2 * h] if kt == vt else [h for c in (kc, vc) if supports(c)])
    for got, exp in zip(pools, want):
        assert torch.equal(got, exp)


def _hot_layer(kt, vt, h, d, hot, seqs, blocks, g, seed):
    """(k_codec, v_codec, k_hot, v_hot, k_pool, v_pool) of one layer, random contents (CPU); a dense
    side (None) has a bf16 pool."""
    kc, vc = (None if t is None else codec_for(t, d, h, seed=seed + i) for i, t in enumerate((kt, vt)))
    if kt == "tq3.5":  # its own outlier channels: per-layer rotations in one launch
        kc.calibrate(torch.randn(64, h, d, generator=g) * torch.linspace(0.1, 5, d)[torch.randperm(d, generator=g)])
        vc.calibrate(torch.randn(64, h, d, generator=g) * torch.linspace(5, 0.1, d))
    hots = [(torch.randn(seqs, h, hot, d, generator=g) * 2).to(torch.bfloat16) for _ in range(2)]
    pools = [torch.randn(blocks, h, 16, d, generator=g).to(torch.bfloat16) if c is None else
             torch.randint(0, 256, (blocks, h, 16, c.record_bytes), generator=g, dtype=torch.uint8) for c in (kc, vc)]
    return [kc, vc, *hots, *pools]


def test_retire_window_equals_twin(monkeypatch):
    """The records of every layer's leaving hot rows (a decode step's start): one launch for the layers
    of one type (each with its own rotations, through the table of addresses), one for another type's
    layers, the twin for layers whose K and V differ; the bytes the twin's gathers and writes store,
    hot buffers untouched. A sequence whose token does not leave writes the scratch slot."""
    h, d, hot, seqs, blocks = 3, 64, 12, 5, 5
    g = torch.Generator().manual_seed(11)
    types = [("tq3.5", "tq3.5"), ("tq4", "tq3"), ("tq3.5", "tq3.5"), ("tqp3", "tqp3"), (None, "tq4"),
             ("tq3.5", "tq3.5"), ("tqp3", "tqp3")]
    layers = [_hot_layer(kt, vt, h, d, hot, seqs, blocks, g, seed=2 * i) for i, (kt, vt) in enumerate(types)]
    seq = torch.tensor([3, 0, 4, 1])
    src_hot = torch.tensor([5, 11, 7, 4])
    rec_dst = torch.tensor([17, 40, 4 * 16, 63])  # sequence 4's token does not leave: the scratch block
    want = [[x.clone() if torch.is_tensor(x) else x for x in layer] for layer in layers]
    reference.retire_window(want, seq, src_hot, rec_dst)
    got = [[x.clone().to(DEV) if torch.is_tensor(x) else x for x in layer] for layer in layers]
    launches = []
    monkeypatch.setattr(quantize, "_quantize_kv_kernel", _Counting(quantize._quantize_kv_kernel, launches))
    quantize.retire_window(got, *(x.to(DEV) for x in (seq, src_hot, rec_dst)))
    # tq3.5 layers 0, 2, 5 in one launch, tqp3 3, 6 in one; tq4 / tq3 two launches of H; the dense K: V's one
    assert sorted((grid[1], grid[2]) for grid in launches) == sorted([(2 * h, 3), (2 * h, 2), (h, 1), (h, 1), (h, 1)])
    for i, (a, b, layer) in enumerate(zip(got, want, layers)):
        for x, y in zip(a[2:], b[2:]):
            assert torch.equal(x.cpu(), y), f"layer {i} {types[i]}"
        assert torch.equal(a[2].cpu(), layer[2]) and torch.equal(a[3].cpu(), layer[3])  # hot rows only read
        assert not torch.equal(b[5], layer[5])  # it wrote


class _Counting:
    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(grid)
        return self.kernel[grid]


def test_large_and_zero_vectors():
    codec = codec_for("tq3.5", 64, 2, seed=1)
    x = torch.randn(5, 2, 64) * 100
    x[2] = 0
    pool = torch.zeros(1, 2, 16, codec.record_bytes, dtype=torch.uint8, device=DEV)
    write_tokens(codec, x.to(DEV), pool, torch.arange(5, device=DEV))
    want = codec.encode(x)
    got = pool[0, :, :5].transpose(0, 1).cpu()
    assert (got != want).any(-1).float().mean() < 0.2  # zero vectors: any code, norm 0
    assert torch.equal(codec.decode(got)[2], torch.zeros(2, 64))


def test_dense_pool_write():
    pool = torch.full((3, 2, 8, 64), float("nan"), device=DEV)
    x = torch.randn(5, 2, 64, device=DEV)
    slots = torch.tensor([0, 9, 23, 7, 12], device=DEV)
    write_tokens(None, x, pool, slots)
    assert torch.equal(pool[slots // 8, :, slots % 8], x)


def test_layout_support():
    assert supports(None)
    for name in TYPES:
        assert supports(codec_for(name, 128, 2, seed=0)), name
    for name in ["polar", "q8", "q4", "qjl", "tq3.5-paper"]:
        assert not supports(codec_for(name, 128, 2, seed=0)), name


def test_layout_follows_calibration():
    codec = codec_for("tq3.5", 64, 2, seed=3)
    first = record_layout(codec, "cpu").rotation
    codec.calibrate(torch.randn(32, 2, 64) * torch.linspace(0.1, 5, 64))
    assert not torch.equal(first, record_layout(codec, "cpu").rotation)
