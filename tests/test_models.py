"""Model math against transformers on tiny random configs of every supported architecture (fp32, dense cache)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tqinfer.cache.dense import DenseCache  # noqa: E402
from tqinfer.engine.engine import LLMEngine  # noqa: E402
from tqinfer.models import UnsupportedArchitecture, build_model  # noqa: E402

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**BASE, tie_word_embeddings=True),
    "llama3-rope": lambda: transformers.LlamaConfig(
        **BASE, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=64), rope_theta=500000.0),
    "mistral": lambda: transformers.MistralConfig(**BASE, sliding_window=24, head_dim=16),
    "qwen2": lambda: transformers.Qwen2Config(**BASE),
    "qwen3": lambda: transformers.Qwen3Config(**BASE, head_dim=32),
}


def build_pair(name: str):
    torch.manual_seed(0)
    config = CONFIGS[name]()
    config._attn_implementation = "eager"
    ref = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    for p in ref.parameters():  # random, not the near-zero init, so errors show
        torch.nn.init.normal_(p, std=0.1)
    cls, args = build_model(config.to_dict())
    model = cls(args)
    model.load_state_dict(cls.sanitize(dict(ref.state_dict()), args), strict=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return ref, model.eval(), args


def engine_for(model, args, max_len=256):
    cache = DenseCache(args.num_hidden_layers, args.num_key_value_heads, args.head_dim, 2, max_len,
                       torch.float32, "cpu")
    return LLMEngine(model, cache, "cpu")


@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, fuse):
    """Fused: q/k/v and gate/up merged into one projection each, as LLM loads every model."""
    ref, model, args = build_pair(name)
    if fuse:
        model.fuse()
    ids = torch.randint(0, args.vocab_size, (1, 57), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits[0].double()
    got = engine_for(model, args).forward([0], [0], [ids[0].tolist()], all_logits=True).double()
    rel = (got - expected).norm() / expected.norm()
    assert torch.isfinite(got).all()
    assert rel <= 1e-4, f"{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_prefill_equals_one_shot(name):
    _, model, args = build_pair(name)
    ids = torch.randint(0, args.vocab_size, (45,), generator=torch.Generator().manual_seed(2)).tolist()
    one = engine_for(model, args).forward([0], [0], [ids], all_logits=True)
    eng = engine_for(model, args)
    parts = [eng.forward([1], [start], [ids[start:start + 13]], all_logits=True) for start in range(0, 45, 13)]
    torch.testing.assert_close(torch.cat(parts), one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen3"])
def test_greedy_tokens_match_transformers(name):
    ref, model, args = build_pair(name)
    model.fuse()
    prompt = torch.randint(0, args.vocab_size, (1, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, 11:].tolist()
    eng = engine_for(model, args)
    logits = eng.forward([0], [0], [prompt[0].tolist()])
    got = []
    for _ in range(20):
        token = int(logits[-1].argmax())
        got.append(token)
        logits = eng.forward([0], [11 + len(got) - 1], [[token]])
    assert got == expected


def test_batched_step_equals_separate_steps():
    _, model, args = build_pair("qwen2")
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, args.vocab_size, (9,), generator=g).tolist()
    b = torch.randint(0, args.vocab_size, (5,), generator=g).tolist()
    eng = engine_for(model, args)
    both = eng.forward([0, 1], [0, 0], [a, b])
    alone_a = engine_for(model, args).forward([0], [0], [a])
    alone_b = engine_for(model, args).forward([0], [0], [b])
    torch.testing.assert_close(both, torch.cat([alone_a, alone_b]), rtol=1e-5, atol=1e-5)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(UnsupportedArchitecture, match="supported: llama, mistral, qwen2, qwen3"):
        build_model({"model_type": "mamba"})


def test_fp16_head_is_exact_and_closer_to_fp32_than_bf16():
    """LLM holds a bf16 model's output projection (and tied embedding) in fp16 on CPUs: the weights
    convert exactly, and the logits come out nearer an fp32 head than the bf16 head's."""
    _, model, args = build_pair("llama")  # tied embeddings
    model = model.fuse().to(torch.bfloat16)
    ids = torch.randint(0, args.vocab_size, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    w_bf16 = model.lm_head.weight.detach().clone()

    def logits():
        cache = DenseCache(args.num_hidden_layers, args.num_key_value_heads, args.head_dim, 1, 64,
                           torch.bfloat16, "cpu")
        return LLMEngine(model, cache, "cpu").forward([0], [0], [ids], all_logits=True).double()

    bf16 = logits()
    assert model.fp16_head()
    assert model.lm_head.weight.dtype == torch.float16 and model.model.embed_tokens.weight is model.lm_head.weight
    assert torch.equal(model.lm_head.weight.to(torch.bfloat16), w_bf16)
    fp16 = logits()
    model.lm_head.weight = torch.nn.Parameter(w_bf16.float(), requires_grad=False)
    model.model.embed_tokens.weight = model.lm_head.weight
    fp32 = logits()
    err = lambda x: float((x - fp32).norm() / fp32.norm())  # noqa: E731
    assert torch.isfinite(fp16).all()
    assert err(fp16) < err(bf16), (err(fp16), err(bf16))
    model.lm_head.weight = torch.nn.Parameter(torch.full_like(w_bf16, 1e5), requires_grad=False)
    assert not model.fp16_head()  # out of fp16's range: left as it is
