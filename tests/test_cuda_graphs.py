"""Decode steps captured in CUDA graphs equal the same steps run eagerly (GPU only).

Two engines over identical caches take the same prefill and then the same decode steps: one replays
graphs (captured per batch size), the other runs eagerly. Logits and cache contents must agree: the
replay runs the same kernels on the same inputs, so the tolerance is only for cuBLAS choosing other
algorithms on the capture stream (relative 2e-2 in bf16), and greedy tokens must be identical.
"""

from __future__ import annotations

import pytest
import torch

from tqinfer.cache.config import CacheConfig, build_cache
from tqinfer.engine.engine import LLMEngine
from tqinfer.models.llama import LlamaForCausalLM, ModelArgs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def tiny_model(head_dim=64, seed=0):
    torch.manual_seed(seed)
    args = ModelArgs.from_dict(dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                    num_attention_heads=8, num_key_value_heads=2, vocab_size=512, head_dim=head_dim,
                                    max_position_embeddings=4096))
    model = LlamaForCausalLM(args).cuda().to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.fuse(), args


def engine_pair(model, args, cache_type, block_size=16):
    """(graphed engine, eager engine) over identical empty caches."""
    cfg = CacheConfig(k_type=cache_type, v_type=cache_type, sinks=4, window=32, block_size=block_size)
    engines = []
    for graphs in (True, False):
        cache = build_cache(cfg, args, max_seqs=4, max_len=512, dtype=torch.bfloat16, device="cuda")
        engines.append(LLMEngine(model, cache, "cuda", cuda_graphs=graphs))
    assert engines[0].cuda_graphs and not engines[1].cuda_graphs
    return engines


def same_decode(graphed, eager, before=lambda e: None):
    """The same ragged prefill, then 80 decode steps on both engines (before(engine) ahead of each
    call): logits within 2e-2 and the same greedy tokens every step."""
    gen = torch.Generator().manual_seed(0)
    lens = {0: 100, 1: 7, 3: 45}  # ragged prompts; slot 2 unused
    chunks = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lens.values()]
    for e in (graphed, eager):
        before(e)
        first = e.forward(list(lens), [0] * 3, chunks)
    token = dict(zip(lens, first.argmax(-1).tolist()))
    for step in range(80):  # crosses the 32-token window and block boundaries; batch sizes 3, then 2
        slots = [0, 1, 3] if step < 50 else [0, 3]
        logits = []
        for e in (graphed, eager):
            before(e)
            logits.append(e.forward(slots, [lens[s] for s in slots], [[token[s]] for s in slots]))
        a, b = logits
        assert torch.isfinite(a).all()
        err = (a - b).norm() / b.norm()
        assert err < 2e-2, f"step {step}: relative logit error {err:.3g}"
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
        for s, t in zip(slots, a.argmax(-1).tolist()):
            token[s] = t
            lens[s] += 1
    assert set(graphed.graphs) == {3, 2}  # one capture per batch size, replayed after


@pytest.mark.parametrize("cache_type", ["bf16", "tq3.5", "tq4", "tq3"])
def test_graph_replay_equals_eager_decode(cache_type):
    model, args = tiny_model()
    same_decode(*engine_pair(model, args, cache_type))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch: compute capability 9.0 or newer")
@pytest.mark.parametrize("cache_type", ["bf16", "tq3.5", "tq4"])
def test_graph_replay_with_pdl_equals_eager_without(cache_type, monkeypatch):
    """Decode graphs whose attention kernels launch each other early (programmatic dependent launch)
    against eager steps without it, three layers and 80 steps: a kernel reading a buffer before its
    writer finished (this layer's or the previous one's) would show here. Blocks of 64 tokens, so the
    compressed caches take the Gluon kernel."""
    from tqinfer.kernels import decode_attention

    model, args = tiny_model()
    graphed, eager = engine_pair(model, args, cache_type, block_size=64)
    same_decode(graphed, eager,
                lambda e: monkeypatch.setattr(decode_attention, "DECODE_PDL", None if e is graphed else False))


def test_replay_after_loading_a_sequence_calibrated_elsewhere(tmp_path):
    """A saved tq3.5 sequence brings its own outlier permutation; loading it rebuilds the kernels' codec
    layouts, so a graph captured before must not be replayed (it would read the freed old layout)."""
    from tqinfer.cache.store import load_sequence, save_sequence

    model, args = tiny_model()
    cfg = CacheConfig(k_type="tq3.5", v_type="tq3.5", sinks=4, window=32, block_size=16)
    gen = torch.Generator().manual_seed(1)
    saved = build_cache(cfg, args, max_seqs=1, max_len=512, dtype=torch.bfloat16, device="cuda")
    other = torch.randint(0, 512, (150,), generator=gen).tolist()
    LLMEngine(model, saved, "cuda", cuda_graphs=False).forward([0], [0], [other])
    save_sequence(saved, 0, other, tmp_path / "seq.safetensors", {})
    engines = []
    for graphs in (True, False):
        cache = build_cache(cfg, args, max_seqs=1, max_len=512, dtype=torch.bfloat16, device="cuda")
        engines.append(LLMEngine(model, cache, "cuda", cuda_graphs=graphs))
    prompt = torch.randint(0, 512, (90,), generator=gen).tolist()
    for e in engines:  # calibrated on `prompt`, then a few decode steps: the graph is captured
        e.forward([0], [0], [prompt])
        for i in range(4):
            e.forward([0], [90 + i], [[7 + i]])
    assert set(engines[0].graphs) == {1}
    perm = lambda cache: torch.stack([c.perm for c in cache.k_codec])  # noqa: E731
    assert not torch.equal(perm(saved), perm(engines[0].cache)), "the test needs two calibrations that differ"
    for e in engines:
        e.cache.set_len(0, 0)
        assert load_sequence(e.cache, 0, tmp_path / "seq.safetensors", {}) == other
        assert torch.equal(perm(e.cache), perm(saved))
    token, n = 5, len(other)
    for step in range(20):
        a, b = (e.forward([0], [n], [[token]]) for e in engines)
        assert torch.isfinite(a).all()
        err = (a - b).norm() / b.norm()
        assert err < 2e-2, f"step {step}: relative logit error {err:.3g}"
        token, n = int(b.argmax()), n + 1


def test_graph_captured_when_the_first_step_calibrates():
    """A tq3.5 cache filled without a prefill (as scripts/bench_e2e.py fills one): its first decode step
    calibrates each layer, so the step's records are written layer by layer; the capture after it
    writes every layer's at once through a table of the layers' tensors, which must exist before the
    capture (PagedCache.prepare_graph: a capture cannot copy it to the device). The graph is captured
    and replayed, and equals eager steps."""
    model, args = tiny_model()
    graphed, eager = engine_pair(model, args, "tq3.5")
    gen = torch.Generator(device="cuda").manual_seed(2)
    n = 200
    hot = [torch.randn(t.shape, generator=gen, device="cuda", dtype=t.dtype) for t in graphed.cache.k_hot]
    for e in (graphed, eager):
        cache = e.cache
        cache.reserve(0, n)
        for layer, x in enumerate(hot):
            cache.k_hot[layer].copy_(x)
            cache.v_hot[layer].copy_(x.flip(-1))
        cache.compressed[0] = n - cache.window
        cache.set_len(0, n)
    token = 3
    for step in range(6):
        a, b = (e.forward([0], [n + step], [[token]]) for e in (graphed, eager))
        assert torch.isfinite(a).all()
        err = (a - b).norm() / b.norm()
        assert err < 2e-2, f"step {step}: relative logit error {err:.3g}"
        token = int(b.argmax())
    assert graphed.cuda_graphs and set(graphed.graphs) == {1} and graphed.cache.retired


def test_decode_projections_through_the_kernel_equal_cublas(monkeypatch):
    """A decode step's projections take fused.linear's kernel (counted) and its logits equal the step
    with every projection through cuBLAS (SKINNY_ROWS 0) to bf16 rounding, greedy tokens identical;
    the prefill's projections (more than SKINNY_ROWS rows) go to cuBLAS."""
    from tqinfer.kernels import fused, fused_triton

    model, args = tiny_model()
    rows, skinny = [], fused_triton.skinny_linear
    monkeypatch.setattr(fused_triton, "skinny_linear", lambda x, w, b: rows.append(x.shape[0]) or skinny(x, w, b))
    logits = []
    for limit in (fused.SKINNY_ROWS, 0):
        monkeypatch.setattr(fused, "SKINNY_ROWS", limit)
        cache = build_cache(CacheConfig(k_type="tq3.5", v_type="tq3.5", sinks=4, window=32), args, max_seqs=2,
                            max_len=256, dtype=torch.bfloat16, device="cuda")
        engine = LLMEngine(model, cache, "cuda", cuda_graphs=False)
        engine.forward([0, 1], [0, 0], [list(range(1, 70)), list(range(3, 40))])
        logits.append(engine.forward([0, 1], [69, 37], [[5], [6]]))
    # the prefill's head (each chunk's last token), then the decode step's 3 layers x (q/k/v, o, gate/up,
    # down) and head: 14 calls of 2 rows, none with the prefill's 106 or with SKINNY_ROWS 0
    assert rows == [2] * 14
    torch.testing.assert_close(logits[0], logits[1], rtol=2e-2, atol=2e-2)
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
