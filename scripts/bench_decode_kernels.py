"""Decode attention on the GPU, the split stage's two kernels on the same caches in one process: the
plain-Triton split kernel (`paged_decode_attention(..., kernel="triton")`) against the Gluon one
(`kernel="gluon"`, tqinfer/kernels/decode_gluon.py) where it reads the records, torch SDPA on a
contiguous bf16 cache alongside. Each row times the whole call (query preparation, split, merge) replayed
from a CUDA graph, L2 flushed (bench_attention.graph_time), best of two alternating rounds, and prints the
Gluon output's relative difference from the Triton kernel's. Prints a markdown table last.

    PYTHONPATH=. python scripts/bench_decode_kernels.py                    # tq4 and tq3.5, six sizes
    PYTHONPATH=. python scripts/bench_decode_kernels.py --kinds tq3.5 --quick
    PYTHONPATH=. python scripts/bench_decode_kernels.py --no-gluon-3bit-32  # tq3.5 at d 64 through Triton
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention as ba  # noqa: E402

from tqinfer.kernels import decode_attention as da  # noqa: E402

CASES = [("llama3-8b", 1, 131072), ("llama3-8b", 8, 32768), ("llama3-8b", 1, 32768), ("llama3-8b", 1, 8192),
         ("smollm2-135m", 1, 4096), ("smollm2-135m", 1, 32768)]  # shape, batch, context
KERNELS = ("triton", "gluon")


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def sdpa_us(q: torch.Tensor, h: int, t: int) -> float:
    """SDPA bf16 over a contiguous cache of t tokens, the baseline of every row."""
    b, _, d = q.shape
    kk = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)
    vv = torch.randn_like(kk)
    return ba.graph_time(lambda: F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, enable_gqa=True))


def kernel_rows(kind: str, q: torch.Tensor, kn: torch.Tensor, cu: torch.Tensor, lens: torch.Tensor, h: int,
                t: int) -> dict:
    """{kernel: best µs} and the Gluon output's difference from the Triton kernel's, for one cache type
    (bench_attention.decode_case's inputs)."""
    b, hq, d = q.shape
    scale = 1 / math.sqrt(d)
    view = ba.make_cache(kind, b, t, h, d)
    out = torch.empty_like(q)
    reads = da.gluon_reads(*da._layouts(view, q.device), d, hq // h, view.block_size, q.device)

    def call(kernel, into=None):
        return da.paged_decode_attention(q, kn, kn, cu, lens, view, scale, out=into, kernel=kernel)

    row = {}
    for _ in range(2):
        for kernel in KERNELS:
            if kernel == "gluon" and not reads:
                row[f"{kind}_{kernel}"] = float("nan")
                continue
            us = ba.graph_time(lambda: call(kernel, out))
            row[f"{kind}_{kernel}"] = min(us, row.get(f"{kind}_{kernel}", float("inf")))
    if reads:
        row[f"{kind}_err"] = rel_diff(call("gluon"), call("triton"))
    return row


def bench_case(shape: str, b: int, t: int, kinds: list[str]) -> dict:
    _, b, t, h, _, q, kn, cu, lens = ba.decode_case(f"{shape}:{b}:{t}")
    row = {"shape": shape, "B": b, "T": t, "sdpa": sdpa_us(q, h, t)}
    for kind in kinds:
        row.update(kernel_rows(kind, q, kn, cu, lens, h, t))
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", nargs="*", default=["tq4", "tq3.5"])
    p.add_argument("--quick", action="store_true", help="the 8B shape's first three sizes only")
    p.add_argument("--no-gluon-3bit-32", action="store_true",
                   help="leave 3-bit parts of 32 channels (tq3.5 at d 64) to the Triton kernel, as before 2026-11-30")
    args = p.parse_args()
    da.GLUON_3BIT_32 = not args.no_gluon_3bit_32
    rows = []
    for shape, b, t in CASES[:3] if args.quick else CASES:
        rows.append(bench_case(shape, b, t, args.kinds))
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}), flush=True)
    cols = [f"{k} {n} µs" for k in args.kinds for n in KERNELS]
    print(f"<!-- {torch.cuda.get_device_name()} · torch {torch.__version__} · "
          f"`PYTHONPATH=. python scripts/bench_decode_kernels.py {' '.join(sys.argv[1:])}` -->")
    print("| shape | B | T | SDPA bf16 µs | " + " | ".join(cols) + " |")
    print("|" + "---|" * (4 + len(cols)))
    for r in rows:
        cells = [f"{r[f'{k}_{n}']:.1f} ({r['sdpa'] / r[f'{k}_{n}']:.2f}x)" for k in args.kinds for n in KERNELS]
        print(f"| {r['shape']} | {r['B']} | {r['T']} | {r['sdpa']:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
