"""Perplexity through the compressed cache with a transform of the keys at the cache boundary: the
experiments behind docs/QUALITY.md, "Key smoothing and key centering, measured". Of these, only
pcenter is in the cache (CacheConfig.center_keys, off by default: it helps tq2.5 and hurts tq3..tq4 on
average over rotation seeds); run this harness with the cache's own centering off (the default).

    SM=pcenter OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/eval_key_transforms.py ppl --tokens 4096 \
        --seeds 0 1 2 --specs bf16 tq4 tq3

takes the arguments of scripts/eval_quality.py; SM picks the transform, chosen per layer and KV head
from the first prefill chunk (as the split types' outlier sets are) and applied to every key the layer
stores or attends to (hot, compressed, the chunk's own), so attention over exact keys is unchanged:
- none: as the cache is.
- k:A: SmoothQuant/KIVI-style smoothing: k' = k / s, q' = q * s, s = rms(k)^A per channel (equal
  within RoPE pairs (i, i + d/2), normalised to mean square 1). q'.k' == q.k.
- kq:A: the same with s = (rms(k) / rms(q))^A (A = 0.5 minimises E||s q||^2 E||k / s||^2, the
  score error of a codec whose error is isotropic in the rotated space).
- center: k' = k - mean(k). Every score of a query moves by the same q.mean, which softmax ignores.
- pcenter: k' = k - c, c the keys' mean weighted by the attention each gets from the chunk's queries
  (causal, sinks left out): the keys attention picks are far from the plain mean.
- slowX: center only the RoPE pairs that turn less than X rad over the cache's context (the post-RoPE
  mean of a fast pair rotates away from the first chunk's mean at later positions).
- matched, pmatched, mslowX: as center, pcenter, slowX, but the exact keys (sinks, window, chunk)
  are stored relative to (1 - D) c while records encode k - c (D per channel: the codec's MSE
  shrinkage, E[x_hat] = (1 - D) x), so compressed scores keep the plain codec's expected bias
  relative to the exact ones and only their variance changes. Mean-square-error types only.
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import torch

import tqinfer.kernels.dispatch as dispatch
from tqinfer.cache.paged import PagedCache
from tqinfer.quant.codebook import codebook_mse
from tqinfer.quant.turboquant import TurboQuantMSE, TurboQuantSplit

MODE = os.environ.get("SM", "none")
_attend, _write_tokens = PagedCache.attend, dispatch.write_tokens
_record_shift: dict[int, torch.Tensor] = {}  # id(K codec) -> D * c, taken off before encoding


def pair_ms(x: torch.Tensor) -> torch.Tensor:
    """Mean square per channel over tokens, averaged within RoPE pairs: [N, H, d] -> [H, d]."""
    e = x.double().pow(2).mean(0)
    h = e.shape[-1] // 2
    p = (e[:, :h] + e[:, h:]) / 2
    return torch.cat([p, p], -1)


def shrink(codec) -> torch.Tensor:
    """D [H, d]: E[decode(encode(x))] = (1 - D) x per channel for the mean-square-error codecs."""
    H, d = codec.heads, codec.dim
    if type(codec) is TurboQuantMSE:
        return torch.full((H, d), codebook_mse(codec.bits, d) * d)
    if type(codec) is TurboQuantSplit:
        out = torch.full((H, d), codebook_mse(codec.b.bits, codec.b.dim) * codec.b.dim)
        return out.scatter_(1, codec.perm[:, :codec.outliers], codebook_mse(codec.a.bits, codec.a.dim) * codec.a.dim)
    raise NotImplementedError(f"{codec.name}: matched centering is for the mse types")


def transform(self, layer, q, k, v, ctx, scale):
    """(c [H, d], s [H, d]) of the layer: keys stored as (k - c) / s, queries as q * s."""
    T, Hq, d = q.shape
    H = k.shape[1]
    G = Hq // H
    kf = k.float()
    c, s = torch.zeros(H, d), torch.ones(H, d)
    kind, _, arg = MODE.partition(":")
    if kind in ("center", "matched"):
        c = kf.mean(0)
    elif kind in ("pcenter", "pmatched"):
        qg = q.float().view(T, H, G, d)
        sc = torch.einsum("nhgd,mhd->hgnm", qg, kf) * scale
        sc = sc.masked_fill(torch.arange(T)[:, None] < torch.arange(T)[None, :], float("-inf"))
        w = torch.softmax(sc, -1).sum((1, 2))
        w[:, :self.sinks] = 0
        c = torch.einsum("hm,mhd->hd", w, kf) / w.sum(-1, keepdim=True)
    elif kind.startswith(("slow", "mslow")):
        limit = float(kind.removeprefix("m").removeprefix("slow") or 1)
        inv = 1.0 / (self.args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        slow = inv * self.max_len < limit
        c = kf.mean(0) * torch.cat([slow, slow])
    elif kind in ("k", "kq"):
        qf = q.float().view(T, H, G, d).transpose(1, 2).reshape(T * G, H, d)
        ratio = pair_ms(kf).sqrt() if kind == "k" else pair_ms(kf).sqrt() / pair_ms(qf).sqrt()
        s = ratio.pow(float(arg)).float()
        s = s / s.pow(2).mean(-1, keepdim=True).sqrt()
    else:
        raise SystemExit(f"unknown SM={MODE!r}")
    if kind in ("matched", "pmatched") or kind.startswith("mslow"):
        self._calibrate(layer, q, (kf - c).to(k.dtype), v, ctx, scale)  # split outlier sets on what records hold
        d_ch = shrink(self.k_codec[layer])
        _record_shift[id(self.k_codec[layer])] = d_ch * c
        c = (1 - d_ch) * c
    return c, s


def attend(self, layer, q, k, v, ctx, scale, window):
    if self.k_codec[layer] is None or MODE == "none":
        return _attend(self, layer, q, k, v, ctx, scale, window)
    state = self.__dict__.setdefault("_key_transform", {})
    if layer not in state:
        state[layer] = transform(self, layer, q, k, v, ctx, scale)
    c, s = state[layer]
    T, Hq, d = q.shape
    H = k.shape[1]
    k2 = ((k.float() - c) / s).to(k.dtype)
    q2 = (q.float().view(T, H, Hq // H, d) * s[None, :, None, :]).view(T, Hq, d).to(q.dtype)
    return _attend(self, layer, q2, k2, v, ctx, scale, window)


def write_tokens(codec, x, pool, slots):
    shift = _record_shift.get(id(codec))
    return _write_tokens(codec, x if shift is None else x - shift, pool, slots)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    PagedCache.attend, dispatch.write_tokens = attend, write_tokens
    print(f"<!-- key transform SM={MODE} -->")
    runpy.run_path(str(Path(__file__).with_name("eval_quality.py")), run_name="__main__")
