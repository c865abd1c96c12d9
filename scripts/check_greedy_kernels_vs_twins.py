"""Real model: greedy answers to a fact planted in ~2.5k tokens, Triton kernels vs torch twins, per cache
type (GPU).

    PYTHONPATH=. python scripts/check_greedy_kernels_vs_twins.py MODEL   (run on the H200 on 2026-11-29;
    docs/QUALITY.md, "The same on the H200")
"""
import os, sys
from tqinfer.llm import LLM
from tqinfer.cache.config import CacheConfig
from tqinfer.sampling import SamplingParams
from tqinfer.evaluation import eval_text
llm = LLM(sys.argv[1], device="cuda", max_context=4096)
doc = llm.tokenizer.decode(llm.tokenizer.encode(eval_text())[:1500])
prompt = doc + "\n\nNote: the code name of project Falcon is amber-4417.\n\n" + doc[:2000] + "\n\nQuestion: what is the code name of project Falcon? Answer:"
for t in ["tq3.5", "tq4", "bf16"]:
    for mode in ("torch", "triton"):
        os.environ["TQINFER_KERNELS"] = mode
        llm.set_cache(CacheConfig(k_type=t, v_type=t).for_device("cuda"))
        r = llm.generate(prompt, SamplingParams.greedy(max_tokens=16))[0]
        print(t, mode, repr(r.text[:80]), flush=True)
