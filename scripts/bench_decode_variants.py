"""Decode attention under variants of its module settings, in one process: each variant sets attributes of
tqinfer.kernels.decode_attention (or of a module it imports, as "decode_gluon.HOT_TOKENS") for its
calls only, the variants interleaved over --rounds rounds on the same caches, the best time of each kept,
SDPA bf16 on a contiguous cache alongside. Each time is the whole call (queries, split, merge) replayed
from a CUDA graph, L2 flushed (bench_attention.graph_time). Prints each output's relative difference from
the first variant's and a markdown table last.

    PYTHONPATH=. python scripts/bench_decode_variants.py --cases llama3-8b:1:8192 smollm2-135m:1:4096 \\
        --variants '{}' '{"SPLIT_MIN_TOKENS": 128}' '{"decode_gluon.HOT_TOKENS": 32}'

It is what docs/BENCHMARKS.md's 2026-12-01 sweeps ran as .bench/w/flags.py (same measurement), committed
after them. A variant takes effect where the code reads the attribute at each call: host-side settings
(SPLIT_MIN_TOKENS, WAVE_TILES, MERGE_WARPS, decode_gluon.HOT_TOKENS, ...), not constants a kernel copied at
import (decode_gluon.WARP_TOKENS) or results cached on a codec's layout (ASM_COLS' query permutation).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def applied(module, variant: dict):
    """Set the variant's attributes on `module` ("name" or "submodule.name") and restore them after; an
    unknown name is an error, so that a typo cannot pass for a measured variant."""
    targets = []
    for key, value in variant.items():
        owner, name = module, key
        if "." in key:
            sub, name = key.split(".", 1)
            owner = getattr(module, sub)
        if not hasattr(owner, name):
            raise ValueError(f"{owner.__name__} has no attribute {name!r}")
        targets.append((owner, name, getattr(owner, name), value))
    try:
        for owner, name, _, value in targets:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, old, _ in reversed(targets):
            setattr(owner, name, old)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", nargs="*", default=["tq3.5", "tq4"])
    p.add_argument("--cases", nargs="*", default=["llama3-8b:1:8192", "llama3-8b:1:32768"], help="shape:batch:context")
    p.add_argument("--variants", nargs="+", default=["{}"], help="JSON objects of attribute values")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    variants = [json.loads(v) for v in args.variants]
    if not all(isinstance(v, dict) for v in variants):
        p.error("each variant is a JSON object of attribute values")
    import torch

    import bench_attention as ba
    from bench_decode_kernels import rel_diff, sdpa_us
    from tqinfer.kernels import decode_attention as da

    for variant in variants:  # every name checked before any GPU time is spent
        with applied(da, variant):
            pass

    rows = []
    for case in args.cases:
        shape, b, t, h, d, q, kn, cu, lens = ba.decode_case(case)
        sdpa = sdpa_us(q, h, t)
        for kind in args.kinds:
            view = ba.make_cache(kind, b, t, h, d)
            out = torch.empty_like(q)

            def call():
                return da.paged_decode_attention(q, kn, kn, cu, lens, view, 1 / math.sqrt(d), out=out)
            best, outs = [math.inf] * len(variants), []
            for r in range(args.rounds):
                for i, variant in enumerate(variants):
                    with applied(da, variant):
                        da._RESIDENT.clear()  # the occupancy a variant's kernel has, measured at its launch
                        call()
                        best[i] = min(best[i], ba.graph_time(call))
                        if r == 0:
                            outs.append(out.clone())
            diffs = [rel_diff(o, outs[0]) for o in outs]
            rows.append((shape, b, t, kind, sdpa, best, diffs))
            print(json.dumps({"case": case, "kind": kind, "sdpa": round(sdpa, 2), "us": [round(x, 2) for x in best],
                              "diff": diffs}), flush=True)
            del view
            torch.cuda.empty_cache()
    print(f"<!-- {torch.cuda.get_device_name()} · torch {torch.__version__} · "
          f"`PYTHONPATH=. python scripts/bench_decode_variants.py {shlex.join(sys.argv[1:])}` -->")
    print("| shape | B | T | type | SDPA bf16 µs | " + " | ".join(f"`{v}` µs" for v in args.variants) + " |")
    print("|" + "---|" * (5 + len(variants)))
    for shape, b, t, kind, sdpa, best, diffs in rows:
        cells = [f"{u:.1f} ({sdpa / u:.2f}x, diff {x:.0e})" for u, x in zip(best, diffs)]
        print(f"| {shape} | {b} | {t} | {kind} | {sdpa:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
