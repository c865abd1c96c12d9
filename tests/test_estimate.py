"""tqinfer estimate: its numbers equal what the engine allocates; refusals carry the numbers."""

from __future__ import annotations

import json

import pytest
import torch

from tqinfer.cache.config import CacheConfig, build_cache
from tqinfer.cache.paged import PagedCache
from tqinfer.cli import main
from tqinfer.estimate import estimate, largest_context, parameter_count
from tqinfer.llm import LLM
from tqinfer.models import build_model


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_estimate_equals_allocated_bytes(tiny_hf_folder, kind):
    folder = tiny_hf_folder(kind, tokenizer="bytes")
    config = json.loads((folder / "config.json").read_text())
    cfg = CacheConfig(k_type="tq3.5", v_type="tq3", sinks=4, window=32, block_size=16)
    e = estimate(config, cfg, 256, torch.float32, 1 << 34, max_seqs=2)
    _, args = build_model(config)
    cache = PagedCache(cfg, args, max_seqs=2, max_len=256, dtype=torch.float32, device="cpu")
    assert e.kv_cache == cache.nbytes()
    dense = estimate(config, CacheConfig(), 250, torch.float32, 1 << 34, max_seqs=2)  # rows in 64-token tiles
    assert dense.kv_cache == build_cache(CacheConfig(), args, max_seqs=2, max_len=250, dtype=torch.float32,
                                         device="cpu").nbytes()
    llm = LLM(str(folder), device="cpu", dtype="float32", max_context=64)
    assert e.weights == sum(p.numel() * p.element_size() for p in llm.model.parameters())
    assert parameter_count(args) == sum(p.numel() for p in llm.model.parameters())


def test_largest_context_fits_and_one_more_block_does_not(tiny_hf_folder):
    folder = tiny_hf_folder("llama", tokenizer="bytes")
    config = json.loads((folder / "config.json").read_text())
    cfg = CacheConfig(k_type="tq4", v_type="tq4", block_size=16)
    memory = 50 << 20
    n = largest_context(config, cfg, torch.bfloat16, memory)
    assert estimate(config, cfg, n, torch.bfloat16, memory).fits
    assert not estimate(config, cfg, n + 16, torch.bfloat16, memory).fits
    dense = CacheConfig(block_size=16)
    bf16 = largest_context(config, dense, torch.bfloat16, memory)
    assert estimate(config, dense, bf16, torch.bfloat16, memory).fits
    assert not estimate(config, dense, bf16 + 16, torch.bfloat16, memory).fits
    # the dense cache's prefill mask is part of the plan: a 1024-token chunk leaves less room than 512
    big = 400 << 20
    wide, narrow = (largest_context(config, dense, torch.bfloat16, big, chunk=c) for c in (1024, 512))
    assert 0 < wide < narrow
    assert n > 3 * bf16  # 4.25 bits vs 16 per value (weights take their share of the memory first)


def test_cli_estimate_prints_the_numbers_and_says_when_it_does_not_fit(tiny_hf_folder, capsys):
    folder = tiny_hf_folder("llama", tokenizer="bytes")
    assert main(["estimate", str(folder), "-c", "512", "--kv-cache", "tq3.5", "--memory", "1"]) == 0
    out = capsys.readouterr().out
    assert "KV cache" in out and "bf16 would be" in out and "fits" in out
    assert main(["estimate", str(folder), "-c", "512", "--memory", "0.0001"]) == 2
    assert "does NOT fit" in capsys.readouterr().out


def test_llm_refuses_a_cache_that_cannot_fit_before_allocating(tiny_hf_folder, capsys):
    folder = tiny_hf_folder("llama", tokenizer="bytes", max_position_embeddings=1 << 40)
    # a dense cache of 2^33 tokens: refused with the numbers, nothing allocated
    code = main(["run", str(folder), "-p", "hi", "-c", str(1 << 33)])
    err = capsys.readouterr().err
    assert code == 1
    assert "needs" in err and "MiB but only" in err and "Traceback" not in err
    code = main(["run", str(folder), "-p", "hi", "-c", str(1 << 33), "--kv-cache", "tq3"])
    err = capsys.readouterr().err
    assert code == 1 and "needs" in err and "(tq3)" in err


def test_context_beyond_the_model_maximum_is_refused(tiny_hf_folder, capsys):
    folder = tiny_hf_folder("llama", tokenizer="bytes")
    assert main(["run", str(folder), "-p", "hi", "-c", "100000"]) == 1
    assert "exceeds the model's maximum of 512" in capsys.readouterr().err
