"""Perplexity through the compressed cache with an encode-side variant of the plain TurboQuant-mse
codec (tq3, tq4): the experiments behind docs/QUALITY.md, "Rotation choice, codebook fit, record
bias and query-aware rounding" (issue 4). Every variant is decided per layer from the first prefill
chunk (as the split types' outlier sets are), changes only what a record encodes or which rotation a layer uses,
and keeps the bits per token and the kernels' decode.

    CV=kcm OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/eval_codec_variants.py ppl --tokens 4096 \
        --seeds 0 1 2 --specs tq4 tq3

takes the arguments of scripts/eval_quality.py; CV picks the variant:
- none: as the cache is (with query-aware rounding, CacheConfig.query_aware, on: the default).
- plain: query-aware rounding off (nearest-centroid codes, the cache before it).
- rot:N: per layer and K|V, N candidate rotations (candidate 0 is the cache's own); keep the one
  whose records have the lowest relative MSE on the chunk's tokens past the sinks.
- kcm / vcm / kvcm: the codec returns (1 - D) x on average over rotations (D = its per-vector MSE),
  so every compressed key is pulled toward zero along the keys' common mean mu, while the exact
  sinks and window are not: records encode k + D / (1 - D) mu (mu per KV head, the chunk's mean past
  the sinks), which removes that common-mode shrinkage. vcm: the same for values; kvcm: both.
- fp[:I]: records encode k + delta, delta per KV head from I fixed-point steps
  delta <- delta - mean(decode(encode(k + delta)) - k) over the chunk's keys past the sinks (the
  mean record error of this rotation, not only its expectation, driven to zero on the chunk).
- fpkv[:I]: the same for keys and values.
- qa[:L]: query-aware rounding of the keys. The score error of a key is q . e, so what matters is
  e^T E[q q^T] e, not ||e||^2. H = E[q q^T] per KV head from the chunk's queries (the heads of its
  group pooled), reduced to its RoPE-pair diagonal (each pair's mean energy on both channels: a
  pair's energy does not change with the position, its cross terms do), rotated into the codec's
  space, plus L * mean(diag) * I (default L = 0.01); codes are chosen coordinate by coordinate with
  the GPTQ/OBQ error feedback under H (same codebook, rotation and norm; only the choice of the
  codes changes), which trades a larger ||e||^2 for a smaller query-weighted error.
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import torch

import tqinfer.kernels.dispatch as dispatch
from tqinfer.cache.paged import PagedCache, codec_seed
from tqinfer.quant.codebook import codebook_mse
from tqinfer.quant.packing import pack
from tqinfer.quant.records import assemble, fp16_bytes, pad_to
from tqinfer.quant.turboquant import TurboQuantMSE

MODE = os.environ.get("CV", "none")
_attend, _write_tokens = PagedCache.attend, dispatch.write_tokens


def roundtrip(codec, x: torch.Tensor) -> torch.Tensor:
    return codec.decode(codec.encode(x)).float()


def rel_mse(codec, x: torch.Tensor) -> float:
    return float((roundtrip(codec, x) - x).pow(2).sum() / x.pow(2).sum())


def query_hessian(q: torch.Tensor, heads: int, lam: float) -> torch.Tensor:
    """q [T, Hq, d] -> float64 [H, d, d]: per KV head the RoPE-pair-diagonal of E[q q^T] + ridge."""
    T, Hq, d = q.shape
    e = q.double().view(T, heads, Hq // heads, d).pow(2).mean((0, 2))  # [H, d]
    h = d // 2
    pair = (e[:, :h] + e[:, h:]) / 2
    diag = torch.cat([pair, pair], -1)
    return torch.diag_embed(diag + lam * diag.mean(-1, keepdim=True))


def qa_encode(codec, hess: torch.Tensor):
    """An encode for a TurboQuantMSE that picks codes by error feedback under H [H, d, d]."""
    P = codec.rot.matrix64
    U = torch.linalg.cholesky(torch.linalg.inv(P @ hess @ P.T), upper=True)  # [H, d, d]

    def encode(x: torch.Tensor) -> torch.Tensor:
        n = torch.linalg.vector_norm(x.double(), dim=-1)
        y = (x.double() / n.clamp_min(1e-30).unsqueeze(-1)) @ P.T  # [N, H, d]
        c, b = codec.centroids64, codec.boundaries64
        u = U.to(x.device)
        idx = torch.empty(y.shape, dtype=torch.uint8, device=x.device)
        for j in range(codec.dim):
            ij = torch.bucketize(y[..., j], b.to(x.device))
            idx[..., j] = ij.to(torch.uint8)
            err = (y[..., j] - c.to(x.device)[ij]) / u[:, j, j]
            y[..., j + 1:] -= err.unsqueeze(-1) * u[:, j, j + 1:]
        codes = pack(idx, codec.bits)
        return assemble([pad_to(codes, codec.norm_at), fp16_bytes(n.half().unsqueeze(-1))], codec.record_bytes)

    return encode


def calibrate(self, layer, q, k, v, n):
    kind, _, arg = MODE.partition(":")
    S = self.sinks
    for which, x in (("k", k[S:n].float()), ("v", v[S:n].float())):
        codecs = self.k_codec if which == "k" else self.v_codec
        codec = codecs[layer]
        if type(codec) is not TurboQuantMSE or x.shape[0] < 16:
            continue
        D = codebook_mse(codec.bits, codec.dim) * codec.dim
        if kind == "rot":
            seed = codec_seed(self.config.seed, layer, which)
            cands = [codec] + [TurboQuantMSE(codec.dim, codec.bits, seed=seed + 7919 * j, heads=codec.heads,
                                             name=codec.name) for j in range(1, int(arg))]
            errs = [rel_mse(c, x) for c in cands]
            codecs[layer] = cands[min(range(len(cands)), key=errs.__getitem__)]
        elif kind in ("kcm", "vcm", "kvcm") and which in kind.removesuffix("cm"):
            codec.cv_shift = D / (1 - D) * x.mean(0)  # what its records add before encoding
        elif kind in ("fp", "fpkv") and (which == "k" or kind == "fpkv"):
            delta = torch.zeros_like(x[0])
            for _ in range(int(arg or 4)):
                delta = delta - (roundtrip(codec, x + delta) - x).mean(0)
            codec.cv_shift = delta
        elif kind == "qa" and which == "k":
            codec.encode = qa_encode(codec, query_hessian(q[:n], codec.heads, float(arg or 0.01)))
        elif kind not in ("none", "plain", "rot", "kcm", "vcm", "kvcm", "fp", "fpkv", "qa"):
            raise SystemExit(f"unknown CV={MODE!r}")


def attend(self, layer, q, k, v, ctx, scale, window):
    if MODE != "none":  # every variant but none starts from the nearest-centroid codec
        self.config.query_aware = False
    if not self.calibrated[layer] and self.k_codec[layer] is not None and not ctx.decode:
        calibrate(self, layer, q, k, v, ctx.chunk_lens[0])
    return _attend(self, layer, q, k, v, ctx, scale, window)


def write_tokens(codec, x, pool, slots):
    shift = getattr(codec, "cv_shift", None)
    return _write_tokens(codec, x if shift is None else (x.float() + shift).to(x.dtype), pool, slots)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    PagedCache.attend, dispatch.write_tokens = attend, write_tokens
    print(f"<!-- codec variant CV={MODE} -->")
    runpy.run_path(str(Path(__file__).with_name("eval_quality.py")), run_name="__main__")
