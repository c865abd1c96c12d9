"""PolarQuant against a float64 oracle, QJL's estimator, and the bf16 / q8 / q4 error bounds."""

import math

import pytest
import torch

from tqinfer.quant.baselines import BF16Codec, Q4Codec, Q8Codec
from tqinfer.quant.polarquant import PolarQuant, angle_codebook
from tqinfer.quant.qjl import QJLCodec


def data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float()


def polar_oracle(pq: PolarQuant, x: torch.Tensor) -> torch.Tensor:
    """Rotated x̂ by the recursive polar transform written per block in float64, angles snapped to the
    nearest centroid by brute force (circular distance at level 1)."""
    y = x.double() @ pq.rot.matrix64.T
    out = torch.empty_like(y)
    books = [angle_codebook(lvl + 1, b)[0] for lvl, b in enumerate(pq.bits)]
    for i in range(y.shape[0]):
        for blk in range(pq.dim // 16):
            v = y[i, blk * 16 : (blk + 1) * 16]
            radii, angles = v, []
            for lvl in range(4):
                a, b = radii[0::2], radii[1::2]
                psi = torch.atan2(b, a)
                if lvl == 0:
                    psi = psi % (2 * math.pi)
                dist = (psi[:, None] - books[lvl][None]).abs()
                if lvl == 0:
                    dist = torch.minimum(dist, 2 * math.pi - dist)
                angles.append(books[lvl][dist.argmin(-1)])
                radii = torch.sqrt(a * a + b * b)
            r = radii.half().double()
            for lvl in reversed(range(4)):
                r = torch.stack([r * torch.cos(angles[lvl]), r * torch.sin(angles[lvl])], -1).flatten()
            out[i, blk * 16 : (blk + 1) * 16] = r
    return out


@pytest.mark.parametrize("d", [64, 128])
def test_polar_matches_float64_oracle(d):
    pq = PolarQuant(d, seed=3)
    x = data((40, d), seed=d)
    got = pq.decode_rotated(pq.encode(x)).double()
    want = polar_oracle(pq, x)
    assert torch.allclose(got, want, atol=2e-4 * x.abs().max().item())


def test_polar_bits_and_block_radii():
    pq = PolarQuant(128, seed=0)
    assert pq.record_bytes == 62 and pq.bits_per_value == 3.875
    x = data((200, 128), seed=1)
    y = pq.decode_rotated(pq.encode(x)).reshape(200, 8, 16)
    true_r = pq.rotate(x).reshape(200, 8, 16).norm(dim=-1)
    # the polar transform keeps each block's radius exactly; only fp16 rounding of it remains
    assert torch.allclose(y.norm(dim=-1), true_r, rtol=1e-3)


def test_angle_codebooks():
    c, b = angle_codebook(1, 4)
    assert torch.allclose(c, (torch.arange(16, dtype=torch.float64) + 0.5) * math.pi / 8)
    for lvl in (2, 3, 4):  # symmetric about π/4, where sin^k(2ψ) peaks; tighter at higher levels
        c, _ = angle_codebook(lvl, 2)
        assert torch.allclose(c + c.flip(0), torch.full_like(c, math.pi / 2), atol=1e-6)
    spread = [angle_codebook(lvl, 2)[0][-1] - angle_codebook(lvl, 2)[0][0] for lvl in (2, 3, 4)]
    assert spread[0] > spread[1] > spread[2]


def test_polar_rejects_bad_dim():
    with pytest.raises(ValueError, match="divisible by 16"):
        PolarQuant(72)


def test_qjl_unbiased_over_seeds():
    """Mean of √(π/2)/m·||k||·<Sq, sign(Sk)> - <q, k> over 400 seeds within 4 standard errors of 0."""
    d = 64
    k = data((64, d), seed=1)
    q = k + data((64, d), seed=2)
    truth = (q * k).sum(-1)
    means = []
    for s in range(400):
        c = QJLCodec(d, 1, seed=s, sketch="gaussian" if s % 2 else "orthogonal")
        rec = c.encode(k)
        signs, gamma = c.qjl_signs(rec)
        est = gamma * (c.qjl_project(c.rotate(q)) * signs).sum(-1)
        means.append((est - truth).mean().item())
    means = torch.tensor(means)
    bound = 4 * means.std().item() / math.sqrt(len(means))
    assert abs(means.mean().item()) < bound
    assert bound < 0.03 * truth.mean().item()  # tight enough to catch a 3% error in the constant


def test_qjl_record_holds_signs_and_norm():
    c = QJLCodec(128, 1, seed=0)
    k = data((10, 128), seed=4)
    rec = c.encode(k)
    signs, gamma = c.qjl_signs(rec)
    want = torch.where(c.sketch.project(k) >= 0, 1.0, -1.0)
    assert torch.equal(signs, want)
    assert torch.allclose(gamma / c.sketch.scale, k.norm(dim=-1), rtol=1e-3)


def test_q8_error_bound():
    c = Q8Codec(128)
    x = data((500, 128), seed=5)
    rec = c.encode(x)
    scale = x.abs().amax(-1, keepdim=True) / 127
    assert torch.all((c.decode(rec) - x).abs() <= scale * 0.5 * (1 + 1e-3) + 1e-7)


def test_q4_error_bound():
    c = Q4Codec(128)
    x = data((500, 128), seed=6)
    g = x.reshape(500, 4, 32)
    scale = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(32, -1)
    zero_round = g.amin(-1).abs().repeat_interleave(32, -1) * 2**-11  # fp16 rounding of the zero
    err = (c.decode(c.encode(x)) - x).abs()
    assert torch.all(err <= scale * 0.5 * (1 + 2e-3) + zero_round + 1e-6)


def test_bf16_exact_on_bf16_values():
    c = BF16Codec(64)
    x = data((20, 64), seed=7).bfloat16().float()
    assert torch.equal(c.decode(c.encode(x)), x)


def test_constant_groups():
    x = torch.full((3, 128), 2.5)
    for c in (Q8Codec(128), Q4Codec(128)):
        assert torch.allclose(c.decode(c.encode(x)), x, rtol=1e-3)
