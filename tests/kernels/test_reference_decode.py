"""The torch twin's decode path (one softmax over the hot buffer, the token and the compressed prefix
in tiles; codec.rotated_parts; reused scratch buffers) against float64 attention over what the cache
holds, on fresh random caches: lengths below, at and past sinks + window, several tiles, every codec
family the path reads through rotated_parts or falls back for."""

import math

import pytest
import torch

from tqinfer.kernels import reference
from tqinfer.quant.registry import make_codec

from .cachegen import attention64, build_cache, rel_err

S, W, BS = 4, 8, 16
# below S, below S + W (hot slots not yet wrapped), exactly S + W, wrapped, several tiles of 16
LENS = [3, 9, S + W, S + W + 1, 3 * BS + 5, 5 * BS - 1]
TYPES = [("tq3.5", "tq3.5"), ("tq4", "tq3"), ("tq2.5", "tq2"), ("tq1", "tq3.5"), ("tqp3", "tq4"),
         ("bf16", "tq3.5"), ("tq3.5", "bf16"), ("polar", "q8"), ("q4", "tq2.5-paper")]


@pytest.mark.parametrize("kt,vt", TYPES, ids=[f"{k}-{v}" for k, v in TYPES])
@pytest.mark.parametrize("tile", [16, 16384])
def test_decode_row_matches_float64(kt, vt, tile, monkeypatch):
    monkeypatch.setattr(reference, "MAX_TILE_TOKENS", tile)
    h, g, d = 3, 3, 64
    seed = sum(map(ord, kt + vt)) + tile
    view, kd, vd = build_cache(kt, vt, LENS, heads=h, d=d, sinks=S, window=W, block_size=BS,
                               dtype=torch.float32, device="cpu", seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    b = len(LENS)
    q = torch.randn(b, h * g, d, generator=gen)
    k = torch.randn(b, h, d, generator=gen) * 2
    v = torch.randn(b, h, d, generator=gen)
    cu = torch.arange(b + 1, dtype=torch.int32)
    scale = 1 / math.sqrt(d)
    for _ in range(2):  # the second call runs on reused scratch buffers
        out = reference.paged_attention(q, k, v, cu, torch.tensor(LENS, dtype=torch.int32), view, scale,
                                        prefix_list=LENS, chunk_list=[1] * b)
        assert torch.isfinite(out).all()
        ref = attention64(q, k, v, cu, LENS, kd, vd, scale)
        # float32 scores and probabilities over float32 centroids: ~1e-7 relative
        assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("name", ["tq1", "tq2", "tq3", "tq4", "tq2.5", "tq3.5", "tq3.5-paper", "tqp3", "polar"])
def test_rotated_parts_recombine_to_decode_rotated(name):
    """unit * norms per part == decode_rotated exactly, with and without scratch buffers, on records
    of fresh random vectors (odd token count, 2 heads)."""
    codec = make_codec(name, 64, 2, seed=5)
    rec = codec.encode(torch.randn(37, 2, 64, generator=torch.Generator().manual_seed(9)) * 3)
    expected = codec.decode_rotated(rec)
    for scratch in (None, reference._Scratch()):
        parts = codec.rotated_parts(rec, scratch)
        got = torch.cat([u if n is None else u * n.unsqueeze(-1) for _, _, u, n in parts], -1)
        assert [(lo, hi) for lo, hi, _, _ in parts] == sorted((lo, hi) for lo, hi, _, _ in parts)
        assert parts[0][0] == 0 and parts[-1][1] == 64
        assert torch.equal(got, expected)
        # and against the float64 reconstruction for the codecs without a QJL term
        if not codec.has_qjl:
            x64 = codec.unrotate(got.double())
            assert torch.isfinite(x64).all()
            assert (x64 - codec.decode(rec).double()).abs().max() < 1e-5


@pytest.mark.parametrize("heads", [1, 3])
def test_split_rotation_matrix_equals_permute_then_block_rotations(heads):
    """TurboQuantSplit.rotate / unrotate as one per-head matrix == gather the outlier channels, rotate
    each part (float64 oracle), on calibrated per-head channel sets and fresh random vectors."""
    codec = make_codec("tq3.5", 64, heads, seed=3)
    gen = torch.Generator().manual_seed(4)
    codec.calibrate(torch.randn(50, heads, 64, generator=gen) * (1 + 5 * torch.rand(heads, 64, generator=gen)))
    x = torch.randn(7, 2, heads, 64, generator=gen, dtype=torch.float64)
    xp = torch.gather(x, -1, codec.perm.expand(x.shape))
    k = codec.outliers
    expected = torch.cat([xp[..., :k] @ codec.a.rot.matrix64.T, xp[..., k:] @ codec.b.rot.matrix64.T], -1)
    got = codec.rotate(x.float())
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got.double() - expected).abs().max() < 1e-5
    assert (codec.rotate(x) - expected).abs().max() < 1e-12  # float64 stays float64
    assert (codec.unrotate(expected) - x).abs().max() < 1e-12
    with pytest.raises(ValueError):
        if heads > 1:
            codec.rotate(torch.randn(5, heads + 1, 64))
        else:
            raise ValueError("one head broadcasts over any shape")
