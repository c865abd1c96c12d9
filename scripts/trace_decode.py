"""A per-program timeline of one decode attention call on the GPU. A copy of the tqinfer package whose
query, Gluon split and merge kernels write %globaltimer stamps (start, after the PDL wait, after the tile
loop, end; each program's SM and kind) is replayed from a CUDA graph with L2 flushed; per case it prints
the medians over the replays of when each stage starts and ends (µs from the first query program's
start) and, for the last replay, the split programs on each SM and when those SMs finished.

It is how the decode call's critical path was read (docs/BENCHMARKS.md, 2026-12-01): which stage waits on
which, the tile loop's time per tile, the SMs that hold more programs than others. The stamps go in by
exact-text patches of the kernel sources: a patch that no longer applies stops the script and names the
text it looked for (tests/kernels/test_trace_decode.py checks that every patch applies). The stamps are
stores and timer reads in the kernels: read them as a timeline, not as the call's time (bench_* scripts).
%globaltimer ticked every 0.256 µs on the H200.

    PYTHONPATH=. python scripts/trace_decode.py --kinds tq3.5 --cases llama3-8b:1:8192 smollm2-135m:1:4096
    PYTHONPATH=. python scripts/trace_decode.py --cases llama3-8b:1:8192 --flags '{"SPLIT_MIN_TOKENS": 192}'
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile

# stamp slots, 8 int64 a program. split: start, after the wait, after the tile loop, end, kind (0: a split
# with work, 1: hot tokens, 2: nothing to do), SM, tiles. merge (each column program): start, after the wait,
# after the splits' reduction, end, before the un-rotation, after it, after the hot chunks. query: start, end
# (slot 3).
_NOW_GLUON = '''

@gluon.jit
def _now(x):
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _smid(x):
    return gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [x], dtype=gl.int32, is_pure=False, pack=1)
'''
_NOW_TRITON = '''

TRACE = {}


@triton.jit
def _tnow(x):
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=tl.int64, is_pure=False, pack=1)
'''
PATCHES = {
    "kernels/decode_gluon.py": [
        ("zero, NSPLIT, FILL, WAVE, SPREAD,\n", "zero, NSPLIT, FILL, WAVE, SPREAD, trace,\n"),
        ("    b = gl.program_id(0)\n    h = gl.program_id(1)\n    L = gl.load(prefix_ptr + b)\n",
         "    b = gl.program_id(0)\n    h = gl.program_id(1)\n"
         "    tr = trace + ((b * H + h) * (NSPLIT + NHOT) + gl.program_id(2)) * 8\n"
         "    gl.store(tr, _now(b))\n    gl.store(tr + 5, _smid(b))\n    L = gl.load(prefix_ptr + b)\n"),
        ("the queries\n        return\n", "the queries\n        gl.store(tr + 3, _now(b))\n"
         "        gl.store(tr + 4, 2)\n        return\n"),
        ("                b = _grid_wait(b)\n            ws =",
         "                b = _grid_wait(b)\n            gl.store(tr + 1, _now(b))\n            ws ="),
        ("G, D, BLOCK_H, NW)\n            return\n",
         "G, D, BLOCK_H, NW)\n            gl.store(tr + 3, _now(b))\n            gl.store(tr + 4, 1)\n"
         "            return\n"),
        ("        b = _grid_wait(b)\n    ws = (b * H + h)", "        b = _grid_wait(b)\n    gl.store(tr + 1, _now(b))\n"
         "    ws = (b * H + h)"),
        ("    # the warps' states merged;", "    gl.store(tr + 2, _now(b))\n    gl.store(tr + 6, t_end - t_start)\n"
         "    # the warps' states merged;"),
        ("                 D, VA_DP, VB_DP, NW, SMEM_MERGE)\n",
         "                 D, VA_DP, VB_DP, NW, SMEM_MERGE)\n    gl.store(tr + 3, _now(b))\n"),
    ],
    "kernels/decode_attention.py": [
        ("ENTER: tl.constexpr = False,\n):", "ENTER: tl.constexpr = False, trace=None,\n):"),
        ("    g = tl.program_id(2) // NCS\n",
         "    g = tl.program_id(2) // NCS\n    tr = trace + ((b * H + h) * G * NCS + tl.program_id(2)) * 8\n"
         "    tl.store(tr, _tnow(b))\n"),
        ("        tl.extra.cuda.gdc_wait()\n    if ENTER:", "        tl.extra.cuda.gdc_wait()\n"
         "    tl.store(tr + 1, _tnow(b))\n    if ENTER:"),
        ("    sc = tl.sum(q * k_new, axis=0)", "    tl.store(tr + 2, _tnow(b))\n    sc = tl.sum(q * k_new, axis=0)"),
        ("    o_ptr = out_ptr + b * s_ot", "    tl.store(tr + 4, _tnow(b))\n    o_ptr = out_ptr + b * s_ot"),
        ("        else:\n            o = acc\n",
         "        else:\n            o = acc\n        tl.store(tr + 5, _tnow(b))\n"),
        ("            o += tl.sum(a_h * w_h[:, None], axis=0)\n",
         "            o += tl.sum(a_h * w_h[:, None], axis=0)\n        tl.store(tr + 6, _tnow(b))\n"),
        ("        tl.store(o_ptr + j, (o / l_i).to(out_ptr.dtype.element_ty))\n",
         "        tl.store(o_ptr + j, (o / l_i).to(out_ptr.dtype.element_ty))\n    tl.store(tr + 3, _tnow(b))\n"),
        ("ROTATE: tl.constexpr, PDL: tl.constexpr = False):",
         "ROTATE: tl.constexpr, PDL: tl.constexpr = False, trace=None):"),
        ("    j0 = tl.program_id(2) * CJ\n", "    j0 = tl.program_id(2) * CJ\n"
         "    tr = trace + ((b * tl.num_programs(1) + h) * tl.num_programs(2) + tl.program_id(2)) * 8\n"
         "    tl.store(tr, _tnow(b))\n"),
        ("d[None, :], x.to(qk_ptr.dtype.element_ty), mask=gm)\n",
         "d[None, :], x.to(qk_ptr.dtype.element_ty), mask=gm)\n    tl.store(tr + 3, _tnow(b))\n"),
        ("ROTATE=k_layout is not None, PDL=pdl)", "ROTATE=k_layout is not None, PDL=pdl, trace=TRACE['query'])"),
        ("            0, nsplit, fill, wave, spread, H=h,",
         "            0, nsplit, fill, wave, spread, TRACE['split'], H=h,"),
        ("        SPREAD=spread, HOT_EARLY=", "        SPREAD=spread, trace=TRACE['merge'], HOT_EARLY="),
    ],
}
APPEND = {"kernels/decode_gluon.py": _NOW_GLUON, "kernels/decode_attention.py": _NOW_TRITON}  # at the module's end
ROWS = 1 << 20  # stamp rows a kernel's buffer holds (programs)


def instrument(dst: str) -> str:
    """Copy the tqinfer package (found without importing it) under dst and apply PATCHES; returns dst."""
    spec = importlib.util.find_spec("tqinfer")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("tqinfer not found: run from the repository root with PYTHONPATH=.")
    pkg = os.path.join(dst, "tqinfer")
    shutil.copytree(list(spec.submodule_search_locations)[0], pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, patches in PATCHES.items():
        path = os.path.join(pkg, rel)
        with open(path) as f:
            src = f.read()
        for old, new in patches:
            if src.count(old) != 1:
                raise SystemExit(f"{rel}: the patch text occurs {src.count(old)} times (want once):\n{old}")
            src = src.replace(old, new)
        src += APPEND.get(rel, "")
        with open(path, "w") as f:
            f.write(src)
    return dst


def _us(x, t0):
    return [(v - t0) / 1e3 for v in x]


def _stats(tq, ts, tm) -> dict:
    """One replay's stage times (µs from the first query program's start) from the stamp rows."""
    split = [r for r in ts if r[4] == 0]
    hot = [r for r in ts if r[4] == 1]
    if not tq or not split or not tm:
        raise SystemExit("no stamps from the query, Gluon split or merge kernel: this cache type is not read by "
                         "the Gluon kernel (decode_attention.gluon_reads), which alone is stamped")
    t0 = min(r[0] for r in tq)
    col = lambda rows, i: [r[i] for r in rows]  # noqa: E731
    med = statistics.median
    out = {
        "query end": max(_us(col(tq, 3), t0)),
        "split start (median)": med(_us(col(split, 0), t0)), "split after wait": med(_us(col(split, 1), t0)),
        "tile loop (median)": med([(r[2] - r[1]) / 1e3 for r in split]),
        "tile loop (max)": max((r[2] - r[1]) / 1e3 for r in split),
        "loop end to split end": med([(r[3] - r[2]) / 1e3 for r in split]),
        "split end (median)": med(_us(col(split, 3), t0)), "split end (max)": max(_us(col(split, 3), t0)),
        "merge after wait": min(_us(col(tm, 1), t0)), "merge splits reduced": max(_us(col(tm, 2), t0)),
        "merge un-rotated": max(_us(col(tm, 5), t0)), "merge hot added": max(_us(col(tm, 6), t0)),
        "merge end": max(_us(col(tm, 3), t0)),
        "split programs": len(split), "hot programs": len(hot), "tiles a split (max)": max(col(split, 6)),
    }
    if hot:
        out["hot start (median)"] = med(_us(col(hot, 0), t0))
        out["hot end (max)"] = max(_us(col(hot, 3), t0))
    return out


def per_sm(ts, tq) -> dict:
    """{(split programs with work, hot-chunk programs) on an SM: (SMs, the median and latest time its last
    split program finished)} of one replay; SMs that ran no split with work are left out."""
    t0 = min(r[0] for r in tq)
    ends, hots = collections.defaultdict(list), collections.Counter(r[5] for r in ts if r[4] == 1)
    for r in ts:
        if r[4] == 0:
            ends[r[5]].append((r[3] - t0) / 1e3)
    groups = collections.defaultdict(list)
    for sm, e in ends.items():
        groups[(len(e), hots.get(sm, 0))].append(max(e))
    return {k: (len(v), round(statistics.median(v), 2), round(max(v), 2)) for k, v in sorted(groups.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", nargs="*", default=["tq3.5"])
    p.add_argument("--cases", nargs="*", default=["llama3-8b:1:8192"], help="shape:batch:context")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--flags", default="{}", help="decode_attention settings for the run, as JSON (as a variant of "
                   "bench_decode_variants.py: \"decode_gluon.HOT_TOKENS\" names a module it imports)")
    args = p.parse_args()
    if args.reps < 1:
        p.error("--reps must be at least 1")
    with tempfile.TemporaryDirectory(prefix="tqinfer_trace_") as tmp:
        sys.path.insert(0, instrument(tmp))
        sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
        from bench_decode_variants import applied
        from tqinfer.kernels import decode_attention as da

        with applied(da, json.loads(args.flags)):
            trace(args, da)


def trace(args, da) -> None:
    """Print the timeline of every case and kind (main's arguments) with the instrumented module da."""
    import torch

    import bench_attention as ba

    for name in ("split", "merge", "query"):
        da.TRACE[name] = torch.zeros(ROWS * 8, dtype=torch.int64, device="cuda")
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for case in args.cases:
        shape, b, t, h, d, q, kn, cu, lens = ba.decode_case(case)
        if q.shape[0] * q.shape[1] * (da.MAX_SPLITS + 64) > ROWS:  # > the largest grid: (B, H, splits + hot)
            raise SystemExit(f"batch {b} is too large for {ROWS} stamp rows a kernel")
        for kind in args.kinds:
            view = ba.make_cache(kind, b, t, h, d)
            out = torch.empty_like(q)

            def call():
                da.paged_decode_attention(q, kn, kn, cu, lens, view, 1 / math.sqrt(d), out=out)
            for _ in range(3):
                call()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                call()
            reps = []
            for _ in range(args.reps):
                for buf in da.TRACE.values():
                    buf.zero_()
                flush.zero_()
                graph.replay()
                torch.cuda.synchronize()
                rows = {k: [r for r in v.view(-1, 8).tolist() if r[0] > 0] for k, v in da.TRACE.items()}
                reps.append(_stats(rows["query"], rows["split"], rows["merge"]))
            print(f"## {shape} B={b} T={t} {kind} (median of {args.reps} replays, µs from the query kernel's start)")
            for key in reps[0]:
                vals = [r[key] for r in reps if key in r]
                print(f"  {key}: {statistics.median(vals):.2f}")
            print("  last replay, (split, hot) programs an SM -> (SMs, median / latest finish):",
                  per_sm(rows["split"], rows["query"]))
            del view, graph
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
