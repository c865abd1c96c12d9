"""JSONL batch generation: one prompt or chat per line in, one result per line out, resumable."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from tqinfer.sampling import SamplingParams

PARAM_NAMES = {f.name for f in fields(SamplingParams)}


@dataclass
class BatchItem:
    id: str
    prompt: object  # str or list of messages
    params: SamplingParams


def parse_line(line: str, number: int, defaults: SamplingParams) -> BatchItem:
    """A line is {"prompt": str} or {"messages": [...]}, optional "id" and sampling params (top level
    or under "params"). Raises ValueError with what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("a line must be a JSON object")
    prompt = obj.get("prompt", obj.get("messages"))
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("empty prompt")
    elif isinstance(prompt, list):
        if not prompt or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            raise ValueError("messages must be a non-empty list of {role, content} objects")
    else:
        raise ValueError('needs "prompt" (a string) or "messages" (a list of {role, content})')
    raw = dict(obj.get("params", {}))
    raw.update({k: v for k, v in obj.items() if k in PARAM_NAMES})
    unknown = set(raw) - PARAM_NAMES
    if unknown:
        raise ValueError(f"unknown sampling parameter(s) {sorted(unknown)}")
    params = defaults.with_updates(**raw)
    return BatchItem(str(obj.get("id", number)), prompt, params)


def finished_ids(output: Path) -> set[str]:
    """Ids already in an output file (a torn last line from an interrupted run is ignored)."""
    done = set()
    if output.is_file():
        for line in output.read_text(encoding="utf-8").splitlines():
            try:
                done.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def result_record(item: BatchItem, result) -> dict:
    s = result.stats
    return {"id": item.id, "text": result.text, "finish_reason": result.finish_reason,
            "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generation_tokens},
            "stats": {"prompt_tps": round(s.prompt_tps, 2), "generation_tps": round(s.generation_tps, 2),
                      "kv_bytes": s.kv_bytes, "kv_bytes_bf16": s.kv_bytes_bf16}}
