"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) end to end against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tqinfer.llm import LLM
from tqinfer.sampling import SamplingParams

pytestmark = pytest.mark.slow
TEXT = (Path(__file__).parents[1] / "data" / "eval" / "license_texts.txt").read_text()


@pytest.fixture(scope="module")
def llm(default_model_files):
    return LLM(default_model_files.folder.as_posix(), device="cpu", dtype="float32", max_context=2048)


def test_logits_match_transformers_on_the_same_gguf(llm, transformers_default_model):
    ids = llm.tokenizer.encode(TEXT)[:256]
    ref = transformers_default_model
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].double()
    got = llm.logits(ids, chunk=100).double()
    rel = float((got - expected).norm() / expected.norm())
    # both dequantize the same Q4_1 weights to fp32; what is left is fp32 summation order
    assert rel <= 1e-4, rel
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.99


def test_greedy_completion_says_paris(llm):
    result = llm.generate("The capital of France is", SamplingParams.greedy(max_tokens=8))[0]
    assert "Paris" in result.text
    assert result.stats.generation_tokens <= 8 and result.finish_reason in ("stop", "length")


def test_tq4_cache_still_says_paris(default_model_files):
    llm = LLM(default_model_files.folder.as_posix(), device="cpu", dtype="float32", max_context=2048,
              cache_type_k="tq4", cache_type_v="tq4")
    # a prompt far longer than sinks + window, so most of it is read back from 4-bit codes
    prompt = TEXT[:6000] + "\n\nQuestion: what is the capital of France? Answer: The capital of France is"
    ids = llm.tokenizer.encode(prompt)
    assert len(ids) > llm.cache_config.sinks + llm.cache_config.window
    with llm.session() as s:
        text = "".join(ev.text for ev in s.stream(ids, SamplingParams.greedy(max_tokens=6)))
        assert s.kv_bytes < s.kv_bytes_bf16
    assert "Paris" in text


def test_chat_reuses_the_cached_prefix(llm):
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a color."}]
    with llm.session() as s:
        first = list(s.stream(llm.chat_ids(messages), SamplingParams.greedy(max_tokens=10)))
        answer = "".join(ev.text for ev in first)
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Another one."}]
        ids = llm.chat_ids(messages)
        second = list(s.stream(ids, SamplingParams.greedy(max_tokens=5)))
        stats = second[-1].stats
        assert stats.reused_tokens >= len(llm.chat_ids(messages[:2])) - 1
        assert stats.prompt_tokens == len(ids) - stats.reused_tokens
        # the reused session gives the same answer as a fresh one
    fresh = llm.generate(ids, SamplingParams.greedy(max_tokens=5))[0]
    assert "".join(ev.text for ev in second) == fresh.text


def test_prompt_longer_than_the_context_is_a_clear_error(llm):
    from tqinfer.errors import ContextError

    with pytest.raises(ContextError, match=r"2100 tokens .* context holds 2048"):
        llm.generate([1] * 2100, SamplingParams.greedy(max_tokens=1))


def test_cpu_fp16_gemv_keeps_the_greedy_tokens_of_bf16_linears(default_model_files):
    """The CPU path holds a bf16 model's projections in fp16 (HalfGemvLinear: fp16 GEMV for decode
    rows). Greedy decoding with plain bf16 linears (the reference) gives tokens and top-2 margins;
    the fp16 path, fed the same tokens, picks the same token at every step whose reference margin
    is more than a few ulps of the logits (a prompt of this test once met an exact bf16 tie, where
    either pick is right), with the bf16 cache and tq3.5 (past sinks + window: codes are read)."""
    from tqinfer.cache.config import CacheConfig
    from tqinfer.models.llama import HalfGemvLinear

    llm = LLM(default_model_files.folder.as_posix(), device="cpu", dtype="bfloat16", max_context=1024)
    halves = [(m, name, ch) for m in llm.model.modules() for name, ch in m.named_children()
              if isinstance(ch, HalfGemvLinear)]
    assert len(halves) == 4 * llm.args.num_hidden_layers
    ids = llm.tokenizer.encode(TEXT)[:400]
    n = 24

    def decode(forced=None):
        """Logits of n decode steps after ids: greedy, or fed `forced` tokens."""
        out = {}
        for t in ("bf16", "tq3.5"):
            llm.set_cache(CacheConfig(k_type=t, v_type=t))
            with llm.session() as s:
                steps = [s.append(ids).float()]
                for i in range(n - 1):
                    token = forced[t][i] if forced else int(steps[-1].argmax())
                    steps.append(s.append([token]).float())
            out[t] = torch.stack(steps)
        return out

    for m, name, ch in halves:
        lin = torch.nn.Linear(ch.in_features, ch.out_features, bias=ch.bias is not None, dtype=torch.bfloat16)
        lin.weight = torch.nn.Parameter(ch.weight.to(torch.bfloat16), requires_grad=False)
        lin.bias = ch.bias
        setattr(m, name, lin)
    ref = decode()
    ref_tokens = {t: x.argmax(-1).tolist() for t, x in ref.items()}
    for m, name, ch in halves:
        setattr(m, name, ch)
    got = decode(ref_tokens)
    for t in ref:
        top2 = ref[t].topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.1
        assert int(clear.sum()) >= n - 3, (t, clear)
        assert got[t].argmax(-1)[clear].tolist() == torch.tensor(ref_tokens[t])[clear].tolist(), t
        rel = float((got[t] - ref[t]).norm() / ref[t].norm())
        assert 0 < rel < 2e-2, (t, rel)


def test_cpu_attention_kernel_keeps_the_twins_tokens(llm, monkeypatch):
    """tq3.5 over the default model read by the C kernel (prefill tiles and decode steps over records)
    against the torch twin's own path (TQINFER_KERNELS=torch): fed the twin's greedy tokens, the
    kernel path picks the same token at every step, and its logits stay close: the two paths differ in
    fp32 summation order only (1e-7 relative per layer, tests/kernels/test_cpu_attention.py), but a
    later chunk's keys can then round to a neighbouring code, so the logits differ by ~1e-3, not 1e-6."""
    from tqinfer.cache.config import CacheConfig
    from tqinfer.kernels import cpu

    ids = llm.tokenizer.encode(TEXT)[:1500]  # past sinks + window: most of the prompt is records
    n = 16
    llm.set_cache(CacheConfig(k_type="tq3.5", v_type="tq3.5"))
    if cpu.cpu_attention(next(c for c in llm.cache.k_codec if c is not None), 3, torch.device("cpu")) is None:
        pytest.skip("no C compiler builds the CPU kernel here")
    calls = []  # records a decode step reads through the kernel, per layer
    weights = cpu.CpuAttention.decode_weights
    monkeypatch.setattr(cpu.CpuAttention, "decode_weights", lambda self, *a: calls.append(a[-1]) or weights(self, *a))

    def decode(forced=None):
        with llm.session() as s:
            steps = [s.append(ids).double()]
            for i in range(n - 1):
                steps.append(s.append([forced[i] if forced else int(steps[-1].argmax())]).double())
        return torch.stack(steps)

    monkeypatch.setenv("TQINFER_KERNELS", "torch")
    ref = decode()
    tokens = ref.argmax(-1).tolist()
    monkeypatch.delenv("TQINFER_KERNELS")
    assert not calls
    got = decode(tokens)
    assert calls and max(calls) > 1000  # decode steps read >1000 records a layer through the kernel
    assert got.argmax(-1).tolist() == tokens
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 5e-3, rel
