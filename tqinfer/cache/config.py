"""CacheConfig: K and V cache types from the codec registry, and the knobs around them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch

DENSE = "bf16"  # the dense type: K/V kept in the model's own dtype (bf16 on GPU, fp32 on a fp32 CPU run)
ROTATIONS = ("hadamard", "orthogonal")


def cache_type_names() -> list[str]:
    try:
        from tqinfer.quant.registry import codec_names
    except ModuleNotFoundError:  # the codec registry lands separately
        return [DENSE]
    return codec_names()


CENTER_MODES = ("auto", "on", "off")


def center_mode(value) -> str:
    """A key-centering setting as its mode name: a bool (and a saved header's bool) reads as on / off."""
    return ("on" if value else "off") if isinstance(value, bool) else value

@dataclass
class CacheConfig:
    """K and V types separately; sinks and a recent window stay full precision; protected layers
    (the first and last `protected_layers`) stay dense. Defaults chosen in docs/QUALITY.md."""

    k_type: str | None = None
    v_type: str | None = None
    sinks: int = 4
    window: int = 128
    protected_layers: int = 0
    rotation: str = "hadamard"
    seed: int = 0
    block_size: int = 64
    # keys stored relative to a per-(layer, KV head) center chosen from the first prefill chunk
    # (paged.attention_weighted_center): softmax does not see a shift shared by every key of a query,
    # and the codec's error scales with ||k - center|| instead of ||k||. No bits per token.
    # "on": every KV head; "auto" (default): the heads whose center holds at least
    # paged.CENTER_AUTO_SHARE of their keys' energy (a key bias, as in Qwen2: tq3.5 +63% -> +1%
    # perplexity there), none on SmolLM2, where centering every head costs a little (docs/QUALITY.md,
    # "Key smoothing and key centering"); "off": none.
    center_keys: str = "auto"
    # query-aware rounding of the keys (TurboQuantMSE types, tq1..tq4): the codes of a key are chosen
    # to make its error small along the queries (their energy per channel from the first prefill
    # chunk, kept with the cache) instead of in plain norm; same codebook, record and bits. Where the
    # cache's writes run the torch encode (CPU, the twins); the fused CUDA write kernels round to the
    # nearest centroid. Three-seed perplexity on SmolLM2: tq4 +0.28% -> +0.20%, tq3 +1.00% -> +0.83%
    # (docs/QUALITY.md, "Rotation choice, codebook fit, record bias and query-aware rounding").
    query_aware: bool = True

    def __post_init__(self):
        # unset types follow the device (see for_device); bf16 until a device is known
        self.auto_k, self.auto_v = self.k_type is None, self.v_type is None
        self.k_type = self.k_type or DENSE
        self.v_type = self.v_type or DENSE
        valid = cache_type_names()
        for which, name in (("K", self.k_type), ("V", self.v_type)):
            if name not in valid:
                raise ValueError(f"unknown {which} cache type {name!r}; valid types: {', '.join(valid)}")
        if self.v_type == "qjl":
            raise ValueError("qjl is a key-only sketch (it estimates inner products); choose another V type")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"unknown rotation {self.rotation!r}; valid: {', '.join(ROTATIONS)}")
        for name in ("sinks", "window", "protected_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.center_keys = center_mode(self.center_keys)
        if self.center_keys not in CENTER_MODES:
            raise ValueError(f"unknown center_keys {self.center_keys!r}; valid: {', '.join(CENTER_MODES)}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")

    def for_device(self, device) -> "CacheConfig":
        """Fill the types the user left unset: tq3.5 on CUDA (measured +0.2% perplexity at 4 bits per
        value, docs/QUALITY.md), the dense cache elsewhere: on the 2-core CPU, tq3.5 (through the C
        kernel, kernels/cpu.py) prefills at 0.73-0.88x the dense cache's speed and decodes at 0.8-0.9x of
        it at 512 tokens, ~1.0x at 2k, 1.2-1.35x at 6k (docs/BENCHMARKS.md, "CPU")."""
        default = "tq3.5" if torch.device(device).type == "cuda" else DENSE
        out = replace(self, k_type=default if self.auto_k else self.k_type,
                      v_type=default if self.auto_v else self.v_type)
        out.auto_k, out.auto_v = self.auto_k, self.auto_v
        return out

    @property
    def dense(self) -> bool:
        return self.k_type == DENSE and self.v_type == DENSE

    @property
    def label(self) -> str:
        if self.k_type == self.v_type:
            return self.k_type
        return f"K {self.k_type} / V {self.v_type}"

    def dense_twin(self) -> "CacheConfig":
        return replace(self, k_type=DENSE, v_type=DENSE)

    def layer_types(self, layer: int, num_layers: int) -> tuple[str, str]:
        """(K type, V type) of a layer: protected first/last layers stay dense."""
        p = self.protected_layers
        if layer < p or layer >= num_layers - p:
            return DENSE, DENSE
        return self.k_type, self.v_type


@lru_cache(maxsize=None)
def record_bytes(type_name: str, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one (token, KV head) vector takes in the cache (memoized: building a codec builds its
    rotation, and the per-token stats ask for this every generated token)."""
    if type_name == DENSE:
        return head_dim * torch.finfo(dtype).bits // 8
    from tqinfer.quant.registry import make_codec

    return make_codec(type_name, head_dim, 1, seed=0).record_bytes


def bytes_per_token(args, config: CacheConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Exact cache bytes per token of context over all layers, K and V, in the compressed steady
    state (sinks and the recent window are a fixed cost per sequence: see fixed_bytes)."""
    total = 0
    for layer in range(args.num_hidden_layers):
        kt, vt = config.layer_types(layer, args.num_hidden_layers)
        total += args.num_key_value_heads * (record_bytes(kt, args.head_dim, dtype) + record_bytes(vt, args.head_dim, dtype))
    return total


def fixed_bytes(args, config: CacheConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Per-sequence bytes of the full-precision sinks + recent window buffers (compressed layers)."""
    if config.dense:
        return 0
    hot = config.sinks + config.window
    layers = sum(1 for i in range(args.num_hidden_layers) if config.layer_types(i, args.num_hidden_layers) != (DENSE, DENSE))
    return layers * 2 * args.num_key_value_heads * hot * args.head_dim * torch.finfo(dtype).bits // 8


def build_cache(config: CacheConfig, args, *, max_seqs: int, max_len: int, dtype, device):
    """The cache object for a model: dense when both types are dense, else the paged compressed cache."""
    if config.dense:
        from tqinfer.cache.dense import DenseCache

        return DenseCache(args.num_hidden_layers, args.num_key_value_heads, args.head_dim, max_seqs, max_len,
                          dtype, device)
    from tqinfer.cache.paged import PagedCache

    return PagedCache(config, args, max_seqs=max_seqs, max_len=max_len, dtype=dtype, device=device)
