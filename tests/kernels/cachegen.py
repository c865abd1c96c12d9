"""Random paged caches per the layout contract (tqinfer/cache/paged.py) and float64 attention over
what they hold: the oracle of the kernel tests and the filler of scripts/bench_attention.py."""

from __future__ import annotations

import math

import torch

from tqinfer.cache.paged import LayerCacheView
from tqinfer.quant.registry import make_codec

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# small blocks keep the interpreter fast; the GPU runs the production block size (triton 3.6 miscompiled
# some 16-token tiles with 8-bit loads on the H200, 2026-11-29, so kernels are used with BS >= 32)
BS = 16 if DEV == "cpu" else 64


def codec_for(name: str | None, d: int, h: int, seed: int):
    if name in (None, "bf16"):
        return None
    codec = make_codec(name, d, h, seed=seed)
    if getattr(codec, "needs_calibration", False):
        # heavy channels, so the outlier set differs per head and is not the default one
        g = torch.Generator().manual_seed(seed + 7)
        x = torch.randn(64, h, d, generator=g) * (1 + 4 * torch.rand(h, d, generator=g))
        codec.calibrate(x)
    return codec


def build_cache(k_type, v_type, lens, *, heads, d, sinks, window, block_size, dtype, device, seed=0):
    """A LayerCacheView for sequences of `lens` cached tokens (random K/V), plus the full-precision
    K/V of every cached token: (view, [k_b [L, H, d] float64], [v_b ...], decoded-from-record copies)."""
    g = torch.Generator().manual_seed(seed)
    kc, vc = codec_for(k_type, d, heads, seed * 2 + 11), codec_for(v_type, d, heads, seed * 2 + 12)
    dense = kc is None and vc is None
    bs = block_size
    nblk = [max(1, -(-n // bs)) for n in lens]
    total = sum(nblk) + 3
    perm = torch.randperm(total, generator=g)
    table = torch.full((len(lens), max(nblk) + 1), 10**6, dtype=torch.int32)  # garbage past the end
    used = 0
    for b, nb in enumerate(nblk):
        table[b, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb

    def pool(codec):
        if codec is None:
            return torch.full((total, heads, bs, d), float("nan"), dtype=dtype)
        return torch.randint(0, 256, (total, heads, bs, codec.record_bytes), generator=g, dtype=torch.uint8)

    k_pool, v_pool = pool(kc), pool(vc)
    hot = sinks + window
    k_hot = torch.full((len(lens) + 1, heads, max(hot, 1), d), float("nan"), dtype=dtype)
    v_hot = k_hot.clone()
    seq_slot = torch.randperm(len(lens) + 1, generator=g)[: len(lens)].to(torch.int32)
    ks, vs, kd, vd = [], [], [], []
    for b, n in enumerate(lens):
        k = (torch.randn(n, heads, d, generator=g) * 2).to(dtype)
        v = torch.randn(n, heads, d, generator=g).to(dtype)
        k_eff, v_eff = k.double().clone(), v.double().clone()
        t = torch.arange(n)
        if dense:
            comp = torch.ones(n, dtype=torch.bool)
        else:
            c_end = n - window if window > 0 else n
            comp = (t >= sinks) & (t < c_end)
        if comp.any():
            tc = t[comp]
            blk, off = table[b, tc // bs].long(), tc % bs
            for codec, x, pl, eff in ((kc, k, k_pool, k_eff), (vc, v, v_pool, v_eff)):
                if codec is None:
                    pl[blk, :, off] = x[comp]
                else:
                    rec = codec.encode(x[comp].float())
                    pl[blk, :, off] = rec
                    # QJL-carrying types: the unbiased estimate (keys' scores and values alike)
                    est = codec.reconstruct(rec)
                    eff[comp] = est.double()
        if not dense:
            th = t[~comp]
            slot = torch.where(th < sinks, th, sinks + (th - sinks) % max(window, 1))
            k_hot[seq_slot[b], :, slot] = k[~comp].transpose(0, 1)
            v_hot[seq_slot[b], :, slot] = v[~comp].transpose(0, 1)
        ks.append(k)
        vs.append(v)
        kd.append(k_eff)
        vd.append(v_eff)
    view = LayerCacheView(
        k_pool.to(device), v_pool.to(device), None if dense else k_hot.to(device),
        None if dense else v_hot.to(device), table.to(device), seq_slot.to(device),
        0 if dense else sinks, 0 if dense else window, bs, kc, vc)
    return view, kd, vd


def attention64(q, k, v, cu_q, lens, kd, vd, scale):
    """float64 attention: each chunk attends to its sequence's cached tokens (as their records decode)
    and causally to itself."""
    t, hq, d = q.shape
    h = k.shape[1]
    gsz = hq // h
    out = torch.empty(t, hq, d, dtype=torch.float64)
    cu = cu_q.tolist()
    for b, (s0, s1) in enumerate(zip(cu[:-1], cu[1:])):
        n = s1 - s0
        keys = torch.cat([kd[b], k[s0:s1].double().cpu()])  # [L + n, H, d]
        vals = torch.cat([vd[b], v[s0:s1].double().cpu()])
        keys = keys.repeat_interleave(gsz, dim=1)
        vals = vals.repeat_interleave(gsz, dim=1)
        qq = q[s0:s1].double().cpu()
        s = torch.einsum("qhd,khd->hqk", qq, keys) * scale
        L = lens[b]
        mask = torch.arange(L + n)[None, :] <= (L + torch.arange(n))[:, None]
        s = s.masked_fill(~mask[None], float("-inf"))
        out[s0:s1] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vals)
    return out


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())
