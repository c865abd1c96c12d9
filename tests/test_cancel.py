"""Stopping while a prompt is read (Esc, Ctrl-C): the step stops between layers, the cache holds what it
held before that step (hot buffers put back, lengths unchanged), chunks finished before it stay cached,
and the stream, the chat and its conversation end cleanly."""

from __future__ import annotations

import threading

import pytest
import torch

from tqinfer.cache.config import CacheConfig
from tqinfer.errors import Cancelled
from tqinfer.llm import LLM
from tqinfer.sampling import SamplingParams

PROMPT = [5 + (i * 7) % 200 for i in range(150)]


class SetAfter(threading.Event):
    """An Event that sets itself at its n-th look: a stop that lands in the middle of a step."""

    def __init__(self, n: int):
        super().__init__()
        self.looks, self.n = 0, n

    def is_set(self) -> bool:
        self.looks += 1
        if self.looks >= self.n:
            self.set()
        return super().is_set()


@pytest.fixture
def folder(tiny_hf_folder):
    return tiny_hf_folder("llama", tokenizer="bytes", max_position_embeddings=1024, num_hidden_layers=4)


def hot_state(llm, slot):
    """The sequence's hot buffers (compressed layers); the dense cache's rows up to its length."""
    cache = llm.cache
    if not hasattr(cache, "k_hot"):
        n = cache.lens[slot]
        return [t[slot, :, :n].clone() for t in cache.k + cache.v]
    return [h[slot].clone() for h in cache.k_hot + cache.v_hot if h is not None]


def stopped_then_resumed(llm):
    """PROMPT's logits read as 102 tokens, a chunk stopped after 2 of its 4 layers, then the rest:
    (logits, hot buffers before the stop, hot buffers after it)."""
    with llm.session() as s:
        s.append(PROMPT[:102])  # the window has wrapped: the stopped step moves tokens out of it
        before = hot_state(llm, s.slot)
        with pytest.raises(Cancelled):
            s.append(PROMPT[102:], cancel=SetAfter(1 + 3))  # append's look, then one look per layer
        assert len(s.tokens) == 102 and llm.cache.lens[s.slot] == 102
        after = hot_state(llm, s.slot)
        return s.append(PROMPT[102:]), before, after


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ktype", ["tq3.5", "bf16"])
def test_a_stop_between_layers_leaves_the_cache_as_it_was(folder, ktype, device, monkeypatch):
    cfg = CacheConfig(k_type=ktype, v_type=ktype, sinks=2, window=8, block_size=16 if device == "cpu" else 64)
    dtype, tol = ("float32", 1e-5) if device == "cpu" else ("bfloat16", 2e-2)  # (the kernels run bf16 models)
    llm = LLM(str(folder), device=device, dtype=dtype, cache=cfg, max_context=512, prefill_chunk=32)
    with llm.session() as ref:  # the same chunks, never stopped
        ref.append(PROMPT[:102])
        want = ref.append(PROMPT[102:])
    got, before, after = stopped_then_resumed(llm)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert torch.allclose(got, want, atol=tol, rtol=tol)
    if ktype == "bf16" or device != "cpu":
        return  # the dense cache writes only past a sequence's length: nothing to put back
    # without putting the hot buffers back, the two layers that ran leave a wrong window behind
    monkeypatch.setattr(llm.cache, "restore_step_state", lambda slots, saved: None)
    got, before, after = stopped_then_resumed(llm)
    assert not all(torch.equal(a, b) for a, b in zip(before, after))
    assert not torch.allclose(got, want, atol=1e-3, rtol=1e-3)


def test_a_stopped_one_token_step_on_a_planned_cache(folder):
    """A prefill piece of one token on a cache that plans its decode writes (write_ahead 1, as on
    CUDA) runs as a decode step: a stop in it is a stop too, and the cache reads as before."""
    cfg = CacheConfig(k_type="tq3.5", v_type="tq3.5", sinks=2, window=8, block_size=16)
    llm = LLM(str(folder), device="cpu", dtype="float32", cache=cfg, max_context=512, prefill_chunk=32)
    llm.cache.write_ahead = 1
    with llm.session() as ref:
        ref.append(PROMPT[:102])
        want = ref.append(PROMPT[102:103])
    with llm.session() as s:
        s.append(PROMPT[:102])
        with pytest.raises(Cancelled):
            s.append(PROMPT[102:103], cancel=SetAfter(1 + 3))
        assert len(s.tokens) == 102
        got = s.append(PROMPT[102:103])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_a_stopped_first_chunk_leaves_no_layer_calibrated(folder):
    """A fresh cache's first chunk (its layers calibrate on it) stopped after 2 of 4 layers: every layer
    calibrates on the next prompt, as if the stopped one had never come."""
    cfg = CacheConfig(k_type="tq3.5", v_type="tq3.5", sinks=2, window=8, block_size=16)

    def fresh():
        return LLM(str(folder), device="cpu", dtype="float32", cache=cfg, max_context=512, prefill_chunk=64)

    ref = fresh()
    with ref.session() as s:
        want = s.append(PROMPT)
    llm = fresh()
    with llm.session() as s:
        with pytest.raises(Cancelled):
            s.append([7 + (i * 13) % 230 for i in range(120)], cancel=SetAfter(1 + 3))
        assert llm.cache.calibrated == [False] * 4
        got = s.append(PROMPT)
    assert torch.equal(got, want)


def test_stream_stopped_while_reading_the_prompt(folder):
    llm = LLM(str(folder), device="cpu", dtype="float32", max_context=512, prefill_chunk=32)
    with llm.session() as s:
        stop = SetAfter(3)  # inside the first chunk
        events = list(s.stream(PROMPT, SamplingParams.greedy(max_tokens=5), cancel=stop))
        assert [(e.text, e.finish_reason) for e in events] == [("", "cancelled")]
        assert s.tokens == []
        # the same prompt again, not stopped: the answer a fresh session gives
        again = "".join(e.text for e in s.stream(PROMPT, SamplingParams.greedy(max_tokens=5)))
    assert again == llm.generate(PROMPT, SamplingParams.greedy(max_tokens=5))[0].text


def test_chat_takes_back_a_turn_stopped_before_its_answer(folder, tmp_path):
    from tqinfer.tui.chat import Chat
    from tqinfer.tui.conversation import ConversationStore

    llm = LLM(str(folder), device="cpu", dtype="float32", max_context=256, prefill_chunk=16)
    chat = Chat(llm, SamplingParams.greedy(max_tokens=4), ConversationStore(tmp_path))
    first = chat.begin("hello there")
    list(chat.stream(first))
    before = [(m.role, m.content) for m in chat.conversation.messages]
    turn = chat.begin("a longer message " * 8)
    assert list(chat.stream(turn, SetAfter(2))) == []
    assert turn.rolled_back
    assert [(m.role, m.content) for m in chat.conversation.messages] == before
    # the next message goes on from the first turn
    turn = chat.begin("and now")
    list(chat.stream(turn))
    # a turn that had to drop older messages to fit, taken back: they are back in the context
    for text in ("first message " * 3, "second message " * 3):
        list(chat.stream(chat.begin(text)))
    start = chat.conversation.context_start
    turn = chat.begin("a long message " * 11)
    assert turn.dropped_messages > 0
    assert list(chat.stream(turn, SetAfter(2))) == [] and turn.rolled_back
    assert chat.conversation.context_start == start
    turn = chat.begin("and now")
    assert "".join(e.text for e in chat.stream(turn)) == chat.conversation.messages[-1].content
