"""Real model, long document: the Triton attention kernels against their torch twins inside the same
forward passes, and the long-document answers with either one's output carried forward (GPU).

Every attention call (each layer of every prefill chunk and decode step) runs the kernel and the twin
on the same queries and the same cache; the relative error of the kernel's output is recorded per
layer, and one of the two outputs continues the forward pass (`--use kernel|twin`; the layer ops stay
the fused Triton ones either way). So a wrong long-context answer can be pinned on the attention
kernels (large errors somewhere, answers change with `--use`) or not.

    PYTHONPATH=. python scripts/check_attention_long.py --model smollm2.gguf --tokens 7000 --types tq3.5 tq4
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TQINFER_CUDA_GRAPHS", "0")  # the twin cannot run inside a graph capture

import torch  # noqa: E402

from tqinfer.ask import Document, DocumentQA  # noqa: E402
from tqinfer.cache.config import CacheConfig  # noqa: E402
from tqinfer.kernels import dispatch, reference  # noqa: E402
from tqinfer.llm import LLM  # noqa: E402
from tqinfer.sampling import SamplingParams  # noqa: E402

from eval_longdoc import FACTS, build_document  # noqa: E402


class Recorder:
    """Wraps dispatch.paged_attention: kernel and twin on the same inputs, errors per layer."""

    def __init__(self, layers: int):
        self.layers, self.calls, self.use = layers, 0, "kernel"
        self.worst: dict[tuple[str, int], float] = {}
        self.sums: dict[str, list[float]] = {"prefill": [0.0, 0], "decode": [0.0, 0]}
        self.nonfinite = 0
        self.kernel = dispatch.paged_attention

    def __call__(self, q, k, v, cu_q, prefix_lens, view, scale, window=None, prefix_list=None, chunk_list=None):
        out_k = self.kernel(q, k, v, cu_q, prefix_lens, view, scale, window, prefix_list, chunk_list)
        out_t = reference.paged_attention(q, k, v, cu_q, prefix_lens, view, scale, window, prefix_list, chunk_list)
        a, b = out_k.double(), out_t.double()
        rel = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)  # [T, Hq]
        self.nonfinite += int((~torch.isfinite(a)).sum())
        kind = "decode" if chunk_list is not None and all(n == 1 for n in chunk_list) else "prefill"
        layer = self.calls % self.layers
        self.calls += 1
        self.worst[kind, layer] = max(self.worst.get((kind, layer), 0.0), float(rel.max()))
        self.sums[kind][0] += float(rel.mean())
        self.sums[kind][1] += 1
        return out_k if self.use == "kernel" else out_t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=7000)
    p.add_argument("--types", nargs="*", default=["tq3.5", "tq4"])
    p.add_argument("--uses", nargs="*", default=["kernel", "twin"])
    p.add_argument("--max-context", type=int, default=8192)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    llm = LLM(args.model, device=args.device, max_context=min(args.max_context, args.tokens + 1024), max_seqs=1)
    doc = build_document(llm, args.tokens, [0.1, 0.4, 0.7, 0.95])
    rec = Recorder(llm.model.args.num_hidden_layers)
    dispatch.paged_attention = rec
    print(f"model {args.model}: {rec.layers} layers, document {args.tokens} tokens; kernel vs twin relative "
          "error of each attention output row (max over the run per layer; mean over calls)", flush=True)
    for t in args.types:
        for use in args.uses:
            os.environ["TQINFER_CACHE"] = tempfile.mkdtemp(prefix="tqinfer-check-")  # prefill afresh
            rec.use, rec.calls, rec.worst, rec.nonfinite = use, 0, {}, 0
            rec.sums = {"prefill": [0.0, 0], "decode": [0.0, 0]}
            llm.set_cache(CacheConfig(k_type=t, v_type=t).for_device(llm.device))
            qa = DocumentQA(llm, [Document("report.txt", doc)])
            found = []
            for name, code in FACTS:
                session, _ = qa.open_session()
                with session:
                    answer = "".join(ev.text for ev in qa.ask(session, f"What is the code name of project {name}?",
                                                              SamplingParams.greedy(max_tokens=24)))
                found.append(code in answer)
                print(f"  {t} use={use} {name}: {answer.strip()[:70]!r}", flush=True)
            for kind in ("prefill", "decode"):
                worst = sorted(((e, l) for (k, l), e in rec.worst.items() if k == kind), reverse=True)[:4]
                s, n = rec.sums[kind]
                print(f"{t} use={use} {kind}: mean rel err {s / max(n, 1):.2e} over {n} calls; worst layers "
                      + ", ".join(f"L{l} {e:.2e}" for e, l in worst), flush=True)
            print(f"{t} use={use}: found {sum(found)}/{len(found)} {found}; non-finite kernel outputs "
                  f"{rec.nonfinite}", flush=True)


if __name__ == "__main__":
    main()
