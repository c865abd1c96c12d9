"""A fake LLM behind the interface the chat uses: characters as tokens, scripted answers, fixed timings."""

from __future__ import annotations

import threading

from tqinfer.llm import Stats, StreamEvent
from tqinfer.sampling import SamplingParams


def sampling_params(**kw) -> SamplingParams:
    """The real sampling settings, with a short answer limit for tests."""
    return SamplingParams(**{"max_tokens": 64, **kw})


class FakeTokenizer:
    """One token per character (its code point)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids if i > 1)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class FakeSession:
    def __init__(self, llm: FakeLLM):
        self.llm = llm
        self.tokens: list[int] = []
        self.prefilled: list[int] = []  # how many tokens each turn prefilled (the reuse check)

    def truncate(self, n: int) -> None:
        del self.tokens[n:]

    def stream(self, prompt_ids, params, cancel: threading.Event | None = None):
        llm = self.llm
        llm.prompts.append(list(prompt_ids))
        if len(prompt_ids) > llm.max_context:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds the context of {llm.max_context}")
        common = 0
        for a, b in zip(self.tokens, prompt_ids):
            if a != b:
                break
            common += 1
        self.tokens = list(prompt_ids)
        new = len(prompt_ids) - common
        self.prefilled.append(new)
        stats = Stats(prompt_tokens=new, prompt_seconds=new / 1000, context_max=llm.max_context,
                      reused_tokens=common)
        reply = llm.reply(llm.tokenizer.decode(prompt_ids)) if callable(llm.reply) else llm.reply
        pieces = [reply[i:i + llm.chunk] for i in range(0, len(reply), llm.chunk)]
        limit = params.max_tokens or len(pieces)
        finish = "stop"
        for i, piece in enumerate(pieces):
            if i == llm.pause_after:
                llm.paused.set()
                llm.gate.wait(10)
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            if i >= limit:
                finish = "length"
                break
            if len(self.tokens) >= llm.max_context:
                finish = "context"
                break
            self.tokens.append(ord(piece[0]))
            stats = self._stats(stats, i + 1)
            yield StreamEvent(text=piece, token=ord(piece[0]), stats=stats)
        yield StreamEvent(stats=self._stats(stats, stats.generation_tokens), finish_reason=finish)

    def _stats(self, s: Stats, generated: int) -> Stats:
        n = len(self.tokens)
        return Stats(prompt_tokens=s.prompt_tokens, prompt_seconds=s.prompt_seconds,
                     generation_tokens=generated, generation_seconds=generated / 50, context_tokens=n,
                     context_max=self.llm.max_context, kv_bytes=n * self.llm.per_token,
                     kv_bytes_bf16=n * self.llm.per_token_bf16, reused_tokens=s.reused_tokens)


class FakeLLM:
    """reply: a string or a function of the rendered prompt; streamed `chunk` characters per event.
    pause_after: the stream waits on `gate` before that many events (sets `paused` first)."""

    def __init__(self, reply="Hello! I am a **fake** model.", *, max_context: int = 4096, chunk: int = 4,
                 pause_after: int | None = None):
        self.tokenizer = FakeTokenizer()
        self.model_name = "FakeLM-1M"
        self.max_context = max_context
        self.cache_label = "K tq3.5 / V tq3.5"
        self.per_token, self.per_token_bf16 = 1000, 4608
        self.reply = reply
        self.chunk = chunk
        self.pause_after = pause_after
        self.gate = threading.Event()
        self.paused = threading.Event()
        self.prompts: list[list[int]] = []
        self.sessions: list[FakeSession] = []

    def chat_ids(self, messages) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_special_tokens=True)

    def session(self) -> FakeSession:
        self.sessions.append(FakeSession(self))
        return self.sessions[-1]

    def bytes_per_token(self) -> tuple[int, int]:
        return self.per_token, self.per_token_bf16
