"""Query-aware rounding in the cache (CacheConfig.query_aware): the K codecs of the TurboQuantMSE types
take the first prefill chunk's query energy, the V codecs and other types do not, the knob turns it
off, and the energy travels with a saved sequence so that the loaded cache encodes as the saved one."""

from __future__ import annotations

import torch

from tqinfer.cache.config import CacheConfig
from tqinfer.cache.paged import PagedCache
from tqinfer.cache.store import load_sequence, save_sequence
from tqinfer.engine.context import StepContext

from .oracles import tiny_args

H, D = 2, 64


def filled(k_type="tq4", v_type="tq3", query_aware=True, seed=0, n=70):
    gen = torch.Generator().manual_seed(seed)
    cfg = CacheConfig(k_type=k_type, v_type=v_type, sinks=2, window=8, block_size=16, query_aware=query_aware)
    cache = PagedCache(cfg, tiny_args(2, H, D), max_seqs=2, max_len=128, dtype=torch.float32, device="cpu")
    for layer in range(2):
        q = torch.randn(n, 2 * H, D, generator=gen)
        q[..., 3] *= 5  # queries with a loud RoPE pair
        q[..., 3 + D // 2] *= 5
        ctx = StepContext.build(cache, [0], [0], [n], "cpu")
        cache.attend(layer, q, torch.randn(n, H, D, generator=gen), torch.randn(n, H, D, generator=gen), ctx,
                     D ** -0.5, None)
    cache.set_len(0, n)
    return cache


def next_step(cache, slot, gen_seed=9):
    gen = torch.Generator().manual_seed(gen_seed)
    p = cache.lens[slot]
    ctx = StepContext.build(cache, [slot], [p], [1], "cpu")
    outs = [cache.attend(layer, torch.randn(1, 2 * H, D, generator=gen), torch.randn(1, H, D, generator=gen),
                         torch.randn(1, H, D, generator=gen), ctx, D ** -0.5, None) for layer in range(2)]
    cache.set_len(slot, p + 1)
    return torch.stack(outs)


def test_key_codecs_take_the_query_energy_of_the_first_chunk():
    cache = filled()
    for kc, vc in zip(cache.k_codec, cache.v_codec):
        e = kc.query_energy
        assert e is not None and e.shape == (H, D)
        assert e[:, 3].min() > 10 * e[:, 10].max()  # the loud pair (3, 3 + d/2) weighs most
        assert vc.query_energy is None
    assert all(c.query_energy is None for c in filled(query_aware=False).k_codec)
    # types without it (the split codecs) are untouched
    assert not any(hasattr(c, "query_energy") for c in filled(k_type="tq3.5").k_codec)


def test_save_load_keeps_the_query_energy(tmp_path):
    cache = filled()
    tokens = list(range(70))
    save_sequence(cache, 0, tokens, tmp_path / "c.safetensors", {})
    fresh = filled(seed=1, n=20)  # calibrated on other data, but no other sequence is live
    fresh.set_len(0, 0)
    assert load_sequence(fresh, 1, tmp_path / "c.safetensors", {}) == tokens
    for a, b in zip(cache.k_codec, fresh.k_codec):
        assert torch.equal(a.query_energy, b.query_energy)
    # the next tokens' records (the window's oldest leaves it) are encoded the same way
    for _ in range(3):
        assert torch.equal(next_step(cache, 0), next_step(fresh, 1))
