"""Perplexity through the compressed cache (and needle retrieval) per cache type, next to bf16.

    PYTHONPATH=. python scripts/eval_quality.py ppl --tokens 4096 --chunk 256
    PYTHONPATH=. python scripts/eval_quality.py needle --lengths 1024 2048 4096 --depths 0 0.5 1

Prints a markdown table (docs/QUALITY.md). A spec is TYPE (K and V), Kx/Vy, and knobs after a colon:
`tq3:sinks=4,window=128,protected=1,rotation=orthogonal,seed=1,center=on` (center=auto|on|off: key centering). `--seeds 0 1 2` runs every compressed
spec once per rotation seed and reports the mean and each seed (docs/QUALITY.md: the rotation draw alone
moves a type's perplexity by a few tenths of a percent).
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

from tqinfer.cache.config import CacheConfig
from tqinfer.evaluation import EVAL_TEXT_NAME, bits_per_value, eval_text, needle, perplexity
from tqinfer.llm import LLM

DEFAULT_SPECS = ["bf16", "q8", "q4", "tq2.5", "tq3", "tq3.5", "tq4", "tqp3", "tqp4", "Kqjl/Vtq4", "polar",
                 "Ktq4/Vtq2", "Ktq4/Vtq3", "tq2.5-paper", "tq3.5-paper"]


def parse_spec(spec: str, default: CacheConfig) -> CacheConfig:
    types, _, knobs = spec.partition(":")
    if "/" in types:
        k, v = types.split("/")
        k, v = k.removeprefix("K"), v.removeprefix("V")
    else:
        k = v = types
    kw = dict(sinks=default.sinks, window=default.window, protected_layers=default.protected_layers,
              rotation=default.rotation, center_keys=default.center_keys)
    names = {"protected": "protected_layers", "center": "center_keys"}
    for item in filter(None, knobs.split(",")):
        key, value = item.split("=")
        key = names.get(key, key)
        if key == "center_keys":  # center=auto|on|off (1 / 0 read as on / off)
            kw[key] = {"1": "on", "0": "off"}.get(value, value)
        else:
            kw[key] = value if key == "rotation" else int(value)
    return CacheConfig(k_type=k, v_type=v, **kw)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["ppl", "needle"])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--specs", nargs="*", default=DEFAULT_SPECS)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--protected", type=int, default=0)
    p.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096])
    p.add_argument("--depths", type=float, nargs="*", default=[0.0, 0.5, 1.0])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seeds", type=int, nargs="*", default=None,
                   help="ppl: run every compressed spec with each of these rotation seeds and report the "
                        "mean and every seed's result (a spec's own seed=N knob is then overridden)")
    args = p.parse_args()

    default = CacheConfig(sinks=args.sinks, window=args.window, protected_layers=args.protected)
    ctx = max(args.tokens, max(args.lengths)) + 64
    llm = LLM(args.model, device="cpu", dtype=args.dtype, max_context=ctx, max_seqs=1)
    print(f"<!-- {date.today()} · {platform.processor() or platform.machine()} · torch {torch.__version__} · "
          f"{args.model} {args.dtype} · `PYTHONPATH=. python scripts/eval_quality.py {args.what} ...` -->")
    if args.what == "ppl":
        ids = llm.tokenizer.encode(eval_text())[: args.tokens]
        print(f"text: {EVAL_TEXT_NAME}, first {len(ids)} tokens, chunks of {args.chunk}; defaults "
              f"sinks={args.sinks} window={args.window} protected={args.protected}\n")
        if args.seeds:
            print("| cache (K/V) | bits/value | PPL, mean over seeds | vs bf16, mean | vs bf16 per seed | seconds |")
            print("| --- | --- | --- | --- | --- | --- |")
        else:
            print("| cache (K/V) | bits/value | PPL | vs bf16 | seconds |")
            print("| --- | --- | --- | --- | --- |")
        base = None
        for spec in args.specs:
            cfg = parse_spec(spec, default)
            seeds = args.seeds if args.seeds and not cfg.dense else [cfg.seed]
            t0 = time.perf_counter()
            ppls = []
            for seed in seeds:
                cfg.seed = seed
                llm.set_cache(cfg)
                ppls.append(perplexity(llm, ids, args.chunk))
            ppl = sum(ppls) / len(ppls)
            base = base or ppl
            rel = f"{100 * (ppl / base - 1):+.2f}%"
            if args.seeds:
                each = " ".join(f"{100 * (x / base - 1):+.2f}" for x in ppls)
                rel += f" | {each}"
            print(f"| {spec} | {bits_per_value(llm, len(ids)):.2f} | {ppl:.4f} | {rel} | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)
    else:
        print(f"haystack: {EVAL_TEXT_NAME}; greedy answer must contain the planted passphrase\n")
        header = " | ".join(f"{n}@{int(d * 100)}%" for n in args.lengths for d in args.depths)
        print(f"| cache | {header} | found |")
        print("|" + " --- |" * (len(args.lengths) * len(args.depths) + 2))
        for spec in args.specs:
            llm.set_cache(parse_spec(spec, default))
            res = needle(llm, args.lengths, args.depths)
            cells = " | ".join("yes" if r.found else "no" for r in res)
            print(f"| {spec} | {cells} | {sum(r.found for r in res)}/{len(res)} |", flush=True)


if __name__ == "__main__":
    main()
