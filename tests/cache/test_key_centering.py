"""Key centering (CacheConfig.center_keys): the cache stores k - center, attention equals float64
attention over center + the dequantized records, the center comes from the first prefill chunk (the
keys weighted by the attention they get) and travels with saved caches."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tqinfer.cache.config import CacheConfig
from tqinfer.cache.paged import (CENTER_AUTO_SHARE, MIN_CENTER_TOKENS, PagedCache, attention_weighted_center,
                                 center_share)
from tqinfer.cache.store import CacheFileError, CacheMismatch, load_sequence, payload_checksum, save_sequence
from tqinfer.engine.context import StepContext
from tqinfer.quant.registry import codec_names

from .oracles import oracle, tiny_args


KEY_TYPES = [t for t in codec_names() if t != "bf16"]


def center64(q, k, scale, sinks):
    """float64: per KV head, the keys weighted by the causal attention each gets from the chunk's
    queries (all heads of the group), sinks left out."""
    q, k = q.double(), k.double()
    T, H, d = k.shape
    G = q.shape[1] // H
    out = torch.zeros(H, d, dtype=torch.float64)
    for h in range(H):
        w = torch.zeros(T, dtype=torch.float64)
        for g in range(G):
            for i in range(T):
                w[: i + 1] += torch.softmax(k[: i + 1, h] @ q[i, h * G + g] * scale, 0)
        w[:sinks] = 0
        out[h] = (w[:, None] * k[:, h]).sum(0) / w.sum()
    return out


def offset_keys(gen, n, H, d, offset):
    """Keys sharing a large per-head offset (as real post-RoPE keys do), plus a spread."""
    return offset + torch.randn(n, H, d, generator=gen, dtype=torch.float64).float()


def step(cache, slot, prefix, q, k, v, scale):
    ctx = StepContext.build(cache, [slot], [prefix], [k.shape[0]], "cpu")
    out = cache.attend(0, q, k, v, ctx, scale, None)
    cache.set_len(slot, prefix + k.shape[0])
    return out


@pytest.mark.parametrize("ktype", KEY_TYPES)
def test_centered_attention_equals_float64_over_the_dequantized_keys(ktype):
    """Attention through a centered cache == float64 softmax attention over the keys the cache holds,
    un-centered: center + reconstruct(encode(k - center)) for compressed tokens, the exact keys for
    the sinks, the window and the chunk itself. The center is the first chunk's keys weighted by the
    attention they get (center64)."""
    gen = torch.Generator().manual_seed(11)
    H, G, d, S, W = 2, 3, 64, 3, 8
    vtype = "tq3" if ktype == "qjl" else ktype
    cfg = CacheConfig(k_type=ktype, v_type=vtype, sinks=S, window=W, block_size=16, center_keys=True)
    cache = PagedCache(cfg, tiny_args(1, H, d), max_seqs=1, max_len=160, dtype=torch.float32, device="cpu")
    offset = 4 * torch.randn(H, d, generator=gen, dtype=torch.float64).float()
    kc, vc = cache.k_codec[0], cache.v_codec[0]
    keys, vals, scale = [], [], d ** -0.5
    for n in (40, 1, 23, 1, 1):
        p = len(keys)
        q = torch.randn(n, H * G, d, generator=gen, dtype=torch.float64).float()
        k = offset_keys(gen, n, H, d, offset)
        v = torch.randn(n, H, d, generator=gen, dtype=torch.float64).float()
        got = step(cache, 0, p, q, k, v, scale).double()
        if p == 0:  # calibrated on this chunk
            assert torch.allclose(cache.k_center[0].double(), center64(q, k, scale, S), atol=1e-5)
        keys += list(k)
        vals += list(v)
        center = cache.k_center[0]
        eff_k, eff_v = torch.stack(keys).double(), torch.stack(vals).double()
        comp = torch.arange(S, max(S, p - W))
        if len(comp):
            xk = torch.stack(keys)[comp]
            eff_k[comp] = kc.reconstruct(kc.encode(xk - center)).double() + center.double()
            if vc is not None:
                eff_v[comp] = vc.reconstruct(vc.encode(torch.stack(vals)[comp])).double()
        expected = oracle(q, eff_k, eff_v, torch.arange(p, p + n), scale)
        err = (got - expected).abs().max()
        assert err < 2e-4, f"{ktype} after {p} tokens: max error {err:.2e}"


def attention_error(center: bool, ktype: str = "tq3") -> float:
    """One decode step over 200 compressed offset keys: relative error against exact attention."""
    gen = torch.Generator().manual_seed(5)
    H, d = 2, 64
    cfg = CacheConfig(k_type=ktype, v_type="bf16", sinks=0, window=0, block_size=16, center_keys=center)
    cache = PagedCache(cfg, tiny_args(1, H, d), max_seqs=1, max_len=256, dtype=torch.float32, device="cpu")
    offset = 3 * torch.randn(H, d, generator=gen)
    k, v = offset_keys(gen, 200, H, d, offset), torch.randn(200, H, d, generator=gen)
    step(cache, 0, 0, torch.randn(200, H, d, generator=gen), k, v, d ** -0.5)
    q = (k[50:51] - offset) * 2  # a query that singles out a few keys
    kn, vn = offset_keys(gen, 1, H, d, offset), torch.randn(1, H, d, generator=gen)
    got = step(cache, 0, 200, q, kn, vn, d ** -0.5).double()
    exact = oracle(q, torch.cat([k, kn]), torch.cat([v, vn]), torch.tensor([200]), d ** -0.5)
    return float((got - exact).norm() / exact.norm())


def test_centering_shrinks_the_error_of_keys_that_share_an_offset():
    on, off = attention_error(True), attention_error(False)
    assert on < 0.6 * off, (on, off)


def test_auto_by_default_centers_only_the_heads_an_offset_dominates():
    """center_keys="auto": a head whose keys share a large offset (share of energy >= CENTER_AUTO_SHARE,
    as Qwen2's k bias gives) is centered, a head of offset-free keys keeps a zero center."""
    assert CacheConfig().center_keys == "auto" and CacheConfig(center_keys=True).center_keys == "on"
    with pytest.raises(ValueError, match="valid: auto, on, off"):
        CacheConfig(center_keys="sometimes")
    gen = torch.Generator().manual_seed(11)
    H, d, n = 2, 64, 120
    cache = PagedCache(CacheConfig(k_type="tq4", v_type="tq4", sinks=4), tiny_args(1, H, d),
                       max_seqs=1, max_len=256, dtype=torch.float32, device="cpu")
    k = torch.randn(n, H, d, generator=gen)
    k[:, 0] += 8 * torch.randn(d, generator=gen)  # head 0: ~98% of the energy in a shared offset
    q = torch.randn(n, H, d, generator=gen)
    step(cache, 0, 0, q, k, torch.randn(n, H, d, generator=gen), d ** -0.5)
    full = attention_weighted_center(q, k, d ** -0.5, 4).double()  # what "on" would use
    share = full.pow(2).sum(-1) / k[4:].double().pow(2).sum(-1).mean(0)
    assert share[0] > CENTER_AUTO_SHARE > 0.1 > share[1], share
    assert torch.allclose(center_share(k, full.float(), 4).double(), share, rtol=1e-5)
    assert torch.allclose(cache.k_center[0][0].double(), full[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(cache.k_center[0][1], torch.zeros(d))


def test_off_and_for_dense_layers_and_a_short_first_chunk():
    H, d = 2, 64
    off = PagedCache(CacheConfig(k_type="tq4", v_type="tq4", center_keys="off"), tiny_args(2, H, d),
                     max_seqs=1, max_len=64, dtype=torch.float32, device="cpu")
    assert off.k_center == [None, None]
    mixed = PagedCache(CacheConfig(k_type="tq4", v_type="tq4", protected_layers=1, center_keys=True),
                       tiny_args(3, H, d), max_seqs=1, max_len=64, dtype=torch.float32, device="cpu")
    assert [m is None for m in mixed.k_center] == [True, False, True]
    dense_k = PagedCache(CacheConfig(k_type="bf16", v_type="tq4", center_keys=True), tiny_args(1, H, d),
                         max_seqs=1, max_len=64, dtype=torch.float32, device="cpu")
    assert dense_k.k_center == [None]
    short = PagedCache(CacheConfig(k_type="tq4", v_type="tq4", center_keys=True), tiny_args(1, H, d),
                       max_seqs=1, max_len=64, dtype=torch.float32, device="cpu")
    n = 4 + MIN_CENTER_TOKENS - 1  # 4 sinks (the default) + one token too few
    step(short, 0, 0, torch.randn(n, H, d), torch.randn(n, H, d) + 5, torch.randn(n, H, d), 0.1)
    assert short.calibrated[0] and torch.equal(short.k_center[0], torch.zeros(H, d))


def filled_cache(center=True, seed=0, n=70):
    gen = torch.Generator().manual_seed(seed)
    H, d = 2, 64
    cfg = CacheConfig(k_type="tq3.5", v_type="tq3", sinks=2, window=8, block_size=16, center_keys=center)
    cache = PagedCache(cfg, tiny_args(2, H, d), max_seqs=2, max_len=128, dtype=torch.float32, device="cpu")
    offset = 3 * torch.randn(H, d, generator=gen)
    for layer in range(2):
        ctx = StepContext.build(cache, [0], [0], [n], "cpu")
        cache.attend(layer, torch.randn(n, H, d, generator=gen), offset_keys(gen, n, H, d, offset),
                     torch.randn(n, H, d, generator=gen), ctx, d ** -0.5, None)
    cache.set_len(0, n)
    return cache, offset


def next_step(cache, slot, gen_seed=9):
    gen = torch.Generator().manual_seed(gen_seed)
    H, d = 2, 64
    p = cache.lens[slot]
    ctx = StepContext.build(cache, [slot], [p], [1], "cpu")
    outs = [cache.attend(layer, torch.randn(1, H, d, generator=gen), torch.randn(1, H, d, generator=gen) + 3,
                         torch.randn(1, H, d, generator=gen), ctx, d ** -0.5, None) for layer in range(2)]
    cache.set_len(slot, p + 1)
    return torch.stack(outs)


def test_save_load_round_trip_keeps_the_key_center(tmp_path):
    cache, _ = filled_cache()
    tokens = list(range(70))
    save_sequence(cache, 0, tokens, tmp_path / "c.safetensors", {})
    fresh, _ = filled_cache(seed=1, n=20)  # calibrated on other data, but no other sequence is live
    fresh.set_len(0, 0)
    assert load_sequence(fresh, 1, tmp_path / "c.safetensors", {}) == tokens
    for a, b in zip(cache.k_center, fresh.k_center):
        assert torch.equal(a, b)
    assert torch.equal(next_step(cache, 0), next_step(fresh, 1))


def test_a_mismatched_or_missing_key_center_is_refused(tmp_path):
    cache, _ = filled_cache()
    save_sequence(cache, 0, list(range(70)), tmp_path / "c.safetensors", {})
    off, _ = filled_cache(center=False)
    off.set_len(0, 0)
    with pytest.raises(CacheMismatch, match="center_keys: file has 'on', this run has 'off'"):
        load_sequence(off, 0, tmp_path / "c.safetensors", {})
    save_sequence(filled_cache(center=False)[0], 0, list(range(70)), tmp_path / "off.safetensors", {})
    on, _ = filled_cache()
    on.set_len(0, 0)
    with pytest.raises(CacheMismatch, match="center_keys: file has 'off', this run has 'on'"):
        load_sequence(on, 0, tmp_path / "off.safetensors", {})
    # another live sequence centered on another point: refused, and nothing of the cache changed
    busy, _ = filled_cache(seed=3)
    before = [m.clone() for m in busy.k_center]
    with pytest.raises(CacheMismatch, match="centered on another point"):
        load_sequence(busy, 1, tmp_path / "c.safetensors", {})
    assert all(torch.equal(a, b) for a, b in zip(before, busy.k_center))
    # a file without its centers
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = {k: v for k, v in load_file(str(tmp_path / "c.safetensors")).items() if not k.endswith("k_center")}
    header = json.loads(meta["tqinfer"])
    header["checksum"] = payload_checksum(tensors)
    save_file(tensors, str(tmp_path / "nocenter.safetensors"), metadata={"tqinfer": json.dumps(header)})
    on.set_len(0, 0)
    with pytest.raises(CacheFileError, match="lacks its key center"):
        load_sequence(on, 0, tmp_path / "nocenter.safetensors", {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton kernels)")
@pytest.mark.parametrize("ktype,vtype", [("tq3.5", "tq3.5"), ("tq2.5", "tq2.5"), ("tq4", "tq3")])
def test_centered_cache_through_the_kernels_equals_float64_over_what_it_holds(ktype, vtype):
    """On CUDA (prefill and decode kernels, the quantize kernel, the planned decode writes): attention
    == float64 attention over center + the decoded records (read back from the pools) for compressed
    tokens and the exact keys elsewhere, within the kernels' fp16/bf16 rounding."""
    from tqinfer.cache.paged import flat_slots, read_tokens

    gen = torch.Generator().manual_seed(3)
    H, G, d, S, W, dev = 2, 4, 128, 4, 64, "cuda"
    cfg = CacheConfig(k_type=ktype, v_type=vtype, sinks=S, window=W, block_size=64, center_keys=True)
    cache = PagedCache(cfg, tiny_args(1, H, d), max_seqs=1, max_len=1024, dtype=torch.bfloat16, device=dev)
    offset = 3 * torch.randn(H, d, generator=gen)
    keys, vals, scale = [], [], d ** -0.5
    for n in [300, 200] + [1] * 5:
        p = len(keys)
        q = torch.randn(n, H * G, d, generator=gen)
        k = offset_keys(gen, n, H, d, offset)
        v = torch.randn(n, H, d, generator=gen)
        ctx = StepContext.build(cache, [0], [p], [n], dev)
        got = cache.attend(0, q.to(dev, torch.bfloat16), k.to(dev, torch.bfloat16), v.to(dev, torch.bfloat16),
                           ctx, scale, None).double().cpu()
        cache.set_len(0, p + n)
        keys += list(k.bfloat16().float())
        vals += list(v.bfloat16().float())
        center = cache.k_center[0].cpu()
        eff_k, eff_v = torch.stack(keys).double(), torch.stack(vals).double()
        hot = cache.k_hot[0][0].float().cpu()  # [H, S + W, d], centered keys as stored
        comp = torch.arange(S, max(S, p - W))
        if len(comp):
            flat = flat_slots(cache.block_table[0], comp.to(dev), cache.block_size)
            rk = read_tokens(cache.k_pool[0], flat, cache.block_size).cpu()
            rv = read_tokens(cache.v_pool[0], flat, cache.block_size).cpu()
            eff_k[comp] = cache.k_codec[0].reconstruct(rk).double() + center.double()
            eff_v[comp] = cache.v_codec[0].reconstruct(rv).double()
        # the hot keys are stored centered, in bf16
        t_hot = torch.arange(min(S, p))
        if len(t_hot):
            eff_k[t_hot] = hot[:, t_hot].transpose(0, 1).double() + center.double()
        expected = oracle(q.bfloat16().float(), eff_k, eff_v, torch.arange(p, p + n), scale)
        rel = float((got - expected).norm() / expected.norm())
        assert rel < 2e-2, f"{ktype}/{vtype} after {p} tokens: relative error {rel:.2e}"
