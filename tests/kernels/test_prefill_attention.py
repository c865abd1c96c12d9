"""Chunked-prefill kernel == float64 attention (== the torch twin): ragged chunks over compressed and
dense prefixes, chunks longer than a block, GQA 1/3/4/8."""

import math
import zlib

import pytest
import torch

from tqinfer.kernels import reference
from tqinfer.kernels import prefill_attention
from tqinfer.kernels.prefill_attention import paged_prefill_attention, sdpa_prefill

from .cachegen import BS, DEV, attention64, build_cache, rel_err


CASES = [  # k type, v type, head_dim, KV heads, group size
    ("bf16", "bf16", 64, 2, 4),
    ("tq4", "tq4", 64, 1, 8),
    ("tq3", "tq3", 64, 3, 3),
    ("tq3.5", "tq3.5", 128, 2, 4),
    ("tq2.5", "tq2.5", 64, 1, 1),
    ("tqp3", "tqp3", 64, 1, 4),
    ("bf16", "tq3.5", 64, 1, 2),
]


def _prefill_case(kt, vt, d, h, g, prefixes, chunks, sinks=4, window=8):
    """A cache holding `prefixes` and the chunks' q, k, v, bounds and scale."""
    seed = zlib.crc32(f"{kt}{vt}{d}{h}{g}".encode()) % 1000
    view, kd, vd = build_cache(kt, vt, prefixes, heads=h, d=d, sinks=sinks, window=window, block_size=BS,
                               dtype=torch.float32, device=DEV, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    t = sum(chunks)
    q = torch.randn(t, h * g, d, generator=gen).to(DEV)
    k = (torch.randn(t, h, d, generator=gen) * 2).to(DEV)
    v = torch.randn(t, h, d, generator=gen).to(DEV)
    cu = torch.tensor([0] + list(torch.tensor(chunks).cumsum(0)), dtype=torch.int32, device=DEV)
    pl = torch.tensor(prefixes, dtype=torch.int32, device=DEV)
    return view, kd, vd, q, k, v, cu, pl, 1 / math.sqrt(d)


@pytest.mark.parametrize("method", ["fused", "auto"])
@pytest.mark.parametrize("kt,vt,d,h,g", CASES, ids=[f"{c[0]}-{c[1]}-d{c[2]}-h{c[3]}-g{c[4]}" for c in CASES])
def test_prefill_matches_float64(kt, vt, d, h, g, method, monkeypatch):
    """The fused kernel, and the default path (sdpa_prefill where it applies: MSE types on both sides;
    its prefix threshold lowered to these short prefixes)."""
    monkeypatch.setattr(prefill_attention, "PATH_MIN_PREFIX", 0)
    prefixes = [0, 17, 40, 5]
    chunks = [19, 1, 37, 3]  # a chunk longer than two query tiles, single tokens, ragged
    view, kd, vd, q, k, v, cu, pl, scale = _prefill_case(kt, vt, d, h, g, prefixes, chunks)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, k, v, cu, pl, view, scale, block_m=16 if g < 4 else 8, out=out, method=method)
    ref = attention64(q, k, v, cu, prefixes, kd, vd, scale)
    assert torch.isfinite(out).all(), "unwritten or non-finite outputs"
    tol = 1e-5 if (kt, vt) == ("bf16", "bf16") and DEV == "cpu" else 3e-3
    assert rel_err(out, ref) < tol
    twin = reference.paged_attention(q, k, v, cu, pl, view, scale)
    assert rel_err(out, twin) < tol


@pytest.mark.parametrize("unit_loads", [True, False, "lut", "pair", "asm"], ids=["units", "bytes", "lut", "pairs", "asm"])
@pytest.mark.parametrize("kt,vt,d", [("tq3.5", "tq4", 64), ("tq3", "tq3.5", 128), ("tq2.5", "tqp3", 64)])
def test_prefill_lookups_agree(unit_loads, kt, vt, d):
    """Codes read in whole units with L1 gathers, byte by byte, through a register table, by fp16x2 pairs
    (4- and 3-bit parts; a side with other parts keeps whole units) or by PRMT lookups (the default;
    compiled code only: the interpreter runs pairs): the same attention, against float64."""
    prefixes, chunks = [45, 30], [9, 20]
    view, kd, vd = build_cache(kt, vt, prefixes, heads=2, d=d, sinks=4, window=8, block_size=BS,
                               dtype=torch.float32, device=DEV, seed=11)
    gen = torch.Generator().manual_seed(12)
    t = sum(chunks)
    q = torch.randn(t, 8, d, generator=gen).to(DEV)
    k = torch.randn(t, 2, d, generator=gen).to(DEV)
    v = torch.randn(t, 2, d, generator=gen).to(DEV)
    cu = torch.tensor([0, chunks[0], t], dtype=torch.int32, device=DEV)
    pl = torch.tensor(prefixes, dtype=torch.int32, device=DEV)
    out = torch.full_like(q, float("nan"))
    scale = 1 / math.sqrt(d)
    paged_prefill_attention(q, k, v, cu, pl, view, scale, block_m=8, out=out, unit_loads=unit_loads, method="fused")
    assert torch.isfinite(out).all()
    assert rel_err(out, attention64(q, k, v, cu, prefixes, kd, vd, scale)) < 3e-3


@pytest.mark.parametrize("kt,vt,d,h,g", [c for c in CASES if c[0] != "bf16" and "tqp" not in c[0] + c[1]])
def test_sdpa_prefill_matches_float64(kt, vt, d, h, g):
    """The decode-then-SDPA path runs (it is not the fused kernel answering) and agrees with float64:
    prefixes with records, prefixes inside the hot window, a chunk without prefix."""
    prefixes, chunks = [0, 17, 40, 5, 90], [19, 1, 37, 3, 6]
    view, kd, vd, q, k, v, cu, pl, scale = _prefill_case(kt, vt, d, h, g, prefixes, chunks)
    out = torch.full_like(q, float("nan"))
    assert sdpa_prefill(q, k, v, view, scale, prefixes, chunks, out) is out
    assert torch.isfinite(out).all(), "unwritten or non-finite outputs"
    assert rel_err(out, attention64(q, k, v, cu, prefixes, kd, vd, scale)) < 3e-3


def test_sdpa_prefill_declines(monkeypatch):
    """QJL (prod) types, dense keys, and a prefix over the buffer budget are left to the fused kernel."""
    for kt, vt in (("tqp3", "tqp3"), ("bf16", "tq3.5"), ("tq3.5", "tqp3")):
        view, _, _, q, k, v, _, _, scale = _prefill_case(kt, vt, 64, 1, 2, [30], [5])
        assert sdpa_prefill(q, k, v, view, scale, [30], [5], torch.empty_like(q)) is None, (kt, vt)
    view, _, _, q, k, v, _, _, scale = _prefill_case("tq3.5", "tq3.5", 64, 1, 2, [30], [5])
    monkeypatch.setattr(prefill_attention, "SCRATCH_BYTES", 2 * 64 * 35 * 4 - 1)  # one byte short (fp32)
    assert sdpa_prefill(q, k, v, view, scale, [30], [5], torch.empty_like(q)) is None
    monkeypatch.setattr(prefill_attention, "SCRATCH_BYTES", 2 * 64 * 35 * 4)
    assert sdpa_prefill(q, k, v, view, scale, [30], [5], torch.empty_like(q)) is not None


@pytest.mark.skipif(DEV != "cuda", reason="flash attention in half types: the GPU path")
@pytest.mark.parametrize("kt,seg", [("tq3.5", None), ("tq4", None), ("tq3.5", 128)])
def test_sdpa_prefill_flash_matches_masked_and_float64(kt, seg, monkeypatch):
    """In bf16 on the GPU the chunk and the prefix go through fused attention ops (the calls are counted),
    merged by their log-sum-exps: equal to the one masked SDPA call (without them) and to float64 within
    bf16 rounding. seg: prefix segments of 128 keys against rows padded to 64 (the bucketed shape cuDNN
    takes where it runs), so full segments, a partial one and the padding are exercised."""
    if seg:
        monkeypatch.setattr(prefill_attention, "SEG_KEYS", seg)
        monkeypatch.setattr(prefill_attention, "SEG_SCALE_MAX", 1)
        monkeypatch.setattr(prefill_attention, "SEG_ROWS", 64)
    prefixes, chunks = [300, 17, 90], [64, 1, 130]
    seed = zlib.crc32(kt.encode()) % 1000
    view, kd, vd = build_cache(kt, kt, prefixes, heads=2, d=128, sinks=4, window=8, block_size=BS,
                               dtype=torch.bfloat16, device=DEV, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    t = sum(chunks)
    q = torch.randn(t, 8, 128, generator=gen).to(DEV, torch.bfloat16)
    k = (torch.randn(t, 2, 128, generator=gen) * 2).to(DEV, torch.bfloat16)
    v = torch.randn(t, 2, 128, generator=gen).to(DEV, torch.bfloat16)
    cu = torch.tensor([0] + list(torch.tensor(chunks).cumsum(0)), dtype=torch.int32, device=DEV)
    assert prefill_attention._flash_ok(q)
    calls, real = [], prefill_attention._flash_lse
    monkeypatch.setattr(prefill_attention, "_flash_lse", lambda *a: calls.append(1) or real(*a))
    ops, real_op = [], prefill_attention._attention_lse  # (op, keys) of each call, the checks' included
    monkeypatch.setattr(prefill_attention, "_attention_lse",
                        lambda op, *a: ops.append((op, a[1].shape[2])) or real_op(op, *a))
    out = torch.full_like(q, float("nan"))
    assert sdpa_prefill(q, k, v, view, 1 / math.sqrt(128), prefixes, chunks, out) is out
    want = 2 * len(prefixes) if not seg else 3 + 3 + 1 + 1  # chunks; prefix 300 in 128 + 128 + 44, 17, 90
    assert len(calls) == want and torch.isfinite(out).all()
    if seg and prefill_attention._CUDNN.get(prefill_attention._key(q)):
        assert ops.count(("cudnn", 128)) == 2  # prefix 300: two full segments of 128 keys
    monkeypatch.setattr(prefill_attention, "_flash_ok", lambda q: False)
    masked = sdpa_prefill(q, k, v, view, 1 / math.sqrt(128), prefixes, chunks, torch.full_like(q, float("nan")))
    assert rel_err(out.float(), masked.float()) < 1e-2
    ref = attention64(q.double(), k.double(), v.double(), cu, prefixes, kd, vd, 1 / math.sqrt(128))
    assert rel_err(out.float(), ref) < 2e-2


@pytest.mark.parametrize("kt,vt", [("tq3.5", "tq3.5"), ("tq4", "tq4"), ("tqp3", "tqp3"), ("bf16", "bf16")])
def test_mixed_step_matches_float64(kt, vt):
    """Continuous batching: single tokens of decoding sequences beside prefill chunks in one step go
    through the decode kernel (single tokens) and prefill (chunks), each over its own rows of the view."""
    from tqinfer.kernels import dispatch
    from tqinfer.kernels.decode_attention import paged_decode_attention

    prefixes, chunks = [40, 17, 90, 5, 60], [1, 19, 1, 7, 1]
    view, kd, vd, q, k, v, cu, pl, scale = _prefill_case(kt, vt, 64, 2, 4, prefixes, chunks)
    out = dispatch.mixed_attention(paged_decode_attention, paged_prefill_attention, q, k, v, pl, view, scale,
                                   prefixes, chunks)
    assert torch.isfinite(out).all()
    assert rel_err(out, attention64(q, k, v, cu, prefixes, kd, vd, scale)) < 3e-3


def test_sdpa_prefill_bucketed_segments(monkeypatch):
    """The prefix cut into segments of SEG_KEYS keys, each against the folded queries padded to a multiple
    of SEG_ROWS rows (the one shape cuDNN builds a plan for) unless that adds over a quarter of the rows,
    the rest as it comes; on the CPU with
    float64 standing in for the fused ops: the padding rows dropped, the parts merged into float64."""
    prefixes, chunks = [0, 17, 40, 5, 90], [19, 1, 37, 3, 6]
    view, kd, vd, q, k, v, cu, pl, scale = _prefill_case("tq3.5", "tq4", 64, 2, 4, prefixes, chunks)
    calls = []
    monkeypatch.setattr(prefill_attention, "_flash_ok", lambda q: True)
    monkeypatch.setattr(prefill_attention, "_flash_lse",
                        lambda *a: calls.append((a[0].shape[2], a[1].shape[2], a[3])) or _softmax_lse(*a[:5]))
    monkeypatch.setattr(prefill_attention, "SEG_KEYS", 16)
    monkeypatch.setattr(prefill_attention, "SEG_SCALE_MAX", 1)
    monkeypatch.setattr(prefill_attention, "SEG_ROWS", 32)
    out = torch.full_like(q, float("nan"))
    assert sdpa_prefill(q, k, v, view, scale, prefixes, chunks, out) is out
    # (query rows, keys) of the prefix calls: G x n rows, padded to a multiple of 32 for full segments
    # where that adds at most a quarter of the rows (148 -> 160; not 4 -> 32, 24 -> 32)
    assert [(r, s) for r, s, causal in calls if not causal] == \
        [(4, 16), (4, 1), (160, 16), (160, 16), (148, 8), (12, 5)] + [(24, 16)] * 5 + [(24, 10)]
    assert torch.isfinite(out).all()
    assert rel_err(out, attention64(q, k, v, cu, prefixes, kd, vd, scale)) < 3e-3


def test_segments_lengthen_for_small_calls(monkeypatch):
    """segment_keys: SEG_KEYS for the 8B shape's 4096-token chunk (and its 2048-token one), twice that for
    the default model's 4096-token chunk, at most SEG_SCALE_MAX x for a chat turn; sdpa_prefill cuts the
    prefix by it and hands it to the op as the bucket's key count."""
    sk = prefill_attention.segment_keys
    base = prefill_attention.SEG_KEYS
    assert sk(4 * 4096, 8, 128) == base and sk(4 * 2048, 8, 128) == base
    assert sk(3 * 4096, 3, 64) == 2 * base and sk(3 * 50, 3, 64) == 8 * base
    prefixes, chunks = [90], [6]
    view, kd, vd, q, k, v, cu, pl, scale = _prefill_case("tq3.5", "tq4", 64, 2, 4, prefixes, chunks)
    calls = []
    monkeypatch.setattr(prefill_attention, "_flash_ok", lambda q: True)
    monkeypatch.setattr(prefill_attention, "_flash_lse",
                        lambda *a: calls.append((a[1].shape[2], a[3], a[5] if len(a) > 5 else None))
                        or _softmax_lse(*a[:5]))
    monkeypatch.setattr(prefill_attention, "SEG_KEYS", 16)
    monkeypatch.setattr(prefill_attention, "SEG_WORK", 4 * 24 * 2 * 64)  # these 24 rows x 2 heads x 64: twice SEG_KEYS
    out = torch.full_like(q, float("nan"))
    assert sdpa_prefill(q, k, v, view, scale, prefixes, chunks, out) is out
    assert [c for c in calls if not c[1]] == [(32, False, 32), (32, False, 32), (26, False, 32)]
    assert rel_err(out, attention64(q, k, v, cu, prefixes, kd, vd, scale)) < 3e-3


def test_fused_op_probe_and_choice(monkeypatch):
    """_flash_ok checks flash attention against float32 (causal and not) and leaves cuDNN alone; the first
    bucketed call checks cuDNN (non-causal only: a wrong scale, a wrong log-sum-exp or an error keeps it
    out) and only bucketed calls take it; a cuDNN call that fails falls back for good; without flash
    attention cuDNN takes every call. The ops are stood in on the CPU; the checks' inputs (48 keys) are
    told apart from the calls' by their key counts."""
    def math_op(q, k, v, causal, scale):
        return _softmax_lse(q, k, v, causal, scale)

    def raises(*a):
        raise RuntimeError("no kernel")

    behaviours = {"right": math_op, "scale": lambda q, k, v, c, s: math_op(q, k, v, c, 1.1 * s),
                  "lse": lambda q, k, v, c, s: (math_op(q, k, v, c, s)[0], math_op(q, k, v, c, s)[1] / 2.718281828),
                  "raises": raises}
    q = torch.randn(1, 2, 64, 32)
    key = prefill_attention._key(q)
    k16, k15 = torch.randn(1, 2, 16, 32), torch.randn(1, 2, 15, 32)
    calls = ((q, k16, False), (q, k15, False), (q[:, :, :48], k16, False), (q[:, :, :16], q[:, :, :16], True))
    monkeypatch.setattr(prefill_attention, "_fused_capable", lambda q: True)
    monkeypatch.setattr(prefill_attention, "SEG_KEYS", 16)
    monkeypatch.setattr(prefill_attention, "SEG_SCALE_MAX", 1)
    monkeypatch.setattr(prefill_attention, "SEG_ROWS", 32)

    def run(flash, cudnn, cudnn_state=None):
        monkeypatch.setattr(prefill_attention, "_FLASH", {})
        monkeypatch.setattr(prefill_attention, "_CUDNN", {} if cudnn_state is None else {key: cudnn_state})
        ran = []
        monkeypatch.setattr(prefill_attention, "_attention_lse", lambda op, *a: ran.append((op, a[1].shape[2])) or (
            behaviours[cudnn] if op == "cudnn" else behaviours[flash])(*a))
        assert prefill_attention._flash_ok(q)
        for qq, kk, causal in calls:
            out, lse = prefill_attention._flash_lse(qq, kk, kk, causal, 0.2)
            ref = _softmax_lse(qq, kk, kk, causal, 0.2)
            assert torch.allclose(out, ref[0], atol=1e-5) and torch.allclose(lse, ref[1], atol=1e-5)
        return [op for op, keys in ran if keys != 48], [op for op, keys in ran if keys == 48]

    for cudnn, took in (("right", "cudnn"), ("scale", "flash"), ("lse", "flash"), ("raises", "flash")):
        used, checks = run("right", cudnn)
        assert used == [took, "flash", "flash", "flash"], cudnn  # only the bucketed call (16 keys, 64 rows)
        assert checks == ["flash", "flash", "cudnn"], cudnn  # flash both ways, then cuDNN once, non-causal
        assert prefill_attention._FLASH[key] == ("flash",) and prefill_attention._CUDNN[key] == (took == "cudnn")
    used, checks = run("right", "right", cudnn_state=False)
    assert used == ["flash"] * 4 and checks == ["flash", "flash"]  # known unfit: not checked again
    used, checks = run("right", "raises", cudnn_state=True)  # checked earlier, then a call fails
    assert used == ["cudnn", "flash", "flash", "flash", "flash"] and prefill_attention._CUDNN[key] is False
    used, checks = run("raises", "right")  # no flash attention: cuDNN for every call
    assert used == ["cudnn"] * 4 and prefill_attention._FLASH[key] == ("cudnn",)


def test_dispatch_routes_decode_mixed_and_prefill_steps(monkeypatch):
    """dispatch.paged_attention with the kernels on (as on CUDA): all single tokens -> the decode kernel,
    single tokens beside chunks -> mixed_attention, chunks alone -> prefill; each equal to float64."""
    from tqinfer.kernels import decode_attention, dispatch

    monkeypatch.setattr(dispatch, "use_triton", lambda t: True)
    seen = []
    for name, mod in (("decode", decode_attention), ("prefill", prefill_attention)):
        fn = getattr(mod, f"paged_{name}_attention")
        monkeypatch.setattr(mod, f"paged_{name}_attention",
                            lambda *a, _fn=fn, _name=name, **kw: seen.append(_name) or _fn(*a, **kw))
    for chunks, want in (([1, 1, 1], ["decode"]), ([1, 5, 1], ["decode", "prefill"]), ([3, 5, 2], ["prefill"])):
        prefixes = [40, 17, 30]
        view, kd, vd, q, k, v, cu, pl, scale = _prefill_case("tq3.5", "tq3.5", 64, 2, 4, prefixes, chunks)
        seen.clear()
        out = dispatch.paged_attention(q, k, v, cu, pl, view, scale, prefix_list=prefixes, chunk_list=chunks)
        assert seen == want, (chunks, seen)
        assert rel_err(out, attention64(q, k, v, cu, prefixes, kd, vd, scale)) < 3e-3


def _softmax_lse(q, k, v, causal, scale):
    """_flash_lse's contract in float64 on any device (for the CPU): (out in q's dtype, lse float32)."""
    s = torch.einsum("bhld,bhsd->bhls", q.double(), k.double()) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    out = torch.einsum("bhls,bhsd->bhld", torch.softmax(s, -1), v.double())
    return out.to(q.dtype), torch.logsumexp(s, -1).float()


@pytest.mark.parametrize("kt,sinks,window", [("tq3.5", 4, 8), ("tq4", 4, 8), ("tq3.5", 0, 8), ("tq4", 4, 0)])
def test_sdpa_prefill_segments_merge(kt, sinks, window, monkeypatch):
    """The flash-attention branch's bookkeeping on the CPU (flash itself stood in by float64 softmax with
    its log-sum-exp): the chunk and the prefix [hot rows | records] in segments of 7 tokens (a budget of
    7 tokens of decoded keys + values; segments across the hot / record seam) merge into float64
    attention, prefixes inside and past the window."""
    prefixes, chunks = [0, 17, 40, 5, 90], [19, 1, 37, 3, 6]
    view, kd, vd, q, k, v, cu, pl, scale = _prefill_case(kt, kt, 64, 2, 4, prefixes, chunks, sinks, window)
    calls = []
    monkeypatch.setattr(prefill_attention, "_flash_ok", lambda q: True)
    monkeypatch.setattr(prefill_attention, "_flash_lse", lambda *a: calls.append(a[1].shape[2]) or _softmax_lse(*a[:5]))
    monkeypatch.setattr(prefill_attention, "SCRATCH_BYTES", 7 * 2 * 2 * 64 * 4)  # 7 tokens, 2 heads, fp32
    out = torch.full_like(q, float("nan"))
    assert sdpa_prefill(q, k, v, view, scale, prefixes, chunks, out) is out
    assert max(calls) <= 37 and calls.count(7) == 12 + 5 + 2  # 90, 40, 17 entries of prefix, in 7s
    assert calls.count(1) >= 1  # the single-token chunk (and no segment of more than 7 prefix entries)
    assert torch.isfinite(out).all()
    assert rel_err(out, attention64(q, k, v, cu, prefixes, kd, vd, scale)) < 3e-3


def test_auto_keeps_the_fused_kernel_below_the_prefix_threshold(monkeypatch):
    """method="auto" takes sdpa_prefill only when a row's prefix reaches PATH_MIN_PREFIX, or PATH_WIDE_PREFIX
    under a chunk of PATH_WIDE_CHUNK query elements."""
    view, kd, vd, q, k, v, cu, pl, scale = _prefill_case("tq3.5", "tq3.5", 64, 1, 2, [30, 50], [5, 3])
    taken = []
    real = prefill_attention.sdpa_prefill
    monkeypatch.setattr(prefill_attention, "sdpa_prefill", lambda *a: taken.append(1) or real(*a))
    # (PATH_MIN_PREFIX, PATH_WIDE_PREFIX, PATH_WIDE_CHUNK): rows (prefix, chunk x Hq x d) are (30, 5 x 2 x 64)
    # and (50, 3 x 2 x 64)
    for rule, want in (((51, 0, 641), []), ((50, 0, 641), [1]), ((51, 30, 640), [1]), ((51, 31, 640), []),
                       ((51, 50, 384), [1]), ((51, 51, 384), [])):
        for name, value in zip(("PATH_MIN_PREFIX", "PATH_WIDE_PREFIX", "PATH_WIDE_CHUNK"), rule):
            monkeypatch.setattr(prefill_attention, name, value)
        taken.clear()
        out = paged_prefill_attention(q, k, v, cu, pl, view, scale, out=torch.full_like(q, float("nan")))
        assert taken == want, rule
        assert rel_err(out, attention64(q, k, v, cu, [30, 50], kd, vd, scale)) < 3e-3
