"""tqinfer: local LLM inference with a TurboQuant-compressed KV cache."""

from tqinfer.cache.config import CacheConfig
from tqinfer.llm import LLM
from tqinfer.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "CacheConfig"]
__version__ = "0.1.0"
