"""Benchmark the fused attention kernels on the GPU: decode attention over the paged compressed cache
(tq3.5, tq4) and the paged bf16 kernel next to torch SDPA on contiguous bf16 and "dequantize, then
SDPA"; the quantize-on-write cost per decode step; chunked-prefill attention over a compressed prefix
vs SDPA bf16. Checks correctness first (kernels vs the torch twin), prints the tables last.

    PYTHONPATH=. python scripts/bench_attention.py            # the full table (one GPU call, < 10 min)
    PYTHONPATH=. python scripts/bench_attention.py --quick    # a few rows
    PYTHONPATH=. python scripts/bench_attention.py --quick --decode-only --baseline .bench/old.py
        # decode rows only, each kernel timed next to another copy of decode_attention.py (before/after)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import triton
from triton.testing import do_bench

from tqinfer.cache.dense import causal_mask
from tqinfer.cache.paged import LayerCacheView
from tqinfer.kernels import reference
from tqinfer.kernels.decode_attention import paged_decode_attention
from tqinfer.kernels.prefill_attention import paged_prefill_attention
from tqinfer.kernels.quantize import write_kv_tokens, write_tokens
from tqinfer.quant.registry import make_codec

SHAPES = {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}  # query heads, KV heads, head_dim
SINKS, WINDOW, BS = 4, 128, 64
DEV = "cuda"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def graph_time(fn) -> float:
    """Median µs of one call, replayed from a CUDA graph (launch gaps out), L2 flushed by do_bench."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=25, rep=150, return_mode="median") * 1e3


def decode_case(case: str):
    """"shape:batch:context" -> (shape, B, T, KV heads, head_dim, q, k_new, cu_q, lens): one decode step's
    inputs over a cache of T tokens a sequence (bf16 queries and new keys, the new key also the value)."""
    shape, b, t = case.split(":")
    b, t = int(b), int(t)
    hq, h, d = SHAPES[shape]
    q = torch.randn(b, hq, d, device=DEV, dtype=torch.bfloat16)
    kn = torch.randn(b, h, d, device=DEV, dtype=torch.bfloat16)
    cu = torch.arange(b + 1, device=DEV, dtype=torch.int32)
    lens = torch.full((b,), t, device=DEV, dtype=torch.int32)
    return shape, b, t, h, d, q, kn, cu, lens


def make_cache(kind: str, b: int, t: int, h: int, d: int, seed: int = 0):
    """A paged cache of b sequences holding t tokens each, random K/V written through write_tokens."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    nb_seq = -(-t // BS)
    nblocks = b * nb_seq
    table = torch.randperm(nblocks, device=DEV, generator=gen).to(torch.int32).view(b, nb_seq)
    if kind == "bf16":
        k_pool = torch.randn(nblocks, h, BS, d, device=DEV, dtype=torch.bfloat16, generator=gen)
        v_pool = torch.randn(nblocks, h, BS, d, device=DEV, dtype=torch.bfloat16, generator=gen)
        return LayerCacheView(k_pool, v_pool, None, None, table, torch.arange(b, device=DEV, dtype=torch.int32),
                              0, 0, BS, None, None)
    kc = make_codec(kind, d, h, seed=2 * seed + 1)
    vc = make_codec(kind, d, h, seed=2 * seed + 2)
    k_pool = torch.zeros(nblocks, h, BS, kc.record_bytes, device=DEV, dtype=torch.uint8)
    v_pool = torch.zeros(nblocks, h, BS, vc.record_bytes, device=DEV, dtype=torch.uint8)
    pos = torch.arange(SINKS, t - WINDOW, device=DEV)
    for s in range(b):
        for c0 in range(0, pos.numel(), 1 << 18):
            p = pos[c0:c0 + (1 << 18)]
            slots = table[s, p // BS].long() * BS + p % BS
            for codec, pool in ((kc, k_pool), (vc, v_pool)):
                x = torch.randn(p.numel(), h, d, device=DEV, dtype=torch.bfloat16, generator=gen)
                write_tokens(codec, x, pool, slots)
    hot = torch.randn(b, h, SINKS + WINDOW, d, device=DEV, dtype=torch.bfloat16, generator=gen)
    return LayerCacheView(k_pool, v_pool, hot, torch.randn_like(hot), table,
                          torch.arange(b, device=DEV, dtype=torch.int32), SINKS, WINDOW, BS, kc, vc)


def kv_bytes(view, b, t, h, d) -> int:
    """Bytes a decode step must read from the cache."""
    if view.k_codec is None:
        return b * t * h * d * 2 * 2
    comp = t - SINKS - WINDOW
    return b * h * (comp * (view.k_codec.record_bytes + view.v_codec.record_bytes) + (SINKS + WINDOW) * d * 4)


def dequant_then_sdpa(view, q, b, t, h, d):
    """The naive path: decode every compressed token to bf16 in HBM, then SDPA over a contiguous cache."""
    pos = torch.arange(SINKS, t - WINDOW, device=DEV)
    flat = view.block_table[:, pos // BS].long() * BS + pos % BS  # [b, Tc]

    def fn():
        kr = view.k_pool[flat // BS, :, flat % BS]  # [b, Tc, H, rec]
        vr = view.v_pool[flat // BS, :, flat % BS]
        kx = view.k_codec.decode(kr).to(torch.bfloat16).transpose(1, 2)
        vx = view.v_codec.decode(vr).to(torch.bfloat16).transpose(1, 2)
        k = torch.cat([view.k_hot[:, :, :SINKS], kx, view.k_hot[:, :, SINKS:]], 2)
        v = torch.cat([view.v_hot[:, :, :SINKS], vx, view.v_hot[:, :, SINKS:]], 2)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return fn


def check_decode(shape: str, kinds, t=5000, b=3):
    """Kernel vs torch twin on the GPU at one ragged batch, every kind: relative error."""
    hq, h, d = SHAPES[shape]
    rows = []
    for kind in kinds:
        view = make_cache(kind, b, t, h, d, seed=7)
        lens = torch.tensor([t, t - 1000, 1], dtype=torch.int32, device=DEV)
        q = torch.randn(b, hq, d, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(b, h, d, device=DEV, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cu = torch.arange(b + 1, device=DEV, dtype=torch.int32)
        scale = 1 / math.sqrt(d)
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, k, v, cu, lens, view, scale, out=out)
        twin = reference.paged_attention(q, k, v, cu, lens, view, scale)
        err = float((out.float() - twin.float()).norm() / twin.float().norm())
        rows.append((kind, err, bool(torch.isfinite(out).all())))
    return rows


def load_decode_kernel(path: str):
    """paged_decode_attention of another copy of kernels/decode_attention.py (e.g. the previous commit's)."""
    spec = importlib.util.spec_from_file_location("tqinfer.kernels._decode_attention_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.paged_decode_attention


def bench_decode(shape, b, t, kinds, results, dequant_limit=1 << 20, baseline=None):
    hq, h, d = SHAPES[shape]
    scale = 1 / math.sqrt(d)
    q = torch.randn(b, hq, d, device=DEV, dtype=torch.bfloat16)
    knew = torch.randn(b, h, d, device=DEV, dtype=torch.bfloat16)
    vnew = torch.randn_like(knew)
    cu = torch.arange(b + 1, device=DEV, dtype=torch.int32)
    lens = torch.full((b,), t, device=DEV, dtype=torch.int32)
    row = dict(shape=shape, B=b, T=t)
    # SDPA bf16 on a contiguous cache
    kk = torch.randn(b, h, t, d, device=DEV, dtype=torch.bfloat16)
    vv = torch.randn_like(kk)
    q4 = q.unsqueeze(2)
    row["sdpa_us"] = graph_time(lambda: F.scaled_dot_product_attention(q4, kk, vv, enable_gqa=True))
    row["sdpa_GBs"] = b * t * h * d * 4 / row["sdpa_us"] / 1e3
    del kk, vv
    for kind in kinds:
        view = make_cache(kind, b, t, h, d)
        out = torch.empty_like(q)
        us = graph_time(lambda: paged_decode_attention(q, knew, vnew, cu, lens, view, scale, out=out))
        row[f"{kind}_us"] = us
        row[f"{kind}_GBs"] = kv_bytes(view, b, t, h, d) / us / 1e3
        if baseline is not None:  # the other kernel on the same cache; each twice, alternating: the best
            base = [graph_time(lambda: baseline(q, knew, vnew, cu, lens, view, scale, out=out))]
            us = min(us, graph_time(lambda: paged_decode_attention(q, knew, vnew, cu, lens, view, scale, out=out)))
            base.append(graph_time(lambda: baseline(q, knew, vnew, cu, lens, view, scale, out=out)))
            row[f"{kind}_base_us"], row[f"{kind}_us"] = min(base), us
            row[f"{kind}_GBs"] = kv_bytes(view, b, t, h, d) / us / 1e3
        if kind != "bf16":
            if b * t <= dequant_limit:
                row[f"{kind}_deq_us"] = graph_time(dequant_then_sdpa(view, q4, b, t, h, d))
            slots = torch.arange(b, device=DEV) * BS  # one token per sequence leaves the window
            x = torch.randn(b, h, d, device=DEV, dtype=torch.bfloat16)
            # one layer's write of K and V in one launch (the engine's decode steps write every layer's
            # in one launch: scripts/bench_window_write.py) and, for comparison, one launch each
            row[f"{kind}_write_us"] = graph_time(lambda: write_kv_tokens(view.k_codec, x, view.k_pool,
                                                                         view.v_codec, x, view.v_pool, slots))
            row[f"{kind}_write2_us"] = graph_time(lambda: (write_tokens(view.k_codec, x, view.k_pool, slots),
                                                           write_tokens(view.v_codec, x, view.v_pool, slots)))
        del view
        torch.cuda.empty_cache()
    results.append(row)
    log(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}))


def sweep(shape, b, t, kind, configs):
    """Decode kernel variants (block_n, num_splits) at one size, same run."""
    hq, h, d = SHAPES[shape]
    view = make_cache(kind, b, t, h, d)
    q = torch.randn(b, hq, d, device=DEV, dtype=torch.bfloat16)
    knew = torch.randn(b, h, d, device=DEV, dtype=torch.bfloat16)
    cu = torch.arange(b + 1, device=DEV, dtype=torch.int32)
    lens = torch.full((b,), t, device=DEV, dtype=torch.int32)
    out = torch.empty_like(q)
    rows = []
    for cfg in configs:
        us = graph_time(lambda: paged_decode_attention(q, knew, knew, cu, lens, view, 1 / math.sqrt(d),
                                                       out=out, **cfg))
        rows.append((cfg, us, kv_bytes(view, b, t, h, d) / us / 1e3))
        log(f"  variant {cfg}: {us:.1f} µs")
    return rows


def check_prefill(shape: str, kinds, t=3000, method="fused"):
    """Prefill (the fused kernel, or the default path: decode + attention where it applies) vs torch twin on
    the GPU: two ragged chunks over compressed prefixes."""
    hq, h, d = SHAPES[shape]
    rows = []
    for kind in kinds:
        view = make_cache(kind, 2, t, h, d, seed=3)
        pl = torch.tensor([t - 300, 1000], dtype=torch.int32, device=DEV)
        chunks = [300, 77]
        cu = torch.tensor([0, 300, 377], dtype=torch.int32, device=DEV)
        q = torch.randn(377, hq, d, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(377, h, d, device=DEV, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        out = torch.full_like(q, float("nan"))
        paged_prefill_attention(q, k, v, cu, pl, view, 1 / math.sqrt(d), out=out, method=method)
        twin = reference.paged_attention(q, k, v, cu, pl, view, 1 / math.sqrt(d))
        err = float((out.float() - twin.float()).norm() / twin.float().norm())
        rows.append((kind, err, bool(torch.isfinite(out).all())))
    return rows


def bench_prefill(shape, prefix, chunk, kinds, results, configs=None):
    """One sequence: a chunk of `chunk` new tokens over `prefix` cached tokens, vs SDPA bf16 over the
    same keys (contiguous; no mask: the chunk's causal triangle is < 1% of the work) and with the
    dense cache's causal mask. Compressed types: the fused kernel (configs; CUDA-graph replay) and the
    default path (decode + fused attention ops), eager (do_bench, L2 flushed) and from a graph replay."""
    hq, h, d = SHAPES[shape]
    scale = 1 / math.sqrt(d)
    q = torch.randn(chunk, hq, d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(chunk, h, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = torch.tensor([0, chunk], device=DEV, dtype=torch.int32)
    pl = torch.tensor([prefix], device=DEV, dtype=torch.int32)
    row = dict(shape=shape, prefix=prefix, chunk=chunk)
    kk = torch.randn(1, h, prefix + chunk, d, device=DEV, dtype=torch.bfloat16)
    vv = torch.randn_like(kk)
    q4 = q.transpose(0, 1).unsqueeze(0)
    row["sdpa_us"] = graph_time(lambda: F.scaled_dot_product_attention(q4, kk, vv, enable_gqa=True))
    mask = causal_mask(prefix, chunk, None, DEV)
    row["sdpa_mask_us"] = graph_time(lambda: F.scaled_dot_product_attention(q4, kk, vv, attn_mask=mask, enable_gqa=True))
    del kk, vv
    for kind in kinds:
        view = make_cache(kind, 1, prefix, h, d)
        out = torch.empty_like(q)
        best = None
        for cfg in (configs or {}).get(kind, ({},)):
            us = graph_time(lambda: paged_prefill_attention(q, k, v, cu, pl, view, scale, out=out, method="fused",
                                                            **cfg))
            row[f"{kind}_us_{json.dumps(cfg)}"] = us
            best = us if best is None else min(best, us)
        row[f"{kind}_us"] = best
        if kind != "bf16":
            def path():
                paged_prefill_attention(q, k, v, cu, pl, view, scale, out=out, prefix_list=[prefix], chunk_list=[chunk])
            row[f"{kind}_path_us"] = do_bench(path, warmup=25, rep=200, return_mode="median") * 1e3
            row[f"{kind}_path_graph_us"] = graph_time(path)
        del view
        torch.cuda.empty_cache()
    results.append(row)
    log(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}))


def _sdpa_on(backend, q, kv):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)


def prefill_breakdown(shape: str, prefix: int, chunk: int, kind: str) -> list[tuple[str, float]]:
    """The default prefill path (prefill_attention.sdpa_prefill) for one sequence, its steps timed alone
    (do_bench, L2 flushed, µs): decoding the prefix's K and V records, cuDNN and flash attention over the
    decoded prefix and over the chunk (causal), the rotations, the whole path (eager, graph replay, host
    time); unmasked SDPA over the same keys, with each backend alone."""
    from tqinfer.kernels import prefill_attention as pa
    from tqinfer.kernels.decode_attention import _layouts

    hq, h, d = SHAPES[shape]
    g, scale = hq // h, 1 / math.sqrt(d)
    view = make_cache(kind, 1, prefix, h, d)
    q = torch.randn(chunk, hq, d, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(chunk, h, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    k_lay, v_lay = _layouts(view, DEV)
    nrec = prefix - SINKS - WINDOW
    kx, vx = (torch.empty(h, nrec, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    row = view.block_table[0]
    qf = torch.randn(1, h, g * chunk, d, device=DEV, dtype=torch.bfloat16)
    qc = torch.randn(1, hq, chunk, d, device=DEV, dtype=torch.bfloat16)
    kc, vc = (torch.randn(1, hq, chunk, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(q)
    kk = torch.randn(1, h, prefix + chunk, d, device=DEV, dtype=torch.bfloat16)
    q4 = q.transpose(0, 1).unsqueeze(0)
    steps = [
        ("decode K records", lambda: pa.dequantize_records(view.k_pool, k_lay, row, SINKS, nrec, kx)),
        ("decode V records", lambda: pa.dequantize_records(view.v_pool, v_lay, row, SINKS, nrec, vx)),
        *[(f"{op} over the prefix (query heads folded)",
           lambda op=op: pa._attention_lse(op, qf, kx[None], vx[None], False, scale)) for op in ("cudnn", "flash")],
        *[(f"{op} over the chunk (causal)", lambda op=op: pa._attention_lse(op, qc, kc, vc, True, scale))
          for op in ("cudnn", "flash")],
        ("rotate q, chunk k and v", lambda: (
            torch.matmul(q.view(chunk, h, g, d).permute(1, 2, 0, 3).reshape(h, g * chunk, d), pa._turn(k_lay, q.dtype)),
            torch.matmul(k.transpose(0, 1), pa._turn(k_lay, q.dtype)), torch.matmul(v.transpose(0, 1), pa._turn(v_lay, q.dtype)))),
        ("the whole path (sdpa_prefill)", lambda: pa.sdpa_prefill(q, k, v, view, scale, [prefix], [chunk], out)),
        ("SDPA bf16, unmasked, same keys", lambda: F.scaled_dot_product_attention(q4, kk, kk, enable_gqa=True)),
        *[(f"SDPA bf16, unmasked, {b.name} backend only", lambda b=b: _sdpa_on(b, q4, kk))
          for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)],
    ]
    times = []
    for name, fn in steps:
        try:
            times.append((name, do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3))
        except RuntimeError as e:  # an attention op not built for this GPU
            times.append((f"{name}: {str(e).splitlines()[0][:80]}", float("nan")))
    times.append((f"fused attention ops the path takes: {pa._FLASH.get(pa._key(q))}, cuDNN for the bucketed "
                  f"calls: {pa._CUDNN.get(pa._key(q))}", float("nan")))
    path = dict(steps)["the whole path (sdpa_prefill)"]
    times.append(("the whole path, CUDA-graph replay (GPU time, launch gaps out)", graph_time(path)))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        path()
    times.append(("the whole path, host time a call (no sync)", (time.perf_counter() - t0) / 20 * 1e6))
    torch.cuda.synchronize()
    return times


def prefill_table(results, kinds):
    comp = [k for k in kinds if k != "bf16"]
    lines = ["| shape | prefix | chunk | SDPA bf16 µs (with the causal mask) | "
             + " | ".join(f"{k} µs (× SDPA)" for k in kinds) + " | "
             + " | ".join(f"{k} default path µs, eager (× SDPA)" for k in comp) + " | "
             + " | ".join(f"{k} default path µs, graph (× SDPA)" for k in comp) + " |",
             "|" + "---|" * (4 + len(kinds) + 2 * len(comp))]
    for r in results:
        cells = [r["shape"], f"{r['prefix'] // 1024}k", str(r["chunk"]), f"{r['sdpa_us']:.0f} ({r['sdpa_mask_us']:.0f})"]
        cells += [f"{r[k + '_us']:.0f} ({r['sdpa_us'] / r[k + '_us']:.2f}×)" for k in kinds]
        cells += [f"{r[k + '_path_us']:.0f} ({r['sdpa_us'] / r[k + '_path_us']:.2f}×)" for k in comp]
        cells += [f"{r[k + '_path_graph_us']:.0f} ({r['sdpa_us'] / r[k + '_path_graph_us']:.2f}×)" for k in comp]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt(v, nd=1):
    return "—" if v is None else f"{v:.{nd}f}"


def decode_table(results, kinds):
    lines = ["| shape | B | T | SDPA bf16 µs | " + " | ".join(
        f"{k} µs (GB/s, × SDPA)" for k in kinds) + " | " + " | ".join(
        f"{k} deq+SDPA µs" for k in kinds if k != "bf16") + " | " + " | ".join(
        f"{k} write µs (% step; two launches)" for k in kinds if k != "bf16") + " |"]
    lines.append("|" + "---|" * (4 + len(kinds) + 2 * sum(k != "bf16" for k in kinds)))
    for r in results:
        cells = [r["shape"], str(r["B"]), f"{r['T'] // 1024}k", f"{r['sdpa_us']:.1f} ({r['sdpa_GBs']:.0f} GB/s)"]
        for k in kinds:
            cells.append(f"{r[k + '_us']:.1f} ({r[k + '_GBs']:.0f}, {r['sdpa_us'] / r[k + '_us']:.2f}×)")
        for k in kinds:
            if k != "bf16":
                cells.append(fmt(r.get(k + "_deq_us")))
        for k in kinds:
            if k != "bf16":
                w, w2 = r[k + "_write_us"], r.get(k + "_write2_us")
                cells.append(f"{w:.1f} ({100 * w / r[k + '_us']:.1f}%; {fmt(w2)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def baseline_table(results, kinds):
    lines = ["| shape | B | T | kernel | before µs | after µs | before / after |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for k in kinds:
            if k + "_base_us" in r:
                lines.append(f"| {r['shape']} | {r['B']} | {r['T'] // 1024}k | {k} | {r[k + '_base_us']:.1f} | "
                             f"{r[k + '_us']:.1f} | {r[k + '_base_us'] / r[k + '_us']:.2f}× |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--decode-only", action="store_true",
                    help="the decode rows alone (no dequantize + SDPA, prefill rows or variant sweep)")
    ap.add_argument("--prefill-only", action="store_true", help="the prefill rows alone")
    ap.add_argument("--prefill-breakdown", action="store_true",
                    help="the steps of the default prefill path timed alone (8B shape, tq3.5, 32k + 1024), then exit")
    ap.add_argument("--baseline", default=None,
                    help="a copy of kernels/decode_attention.py to time next to the current decode kernel")
    args = ap.parse_args()
    baseline = load_decode_kernel(args.baseline) if args.baseline else None
    if args.prefill_breakdown:
        print(f"{datetime.date.today()} · {torch.cuda.get_device_name()} · torch {torch.__version__} · triton "
              f"{triton.__version__}\n\n| step (llama3-8b, tq3.5, 32k prefix + 1024 chunk) | µs |\n|---|---|")
        for name, us in prefill_breakdown("llama3-8b", 32768, 1024, "tq3.5"):
            print(f"| {name} | {us:.1f} |", flush=True)
        return
    t0 = time.time()
    kinds = ["tq3.5", "tq4", "bf16"]
    props = torch.cuda.get_device_properties(0)
    head = (f"{datetime.date.today()} · {props.name} · torch {torch.__version__} · triton {triton.__version__}"
            f" · `PYTHONPATH=. python scripts/bench_attention.py {' '.join(sys.argv[1:])}`")
    log("correctness (kernel vs torch twin, GPU):")
    checks = []
    for shape in SHAPES:
        for kind, err, finite in check_decode(shape, kinds + ["tq3", "tq2.5", "tqp3"]):
            checks.append((shape, kind, err, finite))
            log(f"  decode {shape} {kind}: rel err {err:.2e} finite={finite}")
    for shape, pk in (("llama3-8b", ["tq3.5", "tq4", "bf16", "tqp3"]), ("smollm2-135m", ["tq3.5"])):
        for method in ("fused", "auto"):
            for kind, err, finite in check_prefill(shape, pk, method=method):
                checks.append((shape, f"prefill {method} {kind}", err, finite))
                log(f"  prefill {method} {shape} {kind}: rel err {err:.2e} finite={finite}")
    bad = [c for c in checks if not (c[3] and c[2] < 2e-2)]
    if bad:
        log("CORRECTNESS FAILED:", bad)
        sys.exit(1)
    print(f"\n{head}\n\ncorrectness: max rel err kernel vs twin {max(c[2] for c in checks):.1e} over "
          f"{len(checks)} (shape, type) pairs", flush=True)

    results = []
    if args.prefill_only:
        grid = []
    elif args.quick:
        grid = [("smollm2-135m", 1, 4 * 1024), ("llama3-8b", 1, 32 * 1024), ("llama3-8b", 1, 128 * 1024),
                ("llama3-8b", 8, 32 * 1024)]
    else:
        grid = [(s, b, t * 1024) for s in SHAPES for b in (1, 8, 32) for t in (4, 16, 64, 128)]
    for shape, b, t in grid:
        hq, h, d = SHAPES[shape]
        if b * t * h * d * 2 * 2 * 2.5 > 100e9:  # contiguous + paged bf16 copies must fit
            continue
        bench_decode(shape, b, t, kinds, results, dequant_limit=0 if args.decode_only else 1 << 20,
                     baseline=baseline)
    print("\nDecode attention, one query token per sequence; sinks 4 + window 128 bf16; block 64; CUDA-graph "
          "replay, median, L2 flushed; GB/s on the bytes the kernel must read; × = speedup over SDPA\n")
    print(decode_table(results, kinds), flush=True)
    if baseline is not None:
        print(f"\nBefore ({args.baseline}) / after (the working tree's kernel), same caches, same process:\n")
        print(baseline_table(results, kinds), flush=True)
    if args.decode_only or args.prefill_only:
        presults = []
        if args.prefill_only:
            for shape, prefix, chunk in (("llama3-8b", 32768, 1024), ("llama3-8b", 32768, 2048),
                                         ("llama3-8b", 131072, 2048), ("smollm2-135m", 32768, 2048)):
                bench_prefill(shape, prefix, chunk, kinds, presults, {})
            print("\nPrefill attention: one sequence, a chunk over a cached prefix (compressed: sinks 4 + window "
                  "128 bf16); the fused kernel (default tiles, CUDA-graph replay) and the default path "
                  "(decode + fused attention ops; eager and CUDA-graph replay); SDPA bf16 over the same keys, contiguous, no mask (with the dense "
                  "cache's causal mask)\n")
            print(prefill_table(presults, kinds), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(results=results, prefill=presults, checks=checks), f, indent=1)
        print(f"\n{time.time() - t0:.0f} s")
        return

    presults = []
    pconfigs = {"tq3.5": ({}, dict(unit_loads=True), dict(block_m=16, num_warps=4), dict(block_m=64, num_warps=8)),
                "tq4": ({}, dict(unit_loads=True))}
    for shape, prefix, chunk in ([("llama3-8b", 32768, 1024)] if args.quick else
                                 [("llama3-8b", 32768, 512), ("llama3-8b", 32768, 2048),
                                  ("smollm2-135m", 32768, 2048)]):
        bench_prefill(shape, prefix, chunk, kinds, presults, pconfigs)
    print("\nPrefill attention: one sequence, a chunk over a cached prefix (compressed: sinks 4 + window 128 "
          "bf16), default tiles (tq3.5: best of the default, fp16x2 pair lookups, block_m 16 / 4 warps, block_m 64 / 8 "
          "warps; tq4: best of the default and pairs; each printed below); "
          "SDPA bf16 over the same keys, contiguous, no mask\n")
    print(prefill_table(presults, kinds), flush=True)
    for r in presults:
        print("  " + ", ".join(f"{k}: {v:.0f} µs" for k, v in r.items() if "_us_" in k))

    sw = []
    for kind in ("tq3.5", "tq4"):
        sw += [(kind,) + x for x in sweep("llama3-8b", 1, 128 * 1024, kind, [
            dict(), dict(lookup="mem"), dict(lookup="lut"), dict(num_warps=8), dict(num_splits=32),
            dict(num_splits=128), dict(early_v=kind != "tq4"), dict(max_registers=255)])]
    print("\nDecode variants, llama3-8b, B=1, T=128k (default: lookup='pair', 4 warps, block_n 64, splits from "
          "the kernel's occupancy, 128 registers at most; early_v True for tq4 only):")
    for kind, cfg, us, gbs in sw:
        print(f"  {kind} {cfg}: {us:.1f} µs, {gbs:.0f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=results, prefill=presults, checks=checks, sweep=sw), f, indent=1)
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
