"""`tqinfer <command>`: run, chat, pull, list (and the commands built on them)."""

from __future__ import annotations

import argparse
import os
import sys
import time


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model: alias (smollm2), HF id, folder or .gguf (default: smollm2)")
    p.add_argument("-m", "--model", dest="model_opt", default=None, help="same as the positional MODEL")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context size in tokens (default: model maximum, at most 8192)")
    p.add_argument("--device", default=None, help="cuda, cpu, mps (default: automatic)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bfloat16; float16 on MPS)")
    p.add_argument("-ctk", "--cache-type-k", default=None, help="K cache type (tqinfer estimate --types lists them)")
    p.add_argument("-ctv", "--cache-type-v", default=None, help="V cache type")
    p.add_argument("--kv-cache", default=None, help="one cache type for both K and V")
    p.add_argument("--sinks", type=int, default=None, help="first tokens kept full precision")
    p.add_argument("--window", type=int, default=None, help="most recent tokens kept full precision")
    p.add_argument("--protected-layers", type=int, default=None, help="first/last N layers kept dense")
    p.add_argument("--center-keys", choices=("auto", "on", "off"), default=None,
                   help="store keys relative to a center from the first prompt chunk: every KV head, "
                        "none, or (auto, the default) those a shared offset dominates (docs/QUALITY.md)")
    p.add_argument("-b", "--batch-size", type=positive_int, default=None,
                   help="prompt tokens per prefill step (default: 4096 on CUDA, 512 elsewhere)")
    p.add_argument("-v", "--verbose", action="store_true", help="timings and tracebacks")


def positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=None, help="max tokens to generate")
    p.add_argument("--temp", type=float, default=None, help="temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repeat-penalty", type=float, default=None)
    p.add_argument("-s", "--seed", type=int, default=None)
    p.add_argument("-sys", "--system-prompt", dest="system", default=None, help="system message (implies --chat)")


def cache_config_from_args(args):
    from tqinfer.cache.config import CacheConfig

    k = args.cache_type_k or args.kv_cache
    v = args.cache_type_v or args.kv_cache
    knobs = {name: getattr(args, name) for name in ("sinks", "window", "protected_layers", "center_keys")
             if getattr(args, name, None) is not None}
    return CacheConfig(k_type=k, v_type=v, **knobs)


def llm_from_args(args, progress=None, max_seqs: int = 4):
    from tqinfer.llm import LLM

    return LLM(args.model_opt or args.model, device=args.device, dtype=args.dtype,
               cache=cache_config_from_args(args), max_context=args.ctx_size, progress=progress,
               max_seqs=max_seqs, prefill_chunk=args.batch_size)


def sampling_from_args(args):
    from tqinfer.sampling import SamplingParams

    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repeat_penalty, seed=args.seed,
                          max_tokens=args.n_predict if args.n_predict is not None else 512)


def read_prompt(args) -> str:
    if args.file:
        if args.file == "-":
            return sys.stdin.read()
        with open(args.file, encoding="utf-8") as f:
            return f.read()
    if args.prompt is None:
        if not sys.stdin.isatty():
            return sys.stdin.read()
        raise ValueError("no prompt: give -p PROMPT, -f FILE or pipe text on stdin")
    return args.prompt


def cmd_run(args) -> int:
    t0 = time.perf_counter()
    prompt = read_prompt(args)
    llm = llm_from_args(args)
    load = time.perf_counter() - t0
    if args.chat or args.system:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        ids = llm.chat_ids(messages)
    else:
        ids = llm.tokenizer.encode(prompt)
    last = None
    with llm.session() as session:
        for ev in session.stream(ids, sampling_from_args(args)):
            if ev.text:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            last = ev
    sys.stdout.write("\n")
    if args.verbose and last is not None:
        s = last.stats
        total = time.perf_counter() - t0
        print(f"total duration:       {total:.3f}s\n"
              f"load duration:        {load:.3f}s\n"
              f"prompt eval count:    {s.prompt_tokens} token(s)\n"
              f"prompt eval duration: {s.prompt_seconds:.3f}s\n"
              f"prompt eval rate:     {s.prompt_tps:.2f} tokens/s\n"
              f"eval count:           {s.generation_tokens} token(s)\n"
              f"eval duration:        {s.generation_seconds:.3f}s\n"
              f"eval rate:            {s.generation_tps:.2f} tokens/s\n"
              f"kv cache:             {s.kv_bytes / 2**20:.2f} MiB ({llm.cache_label}; bf16 would be {s.kv_bytes_bf16 / 2**20:.2f} MiB)\n"
              f"finish reason:        {last.finish_reason}", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from tqinfer.tui.app import run_chat

    return run_chat(args)


def cmd_pull(args) -> int:
    from tqinfer import hub

    files = hub.pull(args.name or hub.DEFAULT_MODEL)
    print(f"{files.name}: {files.folder}")
    return 0


def cmd_list(args) -> int:
    from tqinfer import hub

    rows = hub.list_local()
    if not rows:
        print("no local models (tqinfer pull NAME fetches one)")
    for name, path, size in rows:
        print(f"{name:40s} {size / 2**20:10.1f} MiB  {path}")
    return 0


def cmd_estimate(args) -> int:
    import json

    import torch

    from tqinfer import hub
    from tqinfer.cache.config import CacheConfig, cache_type_names
    from tqinfer.cache.paged import available_memory
    from tqinfer.estimate import estimate, largest_context
    from tqinfer.llm import default_prefill_chunk, pick_device, pick_dtype
    from tqinfer.models import build_model

    if args.types:
        from tqinfer.quant.registry import CACHE_TYPES, make_codec

        print(f"{'type':14s} {'bits/value d=64':>16s} {'d=128':>7s}  summary")
        for name in cache_type_names():
            bits = [make_codec(name, d, 1, seed=0).bits_per_value for d in (64, 128)]
            print(f"{name:14s} {bits[0]:16.3f} {bits[1]:7.3f}  {CACHE_TYPES[name].summary}")
        return 0
    files = hub.resolve(args.model_opt or args.model)
    config = json.loads((files.folder / "config.json").read_text())
    _, margs = build_model(config)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    memory = int(args.memory * 2**30) if args.memory else available_memory(device)
    cache = cache_config_from_args(args).for_device(device)
    context = args.ctx_size or min(margs.max_position_embeddings, 8192)
    chunk = args.batch_size or default_prefill_chunk(device)
    e = estimate(config, cache, context, dtype, memory, max_seqs=args.parallel, chunk=chunk, device=device)
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    print(f"model            {files.name} ({margs.model_type}, {margs.num_hidden_layers} layers, "
          f"{margs.num_key_value_heads} KV heads x {margs.head_dim}), weights as {str(dtype).replace('torch.', '')}")
    print(f"context          {context:,} tokens x {args.parallel} sequence(s), cache {cache.label} "
          f"(sinks {cache.sinks}, window {cache.window}, protected layers {cache.protected_layers})")
    print(f"weights          {mib(e.weights)}")
    print(f"KV cache         {mib(e.kv_cache)}   (bf16 would be {mib(e.kv_cache_bf16)})")
    print(f"activations      {mib(e.activations)}")
    print(f"total            {mib(e.total)}   of {mib(memory)} available on {device.type}: "
          f"{'fits' if e.fits else 'does NOT fit'}")
    limit = margs.max_position_embeddings
    most = largest_context(config, cache, dtype, memory, chunk=chunk, device=device)
    print(f"largest context  {most:,} tokens fit in that memory with {cache.label}"
          + (f" (the model's maximum is {limit:,})" if most > limit else ""))
    return 0 if e.fits else 2


def looks_like_model(name: str) -> bool:
    import re
    from pathlib import Path

    from tqinfer import hub

    return (name in getattr(hub, "ALIASES", {}) or Path(name).exists() or name.endswith(".gguf")
            or re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None)


def cmd_ask(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from tqinfer.ask import DocumentQA, read_documents

    err = Console(stderr=True)
    if args.question is None and args.model and not looks_like_model(args.model):
        args.question, args.model = args.model, None  # `tqinfer ask --doc F "question?"`
    docs = read_documents(args.doc, sys.stdin)
    llm = llm_from_args(args)
    params = sampling_from_args(args)
    qa = DocumentQA(llm, docs, use_cache=not args.no_cache, truncate=args.truncate)
    interactive = args.question is None
    if interactive and any(d == "-" for d in args.doc):
        raise ValueError("documents from stdin need the QUESTION on the command line")
    try:
        while True:
            if interactive:
                if sys.stdin.isatty():
                    err.print("[bold]question>[/bold] ", end="")
                line = sys.stdin.readline()
                if not line:
                    break
                question = line.strip()
                if not question:
                    continue
            else:
                question = args.question
            t0 = time.perf_counter()
            with Progress(TextColumn("prefill"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
                          TextColumn("{task.fields[tps]:.0f} tok/s"), TimeRemainingColumn(),
                          console=err, transient=True, disable=not err.is_terminal) as bar:
                task = bar.add_task("prefill", total=len(qa.prefix_ids), tps=0.0)
                session, how = qa.open_session(
                    on_progress=lambda done, total, secs: bar.update(task, completed=done, tps=done / max(secs, 1e-9)),
                    on_notice=lambda m: err.print(f"[yellow]{m}[/yellow]"))
            secs = time.perf_counter() - t0
            err.print(f"[dim]documents: {len(qa.prefix_ids)} tokens {how} in {secs:.2f}s "
                      f"({'prompt cache' if how == 'loaded' else f'{len(qa.prefix_ids) / secs:.0f} tok/s'})[/dim]")
            with session:
                for ev in qa.ask(session, question, params):
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            if not interactive:
                break
    finally:
        qa.close()
    return 0


def cmd_batch(args) -> int:
    import json
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from tqinfer.batch import finished_ids, parse_line, result_record
    from tqinfer.engine.scheduler import Scheduler
    from tqinfer.llm import Result

    err = Console(stderr=True)
    defaults = sampling_from_args(args)
    output = Path(args.output)
    done = finished_ids(output)
    items, bad = [], 0
    with open(args.input, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = parse_line(line, number, defaults)
            except ValueError as e:
                err.print(f"[red]line {number}: {e} (skipped)[/red]")
                bad += 1
                continue
            if item.id not in done:
                items.append(item)
    if done:
        err.print(f"{len(done)} id(s) already in {output}: skipped")
    if not items:
        err.print("nothing to do")
        return 1 if bad else 0
    llm = llm_from_args(args, max_seqs=args.parallel)
    sched = Scheduler(llm, chunk=llm.prefill_chunk)
    by_index = {}
    for item in items:
        try:
            by_index[sched.add(llm._prompt_ids(item.prompt), item.params).index] = item
        except ValueError as e:
            err.print(f"[red]id {item.id}: {e} (skipped)[/red]")
            bad += 1
    generated, t0 = 0, time.perf_counter()
    with open(output, "a", encoding="utf-8") as out, Progress(
            TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tps]:.1f} tok/s"),
            console=err, disable=not err.is_terminal) as bar:
        task = bar.add_task("batch", total=len(by_index), tps=0.0)
        while not sched.done:
            for req, ev in sched.step():
                generated += ev.token is not None
                if ev.finish_reason is not None:
                    result = Result("".join(req.text), [], req.finish, req.stats)
                    out.write(json.dumps(result_record(by_index[req.index], result), ensure_ascii=False) + "\n")
                    out.flush()
                    bar.advance(task)
            bar.update(task, tps=generated / max(time.perf_counter() - t0, 1e-9))
    err.print(f"{len(by_index)} done, {bad} skipped; {generated} tokens at "
              f"{generated / max(time.perf_counter() - t0, 1e-9):.1f} tok/s -> {output}")
    return 1 if bad else 0


def cmd_cache(args) -> int:
    from tqinfer.ask import clear_prompt_caches, list_prompt_caches

    if args.action == "clear":
        print(f"removed {clear_prompt_caches()} prompt cache file(s)")
        return 0
    rows = list_prompt_caches()
    if not rows:
        print("no prompt caches")
    for path, header in rows:
        size = path.stat().st_size / 2**20
        if "error" in header:
            print(f"{path.name}  {size:8.1f} MiB  unreadable: {header['error']}")
        else:
            print(f"{path.name}  {size:8.1f} MiB  {header.get('tokens')} tokens  {header.get('model')}  "
                  f"K {header.get('k_type')} / V {header.get('v_type')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tqinfer", description="Local LLM inference with a TurboQuant KV cache")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="generate from a prompt, streaming to stdout")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("-p", "--prompt", default=None)
    p.add_argument("-f", "--file", default=None, help="read the prompt from FILE (- for stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="terminal chat (Textual); --plain for a line REPL")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--plain", action="store_true", help="line REPL instead of the full-screen UI")
    p.add_argument("--resume", action="store_true", help="reopen the last conversation")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("ask", help="questions over documents, with their compressed cache saved to disk")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("question", nargs="?", default=None, help="the question (none: read questions from stdin)")
    p.add_argument("--doc", action="append", default=[], help="a text or markdown file (- for stdin); repeatable")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the prompt cache")
    p.add_argument("--truncate", choices=["head", "tail", "middle"], default=None,
                   help="keep the head, the tail or both ends of documents longer than the context")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("batch", help="JSONL prompts in, JSONL results out (continuous batching, resumable)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--input", "-i", required=True, help="JSONL: {\"id\", \"prompt\" | \"messages\", params...} per line")
    p.add_argument("--output", "-o", required=True, help="JSONL results, appended; finished ids are skipped on rerun")
    p.add_argument("--parallel", type=int, default=8, help="sequences decoded together")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("cache", help="prompt caches: list or clear")
    p.add_argument("action", choices=["list", "clear"])
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("estimate", help="memory for a context: weights, KV cache, activations; largest context")
    add_model_args(p)
    p.add_argument("--memory", type=float, default=None, help="GiB to fit into (default: free GPU memory or RAM)")
    p.add_argument("--parallel", type=int, default=1, help="sequences held at once")
    p.add_argument("--types", action="store_true", help="list the cache types with their bits per value")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("pull", help="fetch a model into the local cache")
    p.add_argument("name", nargs="?", default=None)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="models in the local cache, with sizes")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False) or os.environ.get("TQINFER_DEBUG")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the boundary: one clear message, no traceback unless asked
        if verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
