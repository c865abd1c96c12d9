"""Continuous batching: batched greedy outputs equal solo runs, preemption keeps them, `tqinfer batch`."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tqinfer.cache.config import CacheConfig
from tqinfer.cli import main
from tqinfer.engine.scheduler import Scheduler
from tqinfer.llm import LLM
from tqinfer.sampling import SamplingParams


@pytest.fixture
def folder(tiny_hf_folder):
    return tiny_hf_folder("llama", tokenizer="bytes", max_position_embeddings=1024)


PROMPTS = [[5 + i % 200 for i in range(n)] for n in (3, 40, 17, 90, 1, 64)]


def solo(llm, prompt, n):
    return llm.generate(prompt, SamplingParams.greedy(max_tokens=n, ignore_eos=True))[0].token_ids


@pytest.mark.parametrize("ktype", ["bf16", "tq3.5"])
def test_batched_greedy_equals_each_request_alone(folder, ktype):
    cfg = CacheConfig(k_type=ktype, v_type=ktype if ktype != "tq3.5" else "tq3", sinks=2, window=8, block_size=16)
    llm = LLM(str(folder), device="cpu", dtype="float32", cache=cfg, max_context=256, max_seqs=4, prefill_chunk=32)
    lengths = [5, 12, 3, 9, 7, 1]
    expected = [solo(llm, p, n) for p, n in zip(PROMPTS, lengths)]
    sched = Scheduler(llm, chunk=32, token_budget=64)
    for p, n in zip(PROMPTS, lengths):
        sched.add(p, SamplingParams.greedy(max_tokens=n, ignore_eos=True))
    results = sched.run()
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason == "length" for r in results)
    if ktype != "bf16":
        assert len(llm.cache.free_blocks) == llm.cache.num_blocks  # everything released


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(list(range(6))), budget=st.integers(8, 96))
def test_random_arrivals_with_preemption_keep_outputs(folder, order, budget):
    cfg = CacheConfig(k_type="tq4", v_type="tq4", sinks=2, window=8, block_size=16)
    # 12 blocks of 16 tokens: far fewer than the requests need together, so preemption happens
    llm = LLM(str(folder), device="cpu", dtype="float32", cache=cfg, max_context=192, max_seqs=4, prefill_chunk=16)
    llm.cache.free_blocks = llm.cache.free_blocks[-12:]
    total = len(llm.cache.free_blocks)
    sched = Scheduler(llm, chunk=16, token_budget=budget)
    lengths = {i: 6 for i in range(6)}
    reqs = {}
    for step, i in enumerate(order):
        reqs[i] = sched.add(PROMPTS[i], SamplingParams.greedy(max_tokens=lengths[i], ignore_eos=True))
        sched.step()  # arrivals interleave with steps
    sched.run()
    assert len(llm.cache.free_blocks) == total and sorted(llm._free_slots) == list(range(4))
    for i, req in reqs.items():
        assert req.finish == "length" and len(req.gen.tokens) == 6
    # preempted requests recompute: their tokens equal a solo run with the same cache type
    for i, req in reqs.items():
        assert req.gen.tokens == solo(llm, PROMPTS[i], 6), (i, req.preemptions)


def test_prefill_chunk_by_device_and_a_step_takes_a_whole_chunk(folder, tiny_hf_folder, monkeypatch):
    import torch

    from tqinfer import llm as llm_mod

    assert llm_mod.default_prefill_chunk(torch.device("cuda")) == 4096
    assert llm_mod.default_prefill_chunk(torch.device("cpu")) == 512
    llm = LLM(str(folder), device="cpu", dtype="float32", max_context=1024, max_seqs=2)
    assert llm.prefill_chunk == 512
    monkeypatch.setitem(llm_mod.PREFILL_CHUNK, "cpu", 300)  # as CUDA's larger chunk, at a CPU size
    llm = LLM(str(folder), device="cpu", dtype="float32", max_context=1024, max_seqs=2)
    assert llm.prefill_chunk == 300
    prompt = [5 + i % 200 for i in range(700)]
    sched = Scheduler(llm, chunk=llm.prefill_chunk)
    req = sched.add(prompt, SamplingParams.greedy(max_tokens=2, ignore_eos=True))
    sched.step()
    assert req.cached == 300  # one whole chunk in the first step (the default budget holds it)
    assert sched.run()[0].token_ids == solo(llm, prompt, 2)
    # a chunk over 2048 tokens is not cut by the default budget
    big = LLM(str(tiny_hf_folder("llama", tokenizer="bytes", max_position_embeddings=4096)), device="cpu",
              dtype="float32", max_context=3000, max_seqs=1)
    sched = Scheduler(big, chunk=2500)
    req = sched.add([5 + i % 200 for i in range(2600)], SamplingParams.greedy(max_tokens=1, ignore_eos=True))
    sched.step()
    assert sched.budget == 2500 and req.cached == 2500


def test_batch_cli_reports_malformed_lines_and_resumes(folder, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        json.dumps({"id": "a", "prompt": "hello", "max_tokens": 4}),
        "{not json",
        json.dumps({"id": "b", "messages": [{"role": "user", "content": "hi"}], "params": {"max_tokens": 3}}),
        json.dumps({"id": "c", "prompt": "x", "params": {"warmth": 3}}),
        json.dumps({"prompt": "no id", "max_tokens": 2}),
    ]
    inp.write_text("\n".join(lines) + "\n")
    code = main(["batch", str(folder), "-i", str(inp), "-o", str(out), "--temp", "0", "-c", "256", "-n", "8"])
    err = capsys.readouterr().err
    assert code == 1  # some lines were skipped
    assert "line 2: not JSON" in err and "line 4: unknown sampling parameter(s) ['warmth']" in err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["5", "a", "b"]
    assert {r["id"]: r["usage"]["completion_tokens"] for r in rows}["a"] <= 4
    # a rerun skips the finished ids and adds nothing
    code = main(["batch", str(folder), "-i", str(inp), "-o", str(out), "--temp", "0", "-c", "256", "-n", "8"])
    err = capsys.readouterr().err
    assert "3 id(s) already in" in err
    assert len(out.read_text().splitlines()) == 3
