"""TurboQuant mse / prod / split against the computed optimum and the unbiasedness claim."""

import math

import pytest
import torch

from tqinfer.quant.codebook import codebook_mse
from tqinfer.quant.turboquant import TurboQuantMSE, TurboQuantProd, TurboQuantSplit


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).float()


@pytest.mark.parametrize("rotation", ["hadamard", "orthogonal"])
@pytest.mark.parametrize("dim,bits", [(128, 1), (128, 2), (128, 3), (128, 4), (64, 2), (256, 3), (96, 2)])
def test_mse_distortion_within_3_percent(dim, bits, rotation):
    """Measured D_mse = E||x - x̂||² on 20k unit vectors within 3% of the codebook's computed value
    (the standard error of the mean is < 0.5% here)."""
    x = unit(20_000, dim, seed=dim + bits)
    tq = TurboQuantMSE(dim, bits, seed=1, rotation=rotation)
    xh = tq.dequantize(tq.quantize(x))
    d_mse = (x - xh).pow(2).sum(-1).mean().item()
    assert d_mse == pytest.approx(codebook_mse(bits, dim) * dim, rel=0.03)


@pytest.mark.parametrize("sketch,factor", [("gaussian", math.pi / 2), ("orthogonal", math.pi / 2 - 1)])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_prod_distortion(bits, sketch, factor):
    """D_prod = E(<q,x> - <q,x̂>)² for unit q, x: (π/2)·D_mse(b-1)/d with a Gaussian S (the paper), and
    ≈ (π/2 - 1)·D_mse(b-1)/d with orthogonal rows (they do not spend variance along the residual).
    20k pairs: standard error ≈ 1%; tolerance 6%."""
    d = 128
    x, q = unit(20_000, d, 1), unit(20_000, d, 2)
    tq = TurboQuantProd(d, bits, seed=4, sketch=sketch)
    err = tq.inner_product(q, tq.quantize(x)) - (q * x).sum(-1)
    d_mse_prev = codebook_mse(bits - 1, d) * d if bits > 1 else 1.0
    assert err.pow(2).mean().item() == pytest.approx(factor * d_mse_prev / d, rel=0.06)


def seed_means(make, x, q, seeds):
    """Mean error of <q, x̂> - <q, x> for each seed's codec: i.i.d. draws of the estimator's bias."""
    truth = (q * x).sum(-1)
    out = []
    for s in seeds:
        c = make(s)
        out.append((c.inner_product(q, c.quantize(x)) - truth).mean().item())
    return torch.tensor(out, dtype=torch.float64)


def correlated_pairs(d=64, n=128):
    x = unit(n, d, 7)
    q = x + 0.5 * unit(n, d, 8) / math.sqrt(2)
    return x, q / q.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("bits,sketch", [(1, "gaussian"), (2, "orthogonal"), (3, "gaussian"), (3, "orthogonal")])
def test_prod_unbiased(bits, sketch):
    """Fixed pairs with <q, x> ≈ 0.9, 200 seeds: the mean error is within 4 standard errors of 0 (a
    false alarm has probability 6e-5), and that bound is under 1% of <q, x>."""
    x, q = correlated_pairs()
    prod = seed_means(lambda s: TurboQuantProd(64, bits, seed=s, sketch=sketch), x, q, range(200))
    bound = 4 * prod.std().item() / math.sqrt(len(prod))
    assert abs(prod.mean().item()) < bound
    assert bound < 0.01 * (q * x).sum(-1).mean().item()


def test_mse_one_bit_shrinks_by_2_over_pi():
    """TurboQuant-mse is biased: at 1 bit <q, x̂> ≈ (1 - D_mse(1))·<q, x> ≈ (2/π)·<q, x>."""
    x, q = correlated_pairs()
    truth = (q * x).sum(-1).mean().item()
    mse = seed_means(lambda s: TurboQuantMSE(64, 1, seed=s), x, q, range(50))
    shrink = (mse.mean().item() + truth) / truth
    assert shrink == pytest.approx(1 - codebook_mse(1, 64) * 64, rel=0.02)
    assert shrink == pytest.approx(2 / math.pi, rel=0.03)


def test_prod_one_bit_is_qjl_of_rotated_vector():
    tq = TurboQuantProd(64, 1, seed=0)
    x = unit(10, 64, 0)
    qv = tq.quantize(x)
    assert qv.codes.shape[-1] == 0
    assert torch.allclose(qv.gamma.float(), torch.ones(10), atol=1e-3)  # residual = the unit vector


@pytest.mark.parametrize("outliers,hi,lo", [(64, 3, 2), (64, 4, 3), (32, 3, 2)])
def test_split_distortion_isotropic(outliers, hi, lo):
    """On isotropic data each part holds its share of the energy: D = (k·D_k(hi) + (d-k)·D_{d-k}(lo))/d."""
    d = 128
    x = unit(20_000, d, 5)
    tq = TurboQuantSplit(d, outliers, hi, lo, seed=2)
    err = (x - tq.dequantize(tq.quantize(x))).pow(2).sum(-1).mean().item()
    expect = (outliers * codebook_mse(hi, outliers) * outliers
              + (d - outliers) * codebook_mse(lo, d - outliers) * (d - outliers)) / d
    assert err == pytest.approx(expect, rel=0.03)
    assert tq.code_bits == (outliers * hi + (d - outliers) * lo) / d


def planted(n, heads, d, hot, seed=0, scale=8.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, heads, d, generator=g)
    for h, chans in enumerate(hot):
        x[:, h, chans] *= scale
    return x


def rope(x, pos, base=10000.0):
    """rotate_half RoPE: channel i pairs with i + d/2."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rot = torch.cat([-x2, x1], -1)
    return (x.double() * cos[:, None] + rot * sin[:, None]).float()


def test_calibrate_finds_planted_channels():
    d, k = 64, 8
    hot = [[1, 5, 9, 20, 33, 40, 50, 63], [0, 2, 4, 6, 8, 10, 12, 14]]
    x = planted(2000, 2, d, hot)
    tq = TurboQuantSplit(d, k, 3, 2, heads=2, rope_pairs=False, calibration=x)
    for h in range(2):
        assert sorted(tq.perm[h, :k].tolist()) == hot[h]
        assert sorted(tq.perm[h].tolist()) == list(range(d))


def test_calibrate_rope_pairs_stable_across_positions():
    """Energy planted in one channel of each pair i spreads over (i, i + d/2) after RoPE; the pair set is
    the same whichever positions calibrate it."""
    d, k = 64, 8
    hot_pairs = [3, 7, 11, 30]
    x = planted(4000, 1, d, [hot_pairs])
    early = rope(x[:2000], torch.arange(2000))
    late = rope(x[2000:], torch.arange(50_000, 52_000))
    sets = []
    for data in (early, late):
        tq = TurboQuantSplit(d, k, 3, 2, heads=1, rope_pairs=True, calibration=data)
        sets.append(sorted(tq.perm[0, :k].tolist()))
    assert sets[0] == sets[1] == sorted(hot_pairs + [i + d // 2 for i in hot_pairs])


def test_calibration_lowers_error_on_outlier_data():
    d = 128
    hot = [list(range(40, 56)) + list(range(104, 120))]
    x = planted(3000, 1, d, hot, scale=6.0)
    plain = TurboQuantSplit(d, 32, 4, 2, heads=1)
    tuned = TurboQuantSplit(d, 32, 4, 2, heads=1, calibration=x[:1000])
    e = [(x[1000:] - c.decode(c.encode(x[1000:]))).pow(2).sum(-1).mean() for c in (plain, tuned)]
    assert e[1] < 0.7 * e[0]


def test_split_state_dict_roundtrip():
    x = planted(500, 3, 64, [[1, 2], [3, 4], [5, 6]])
    a = TurboQuantSplit(64, 16, 3, 2, heads=3, seed=9, calibration=x)
    b = TurboQuantSplit(64, 16, 3, 2, heads=3, seed=9)
    assert not torch.equal(a.encode(x), b.encode(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.encode(x), b.encode(x))
    bad = a.state_dict()
    bad["perm"][0, 0] = bad["perm"][0, 1]
    with pytest.raises(ValueError, match="permutation"):
        b.load_state_dict(bad)


def test_split_rejects_bad_configs():
    with pytest.raises(ValueError, match="outlier"):
        TurboQuantSplit(64, 2, 3, 2)
    with pytest.raises(ValueError, match="rope_pairs"):
        TurboQuantSplit(64, 15, 3, 2, rope_pairs=True)
