"""Long-document Q&A: facts planted at several depths of a long real document, asked one by one
through `tqinfer ask`'s DocumentQA; accuracy and time to the first answer token, with the documents
prefilled and with their saved prompt cache, per cache type.

    PYTHONPATH=. python scripts/eval_longdoc.py --tokens 7000 --types bf16 tq3.5 tq4

Prints a markdown table for docs/QUALITY.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import date

import torch

from tqinfer.ask import Document, DocumentQA
from tqinfer.cache.config import CacheConfig
from tqinfer.evaluation import EVAL_TEXT_NAME, eval_text
from tqinfer.llm import LLM
from tqinfer.sampling import SamplingParams

FACTS = [("Falcon", "amber-4417"), ("Heron", "cobalt-2093"), ("Lynx", "violet-7751"), ("Otter", "silver-3368")]


def build_document(llm, tokens: int, depths: list[float]) -> str:
    """The evaluation text, repeated to about `tokens` tokens, with one fact planted at each depth."""
    words = (eval_text() + "\n\n") * 4
    ids = llm.tokenizer.encode(words, add_special_tokens=False)[:tokens]
    pieces, last = [], 0
    for (name, code), depth in zip(FACTS, depths):
        cut = int(depth * len(ids))
        pieces.append(llm.tokenizer.decode(ids[last:cut]))
        pieces.append(f"\n\nNote: the code name of project {name} is {code}.\n\n")
        last = cut
    pieces.append(llm.tokenizer.decode(ids[last:]))
    return "".join(pieces)


def first_token_seconds(qa: DocumentQA, question: str) -> tuple[float, str, str]:
    """(seconds from opening the documents to the first answer token, how they were opened, answer)."""
    t0 = time.perf_counter()
    session, how = qa.open_session()
    first, text = None, []
    with session:
        for ev in qa.ask(session, question, SamplingParams.greedy(max_tokens=24)):
            if first is None and ev.token is not None:
                first = time.perf_counter() - t0
            text.append(ev.text)
    return first or 0.0, how, "".join(text)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=7000)
    p.add_argument("--types", nargs="*", default=["bf16", "tq3.5", "tq4"])
    p.add_argument("--depths", type=float, nargs="*", default=[0.1, 0.4, 0.7, 0.95])
    p.add_argument("--device", default=None)
    p.add_argument("--max-context", type=int, default=8192, help="cap on the context allocated (tokens)")
    args = p.parse_args()
    os.environ["TQINFER_CACHE"] = tempfile.mkdtemp(prefix="tqinfer-longdoc-")  # cold prompt caches
    llm = LLM(args.model, device=args.device, max_context=min(args.max_context, args.tokens + 1024), max_seqs=1)
    doc = build_document(llm, args.tokens, args.depths)
    rows = []
    for t in args.types:
        llm.set_cache(CacheConfig(k_type=t, v_type=t).for_device(llm.device))
        qa = DocumentQA(llm, [Document("report.txt", doc)])
        found, firsts = [], []
        for i, ((name, code), depth) in enumerate(zip(FACTS, args.depths)):
            secs, how, answer = first_token_seconds(qa, f"What is the code name of project {name}?")
            firsts.append((how, secs))
            found.append(code in answer)
            print(f"<!-- {t} {name} ({how}, {secs:.2f} s): {answer.strip()[:80]!r} -->", flush=True)
        cold = [s for h, s in firsts if h == "prefilled"]
        warm = [s for h, s in firsts if h == "loaded"]
        rows.append((t, len(qa.prefix_ids), found, cold[0] if cold else 0.0, sum(warm) / max(1, len(warm))))
    device = torch.cuda.get_device_name() if llm.device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"<!-- {date.today()} · {device} · torch {torch.__version__} · {args.model} {llm.dtype} · "
          f"`PYTHONPATH=. python scripts/eval_longdoc.py --tokens {args.tokens} --types {' '.join(args.types)}` -->")
    print(f"document: {EVAL_TEXT_NAME} repeated, facts at depths {args.depths}; greedy answers must contain the code\n")
    heads = " | ".join(f"{int(d * 100)}%" for d in args.depths)
    print(f"| cache | doc tokens | {heads} | found | first token, prefilled (s) | first token, from saved cache (s) |")
    print("|" + " --- |" * (len(args.depths) + 5))
    for t, n, found, cold, warm in rows:
        cells = " | ".join("yes" if f else "no" for f in found)
        print(f"| {t} | {n} | {cells} | {sum(found)}/{len(found)} | {cold:.1f} | {warm:.2f} |")


if __name__ == "__main__":
    main()
