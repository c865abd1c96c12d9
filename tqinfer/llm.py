"""LLM and sessions: the face over the engine that the CLI, the chat and the server share."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from tqinfer.errors import Cancelled, ContextError
from tqinfer.engine.request import Generation
from tqinfer.sampling import SamplingParams


@dataclass
class Stats:
    """Running statistics of one request, carried by every streamed event."""

    prompt_tokens: int = 0  # tokens prefilled for this request (reused prefix excluded)
    prompt_seconds: float = 0.0
    generation_tokens: int = 0
    generation_seconds: float = 0.0
    context_tokens: int = 0  # tokens in the sequence's cache now
    context_max: int = 0
    kv_bytes: int = 0  # bytes the cache holds for this sequence
    kv_bytes_bf16: int = 0  # what a bf16 cache would hold for the same tokens
    peak_memory: int = 0  # bytes, device peak (CUDA) or process RSS peak (CPU)
    reused_tokens: int = 0  # prompt tokens served from the cached prefix

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


@dataclass
class StreamEvent:
    """The one streamed response type: a text delta and/or a token, stats, and finish_reason when done.

    finish_reason: None while streaming, then "stop" (EOS or stop string), "length" (max_tokens),
    "context" (context full) or "cancelled" (the caller asked to stop)."""

    text: str = ""
    token: int | None = None
    stats: Stats = field(default_factory=Stats)
    finish_reason: str | None = None


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: Stats


def _start_cpu_threads() -> None:
    """Run one parallel op in the main thread: when torch's first parallel op happens in another
    thread (the chat's engine thread), CPU decoding there was measured about 10x slower."""
    if threading.current_thread() is threading.main_thread():
        torch.ones(256, 256) @ torch.ones(256, 256)


_start_cpu_threads()


def pick_device(device=None) -> torch.device:
    """CUDA (NVIDIA or ROCm), else MPS, else CPU; an explicit choice wins."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# Prompt tokens a prefill step takes at most. On CUDA every chunk pays host work per layer (and the
# compressed caches' prefix attention per call), so larger chunks win: on the H200 at a 32k prompt,
# 4096-token chunks prefilled up to 9x faster than 512-token ones (default model: bf16 96128 vs 31900
# tok/s, tq3.5 65510 vs 7655; 8B shape: bf16 18305 vs 15888, tq3.5 21089 vs 6800; docs/BENCHMARKS.md,
# "Prefill chunk size").
# The CPU keeps 512: on the 2-core CPU larger chunks were no faster (default model, a 2048-token prompt:
# bf16 cache 645-704 tok/s at 512, 640-682 at 1024, 531-555 at 2048; tq3.5 503-540 / 562-565 / 511-519).
PREFILL_CHUNK = {"cuda": 4096}
PREFILL_CHUNK_OTHER = 512


def default_prefill_chunk(device: torch.device) -> int:
    return PREFILL_CHUNK.get(torch.device(device).type, PREFILL_CHUNK_OTHER)


def pick_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        # bf16 everywhere: on the 2-core reference CPU (AVX2, no native bf16) bf16 weights still decode
        # 1.6x faster than fp32 (half the bytes per token) and prefill 1.3-1.6x (docs/BENCHMARKS.md)
        return torch.float16 if device.type == "mps" else torch.bfloat16
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(names)}")
        return names[dtype]
    return dtype


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class LLM:
    """A loaded model with its tokenizer and KV cache. Sessions hold sequences in the cache."""

    def __init__(self, model: str | None = None, *, device=None, dtype=None, cache=None,
                 cache_type_k: str | None = None, cache_type_v: str | None = None,
                 max_context: int | None = None, max_seqs: int = 4, prefill_chunk: int | None = None,
                 progress: Callable[[str, float | None], None] | None = None):
        from tqinfer import hub
        from tqinfer.cache.config import CacheConfig
        from tqinfer.loader import load_weights
        from tqinfer.models import build_model
        from tqinfer.tokenizer import load_tokenizer

        report = progress or (lambda stage, fraction: None)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        report("resolving model", None)
        self.files = hub.resolve(model, progress=progress is None)
        self.model_name = self.files.name
        report("loading tokenizer", None)
        self.tokenizer = load_tokenizer(self.files.folder)
        report("loading weights", None)
        weights = load_weights(self.files, self.dtype, progress=progress is None)
        self.config = weights.config
        self.generation_config = weights.generation_config or {}
        model_cls, self.args = build_model(self.config)
        with torch.device("meta"):
            net = model_cls(self.args)
        tensors = model_cls.sanitize(weights.tensors, self.args)
        net.load_state_dict(tensors, strict=True, assign=True)
        if self.args.tie_word_embeddings:
            net.lm_head.weight = net.model.embed_tokens.weight
        self.model = net.to(self.device, self.dtype).eval().fuse()
        if self.device.type == "cpu":
            self.model.fp16_head()
            self.model.half_gemv_linears()
        report("allocating cache", None)
        limit = self.args.max_position_embeddings
        if max_context is not None and max_context > limit:
            raise ContextError(f"context {max_context} exceeds the model's maximum of {limit} tokens")
        self.max_context = max_context or min(limit, 8192)
        if cache is None:
            cache = CacheConfig(k_type=cache_type_k, v_type=cache_type_v)
        elif cache_type_k or cache_type_v:
            raise ValueError("pass either cache=CacheConfig(...) or cache_type_k/cache_type_v, not both")
        self.max_seqs = max_seqs
        self.set_cache(cache.for_device(self.device))
        self.prefill_chunk = prefill_chunk or default_prefill_chunk(self.device)
        report("ready", 1.0)

    def set_cache(self, cache) -> None:
        """(Re)build the KV cache with another CacheConfig; the weights stay loaded."""
        from tqinfer.cache.config import build_cache
        from tqinfer.engine.engine import LLMEngine

        if getattr(self, "_free_slots", None) is not None and len(self._free_slots) != self.max_seqs:
            raise RuntimeError("close every session before changing the cache")
        self.cache = None  # free the old pool before allocating the new one
        self.cache_config = cache
        self.cache = build_cache(cache, self.args, max_seqs=self.max_seqs, max_len=self.max_context,
                                 dtype=self.dtype, device=self.device)
        self.engine = LLMEngine(self.model, self.cache, self.device)
        self._free_slots = list(range(self.max_seqs))[::-1]

    # --- descriptions used by the UIs -------------------------------------------------------
    @property
    def cache_label(self) -> str:
        return self.cache_config.label

    def bytes_per_token(self) -> tuple[int, int]:
        """(this cache, a bf16 cache) bytes per token of context, all layers, K and V."""
        from tqinfer.cache.config import bytes_per_token

        return (bytes_per_token(self.args, self.cache_config, self.dtype),
                bytes_per_token(self.args, self.cache_config.dense_twin()))

    def cache_identity(self) -> dict:
        """What a saved cache must match to be reused: the weights, the cache setup, the dtype."""
        import tqinfer

        c = self.cache_config
        ident = {"weights_id": self.files.weights_id, "dtype": str(self.dtype),
                 "k_type": c.k_type, "v_type": c.v_type, "sinks": c.sinks, "window": c.window,
                 "protected_layers": c.protected_layers, "rotation": c.rotation, "seed": c.seed,
                 "tqinfer": tqinfer.__version__}
        if not c.dense:  # (a dense cache has no keys to center: its saved files stay valid)
            ident["center_keys"] = c.center_keys
        return ident

    # --- sessions and generation ------------------------------------------------------------
    def load_session(self, path) -> "Session":
        """A new session holding a sequence saved by Session.save (refused if the setup differs)."""
        from tqinfer.cache.store import load_sequence

        s = self.session()
        try:
            s.tokens = load_sequence(self.cache, s.slot, path, self.cache_identity())
        except BaseException:
            s.close()
            raise
        return s

    def session(self) -> "Session":
        if not self._free_slots:
            raise RuntimeError(f"all {self.cache.max_seqs} cache sequences are in use; close a session first")
        return Session(self, self._free_slots.pop())

    def _release(self, slot: int) -> None:
        self.cache.set_len(slot, 0)
        self._free_slots.append(slot)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if prompt and isinstance(prompt[0], dict):
            return self.chat_ids(prompt)
        return [int(t) for t in prompt]

    def stream(self, prompt, params: SamplingParams | None = None,
               cancel: threading.Event | None = None) -> Iterator[StreamEvent]:
        with self.session() as s:
            yield from s.stream(self._prompt_ids(prompt), params or SamplingParams(), cancel)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[Result]:
        """Prompts (strings, token-id lists or chats) -> results in input order."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, dict)))
        if single:
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        if len(prompts) == 1:
            return [collect(self.stream(prompts[0], params[0]))]
        from tqinfer.engine.scheduler import Scheduler

        sched = Scheduler(self, chunk=self.prefill_chunk)
        for p, sp in zip(prompts, params):
            sched.add(self._prompt_ids(p), sp)
        return sched.run()

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> Result:
        return collect(self.stream(messages, params))

    @torch.inference_mode()
    def logits(self, token_ids: list[int], chunk: int | None = None) -> torch.Tensor:
        """Next-token logits at every position [len, vocab] (fp32), prefilled in chunks."""
        with self.session() as s:
            return s.append(list(token_ids), all_logits=True, chunk=chunk)


def collect(events: Iterator[StreamEvent]) -> Result:
    text, tokens, last = [], [], StreamEvent()
    for ev in events:
        text.append(ev.text)
        if ev.token is not None:
            tokens.append(ev.token)
        last = ev
    return Result("".join(text), tokens, last.finish_reason or "stop", last.stats)


class Session:
    """One sequence in the cache: its token ids (those whose K/V are cached) and operations on them."""

    def __init__(self, llm: LLM, slot: int):
        self.llm = llm
        self.slot = slot
        self.tokens: list[int] = []
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.llm._release(self.slot)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def kv_bytes(self) -> int:
        return self.llm.cache.seq_nbytes(self.slot)

    @property
    def kv_bytes_bf16(self) -> int:
        return self.llm.bytes_per_token()[1] * len(self.tokens)

    def save(self, path, **extra) -> None:
        """Save this sequence's cache (safetensors + metadata: model, cache setup, token ids)."""
        from tqinfer.cache.store import save_sequence

        meta = {"model": self.llm.model_name, **self.llm.cache_identity(), **extra}
        save_sequence(self.llm.cache, self.slot, self.tokens, path, meta)

    def truncate(self, n: int) -> None:
        """Roll the sequence back to its first n tokens."""
        n = max(0, min(n, len(self.tokens)))
        self.llm.cache.truncate(self.slot, n)
        del self.tokens[n:]

    def append(self, ids: list[int], all_logits: bool = False, chunk: int | None = None,
               on_chunk: Callable[[int, int], None] | None = None, cancel: threading.Event | None = None) -> torch.Tensor:
        """Prefill ids after the cached tokens in chunks; returns the last token's logits [vocab]
        (or every token's [len(ids), vocab] when all_logits). cancel: once set, errors.Cancelled
        within a layer's time; the chunks done so far stay cached (a later prompt with the same
        start reuses them), the interrupted one is not."""
        if not ids:
            raise ValueError("nothing to append")
        if len(self.tokens) + len(ids) > self.llm.max_context:
            raise ContextError(
                f"{len(self.tokens) + len(ids)} tokens do not fit the context of {self.llm.max_context} "
                f"(model maximum {self.llm.args.max_position_embeddings}); use a larger -c or a shorter prompt"
            )
        chunk = chunk or self.llm.prefill_chunk
        outs = []
        for i in range(0, len(ids), chunk):
            piece = ids[i:i + chunk]
            if cancel is not None and cancel.is_set():
                raise Cancelled("stopped while reading the prompt")
            logits = self.llm.engine.forward([self.slot], [len(self.tokens)], [piece], all_logits=all_logits,
                                             cancel=cancel)
            self.tokens.extend(piece)
            outs.append(logits)
            if on_chunk:
                on_chunk(i + len(piece), len(ids))
        return torch.cat(outs) if all_logits else outs[-1][-1]

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None,
               cancel: threading.Event | None = None) -> Iterator[StreamEvent]:
        """Reuse the longest cached prefix of prompt_ids, prefill the rest, then generate."""
        llm = self.llm
        params = (params or SamplingParams()).resolve(llm.generation_config)
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) > llm.max_context:
            raise ContextError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {llm.max_context} "
                f"(model maximum {llm.args.max_position_embeddings}); use a larger -c or a shorter prompt"
            )
        stats = Stats(context_max=llm.max_context)
        reuse = min(common_prefix(self.tokens, prompt_ids), len(prompt_ids) - 1)
        self.truncate(reuse)
        stats.reused_tokens = reuse
        t0 = time.perf_counter()
        try:
            logits = self.append(prompt_ids[reuse:], cancel=cancel)
        except Cancelled:  # Esc while the prompt was read: no answer, the conversation stays as it was
            yield StreamEvent(text="", stats=self._fill(stats), finish_reason="cancelled")
            return
        self._sync()
        stats.prompt_tokens = len(prompt_ids) - reuse
        stats.prompt_seconds = time.perf_counter() - t0

        gen = Generation(params, llm.tokenizer, prompt_ids, logits.shape[-1], logits.device)
        t1 = time.perf_counter()
        while gen.check_limits(len(self.tokens), llm.max_context, cancel) is None:
            token, delta = gen.step(logits)
            stats.generation_tokens += 1
            stats.generation_seconds = time.perf_counter() - t1
            if gen.finish is None:
                logits = self.append([token])
            self._fill(stats)
            yield StreamEvent(text=delta, token=token, stats=stats)
        yield StreamEvent(text=gen.tail(), stats=self._fill(stats), finish_reason=gen.finish)

    def _sync(self) -> None:
        if self.llm.device.type == "cuda":
            torch.cuda.synchronize(self.llm.device)

    def _fill(self, stats: Stats) -> Stats:
        stats.context_tokens = len(self.tokens)
        stats.kv_bytes = self.kv_bytes
        stats.kv_bytes_bf16 = self.kv_bytes_bf16
        stats.peak_memory = peak_memory(self.llm.device)
        return stats
