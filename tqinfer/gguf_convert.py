"""GGUF file -> Hugging Face-style folder (config.json, safetensors, tokenizer.json, tokenizer_config.json).

A GGUF is converted once; afterwards every load reads the folder like any other HF checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np

from tqinfer.hub import ModelError, format_bytes, progress_steps

GGUF_MAGIC = b"GGUF"
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


def check_gguf(path: Path) -> None:
    """Raise ModelError unless `path` starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(
            f"{path} is not a GGUF file: it starts with {magic!r}, a GGUF starts with {GGUF_MAGIC!r}"
        )


def open_gguf(path: Path):
    """A gguf.GGUFReader over `path`, with bad magic and truncation reported as ModelError."""
    import gguf

    path = Path(path)
    check_gguf(path)
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on a cut-off file
        expected = gguf_expected_size(path)
        if expected is None:
            raise ModelError(f"{path} is truncated or corrupt: its GGUF header cannot be read ({e})") from None
        if expected > size:
            raise ModelError(
                f"{path} is truncated: expected {format_bytes(expected)}, found {format_bytes(size)}"
            ) from None
        raise ModelError(f"{path} is corrupt: {e}") from None
    if reader.tensors:
        end = max(t.data_offset + t.n_bytes for t in reader.tensors)
        if end > size:
            raise ModelError(
                f"{path} is truncated: expected {format_bytes(end)}, found {format_bytes(size)}"
            )
    return reader


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9


def gguf_expected_size(path: Path) -> int | None:
    """The file size a GGUF's header promises (end of its last tensor), or None if the header itself
    is cut off or unreadable. A small parser of its own, because gguf's reader needs the whole file."""
    import struct

    import gguf

    try:
        with open(path, "rb") as f:
            buf = f.read(64 * 1024 * 1024)
        pos = 0

        def take(fmt):
            nonlocal pos
            values = struct.unpack_from("<" + fmt, buf, pos)
            pos += struct.calcsize("<" + fmt)
            return values[0] if len(values) == 1 else values

        def string():
            nonlocal pos
            n = take("Q")
            if pos + n > len(buf):
                raise struct.error("string past the end")
            out = buf[pos : pos + n]
            pos += n
            return out.decode("utf-8", "replace")

        def value(kind):
            nonlocal pos
            if kind == _STRING:
                return string()
            if kind == _ARRAY:
                sub, n = take("I"), take("Q")
                if sub in _SCALAR_SIZES:
                    pos += _SCALAR_SIZES[sub] * n
                    return None
                for _ in range(n):
                    value(sub)
                return None
            fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}[kind]
            return take(fmt)

        if buf[:4] != GGUF_MAGIC:
            return None
        pos = 4
        take("I")  # version
        n_tensors, n_kv = take("Q"), take("Q")
        alignment = 32
        for _ in range(n_kv):
            key = string()
            v = value(take("I"))
            if key == "general.alignment" and isinstance(v, int):
                alignment = v
        end = 0
        for _ in range(n_tensors):
            string()
            dims = [take("Q") for _ in range(take("I"))]
            qtype, offset = take("I"), take("Q")
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
            n = 1
            for d in dims:
                n *= d
            end = max(end, offset + n // block * type_size)
        if pos > len(buf):
            return None
        start = (pos + alignment - 1) // alignment * alignment
        return start + end
    except (struct.error, KeyError, ValueError, OSError):
        return None


def read_metadata(reader) -> dict:
    """All key/value metadata as Python values (strings decoded, arrays as lists)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception:
            continue
    return out


def convert_gguf(gguf_path: Path, dest: Path, *, progress: bool = True, source_name: str | None = None) -> Path:
    """Write the HF-style folder for `gguf_path` at `dest`, atomically (temp dir + rename)."""
    gguf_path, dest = Path(gguf_path), Path(dest)
    reader = open_gguf(gguf_path)
    meta = read_metadata(reader)
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
        vocab_size = next(int(t.shape[1]) for t in reader.tensors if t.name == "token_embd.weight")
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
        config["final_logit_softcapping"] = key("final_logit_softcapping")
        config["attn_logit_softcapping"] = key("attn_logit_softcapping")
    if model_type == "mistral" and config["sliding_window"] is None:
        config["sliding_window"] = None
    return config


def _rope_scaling(meta: dict, arch: str, reader) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
        if freqs is None:
            return None
        return llama3_scaling_from_rope_freqs(
            dequantize_tensor(freqs).reshape(-1),
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


def dequantize_tensor(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in HF layout (rows = output features)."""
    import gguf

    try:
        out = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ModelError(
            f"GGUF tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf package "
            "cannot dequantize"
        ) from None
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.asarray(out, dtype=np.float32).reshape(shape)


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
            w = dequantize_tensor(t)
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


# ------------------------------------------------------------------------------------------- tokenizer

# Pre-tokenizer split regexes by `tokenizer.ggml.pre` (llama.cpp's llama-vocab.cpp names).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# name -> (split regex or None for GPT-2's built-in ByteLevel regex, digits one by one first,
#          ignore_merges: whole words in the vocabulary are taken as is, as llama.cpp does for llama3)
PRE_TOKENIZERS: dict[str, tuple[str | None, bool, bool]] = {
    "default": (None, False, False),
    "gpt2": (None, False, False),
    "smollm": (None, True, False),  # SmolLM's tokenizer.json: Digits(individual) + ByteLevel
    "starcoder": (None, True, False),
    "refact": (None, True, False),
    "llama3": (_LLAMA3_SPLIT, False, True),
    "llama-v3": (_LLAMA3_SPLIT, False, True),
    "llama-bpe": (_LLAMA3_SPLIT, False, True),
    "smaug-bpe": (_LLAMA3_SPLIT, False, False),
    "falcon3": (_LLAMA3_SPLIT, False, False),
    "pixtral": (_LLAMA3_SPLIT, False, False),
    "dbrx": (_LLAMA3_SPLIT, False, False),
    "qwen2": (_QWEN2_SPLIT, False, False),
    "deepseek-r1-qwen": (_QWEN2_SPLIT, False, False),
    "megrez": (_QWEN2_SPLIT, False, False),
    "tekken": (_TEKKEN_SPLIT, False, False),
    "gpt-4o": (_GPT4O_SPLIT, False, False),
    "llama4": (_GPT4O_SPLIT, False, False),
}

_CONTROL, _USER_DEFINED = 3, 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_gguf_tokenizer(meta: dict):
    """A `tokenizers.Tokenizer` equivalent to the GGUF's vocabulary (gpt2 BPE or llama SPM)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelError("GGUF has no tokenizer (no tokenizer.ggml.tokens in its metadata)")
    if kind == "gpt2":
        tok = _byte_level_bpe(meta, tokens)
    elif kind == "llama":
        tok = _sentencepiece_bpe(meta, tokens)
    else:
        raise ModelError(f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2 (BPE), llama (SPM)")
    _add_special_tokens(tok, meta, tokens, byte_level=kind == "gpt2")
    _set_post_processor(tok, meta, tokens, add_bos_default=kind == "llama")
    return tok


def _byte_level_bpe(meta: dict, tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, t in enumerate(tokens):
        t = t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
        vocab.setdefault(t, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        warnings.warn(
            f"GGUF pre-tokenizer {pre!r} is unknown to tqinfer; using GPT-2's, token ids may differ", stacklevel=3
        )
    split, digits, ignore_merges = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
    steps = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(tokens: list[str], scores: list[float], normal: set[str]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two tokens,
    ranked by the merged token's score (best first), as sentencepiece's BPE applies them."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece in normal:
        score = scores[vocab[piece]]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_bpe(meta: dict, tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    normal = {t for t, ty in zip(tokens, types) if ty == 1}
    merges = spm_merges(tokens, scores, normal)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=True)
    )
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Replace(" ", "▁")]
    if add_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def _add_special_tokens(tok, meta: dict, tokens: list[str], byte_level: bool) -> None:
    from tokenizers import AddedToken

    types = meta.get("tokenizer.ggml.token_type") or []
    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    special = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types)
        if ty == _CONTROL and (alphabet is None or set(t) <= alphabet) and t
    ]
    if special:
        tok.add_special_tokens(special)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if user:
        tok.add_tokens(user)


def _set_post_processor(tok, meta: dict, tokens: list[str], add_bos_default: bool) -> None:
    from tokenizers import processors

    add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos_default)
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    pieces, specials = [], []
    if add_bos and bos is not None:
        pieces.append(tokens[bos])
        specials.append((tokens[bos], int(bos)))
    single = pieces + ["$A"]
    pair = pieces + ["$A"] + pieces + ["$B"]
    if add_eos and eos is not None:
        single.append(tokens[eos])
        pair.insert(pair.index("$B"), tokens[eos])
        pair.append(tokens[eos])
        specials.append((tokens[eos], int(eos)))
    if specials:
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair), special_tokens=list(dict.fromkeys(specials))
        )


def gguf_tokenizer_files(meta: dict) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json contents for a GGUF's metadata."""
    hf_json = meta.get("tokenizer.huggingface.json")
    tok_json = hf_json if hf_json else build_gguf_tokenizer(meta).to_str(pretty=False)
    tokens = meta.get("tokenizer.ggml.tokens") or []
    kind = meta.get("tokenizer.ggml.model")
    cfg: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    arch = meta.get("general.architecture")
    ctx = meta.get(f"{arch}.context_length")
    if ctx:
        cfg["model_max_length"] = int(ctx)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        idx = meta.get(f"tokenizer.ggml.{key}")
        if idx is not None and 0 <= idx < len(tokens):
            cfg[name] = tokens[idx]
    template = meta.get("tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return {"tokenizer.json": tok_json, "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"}
