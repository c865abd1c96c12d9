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
