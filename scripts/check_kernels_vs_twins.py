"""Real model: logits through the Triton kernels vs the torch twins, same cache type, 1500 tokens (GPU).

    PYTHONPATH=. python scripts/check_kernels_vs_twins.py MODEL   (run on the H200 on 2026-11-29 with the
    default model's GGUF; numbers in docs/QUALITY.md, "The same on the H200")
"""
import os, sys
from tqinfer.llm import LLM
from tqinfer.cache.config import CacheConfig
from tqinfer.evaluation import eval_text
llm = LLM(sys.argv[1], device="cuda", max_context=4096)
ids = llm.tokenizer.encode(eval_text())[:1500]
for t in ["tq4", "tq3.5", "tq3", "bf16"]:
    out = {}
    for mode in ("torch", "triton"):
        os.environ["TQINFER_KERNELS"] = mode
        llm.set_cache(CacheConfig(k_type=t, v_type=t).for_device("cuda"))
        out[mode] = llm.logits(ids, chunk=256).float()
    a, b = out["triton"], out["torch"]
    rel = ((a - b).norm(dim=-1) / b.norm(dim=-1))
    print(t, "rel err by chunk:", [round(float(rel[i:i+256].mean()), 4) for i in range(0, 1500, 256)],
          "argmax agree", round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4), flush=True)
