"""Quality through the real cache: perplexity with the prefix compressed, and needle retrieval."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

EVAL_TEXT = Path(__file__).resolve().parents[1] / "data" / "eval" / "license_texts.txt"
EVAL_TEXT_NAME = "GPL-3.0 + Apache-2.0 + MPL-2.0 license texts (data/eval/license_texts.txt)"


def eval_text() -> str:
    if not EVAL_TEXT.is_file():
        raise FileNotFoundError(f"evaluation text not found at {EVAL_TEXT} (run from a source checkout)")
    return EVAL_TEXT.read_text(encoding="utf-8")


@torch.inference_mode()
def perplexity(llm, ids: list[int], chunk: int = 256) -> float:
    """Teacher-forced perplexity, prefilled in chunks: each chunk reads the earlier tokens back from
    the cache as stored (compressed for a quantized type), never from a full-precision copy."""
    logits = llm.logits(ids, chunk=chunk)
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:], device=logits.device))
    return math.exp(float(nll))


def bits_per_value(llm, tokens: int) -> float:
    """Average stored bits per K/V value of a sequence of `tokens`, sinks, window and norms counted."""
    from tqinfer.cache.config import bytes_per_token

    args, cfg = llm.args, llm.cache_config
    values = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim
    n_hot = min(tokens, cfg.sinks + cfg.window) if not cfg.dense else tokens
    # hot tokens are bf16 in every layer; the rest are records (bf16 in protected layers)
    total = (tokens - n_hot) * bytes_per_token(args, cfg) + n_hot * bytes_per_token(args, cfg.dense_twin())
    return total * 8 / (tokens * values)


@dataclass
class NeedleResult:
    length: int
    depth: float
    found: bool
    answer: str


def needle_prompt(llm, haystack_ids: list[int], length: int, depth: float, secret: str) -> list[int]:
    """A chat prompt of about `length` tokens: filler text with one planted fact at `depth` (0..1)."""
    needle = llm.tokenizer.encode(f" The secret passphrase is {secret}. ", add_special_tokens=False)
    question = "What is the secret passphrase mentioned in the text above? Answer with the passphrase only."
    overhead = len(llm.chat_ids([{"role": "user", "content": "\n\n" + question}])) + len(needle)
    body = length - overhead
    if body <= 0:
        raise ValueError(f"length {length} is too short for the needle prompt ({overhead} tokens of overhead)")
    filler = (haystack_ids * (body // len(haystack_ids) + 1))[:body]
    at = int(round(depth * body))
    text = llm.tokenizer.decode(filler[:at]) + llm.tokenizer.decode(needle) + llm.tokenizer.decode(filler[at:])
    return llm.chat_ids([{"role": "user", "content": text + "\n\n" + question}])


def needle(llm, lengths: list[int], depths: list[float], seed: int = 0) -> list[NeedleResult]:
    from tqinfer.sampling import SamplingParams

    rng = random.Random(seed)
    haystack = llm.tokenizer.encode(eval_text(), add_special_tokens=False)
    results = []
    for length in lengths:
        for depth in depths:
            secret = f"{rng.choice(['blue', 'amber', 'silver', 'green', 'violet'])}-{rng.randrange(1000, 9999)}"
            ids = needle_prompt(llm, haystack, length, depth, secret)
            answer = llm.generate(ids, SamplingParams.greedy(max_tokens=16))[0].text
            results.append(NeedleResult(length, depth, secret in answer, answer.strip()))
    return results
