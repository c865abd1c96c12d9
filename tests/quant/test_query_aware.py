"""Query-aware rounding of TurboQuantMSE (keys): codes chosen by error feedback under the queries'
energy make the score error q . e smaller than nearest-centroid codes, with the same codebook,
rotation, norm and record; the energy is the codec's saved state."""

from __future__ import annotations

import pytest
import torch

from tqinfer.quant.turboquant import TurboQuantMSE


def anisotropic(n, heads, d, seed, loud=(0, 1, 5), gain=6.0):
    """Vectors whose energy sits in a few RoPE pairs (i, i + d/2), as SmolLM2's queries and keys."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, heads, d, generator=g)
    for i in loud:
        x[..., i] *= gain
        x[..., i + d // 2] *= gain
    return x


def score_error(codec, q, k):
    """Mean square of q . (k_hat - k) over every (query, key) pair of each head."""
    e = codec.decode(codec.encode(k)) - k
    return torch.einsum("nhd,mhd->hnm", q.double(), e.double()).pow(2).mean().item()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_query_aware_rounding_lowers_the_score_error_at_the_same_record(bits):
    d, H = 64, 2
    q_cal, q_test = anisotropic(256, 2 * H, d, 1), anisotropic(256, 2 * H, d, 2)
    k = anisotropic(2000, H, d, 3, loud=(0, 2, 5))
    plain = TurboQuantMSE(d, bits, seed=7, heads=H)
    aware = TurboQuantMSE(d, bits, seed=7, heads=H)
    aware.calibrate_queries(q_cal)
    # per KV head: the group's query heads pooled, RoPE pairs averaged
    assert aware.query_energy.shape == (H, d)
    assert torch.equal(aware.query_energy[:, :d // 2], aware.query_energy[:, d // 2:])
    q = q_test.view(256, H, 2, d)[:, :, 0]
    ratio = score_error(aware, q, k) / score_error(plain, q, k)
    assert ratio < 0.8
    rec_p, rec_a = plain.encode(k), aware.encode(k)
    assert rec_a.shape == rec_p.shape and rec_a.dtype == torch.uint8
    # the same norm bytes; only the codes differ, and they decode with the plain decoder
    assert torch.equal(rec_a[..., plain.norm_at:], rec_p[..., plain.norm_at:])
    assert not torch.equal(rec_a, rec_p)
    assert torch.equal(plain.decode(rec_a), aware.decode(rec_a))


def test_without_query_energy_the_codes_are_the_nearest_centroids():
    d, H = 64, 2
    k = anisotropic(300, H, d, 4)
    plain = TurboQuantMSE(d, 4, seed=3, heads=H)
    codec = TurboQuantMSE(d, 4, seed=3, heads=H)
    codec.calibrate_queries(anisotropic(64, H, d, 5))
    codec.set_query_energy(None)
    assert codec.state_dict() == {}
    assert torch.equal(codec.encode(k), plain.encode(k))


def test_query_energy_is_the_saved_state():
    d, H = 64, 3
    k = anisotropic(200, H, d, 6)
    a = TurboQuantMSE(d, 3, seed=5, heads=H)
    a.calibrate_queries(anisotropic(100, 3 * H, d, 7))
    state = a.state_dict()
    assert set(state) == {"query_energy"} and state["query_energy"].shape == (H, d)
    b = TurboQuantMSE(d, 3, seed=5, heads=H)
    b.load_state_dict(state)
    assert torch.equal(a.encode(k), b.encode(k))
    with pytest.raises(ValueError, match="query energy"):
        b.load_state_dict({"query_energy": torch.ones(H + 1, d)})
    with pytest.raises(ValueError, match="query energy"):
        b.set_query_energy(torch.full((H, d), float("nan")))
    with pytest.raises(ValueError, match="unknown state"):
        b.load_state_dict({"perm": torch.zeros(H, d)})
    with pytest.raises(ValueError, match="multiple"):
        b.calibrate_queries(torch.randn(10, 4, d))
