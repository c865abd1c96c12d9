"""Continuous batching: waiting and running requests, chunked prefill interleaved with decode,
admission by free cache slots and blocks, preemption by recompute when blocks run out."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tqinfer.engine.request import Generation
from tqinfer.errors import CacheMemoryError, ContextError
from tqinfer.llm import Result, StreamEvent, Stats
from tqinfer.sampling import SamplingParams


@dataclass
class Request:
    index: int
    prompt: list[int]
    params: SamplingParams
    seq: list[int] = field(default_factory=list)  # prompt + generated: what the cache must hold
    cached: int = 0  # tokens of seq whose K/V are in the cache
    slot: int | None = None
    gen: Generation | None = None
    stats: Stats = field(default_factory=Stats)
    text: list[str] = field(default_factory=list)
    finish: str | None = None
    arrived: float = 0.0
    prefill_done: float | None = None
    preemptions: int = 0


class Scheduler:
    def __init__(self, llm, chunk: int = 512, token_budget: int | None = None):
        """chunk: prompt tokens a request prefills per step at most; token_budget: tokens a step takes
        over all requests (default: max(2048, chunk), so a whole chunk fits a step)."""
        self.llm, self.chunk = llm, chunk
        self.budget = token_budget if token_budget is not None else max(2048, chunk)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished: list[Request] = []
        self._next = 0

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self.llm.max_context:
            raise ContextError(f"a prompt has {len(prompt_ids)} tokens but the context holds {self.llm.max_context}")
        req = Request(self._next, list(prompt_ids), params.resolve(self.llm.generation_config),
                      seq=list(prompt_ids), arrived=time.perf_counter())
        req.stats.context_max = self.llm.max_context
        self._next += 1
        self.waiting.append(req)
        return req

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    # --- admission and preemption ---------------------------------------------------------------
    def _admit(self) -> None:
        cache = self.llm.cache
        reserved = sum(cache.blocks_needed(len(r.seq) + 1) - cache.blocks_needed(r.cached) for r in self.running)
        while self.waiting and self.llm._free_slots:
            req = self.waiting[0]
            need = cache.blocks_needed(len(req.seq) + 1)
            if need + reserved > cache.free_block_count():
                if not self.running:
                    raise CacheMemoryError(
                        f"request {req.index} needs {need} cache blocks for {len(req.seq)} tokens but the cache "
                        f"has {cache.free_block_count()} free; use a larger cache or a shorter prompt")
                break
            self.waiting.popleft()
            req.slot = self.llm._free_slots.pop()
            req.cached = 0
            reserved += need
            self.running.append(req)

    def _preempt(self) -> None:
        """Free the most recently admitted request; it recomputes its tokens when readmitted."""
        victim = self.running.pop()
        self.llm._release(victim.slot)
        victim.slot, victim.cached = None, 0
        victim.preemptions += 1
        self.waiting.appendleft(victim)

    # --- one step -----------------------------------------------------------------------------
    def step(self) -> list[tuple[Request, StreamEvent]]:
        self._admit()
        batch, budget = [], self.budget
        for req in self.running:
            pending = len(req.seq) - req.cached
            n = min(pending, self.chunk, budget) if pending > 1 else 1
            if n <= 0:
                continue
            batch.append((req, n))
            budget -= n
        if not batch:
            return []
        while True:
            try:
                for req, n in batch:
                    self.llm.cache.reserve(req.slot, req.cached + n)
                break
            except CacheMemoryError:
                if len(self.running) <= 1:
                    raise
                victim = self.running[-1]
                self._preempt()
                batch = [(r, n) for r, n in batch if r is not victim]
        t0 = time.perf_counter()
        logits = self.llm.engine.forward([r.slot for r, _ in batch], [r.cached for r, _ in batch],
                                         [r.seq[r.cached:r.cached + n] for r, n in batch])
        events = []
        now = time.perf_counter()
        for i, (req, n) in enumerate(batch):
            req.cached += n
            if req.cached < len(req.seq):
                req.stats.prompt_seconds += now - t0
                continue
            if req.gen is None:
                req.stats.prompt_tokens = len(req.prompt)
                req.stats.prompt_seconds = now - req.arrived
                req.prefill_done = now
                req.gen = Generation(req.params, self.llm.tokenizer, req.prompt, logits.shape[-1], logits.device)
            ev = self._sample(req, logits[i])
            events.append((req, ev))
        self.running = [r for r in self.running if r.finish is None]
        return events

    def _sample(self, req: Request, logits) -> StreamEvent:
        gen = req.gen
        token, delta = None, ""
        if gen.check_limits(len(req.seq), self.llm.max_context) is None:
            token, delta = gen.step(logits)
            req.stats.generation_tokens += 1
            if gen.finish is None:
                req.seq.append(token)
        req.stats.generation_seconds = time.perf_counter() - req.prefill_done
        req.stats.context_tokens = req.cached
        if gen.finish is not None:
            delta += gen.tail()
            req.finish = gen.finish
            req.stats.kv_bytes = self.llm.cache.seq_nbytes(req.slot)
            req.stats.kv_bytes_bf16 = self.llm.bytes_per_token()[1] * req.cached
            self.llm._release(req.slot)
            req.slot = None
            self.finished.append(req)
        req.text.append(delta)
        return StreamEvent(text=delta, token=token, stats=req.stats, finish_reason=req.finish)

    def run(self) -> list[Result]:
        while not self.done:
            self.step()
        done = sorted(self.finished, key=lambda r: r.index)
        return [Result("".join(r.text), r.gen.tokens if r.gen else [], r.finish, r.stats) for r in done]
