"""The paged compressed cache and the torch twin of attention over codes, against float64 oracles."""

from __future__ import annotations

import random

import pytest
import torch

from tqinfer.cache.config import CacheConfig, bytes_per_token, fixed_bytes
from tqinfer.cache.paged import PagedCache, flat_slots, read_tokens
from tqinfer.engine.context import StepContext
from tqinfer.errors import CacheMemoryError
from tqinfer.quant.registry import codec_names

from .oracles import oracle, tiny_args

TYPES = [t for t in codec_names() if t != "bf16"]


@pytest.mark.parametrize("ktype,vtype", [(t, t if t != "qjl" else "tq3") for t in TYPES] + [("tq4", "tq2"), ("tq2", "bf16")])
def test_attention_over_codes_equals_float64_oracle(ktype, vtype):
    torch.manual_seed(0)
    H, G, d, S, W = 2, 3, 64, 3, 8
    cfg = CacheConfig(k_type=ktype, v_type=vtype, sinks=S, window=W, block_size=16)
    cache = PagedCache(cfg, tiny_args(1, H, d), max_seqs=3, max_len=128, dtype=torch.float32, device="cpu")
    lens = {0: [20, 1, 1, 17], 2: [5, 40, 1]}  # ragged chunk schedules for two sequences
    hist = {s: ([], []) for s in lens}
    kc, vc = cache.k_codec[0], cache.v_codec[0]
    steps = max(len(v) for v in lens.values())
    scale = d ** -0.5
    for step in range(steps):
        slots = [s for s in lens if step < len(lens[s])]
        chunks = [lens[s][step] for s in slots]
        prefix = [len(hist[s][0]) for s in slots]
        T = sum(chunks)
        q = torch.randn(T, H * G, d)
        k = torch.randn(T, H, d) * 3
        v = torch.randn(T, H, d)
        ctx = StepContext.build(cache, slots, prefix, chunks, "cpu")
        out = cache.attend(0, q, k, v, ctx, scale, None)
        for s, n in zip(slots, chunks):
            cache.set_len(s, cache.lens[s] + n)
        start = 0
        for s, p, n in zip(slots, prefix, chunks):
            hk, hv = hist[s]
            hk += list(k[start:start + n]); hv += list(v[start:start + n])
            keys, vals = torch.stack(hk), torch.stack(hv)
            # tokens in [S, p - W) were compressed from their exact values before this chunk
            eff_k, eff_v = keys.clone(), vals.clone()
            comp = torch.arange(S, max(S, p - W))
            if len(comp):
                mean = cache.k_center[0] if cache.k_center[0] is not None else 0  # key centering
                recs_k = kc.encode(keys[comp] - mean); recs_v = vc.encode(vals[comp]) if vc else None
                eff_k[comp] = kc.reconstruct(recs_k) + mean
                if vc is not None:
                    eff_v[comp] = vc.reconstruct(recs_v)
            expected = oracle(q[start:start + n], eff_k, eff_v, torch.arange(p, p + n), scale)
            got = out[start:start + n].double()
            assert torch.isfinite(got).all()
            err = (got - expected).abs().max()
            assert err < 2e-4, f"{ktype}/{vtype} step {step}: max error {err:.2e}"
            start += n


def attention_error(ktype: str, vtype: str) -> float:
    """Relative error of one decode step over 256 compressed tokens against exact attention."""
    torch.manual_seed(1)
    H, d = 2, 128
    cfg = CacheConfig(k_type=ktype, v_type=vtype, sinks=0, window=0, block_size=16)
    cache = PagedCache(cfg, tiny_args(1, H, d), max_seqs=1, max_len=300, dtype=torch.float32, device="cpu")
    k, v = torch.randn(256, H, d), torch.randn(256, H, d)
    ctx = StepContext.build(cache, [0], [0], [256], "cpu")
    cache.attend(0, torch.randn(256, H, d), k, v, ctx, d ** -0.5, None)
    cache.set_len(0, 256)
    q = k[100:101] * 1.5  # a query that singles out a few keys, as real attention does
    ctx = StepContext.build(cache, [0], [256], [1], "cpu")
    kn, vn = torch.randn(1, H, d), torch.randn(1, H, d)
    got = cache.attend(0, q, kn, vn, ctx, d ** -0.5, None).double()
    exact = oracle(q, torch.cat([k, kn]), torch.cat([v, vn]), torch.tensor([256]), d ** -0.5)
    return float((got - exact).norm() / exact.norm())


def test_compressed_close_to_full_precision_and_better_with_more_bits():
    errors = {b: attention_error(f"tq{b}", f"tq{b}") for b in (2, 3, 4)}
    assert errors[4] < errors[3] < errors[2], errors
    # values dominate here: sqrt(D_mse) per unit vector is 0.10 at 4 bits, 0.18 at 3, 0.34 at 2
    assert errors[4] < 0.2, errors


def test_blocks_allocated_and_freed_in_random_order_leak_nothing():
    cfg = CacheConfig(k_type="tq3", v_type="tq3", block_size=16)
    cache = PagedCache(cfg, tiny_args(), max_seqs=4, max_len=100, dtype=torch.float32, device="cpu")
    total = cache.num_blocks
    rng = random.Random(0)
    for _ in range(300):
        slot = rng.randrange(4)
        op = rng.random()
        if op < 0.5:
            n = min(100, cache.lens[slot] + rng.randrange(1, 30))
            cache.reserve(slot, n)
            cache.set_len(slot, n)
        elif op < 0.8:
            cache.truncate(slot, rng.randrange(0, cache.lens[slot] + 1))
        else:
            cache.set_len(slot, 0)
        used = sum(len(t) for t in cache.tables)
        assert used + len(cache.free_blocks) == total
        assert len(set(cache.free_blocks)) == len(cache.free_blocks)
        for s in range(4):
            assert len(cache.tables[s]) == -(-cache.lens[s] // 16)


def test_allocated_bytes_equal_the_estimate():
    args = tiny_args(layers=3, kv_heads=2, head_dim=64)
    cfg = CacheConfig(k_type="tq3.5", v_type="tq2", sinks=4, window=16, protected_layers=1, block_size=16)
    cache = PagedCache(cfg, args, max_seqs=2, max_len=64, dtype=torch.bfloat16, device="cpu")
    # the blocks the sequences can have, plus one scratch block that decode steps' no-op writes go to
    expected = (cache.num_blocks + 1) * 16 * bytes_per_token(args, cfg) + 2 * fixed_bytes(args, cfg)
    assert cache.nbytes() == expected
    # layers 0 and 2 protected (bf16 K and V); layer 1: tq3.5 K at d=64 (32 channels at 4 bits = 16
    # bytes + 32 at 3 bits = 12 bytes + two fp16 norms = 32) and tq2 V (16 bytes + fp16 norm = 18)
    assert bytes_per_token(args, cfg) == 2 * (2 * 64 * 2 * 2) + 2 * (32 + 18)


def test_context_that_cannot_fit_is_refused_before_allocation():
    args = tiny_args(layers=32, kv_heads=8, head_dim=128)
    cfg = CacheConfig(k_type="tq4", v_type="tq4")
    with pytest.raises(CacheMemoryError, match=r"needs [\d.]+ MiB but only [\d.]+ MiB is free"):
        PagedCache(cfg, args, max_seqs=1, max_len=1 << 40, dtype=torch.bfloat16, device="cpu")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("sinks,window,protected,v_type", [(4, 8, 0, "tq4"), (2, 16, 1, "tq4"), (0, 0, 0, "tq4"),
                                                            (2, 16, 0, "tq3.5")])
def test_planned_decode_writes_equal_the_generic_path(sinks, window, protected, v_type, device):
    """A decode step's device-side write plan (what a CUDA graph replays: every layer's window exits
    written at the step's start, the new token into its hot row after the layer's attention) leaves
    the cache exactly as the host-indexed generic write does, through window exits, a rollback and
    ragged batches: cache `planned` takes every decode step through its plan, cache `generic` through
    the generic path. On CUDA through the kernels (one launch for the layers of one type)."""
    torch.manual_seed(1)
    H, G, d = 2, 2, 64
    cfg = CacheConfig(k_type="tq3.5", v_type=v_type, sinks=sinks, window=window, protected_layers=protected,
                      block_size=16)
    args = tiny_args(3 if protected or v_type == "tq3.5" else 1, H, d)
    planned, generic = (PagedCache(cfg, args, max_seqs=3, max_len=160, dtype=torch.float32, device=device)
                        for _ in range(2))
    planned.write_ahead = generic.write_ahead = 1  # as on CUDA, where the plan serves decode steps
    layers = args.num_hidden_layers

    def step(slots, chunks, seed):
        gen = torch.Generator().manual_seed(seed)
        T = sum(chunks)
        q, k, v = (torch.randn(T, heads, d, generator=gen).to(device) for heads in (H * G, H, H))
        outs = []
        for cache in (planned, generic):
            prefix = [cache.lens[s] for s in slots]
            ctx = StepContext.build(cache, slots, prefix, chunks, device)
            if cache is generic:
                ctx.plan = None
            outs.append([cache.attend(layer, q, k, v, ctx, d ** -0.5, None) for layer in range(layers)])
            for s, n in zip(slots, chunks):
                cache.set_len(s, cache.lens[s] + n)
        return outs

    step([0, 1, 2], [30, 3, 17], seed=0)  # prefill (both generic)
    schedule = [[0, 1, 2]] * 20 + [[0, 2]] * 10 + ["truncate"] + [[0, 1, 2]] * 12
    for i, slots in enumerate(schedule):
        if slots == "truncate":
            for cache in (planned, generic):
                cache.truncate(0, cache.lens[0] - 11)
            continue
        got, want = step(slots, [1] * len(slots), seed=i + 1)
        for a, b in zip(got, want):
            assert not torch.isnan(a).any()
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert planned.lens == generic.lens and planned.compressed == generic.compressed
    nb = planned.num_blocks  # the scratch block after them takes the plan's no-op writes
    for layer in range(layers):
        for a, b in ((planned.k_pool, generic.k_pool), (planned.v_pool, generic.v_pool)):
            assert torch.equal(a[layer][:nb], b[layer][:nb])
        for a, b in ((planned.k_hot, generic.k_hot), (planned.v_hot, generic.v_hot)):
            if a[layer] is not None:
                assert torch.equal(a[layer], b[layer])


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_a_decode_step_that_calibrates_writes_its_records_after(device):
    """A split type's first step being a decode step whose token leaves the window (a cache filled
    without a prefill, as scripts/bench_e2e.py fills one): each layer calibrates in its own attention,
    so the planned step writes that layer's records after it (not all layers' at the step's start,
    with the outlier channels of before): pools, hot rows and outputs equal the generic path's (on
    CUDA through the kernels)."""
    torch.manual_seed(3)
    H, G, d, S, W, n = 2, 2, 64, 2, 16, 40
    cfg = CacheConfig(k_type="tq3.5", v_type="tq3.5", sinks=S, window=W, block_size=16)
    args = tiny_args(3, H, d)
    caches = [PagedCache(cfg, args, max_seqs=2, max_len=96, dtype=torch.float32, device=device) for _ in range(2)]
    planned, generic = caches
    for cache in caches:
        cache.write_ahead = 1
        for slot in (0, 1):
            cache.reserve(slot, n)
            cache.compressed[slot] = n - W
            cache.set_len(slot, n)
    for layer in range(3):  # the same random hot rows in both (records: zero vectors)
        for name in ("k_hot", "v_hot"):
            x = getattr(planned, name)[layer]
            x.copy_(torch.randn(x.shape) * 2)  # (CPU generator, copied to the device)
            getattr(generic, name)[layer].copy_(x)
    for step in range(3):
        q, k, v = (torch.randn(2, heads, d).to(device) for heads in (H * G, H, H))
        outs = []
        for cache in caches:
            ctx = StepContext.build(cache, [0, 1], [cache.lens[0], cache.lens[1]], [1, 1], device)
            if cache is generic:
                ctx.plan = None
            outs.append([cache.attend(layer, q, k, v, ctx, d ** -0.5, None) for layer in range(3)])
            for slot in (0, 1):
                cache.set_len(slot, cache.lens[slot] + 1)
        assert planned.retired == (step > 0)  # all layers at the start once they are calibrated
        for a, b in zip(*outs):
            assert not torch.isnan(a).any()
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    nb = planned.num_blocks
    assert planned.k_pool[2][:nb].any()  # records were written
    for layer in range(3):
        for name in ("k_pool", "v_pool"):
            assert torch.equal(getattr(planned, name)[layer][:nb], getattr(generic, name)[layer][:nb])
        for name in ("k_hot", "v_hot"):
            assert torch.equal(getattr(planned, name)[layer], getattr(generic, name)[layer])


@pytest.mark.parametrize("sinks,window", [(4, 8), (0, 16)])
def test_records_written_ahead_change_nothing_attention_reads(sinks, window):
    """Window exits written in batches (the CPU's write_ahead) give bit-identical attention to one
    record per exit, through chunked prefill, decode steps, a rollback and a ragged batch; the
    records every token outside the window reads are the same bytes."""
    torch.manual_seed(2)
    H, G, d = 2, 2, 64
    cfg = CacheConfig(k_type="tq3.5", v_type="tq3", sinks=sinks, window=window, block_size=16)
    args = tiny_args(2, H, d)
    ahead, single = (PagedCache(cfg, args, max_seqs=2, max_len=200, dtype=torch.float32, device="cpu")
                     for _ in range(2))
    ahead.write_ahead, single.write_ahead = 32, 1
    schedule = [([0, 1], [40, 5]), ([0], [9])] + [([0, 1], [1, 1])] * 45 + ["truncate"] + [([0, 1], [1, 1])] * 20
    for i, step in enumerate(schedule):
        if step == "truncate":
            for cache in (ahead, single):
                cache.truncate(0, cache.lens[0] - 13)
            continue
        slots, chunks = step
        gen = torch.Generator().manual_seed(i)
        T = sum(chunks)
        q, k, v = (torch.randn(T, heads, d, generator=gen) for heads in (H * G, H, H))
        outs = []
        for cache in (ahead, single):
            ctx = StepContext.build(cache, slots, [cache.lens[s] for s in slots], chunks, "cpu")
            outs.append([cache.attend(layer, q, k, v, ctx, d ** -0.5, None) for layer in range(2)])
            for s, n in zip(slots, chunks):
                cache.set_len(s, cache.lens[s] + n)
        for a, b in zip(*outs):
            assert not torch.isnan(a).any()
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ahead.lens == single.lens
    assert all(a >= b for a, b in zip(ahead.compressed, single.compressed))
    assert ahead.compressed != single.compressed  # records were written ahead
    for slot in (0, 1):
        n = single.lens[slot] - window  # tokens outside the window: attention reads their records
        t = torch.arange(sinks, n)
        for layer in range(2):
            for pa, pb in ((ahead.k_pool, single.k_pool), (ahead.v_pool, single.v_pool)):
                fa = flat_slots(ahead.block_table[slot], t, 16)
                fb = flat_slots(single.block_table[slot], t, 16)
                assert torch.equal(read_tokens(pa[layer], fa, 16), read_tokens(pb[layer], fb, 16))
