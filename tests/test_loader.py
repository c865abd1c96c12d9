"""Weights: safetensors folders (single, sharded, tied, dtype) and GGUF conversion, against transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tqinfer import hub
from tqinfer.gguf_convert import unpermute_qk
from tqinfer.gguf_file import GGUFTensor, dequantize, read_gguf
from tqinfer.hub import ModelError, ModelFiles
from tqinfer.loader import load_weights

transformers = pytest.importorskip("transformers")


def files_for(folder) -> ModelFiles:
    return ModelFiles(name=str(folder), folder=folder, source="hf-folder", weights_id="test")


def reference_state(folder) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return dict(model.state_dict())


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_safetensors_folder_equals_transformers(tiny_hf_folder, model_type):
    folder = tiny_hf_folder(model_type, tokenizer="bytes")
    got = load_weights(files_for(folder), torch.float32, progress=False)
    ref = reference_state(folder)
    assert set(got.tensors) == set(ref)
    for name, t in ref.items():
        assert torch.equal(got.tensors[name], t), name
    assert got.config["model_type"] == model_type and got.config["hidden_size"] == 64
    assert got.generation_config.get("eos_token_id") == 2


def test_sharded_and_bf16(tiny_hf_folder):
    folder = tiny_hf_folder("qwen2", tokenizer="bytes", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 3
    got = load_weights(files_for(folder), torch.bfloat16, progress=False)
    ref = reference_state(folder)
    assert set(got.tensors) == set(ref)
    for name, t in ref.items():
        assert got.tensors[name].dtype == torch.bfloat16
        assert torch.equal(got.tensors[name], t.to(torch.bfloat16)), name


def test_tied_embeddings(tiny_hf_folder):
    folder = tiny_hf_folder("llama", tokenizer="bytes")  # the tiny llama ties its head
    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))
    got = load_weights(files_for(folder), torch.float32, progress=False)
    assert got.tensors["lm_head.weight"] is got.tensors["model.embed_tokens.weight"]
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="tie_word_embeddings=false but the weights have no lm_head.weight"):
        load_weights(files_for(folder), torch.float32, progress=False)


def test_truncated_safetensors(tiny_hf_folder):
    folder = tiny_hf_folder("llama", tokenizer="bytes")
    path = folder / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 3)
    with pytest.raises(ModelError) as err:
        load_weights(files_for(folder), torch.float32, progress=False)
    message = str(err.value)
    assert "model.safetensors is truncated" in message
    assert f"expected {hub.format_bytes(size)}, found {hub.format_bytes(size // 3)}" in message
    with open(path, "r+b") as f:
        f.truncate(5)
    with pytest.raises(ModelError, match="model.safetensors is truncated"):
        load_weights(files_for(folder), torch.float32, progress=False)


def test_missing_shard_and_missing_config(tiny_hf_folder):
    folder = tiny_hf_folder("qwen2", tokenizer="bytes", max_shard_size="20KB")
    victim = sorted(folder.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelError, match=f"missing shard.*{victim.name}"):
        load_weights(files_for(folder), torch.float32, progress=False)
    (folder / "config.json").unlink()
    with pytest.raises(ModelError, match="has no config.json"):
        load_weights(files_for(folder), torch.float32, progress=False)


# ----------------------------------------------------------------------------------------------- GGUF


def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py's LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((6 * 16, 40)).astype(np.float32)
    for heads in (1, 2, 3, 6):
        permuted = llama_cpp_permute(w, heads)
        assert not np.array_equal(permuted, w)
        assert np.array_equal(unpermute_qk(permuted, heads), w)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_tiny_gguf_round_trip(tiny_gguf, isolated_cache, model_type):
    """HF model -> GGUF written like llama.cpp (q/k permuted for llama) -> tqinfer: the same tensors."""
    path, folder = tiny_gguf(model_type)
    files = hub.resolve(str(path), progress=False)
    got = load_weights(files, torch.float32, progress=False)
    ref = reference_state(folder)
    assert set(got.tensors) == set(ref)
    for name, t in ref.items():
        assert torch.equal(got.tensors[name], t), name
    hf_config = json.loads((folder / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rms_norm_eps"):
        assert got.config[key] == hf_config[key], key
    assert got.config["head_dim"] == hf_config.get("head_dim", 16)
    assert got.config["attention_bias"] == (model_type == "qwen2")
    assert got.config["model_type"] == ("llama" if model_type == "mistral" else model_type)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tiny_gguf, isolated_cache):
    path, folder = tiny_gguf("llama3")
    assert any(t.name == "rope_freqs.weight" for t in read_gguf(path).tensors)
    got = load_weights(hub.resolve(str(path), progress=False), torch.float32, progress=False)
    rope = json.loads((folder / "config.json").read_text())["rope_parameters"]
    assert got.config["rope_theta"] == rope["rope_theta"] == 500000.0
    expected = {k: v for k, v in rope.items() if k != "rope_theta"}
    assert got.config["rope_scaling"] == expected
    assert expected["original_max_position_embeddings"] == 64 and expected["factor"] == 8.0
    assert "rope_freqs.weight" not in got.tensors
    # the recovered config reproduces transformers' inverse frequencies
    ref_cfg = transformers.LlamaConfig(**{k: v for k, v in got.config.items() if k != "torch_dtype"})
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](ref_cfg, "cpu")
    ref_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](transformers.AutoConfig.from_pretrained(str(folder)), "cpu")
    torch.testing.assert_close(inv, ref_inv)


@pytest.mark.parametrize("qtype_name", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantized_gguf_dequantizes_like_gguf_package(tiny_gguf, isolated_cache, qtype_name):
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    path, folder = tiny_gguf("qwen3", qtype=qtype)
    reader = gguf.GGUFReader(path)  # gguf's own reader, independent of ours
    assert {t.tensor_type.name for t in reader.tensors} >= {qtype_name}
    got = load_weights(hub.resolve(str(path), progress=False), torch.float32, progress=False).tensors
    ref = load_file(str(folder / "model.safetensors"))
    for t in reader.tensors:
        name = {"token_embd.weight": "model.embed_tokens.weight"}.get(t.name)
        if name is None:
            continue
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(got[name], expected.reshape(got[name].shape))
        # and close to the original weights, within what the format can hold
        err = (got[name] - ref[name]).abs().max().item()
        assert 0 < err < {"F16": 1e-3, "BF16": 2e-3, "Q8_0": 5e-3}.get(qtype_name, 0.1), err


def _transformers_dequant_types():
    try:
        from transformers.integrations.gguf import dequant
    except ImportError:
        return []
    import gguf

    return [gguf.GGMLQuantizationType(t).name for t in sorted(dequant.GGML_BLOCK)]


@pytest.mark.parametrize("qtype_name", _transformers_dequant_types())
def test_every_quant_type_matches_transformers_dequant(qtype_name):
    """Random blocks of each quantized type (K-quants, IQ types, ...): our dequantization (the gguf
    package) == transformers' own torch implementation."""
    import gguf
    from transformers.integrations.gguf import dequant

    qtype = gguf.GGMLQuantizationType[qtype_name]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(int(qtype)).integers(0, 256, size=(6, type_size), dtype=np.uint8)
    raw &= 0xBF  # keeps every fp16 scale finite (exponent bits never all ones)

    tensor = GGUFTensor("blk.0.ffn_up.weight", qtype, (6, block), 6 * block, raw.size, 0, raw)
    try:
        got = dequantize(tensor)
    except ModelError as e:
        pytest.skip(str(e))
    expected = dequant.dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(qtype)).numpy()
    assert np.isfinite(got).all() and np.abs(got).max() > 0
    np.testing.assert_allclose(got.reshape(-1), expected, rtol=1e-5, atol=1e-6)


def test_bad_magic_and_truncated_gguf(tiny_gguf, isolated_cache, tmp_path):
    path, _ = tiny_gguf("llama")
    data = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + data[4:])
    with pytest.raises(ModelError, match=r"bad.gguf is not a GGUF file: it starts with b'GGML'"):
        hub.resolve(str(bad), progress=False)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 5000])
    with pytest.raises(ModelError, match=rf"cut.gguf is truncated: expected {hub.format_bytes(len(data))}"):
        hub.resolve(str(cut), progress=False)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:200])
    with pytest.raises(ModelError, match="header.gguf is truncated"):
        hub.resolve(str(header_only), progress=False)
    # nothing half-written is left behind
    models = isolated_cache / "models"
    assert not models.exists() or not any(models.iterdir())


@pytest.mark.slow
def test_default_model_weights_equal_transformers_gguf_load(default_model_files, transformers_default_model):
    """Converted SmolLM2 GGUF == the state dict transformers builds from the same GGUF, name by name."""
    got = load_weights(default_model_files, torch.float32, progress=False)
    ref_model = transformers_default_model
    ref = dict(ref_model.state_dict())
    assert set(got.tensors) == set(ref)
    assert len(ref) == 30 * 9 + 3
    for name, t in ref.items():
        torch.testing.assert_close(got.tensors[name], t, rtol=0, atol=0, msg=name)
    cfg = ref_model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert got.config[key] == getattr(cfg, key), key
    assert got.config["rope_theta"] == 100000.0 and got.config["rms_norm_eps"] == pytest.approx(1e-5)
    assert got.config["model_type"] == "llama" and got.config["torch_dtype"] == "float32"

    # and the converted folder is a valid transformers checkpoint giving the same logits
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 2]])
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(default_model_files.folder), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref_model(ids).logits, rtol=1e-5, atol=1e-5)


EXTRA_MODELS = ["qwen2.5-coder-0.5b", "gemma3-270m"]


@pytest.mark.slow
@pytest.mark.parametrize("name", EXTRA_MODELS)
def test_extra_alias_matches_transformers(name):
    """The other pinned GGUF aliases against transformers' GGUF load: tokenizer ids on real text, chat
    template, config, every weight. Opt-in (hundreds of MB each): runs when the GGUF is already in the
    cache or TQINFER_TEST_ALL_MODELS=1."""
    import os

    from test_tokenizer import CONVERSATION, REAL_TEXT

    from tqinfer.tokenizer import load_tokenizer

    alias = hub.ALIASES[name]
    gguf_path = hub.cache_dir() / "downloads" / alias.filename
    if not gguf_path.is_file() and os.environ.get("TQINFER_TEST_ALL_MODELS") != "1":
        pytest.skip(f"{name} is not in the cache; set TQINFER_TEST_ALL_MODELS=1 to fetch it")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    files = hub.resolve(name, progress=False)
    gguf_path = files.gguf
    tok = load_tokenizer(files.folder)
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ids = tok.encode(REAL_TEXT)
    assert ids == ref_tok.encode(REAL_TEXT)
    assert tok.decode(ids, skip_special_tokens=True) == REAL_TEXT
    if tok.chat_template:
        assert tok.apply_chat_template(CONVERSATION) == ref_tok.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    got = load_weights(files, torch.float32, progress=False)
    state = dict(ref.state_dict())
    assert set(got.tensors) == set(state)
    for key, t in state.items():
        assert torch.equal(got.tensors[key], t), key
    rc = ref.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert got.config[key] == getattr(rc, key), key
    assert got.config["head_dim"] == (getattr(rc, "head_dim", None) or rc.hidden_size // rc.num_attention_heads)
    uses_window = "sliding_attention" in (getattr(rc, "layer_types", None) or [])
    assert got.config["sliding_window"] == (rc.sliding_window if uses_window else None)
    mine = transformers.AutoModelForCausalLM.from_pretrained(str(files.folder), dtype=torch.float32)
    if hasattr(ref.config, "layer_types"):
        assert mine.config.layer_types == ref.config.layer_types
    assert mine.config.rope_parameters == ref.config.rope_parameters
    x = torch.tensor([ids[:48]])
    with torch.no_grad():
        torch.testing.assert_close(mine(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
