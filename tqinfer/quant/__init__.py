"""KV cache codecs: TurboQuant (mse, prod, split), QJL, PolarQuant and baselines, behind one registry."""

from .base import KVCodec, reference_scores
from .registry import CACHE_TYPES, cache_type, codec_names, make_codec

__all__ = ["KVCodec", "reference_scores", "CACHE_TYPES", "cache_type", "codec_names", "make_codec"]
