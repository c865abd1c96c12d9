"""The one registry of KV cache types: a name the cache, CLI and quality tables use -> its codec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .base import KVCodec
from .baselines import BF16Codec, Q4Codec, Q8Codec
from .polarquant import PolarQuant
from .qjl import QJLCodec
from .turboquant import TurboQuantMSE, TurboQuantProd, TurboQuantSplit

# QJL matrix of tqp* and qjl: row-orthogonalised measured ~2.8x lower D_prod than Gaussian at every b
# (docs/QUALITY.md, "Codec distortion"), at the same cost.
PROD_SKETCH = "orthogonal"


@dataclass(frozen=True)
class CacheType:
    name: str
    summary: str
    build: Callable[..., KVCodec]  # (dim, heads, seed, rotation, rope_pairs) -> codec
    keys_only: bool = False  # no decodable values (qjl)


def _split(outlier_frac: float, hi: int, lo: int):
    def build(dim, heads, seed, rotation, rope_pairs, name):
        k = int(dim * outlier_frac)
        k -= k % 2
        return TurboQuantSplit(dim, k, hi, lo, heads=heads, seed=seed, rotation=rotation,
                               rope_pairs=rope_pairs, name=name)
    return build


def _types() -> dict[str, CacheType]:
    t = [
        CacheType("bf16", "dense bf16 (16 bits)", lambda d, h, s, r, p, n: BF16Codec(d, h, n)),
        CacheType("q8", "int8 absmax per vector + fp16 scale", lambda d, h, s, r, p, n: Q8Codec(d, h, n)),
        CacheType("q4", "int4 per-32 group, fp16 scale and zero", lambda d, h, s, r, p, n: Q4Codec(d, h, n)),
    ]
    for b in (1, 2, 3, 4):
        t.append(CacheType(f"tq{b}", f"TurboQuant-mse, {b}-bit codes + fp16 norm",
                           lambda d, h, s, r, p, n, b=b: TurboQuantMSE(d, b, seed=s, rotation=r, heads=h, name=n)))
    t += [
        CacheType("tq2.5", "split: d/2 outlier channels at 3 bits + d/2 at 2 (2.5 code bits)", _split(0.5, 3, 2)),
        CacheType("tq3.5", "split: d/2 outlier channels at 4 bits + d/2 at 3 (3.5 code bits)", _split(0.5, 4, 3)),
        CacheType("tq2.5-paper", "the paper's '2.5 bit': d/4 at 3 bits + 3d/4 at 2 (2.25 code bits)", _split(0.25, 3, 2)),
        CacheType("tq3.5-paper", "the paper's '3.5 bit': d/4 at 4 bits + 3d/4 at 3 (3.25 code bits)", _split(0.25, 4, 3)),
    ]
    for b in (2, 3, 4):
        t.append(CacheType(f"tqp{b}", f"TurboQuant-prod, {b - 1}-bit mse codes + 1-bit QJL residual",
                           lambda d, h, s, r, p, n, b=b: TurboQuantProd(
                               d, b, seed=s, rotation=r, sketch=PROD_SKETCH, heads=h, name=n)))
    t += [
        CacheType("qjl", "QJL 1-bit key sketch (m = d) + fp16 norm; keys only",
                  lambda d, h, s, r, p, n: QJLCodec(d, h, seed=s, sketch=PROD_SKETCH, name=n), keys_only=True),
        CacheType("polar", "PolarQuant, 16-blocks, 4/2/2/2-bit angles + fp16 radius (3.875 bits)",
                  lambda d, h, s, r, p, n: PolarQuant(d, seed=s, rotation=r, heads=h, name=n)),
    ]
    return {c.name: c for c in t}


CACHE_TYPES = _types()


def codec_names() -> list[str]:
    """Every cache type name, in registry order."""
    return list(CACHE_TYPES)


def cache_type(name: str) -> CacheType:
    if name not in CACHE_TYPES:
        raise ValueError(f"unknown KV cache type {name!r}; valid types: {', '.join(CACHE_TYPES)}")
    return CACHE_TYPES[name]


def make_codec(name: str, dim: int, heads: int, *, seed: int, rotation: str = "hadamard",
               rope_pairs: bool = True) -> KVCodec:
    """Build one layer's K or V codec. `seed` fixes every random choice (give K and V and each layer
    their own); `rope_pairs` makes split types pick outlier channels in RoPE pairs (i, i + d/2)."""
    return cache_type(name).build(dim, heads, seed, rotation, rope_pairs, name)
