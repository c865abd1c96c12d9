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
    build: Callable[..., KVCodec]  # (dim, heads, *, seed, rotation, rope_pairs, name) -> codec
    keys_only: bool = False  # no decodable values (qjl)


def _bf16(d, h, *, name, **_):
    return BF16Codec(d, h, name)


def _q8(d, h, *, name, **_):
    return Q8Codec(d, h, name)


def _q4(d, h, *, name, **_):
    return Q4Codec(d, h, name)


def _mse(bits):
    def build(d, h, *, seed, rotation, name, **_):
        return TurboQuantMSE(d, bits, seed=seed, rotation=rotation, heads=h, name=name)
    return build


def _split(outlier_frac: float, hi: int, lo: int):
    def build(d, h, *, seed, rotation, rope_pairs, name):
        k = int(d * outlier_frac)
        k -= k % 2
        return TurboQuantSplit(d, k, hi, lo, heads=h, seed=seed, rotation=rotation,
                               rope_pairs=rope_pairs, name=name)
    return build


def _prod(bits):
    def build(d, h, *, seed, rotation, name, **_):
        return TurboQuantProd(d, bits, seed=seed, rotation=rotation, sketch=PROD_SKETCH, heads=h, name=name)
    return build


def _qjl(d, h, *, seed, name, **_):
    return QJLCodec(d, h, seed=seed, sketch=PROD_SKETCH, name=name)


def _polar(d, h, *, seed, rotation, name, **_):
    return PolarQuant(d, seed=seed, rotation=rotation, heads=h, name=name)


def _types() -> dict[str, CacheType]:
    t = [
        CacheType("bf16", "dense bf16 (16 bits)", _bf16),
        CacheType("q8", "int8 absmax per vector + fp16 scale", _q8),
        CacheType("q4", "int4 per-32 group, fp16 scale and zero", _q4),
    ]
    t += [CacheType(f"tq{b}", f"TurboQuant-mse, {b}-bit codes + fp16 norm", _mse(b)) for b in (1, 2, 3, 4)]
    t += [
        CacheType("tq2.5", "split: d/2 outlier channels at 3 bits + d/2 at 2 (2.5 code bits)", _split(0.5, 3, 2)),
        CacheType("tq3.5", "split: d/2 outlier channels at 4 bits + d/2 at 3 (3.5 code bits)", _split(0.5, 4, 3)),
        CacheType("tq2.5-paper", "the paper's 2.5 bits: d/4 at 3 + 3d/4 at 2 (2.25 code bits + norms)",
                  _split(0.25, 3, 2)),
        CacheType("tq3.5-paper", "the paper's 3.5 bits: d/4 at 4 + 3d/4 at 3 (3.25 code bits + norms)",
                  _split(0.25, 4, 3)),
    ]
    t += [CacheType(f"tqp{b}", f"TurboQuant-prod, {b - 1}-bit mse codes + 1-bit QJL residual", _prod(b))
          for b in (2, 3, 4)]
    t += [
        CacheType("qjl", "QJL 1-bit key sketch (m = d) + fp16 norm; keys only", _qjl, keys_only=True),
        CacheType("polar", "PolarQuant, 16-blocks, 4/2/2/2-bit angles + fp16 radius (3.875 bits)", _polar),
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
    return cache_type(name).build(dim, heads, seed=seed, rotation=rotation, rope_pairs=rope_pairs, name=name)
