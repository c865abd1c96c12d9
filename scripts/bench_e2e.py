"""End-to-end decode and prefill tok/s on random-weight models (random weights are fine for speed,
never for quality): bf16 cache vs TurboQuant caches in the same run, caches filled synthetically.

    PYTHONPATH=. python scripts/bench_e2e.py --shapes default 8b --contexts 4096 32768 --batch 1 16

Prints a markdown table for docs/BENCHMARKS.md. --baseline FILE times a copy of decode_attention.py
(e.g. `git show REV:tqinfer/kernels/decode_attention.py > .bench/old.py`) next to the current kernel in
the same process, decode rows alternating between the two for --rounds rounds.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import time
from datetime import date

import torch

from tqinfer.cache.config import CacheConfig, build_cache
from tqinfer.engine.engine import LLMEngine
from tqinfer.estimate import largest_context
from tqinfer.kernels import decode_attention, dispatch
from tqinfer.llm import default_prefill_chunk
from tqinfer.models.llama import LlamaForCausalLM, ModelArgs

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "default": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}


def build(shape: str, device, dtype, max_pos: int):
    cfg = dict(SHAPES[shape], model_type="llama", max_position_embeddings=max_pos, rope_theta=500000.0)
    args = ModelArgs.from_dict(cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().fuse(), cfg, args


def fill(cache, slots: list[int], n: int, dtype) -> None:
    """Give each sequence n tokens of random K/V: one block written through the codec (kernels on
    CUDA), copied to every block, hot buffers random."""
    g = torch.Generator(device="cpu").manual_seed(0)
    if cache.kind == "dense":
        for t in cache.k + cache.v:
            t[:, :, :n].normal_()
        for s in slots:
            cache.set_len(s, n)
        return
    bs = cache.block_size
    for s in slots:
        cache.reserve(s, n)
    first = cache.tables[slots[0]][0]
    H, d = cache.args.num_key_value_heads, cache.args.head_dim
    for layer in range(cache.args.num_hidden_layers):
        for codec, pool in ((cache.k_codec[layer], cache.k_pool[layer]), (cache.v_codec[layer], cache.v_pool[layer])):
            x = torch.randn(bs, H, d, generator=g).to(cache.device, dtype)
            slots_t = torch.arange(first * bs, first * bs + bs, device=cache.device)
            dispatch.write_tokens(codec, x, pool, slots_t)
            blocks = torch.tensor([b for s in slots for b in cache.tables[s]], device=cache.device)
            pool[blocks] = pool[first].clone()
        for hot in (cache.k_hot[layer], cache.v_hot[layer]):
            if hot is not None:
                hot.normal_()
    for s in slots:
        cache.compressed[s] = max(cache.sinks, n - cache.window)
        cache.set_len(s, n)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_tps(engine, slots, n: int, steps: int) -> float:
    tokens = [[1] for _ in slots]
    for i in range(2):  # warm-up (kernel compiles, layouts)
        engine.forward(slots, [n + i] * len(slots), tokens)
    sync(engine.device)
    t0 = time.perf_counter()
    for i in range(steps):
        engine.forward(slots, [n + 2 + i] * len(slots), tokens)
    sync(engine.device)
    return steps * len(slots) / (time.perf_counter() - t0)


def prefill_tps(engine, n: int, chunk: int) -> tuple[float, float]:
    """(tok/s of a first and a second prefill of n tokens in chunks): the first pays one-time costs that
    depend on the prefix length (compiles, cuDNN's execution plans for new shapes), the second not."""
    ids = torch.randint(0, engine.model.args.vocab_size, (n,)).tolist()
    engine.forward([0], [0], [ids[:chunk]])  # warm-up
    engine.cache.set_len(0, 0)
    tps = []
    for _ in range(2):
        sync(engine.device)
        t0 = time.perf_counter()
        for s in range(0, n, chunk):
            engine.forward([0], [s], [ids[s:s + chunk]])
        sync(engine.device)
        tps.append(n / (time.perf_counter() - t0))
        engine.cache.set_len(0, 0)
    return tps[0], tps[1]


def load_decode_kernel(path: str):
    """paged_decode_attention of another copy of kernels/decode_attention.py (its relative imports
    resolve inside tqinfer.kernels)."""
    spec = importlib.util.spec_from_file_location("tqinfer.kernels._decode_attention_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.paged_decode_attention


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="*", default=["default", "8b"])
    p.add_argument("--types", nargs="*", default=["bf16", "tq3.5", "tq4"])
    p.add_argument("--contexts", type=int, nargs="*", default=[4096, 32768])
    p.add_argument("--batch", type=int, nargs="*", default=[1])
    p.add_argument("--prefill", type=int, nargs="*", default=[8192])
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: the engine's for the device)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--largest", type=float, default=0.0,
                   help="also allocate this fraction of the largest context that fits and time decode there")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--baseline", default=None,
                   help="a copy of kernels/decode_attention.py to time next to the current one (decode rows)")
    p.add_argument("--rounds", type=int, default=1, help="decode timings per kernel, alternating; the best is kept")
    args = p.parse_args()
    args.chunk = args.chunk or default_prefill_chunk(torch.device(args.device))
    current = decode_attention.paged_decode_attention
    kernels = [("", current)] if args.baseline is None else [("before", load_decode_kernel(args.baseline)),
                                                              ("after", current)]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for shape in args.shapes:
        need = max(args.contexts + args.prefill) + 64
        model, cfg, margs = build(shape, device, dtype, max(need, 8192))
        for t in args.types:
            cc = CacheConfig(k_type=t, v_type=t)
            for b in args.batch:
                for n in args.contexts:
                    best = {}
                    for _ in range(args.rounds):
                        for label, fn in kernels:
                            decode_attention.paged_decode_attention = fn  # dispatch looks it up per call
                            cache = build_cache(cc, margs, max_seqs=b, max_len=n + args.steps + 64, dtype=dtype,
                                                device=device)
                            engine = LLMEngine(model, cache, device)
                            fill(cache, list(range(b)), n, dtype)
                            tps = decode_tps(engine, list(range(b)), n, args.steps)
                            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0
                            best[label] = max(best.get(label, (0, 0)), (tps, peak))
                            print((shape, t, b, n, label, round(tps, 1)), file=sys.stderr, flush=True)
                            del engine, cache
                            gc.collect()  # captured graphs hold their engine: free them before the next cache
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                                torch.cuda.reset_peak_memory_stats()
                    decode_attention.paged_decode_attention = current
                    for label, _ in kernels:
                        rows.append((shape, t, f"decode B={b}" + (f", {label}" if label else ""), n) + best[label])
            for n in args.prefill:
                cache = build_cache(cc, margs, max_seqs=1, max_len=n + 64, dtype=dtype, device=device)
                engine = LLMEngine(model, cache, device)
                first, again = prefill_tps(engine, n, args.chunk)
                rows.append((shape, t, f"prefill (chunk {args.chunk}), first pass", n, first, 0))
                rows.append((shape, t, f"prefill (chunk {args.chunk}), second pass", n, again, 0))
                print(rows[-2:], file=sys.stderr, flush=True)
                del engine, cache
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            # the estimate counts the weights itself: give it the memory free without them
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            free = torch.cuda.mem_get_info()[0] + weights
            for t in args.types:
                cc = CacheConfig(k_type=t, v_type=t)
                most = largest_context(cfg, cc, dtype, free, chunk=args.chunk)
                tps = 0.0
                if args.largest:  # allocate most of it and time decode steps at that context
                    n = int(most * args.largest) // 64 * 64
                    cache = build_cache(cc, margs, max_seqs=1, max_len=n + 64, dtype=dtype, device=device)
                    engine = LLMEngine(model, cache, device)
                    fill(cache, [0], n - 8, dtype)
                    tps = decode_tps(engine, [0], n - 8, 3)
                    rows.append((shape, t, f"decode B=1 at {args.largest:.0%} of the largest", n, tps,
                                 torch.cuda.max_memory_allocated() / 2**30))
                    print(rows[-1], file=sys.stderr, flush=True)
                    del engine, cache
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                rows.append((shape, t, "largest context (estimate, memory free of the weights)", most, 0,
                             free / 2**30))
        del model
    print(f"<!-- {date.today()} · {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} · "
          f"torch {torch.__version__} · `PYTHONPATH=. python scripts/bench_e2e.py {' '.join(sys.argv[1:])}` -->")
    print("| shape | cache | what | context | tok/s | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape, t, what, n, tps, peak in rows:
        print(f"| {shape} | {t} | {what} | {n} | {tps:.1f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
