"""Decode-step projections (1 to 16 rows): cuBLAS (F.linear) against fused.linear's Triton kernel on the
Llama-3-8B and default-model shapes, bf16 (the engine takes the kernel below fused.SKINNY_MAX_OUT output
features: the last column). Each time is one call's share of a CUDA graph of --calls
calls, the weights rotated over enough copies (>= 200 MB) that no call finds its weight in L2, as in a
decode step. Prints the relative difference of the two outputs and a markdown table last.

    PYTHONPATH=. python scripts/bench_linear.py --rows 1 4 16
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch
import torch.nn.functional as F

from tqinfer.kernels import fused, fused_triton

SHAPES = {  # name: (out features, in features)
    "8b q/k/v": (6144, 4096), "8b o": (4096, 4096), "8b gate/up": (28672, 4096), "8b down": (4096, 14336),
    "8b head": (128256, 4096), "135m q/k/v": (960, 576), "135m o": (576, 576), "135m gate/up": (3072, 576),
    "135m down": (576, 1536), "135m head": (49152, 576),
}


def graph_us(fn, calls: int, reps: int = 7) -> float:
    """Best µs a call over reps replays of a graph holding `calls` calls of fn(i)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(2):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    best = float("inf")
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / calls)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="*", default=[1, 4, 16])
    p.add_argument("--shapes", nargs="*", default=list(SHAPES))
    p.add_argument("--calls", type=int, default=24)
    args = p.parse_args()
    if max(args.rows) > fused.SKINNY_ROWS:
        p.error(f"the kernel takes at most {fused.SKINNY_ROWS} rows")
    rows = []
    for name in args.shapes:
        n, k = SHAPES[name]
        copies = max(2, -(-200_000_000 // (n * k * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5 for _ in range(copies)]
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, ws[0])
            got = fused_triton.skinny_linear(x, ws[0], None)
            diff = float((got.float() - ref.float()).norm() / ref.float().norm())
            cublas = graph_us(lambda i: F.linear(x, ws[i % copies]), args.calls)
            kernel = graph_us(lambda i: fused_triton.skinny_linear(x, ws[i % copies], None), args.calls)
            rows.append((name, n, k, m, cublas, kernel, diff))
            print(rows[-1], file=sys.stderr, flush=True)
        del ws
        torch.cuda.empty_cache()
    print(f"<!-- {torch.cuda.get_device_name()} · torch {torch.__version__} · "
          f"`PYTHONPATH=. python scripts/bench_linear.py {shlex.join(sys.argv[1:])}` -->")
    print("| projection | N x K | rows | tile (N, K, stages) | cuBLAS µs (GB/s) | kernel µs (GB/s) | speedup "
          "| rel. diff | engine |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, k, m, cublas, kernel, diff in rows:
        gb = n * k * 2 / 1e3  # bytes / 1e3: GB/s from µs
        print(f"| {name} | {n} x {k} | {m} | {fused_triton.skinny_config(n, k)} | {cublas:.2f} ({gb / cublas:.0f}) | "
              f"{kernel:.2f} ({gb / kernel:.0f}) | {cublas / kernel:.2f}x | {diff:.1e} | "
              f"{'kernel' if n < fused.SKINNY_MAX_OUT else 'cuBLAS'} |")


if __name__ == "__main__":
    main()
