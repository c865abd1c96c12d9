"""Model math against transformers on tiny random configs of every supported architecture (fp32, dense cache)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tqinfer.cache.dense import DenseCache  # noqa: E402
from tqinfer.cache.dense import sdpa as _SDPA  # noqa: E402
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


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_dense_prefill_in_row_pieces_equals_one_call(name, monkeypatch):
    import tqinfer.cache.dense as dense

    _, model, args = build_pair(name)
    ids = torch.randint(0, args.vocab_size, (45,), generator=torch.Generator().manual_seed(5)).tolist()
    one = engine_for(model, args).forward([0], [0], [ids], all_logits=True)
    calls = []
    monkeypatch.setattr(dense, "sdpa", lambda q, *a: calls.append(q.shape[0]) or _SDPA(q, *a))
    monkeypatch.setattr(dense, "MASK_ELEMENTS", 100)  # 45 x 45 masks: 2 query rows a call
    held = []
    step_mask = dense.step_mask
    monkeypatch.setattr(dense, "step_mask", lambda ctx, *a: (
        step_mask(ctx, *a), held.append(sum(m.numel() for m in ctx.masks.values() if m is not None)))[0])
    split = engine_for(model, args).forward([0], [0], [ids], all_logits=True)
    assert max(calls) == 2 and sum(calls) == 45 * args.num_hidden_layers
    assert 0 < max(held) <= 100  # the masks a step keeps stay within the bound too
    torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-5)
    # an empty chunk beside another (a direct engine call) attends nothing and breaks nothing
    both = engine_for(model, args).forward([0, 1], [0, 0], [ids[:3], []])
    torch.testing.assert_close(both[:1], engine_for(model, args).forward([0], [0], [ids[:3]]), rtol=1e-5, atol=1e-5)


def test_step_mask_is_built_once_per_shape_and_masks_as_the_boolean_one():
    from types import SimpleNamespace

    from tqinfer.cache.dense import causal_mask, sdpa, step_mask

    ctx = SimpleNamespace(masks={})
    q = torch.zeros(3, 4, 8)
    m = step_mask(ctx, 5, 3, None, q)
    assert m is step_mask(ctx, 5, 3, None, q)  # every layer of the step gets the same tensor
    assert torch.equal(m, causal_mask(5, 3, None, "cpu"))
    w = step_mask(ctx, 5, 3, 4, q)  # a sliding-window layer's differs
    assert torch.equal(w, causal_mask(5, 3, 4, "cpu")) and not torch.equal(w, m) and len(ctx.masks) == 2
    if torch.cuda.is_available():  # the additive form SDPA gets on CUDA: same output as the boolean mask
        g = torch.Generator(device="cuda").manual_seed(0)
        shapes = ((37, 4, 64), (2, 77, 64), (2, 77, 64))
        q, k, v = (torch.randn(*s, device="cuda", generator=g).bfloat16() for s in shapes)
        for window in (None, 16):
            add = step_mask(ctx, 40, 37, window, q)
            assert add.dtype == torch.bfloat16
            ref = sdpa(q, k, v, causal_mask(40, 37, window, "cuda"), 0.125)
            torch.testing.assert_close(sdpa(q, k, v, add, 0.125), ref, rtol=0, atol=0)


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


def _fp16_normal(w):
    """w with magnitudes below 2^-10 raised to it: bf16 values then lie in fp16's normal range, where
    fp16 holds them exactly (tinier ones would be fp16 subnormals and lose bits)."""
    return torch.where(w.abs() < 2**-10, torch.full_like(w, 2**-10) * torch.where(w < 0, -1, 1), w)


def _bf16_linear(out_f, in_f, seed, bias=False, std=0.05):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(_fp16_normal(torch.randn(out_f, in_f, generator=g) * std))
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    return lin.requires_grad_(False)


@pytest.mark.parametrize("scale", [1.0, 1 / 32])
@pytest.mark.parametrize("bias", [False, True])
def test_half_gemv_linear_decode_rows_in_fp16_prefill_rows_exactly_bf16(bias, scale):
    """HalfGemvLinear: the weights are the bf16 ones exactly; up to GEMV_ROWS rows the product is
    the fp16 GEMV (fp32 accumulation) rounded to bf16, within bf16 rounding of float64 math; more
    rows give exactly the bf16 linear's output."""
    from tqinfer.models.llama import GEMV_ROWS, HalfGemvLinear

    lin = _bf16_linear(96, 320, seed=5, bias=bias)
    half = HalfGemvLinear(lin, in_scale=scale)
    assert half.weight.dtype == torch.float16 and torch.equal(half.weight.to(torch.bfloat16), lin.weight)
    g = torch.Generator().manual_seed(6)
    for rows in (1, GEMV_ROWS, GEMV_ROWS + 3):
        x = (torch.randn(rows, 320, generator=g) * 4).to(torch.bfloat16)
        got = half(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
        exact = x.double() @ lin.weight.double().T + (lin.bias.double() if bias else 0)
        rel = float((got.double() - exact).norm() / exact.norm())
        assert rel < 4e-3, rel
        if rows <= GEMV_ROWS:  # the fp16 path ran: its rounding, not the bf16 GEMV's
            fp16 = torch.nn.functional.linear((x.half() * scale), lin.weight.half()).to(torch.bfloat16) / scale
            assert torch.equal(got, fp16 + lin.bias if bias else fp16)
            y16 = torch.nn.functional.linear(x.half(), lin.weight.half()).double()
            plain = x.double() @ lin.weight.double().T
            assert float((y16 - plain).norm() / plain.norm()) < 5e-4  # fp32 accumulation
        else:
            assert torch.equal(got, lin(x))


def test_half_gemv_linear_prefill_rows_inside_and_outside_inference_mode():
    """The bf16 conversion buffers are per thread and reused: ones made under inference_mode (an
    engine step) must not be written outside it (a model called directly afterwards)."""
    from tqinfer.models.llama import GEMV_ROWS, HalfGemvLinear

    lin = _bf16_linear(96, 320, seed=9)
    half = HalfGemvLinear(lin)
    x = (torch.randn(GEMV_ROWS + 5, 320, generator=torch.Generator().manual_seed(3))).to(torch.bfloat16)
    with torch.inference_mode():
        inside = half(x)
    outside = half(x)
    assert torch.equal(inside, outside) and torch.equal(outside, lin(x))


def test_half_gemv_linear_overflow_falls_back_to_bf16():
    from tqinfer.models.llama import HalfGemvLinear

    lin = _bf16_linear(64, 128, seed=7, std=1.0)
    half = HalfGemvLinear(lin, guard=True)
    x = torch.full((1, 128), 4000.0, dtype=torch.bfloat16)  # outputs ~1e5: past fp16's 65504
    assert not torch.isfinite(torch.nn.functional.linear(x.half(), half.weight)).all()
    got = half(x)
    assert torch.isfinite(got).all() and torch.equal(got, lin(x))


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])  # tied head; biases; q/k norms
def test_half_gemv_linears_logits_near_bf16_prefill_identical(name):
    """A bf16 model with every projection as HalfGemvLinear (as LLM holds it on CPUs): q/k/v and
    gate/up proved in range (no run-time check), the prefill (many rows) bit-identical, decode
    logits (teacher-forced, the same tokens) within bf16 noise of the bf16 model's. Greedy tokens
    on the real model: tests/test_default_model.py."""
    from tqinfer.models.llama import HalfGemvLinear

    _, model, args = build_pair(name)
    model = model.fuse().to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(_fp16_normal(p))
    g = torch.Generator().manual_seed(8)
    prompt = torch.randint(0, args.vocab_size, (23,), generator=g).tolist()
    forced = torch.randint(0, args.vocab_size, (12,), generator=g).tolist()

    def run(dtype=torch.bfloat16):
        cache = DenseCache(args.num_hidden_layers, args.num_key_value_heads, args.head_dim, 1, 64, dtype, "cpu")
        eng = LLMEngine(model, cache, "cpu")
        pre = eng.forward([0], [0], [prompt], all_logits=True).double()
        steps = [eng.forward([0], [len(prompt) + i], [[t]]).double()[-1] for i, t in enumerate(forced)]
        return pre, torch.stack(steps)

    pre, steps = run()
    model.float()
    exact = run(torch.float32)[1]
    model.to(torch.bfloat16)
    assert model.half_gemv_linears() == 4 * args.num_hidden_layers
    halves = [m for m in model.modules() if isinstance(m, HalfGemvLinear)]
    fused = ((args.num_attention_heads + 2 * args.num_key_value_heads) * args.head_dim, 2 * args.intermediate_size)
    assert not any(m.guard for m in halves if m.out_features in fused)
    assert all(m.guard for m in halves if m.out_features not in fused)
    pre2, steps2 = run()
    assert torch.equal(pre2, pre)
    err = lambda x: float((x - exact).norm() / exact.norm())  # noqa: E731
    assert 0 < float((steps2 - steps).norm()) and err(steps2) < 1.5 * err(steps) + 1e-3, (err(steps2), err(steps))
