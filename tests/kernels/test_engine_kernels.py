"""The engine with the CUDA routing on (kernels under the interpreter): continuous batching mixes decoding
sequences with prefill chunks, so steps go through dispatch's decode / mixed / prefill routes, the
decode-then-attend prefill path and the quantize kernel; greedy outputs equal the torch twins' solo runs."""

from __future__ import annotations

import pytest
import torch

from tqinfer.cache.config import CacheConfig
from tqinfer.engine.scheduler import Scheduler
from tqinfer.kernels import decode_attention, dispatch, prefill_attention
from tqinfer.llm import LLM
from tqinfer.sampling import SamplingParams

PROMPTS = [[5 + (7 * i) % 200 for i in range(n)] for n in (3, 40, 17, 61)]
LENGTHS = [6, 4, 5, 3]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernels under the interpreter on CPU tensors; where CUDA "
                    "is present Triton launches them natively and refuses CPU tensors")
@pytest.mark.parametrize("flash", [False, True], ids=["masked", "flash-segments"])
def test_batched_kernels_equal_solo_twins(tiny_hf_folder, monkeypatch, flash):
    """flash: sdpa_prefill's flash branch, flash attention stood in by float64 softmax with its
    log-sum-exp (test_prefill_attention._softmax_lse), prefixes decoded in segments of 5 tokens."""
    folder = tiny_hf_folder("llama", tokenizer="bytes", max_position_embeddings=1024, head_dim=64)  # kernel-read
    cfg = CacheConfig(k_type="tq3.5", v_type="tq3", sinks=2, window=8, block_size=16)
    llm = LLM(str(folder), device="cpu", dtype="float32", cache=cfg, max_context=128, max_seqs=4, prefill_chunk=16)
    greedy = [SamplingParams.greedy(max_tokens=n, ignore_eos=True) for n in LENGTHS]
    expected = [llm.generate(p, s)[0].token_ids for p, s in zip(PROMPTS, greedy)]  # the torch twins

    routes = []

    def count(mod, name, tag, returned=lambda r: True):
        real = getattr(mod, name)

        def wrapped(*a, **kw):
            r = real(*a, **kw)
            if returned(r):
                routes.append(tag)
            return r
        monkeypatch.setattr(mod, name, wrapped)

    monkeypatch.setattr(dispatch, "use_triton", lambda t: True)
    count(dispatch, "mixed_attention", "mixed")
    count(decode_attention, "paged_decode_attention", "decode")
    count(prefill_attention, "sdpa_prefill", "sdpa", lambda r: r is not None)
    monkeypatch.setattr(prefill_attention, "PATH_MIN_PREFIX", 0)
    if flash:
        from .test_prefill_attention import _softmax_lse

        monkeypatch.setattr(prefill_attention, "_flash_ok", lambda q: True)
        monkeypatch.setattr(prefill_attention, "_flash_lse", lambda *a: _softmax_lse(*a[:5]))  # (seg_keys dropped)
        monkeypatch.setattr(prefill_attention, "SCRATCH_BYTES", 5 * 2 * 2 * 64 * 4)  # 5 tokens, 2 KV heads
    sched = Scheduler(llm, chunk=16, token_budget=24)
    for p, s in zip(PROMPTS, greedy):
        sched.add(p, s)
    results = sched.run()
    assert {"mixed", "decode", "sdpa"} <= set(routes), routes
    assert [r.token_ids for r in results] == expected
