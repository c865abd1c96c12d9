"""GGUF file -> Hugging Face-style folder (config.json, safetensors, tokenizer.json, tokenizer_config.json).

A GGUF is converted once; afterwards every load reads the folder like any other HF checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from tqinfer.gguf_file import dequantize, read_gguf
from tqinfer.gguf_vocab import gguf_tokenizer_files
from tqinfer.hub import ModelError, progress_steps

# Models below this many parameters are written in float32 (what transformers' GGUF load gives);
# larger ones in bfloat16 so the converted copy stays a sane size.
FP32_PARAM_LIMIT = 1_000_000_000
SHARD_BYTES = 2 * 1024**3

# GGUF general.architecture -> (HF model_type, HF architectures entry)
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}
# llama.cpp's convert_hf_to_gguf.py permutes q/k rows for these (interleaved RoPE); undone here.
PERMUTED_QK = {"llama", "mistral"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma's four norms per layer have their own names (and GGUF stores them as weight + 1).
_GEMMA_LAYER_NAMES = dict(
    _LAYER_NAMES,
    post_attention_norm="post_attention_layernorm",
    ffn_norm="pre_feedforward_layernorm",
    post_ffw_norm="post_feedforward_layernorm",
)
# Tensors a GGUF may carry that have no HF parameter (rope_freqs becomes config rope_scaling).
_SKIPPED = {"rope_freqs.weight"}


def convert_gguf(gguf_path: Path, dest: Path, *, progress: bool = True, source_name: str | None = None) -> Path:
    """Write the HF-style folder for `gguf_path` at `dest`, atomically (temp dir + rename)."""
    gguf_path, dest = Path(gguf_path), Path(dest)
    reader = read_gguf(gguf_path)
    meta = reader.metadata
    config = gguf_config(meta, reader)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_weights(reader, meta, config, tmp, progress)
        tokenizer_files = gguf_tokenizer_files(meta)
        for name, content in tokenizer_files.items():
            (tmp / name).write_text(content, encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(meta), indent=2) + "\n")
        (tmp / "tqinfer_source.json").write_text(
            json.dumps({"name": source_name or str(gguf_path), "gguf": str(gguf_path)}, indent=2) + "\n"
        )
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "config.json").exists():  # not a concurrent conversion that won the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# ---------------------------------------------------------------------------------------------- config


def _arch(meta: dict) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return arch


def gguf_config(meta: dict, reader) -> dict:
    """The HF config.json dict for a GGUF's metadata and tensor list."""
    arch = _arch(meta)
    model_type, hf_arch = ARCHITECTURES[arch]
    name = str(meta.get("general.name", ""))
    if arch == "llama" and "mistral" in name.lower():
        model_type, hf_arch = ARCHITECTURES["mistral"]

    def key(suffix, default=None):
        return meta.get(f"{arch}.{suffix}", default)

    tensor_names = {t.name for t in reader.tensors}
    hidden = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    n_kv = key("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        n_kv = max(n_kv)
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // n_heads
    tokens = meta.get("tokenizer.ggml.tokens") or []
    vocab_size = key("vocab_size") or len(tokens)
    if not vocab_size:
        vocab_size = reader.tensor("token_embd.weight").shape[0]
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(str(np.float32(key("attention.layer_norm_rms_epsilon", 1e-6)))),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, arch, reader),
        "max_position_embeddings": int(key("context_length", 4096)),
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "hidden_act": "gelu_pytorch_tanh" if arch == "gemma3" else "silu",
        "sliding_window": key("attention.sliding_window"),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            config[hf_key] = int(value)
    if arch == "gemma3":
        config["hidden_activation"] = "gelu_pytorch_tanh"
        config["query_pre_attn_scalar"] = int(head_dim)
        config["rope_local_base_freq"] = float(key("rope.freq_base_swa", 10000.0))
        # llama.cpp: every 6th layer attends globally, the others through the sliding window
        config["sliding_window_pattern"] = 6
        config["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                 for i in range(config["num_hidden_layers"])]
        config["final_logit_softcapping"] = key("final_logit_softcapping")
        config["attn_logit_softcapping"] = key("attn_logit_softcapping")
    if model_type == "mistral" and config["sliding_window"] is None:
        config["sliding_window"] = None
    return config


def _rope_scaling(meta: dict, arch: str, reader) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        freqs = reader.tensor("rope_freqs.weight")
        if freqs is None:
            return None
        return llama3_scaling_from_rope_freqs(
            dequantize(freqs).reshape(-1),
            float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            int(meta.get(f"{arch}.rope.dimension_count") or 2 * freqs.n_elements),
        )
    scaling = {"rope_type": kind, "type": kind, "factor": float(meta.get(f"{arch}.rope.scaling.factor", 1.0))}
    orig = meta.get(f"{arch}.rope.scaling.original_context_length")
    if orig:
        scaling["original_max_position_embeddings"] = int(orig)
    return scaling


def llama3_rope_factors(rope_theta: float, dim: int, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original: int) -> np.ndarray:
    """Per-frequency divisors as llama.cpp's converter writes them into `rope_freqs.weight`."""
    freqs = 1.0 / rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / freqs
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high_freq_factor, 1.0,
                    np.where(wavelen > original / low_freq_factor, factor, mid))


def llama3_scaling_from_rope_freqs(factors: np.ndarray, rope_theta: float, dim: int) -> dict | None:
    """Llama 3.x GGUFs keep rope scaling only as a `rope_freqs` tensor: recover the HF `rope_scaling`
    by matching it against the parameters every Llama 3.1/3.2 release uses."""
    factor = float(factors.max())
    if factor == 1.0 and float(factors.min()) == 1.0:
        return None
    # Llama 3.1/3.2 use (1, 4, 8192); the search also covers other sizes and frequency bands.
    originals = [8192] + [2**k for k in range(5, 21) if 2**k != 8192]
    bands = [(1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0), (0.5, 4.0), (1.0, 32.0)]
    for original in originals:
        for low, high in bands:
            expected = llama3_rope_factors(rope_theta, dim, factor, low, high, original)
            if expected.shape == factors.shape and np.allclose(expected, factors, rtol=1e-4):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": original}
    raise ModelError(
        "GGUF has a rope_freqs tensor (llama3 rope scaling) that matches no known Llama 3 parameters; "
        "use the model's Hugging Face safetensors instead"
    )


def generation_config(meta: dict) -> dict:
    gen = {}
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if bos is not None:
        gen["bos_token_id"] = int(bos)
    eos = [meta.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    eos = list(dict.fromkeys(int(e) for e in eos if e is not None))
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    pad = meta.get("tokenizer.ggml.padding_token_id")
    if pad is not None:
        gen["pad_token_id"] = int(pad)
    return gen


# --------------------------------------------------------------------------------------------- weights


def hf_tensor_name(gguf_name: str, arch: str) -> str | None:
    """The HF parameter name of a GGUF tensor, or None for tensors without one."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _SKIPPED:
        return None
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk":
        _, layer, base, kind = parts
        names = _GEMMA_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
        if base in names:
            return f"model.layers.{layer}.{names[base]}.{kind}"
    raise ModelError(f"GGUF tensor {gguf_name!r} has no known Hugging Face name for architecture {arch!r}")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (half-split RoPE -> interleaved) for `n_head` heads."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_weights(reader, meta: dict, config: dict, folder: Path, progress: bool) -> None:
    import torch
    from safetensors.torch import save_file

    arch = _arch(meta)
    n_params = sum(int(t.n_elements) for t in reader.tensors if hf_tensor_name(t.name, arch))
    dtype = torch.float32 if n_params < FP32_PARAM_LIMIT else torch.bfloat16
    config["torch_dtype"] = "float32" if dtype == torch.float32 else "bfloat16"
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    tensors = [t for t in reader.tensors if hf_tensor_name(t.name, arch)]
    shards: list[dict] = [{}]
    shard_bytes = 0
    with progress_steps("Converting GGUF", total=len(tensors), enabled=progress) as advance:
        for t in tensors:
            name = hf_tensor_name(t.name, arch)
            w = dequantize(t)
            if arch in PERMUTED_QK and ".attn_q." in t.name and w.ndim >= 1:
                w = unpermute_qk(w, n_heads)
            elif arch in PERMUTED_QK and ".attn_k." in t.name and w.ndim >= 1:
                w = unpermute_qk(w, n_kv)
            if arch == "gemma3" and t.name.endswith("norm.weight"):
                w = w - 1.0
            if not w.flags.writeable:  # F32 tensors are views of the read-only memory map
                w = w.copy()
            tensor = torch.from_numpy(np.ascontiguousarray(w)).to(dtype)
            nbytes = tensor.numel() * tensor.element_size()
            if shard_bytes and shard_bytes + nbytes > SHARD_BYTES:
                shards.append({})
                shard_bytes = 0
            shards[-1][name] = tensor
            shard_bytes += nbytes
            advance()
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=metadata)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata=metadata)
        for name, tensor in shard.items():
            weight_map[name] = fname
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
