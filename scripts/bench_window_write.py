"""Quantize-on-write per decode step, all layers of a model shape (GPU, CUDA-graph replay, L2 flushed):
the records of each layer's token leaving the recent window.

- "batched" (the engine's): quantize.retire_window over every layer in one launch at the step's start
  (the new token then enters its hot row in the decode attention's merge kernel: no launch of its own);
- "per layer": retire_window of one layer, layer by layer (one launch a layer);
- "baseline" (--baseline FILE, a copy of an older kernels/quantize.py with shift_window): its one
  launch a layer, which wrote the records and the new token.

Next to it, one layer's decode attention over a cache of T tokens (paged_decode_attention, same
process), without and with the new token's hot-row write (enter), so that the table gives the
write's share of a step's attention (L layers of it).

    PYTHONPATH=. python scripts/bench_window_write.py --cases llama3-8b:1:32768 smollm2-135m:1:4096 \
        --kinds tq3.5 tq4 [--baseline .bench/quantize_old.py]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import sys

import torch
import triton

from bench_attention import SHAPES, decode_case, graph_time, log, make_cache
from tqinfer.kernels import quantize
from tqinfer.kernels.decode_attention import paged_decode_attention
from tqinfer.quant.registry import make_codec

LAYERS = {"llama3-8b": 32, "smollm2-135m": 30}
HOT = 4 + 128  # sinks + window rows a sequence


def model_layers(kind: str, n_layers: int, b: int, h: int, d: int):
    """n_layers of (k_codec, v_codec, k_hot, v_hot, k_pool, v_pool): each its own codecs (rotations),
    random hot rows, pools of a few blocks a sequence."""
    layers = []
    for i in range(n_layers):
        kc, vc = make_codec(kind, d, h, seed=2 * i + 1), make_codec(kind, d, h, seed=2 * i + 2)
        hots = [torch.randn(b, h, HOT, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        pools = [torch.zeros(4 * b + 1, h, 64, c.record_bytes, device="cuda", dtype=torch.uint8) for c in (kc, vc)]
        layers.append((kc, vc, *hots, *pools))
    return layers


def load_quantize(path: str):
    spec = importlib.util.spec_from_file_location("tqinfer.kernels._quantize_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (its dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", nargs="*", default=["llama3-8b:1:32768", "llama3-8b:1:131072", "llama3-8b:16:32768",
                                                  "smollm2-135m:1:4096"])
    p.add_argument("--kinds", nargs="*", default=["tq3.5", "tq4"])
    p.add_argument("--baseline", default=None, help="a copy of an older quantize.py with shift_window")
    args = p.parse_args()
    base = load_quantize(args.baseline) if args.baseline else None
    rows = []
    for case in args.cases:
        shape, b, t, h, d, q, kn, cu, lens = decode_case(case)
        n_layers = LAYERS[shape]
        for kind in args.kinds:
            layers = model_layers(kind, n_layers, b, h, d)
            seq = torch.arange(b, device="cuda")
            src = torch.full((b,), 4 + t % 128, device="cuda")  # the row the leaving token holds
            dst = seq * 4 * 64 + 5  # flat pool slots
            knew, vnew = kn, torch.randn_like(kn)

            row = dict(case=case, kind=kind, layers=n_layers)
            row["batched"] = graph_time(lambda: quantize.retire_window(layers, seq, src, dst))
            row["per_layer"] = graph_time(lambda: [quantize.retire_window([lay], seq, src, dst) for lay in layers])
            if base is not None:
                row["baseline"] = graph_time(lambda: [base.shift_window(*lay[:6], knew, vnew, seq, src, src, dst)
                                                      for lay in layers])
            row["batched"] = min(row["batched"], graph_time(lambda: quantize.retire_window(layers, seq, src, dst)))
            view = make_cache(kind, b, t, h, d)
            out = torch.empty_like(q)
            enter = torch.zeros(b, dtype=torch.int64, device="cuda")
            for label, e in (("attention", None), ("attention_enter", enter)) * 2:  # alternating, the best
                us = graph_time(lambda: paged_decode_attention(q, kn, kn, cu, lens, view, 1 / math.sqrt(d), out=out,
                                                               enter=e))
                row[label] = min(row.get(label, us), us)
            del view, layers
            torch.cuda.empty_cache()
            log(row)
            rows.append(row)
    print(f"<!-- {datetime.date.today()} · {torch.cuda.get_device_name()} · torch {torch.__version__} · "
          f"triton {triton.__version__} · `PYTHONPATH=. python scripts/bench_window_write.py {' '.join(sys.argv[1:])}` -->")
    print("| case | type | layers | attention a layer µs: without / with the hot-row write | records of the "
          "step's window exits µs: one launch (per layer) | per layer" + (" | baseline (records and hot row)" if base else "")
          + " | records a layer, % of attention |")
    print("|---|---|---|---|---|---|" + ("---|" if base else "") + "---|")
    for r in rows:
        share = r["batched"] / r["layers"] / r["attention"] * 100
        print(f"| {r['case']} | {r['kind']} | {r['layers']} | {r['attention']:.1f} / {r['attention_enter']:.1f} | "
              f"{r['batched']:.1f} ({r['batched'] / r['layers']:.2f}) | {r['per_layer']:.1f}"
              + (f" | {r['baseline']:.1f}" if base else "") + f" | {share:.1f}% |")


if __name__ == "__main__":
    main()
