"""The chat logic without a UI: turns, context fitting, slash commands, conversation files."""

from __future__ import annotations

import json

import pytest
from fakes import FakeLLM, sampling_params

from tqinfer.tui.chat import Chat, ChatError, open_conversation
from tqinfer.tui.conversation import Conversation, ConversationError, ConversationStore


def chat_with(llm=None, store=None, **kw) -> Chat:
    return Chat(llm or FakeLLM(), sampling_params(**kw), store or ConversationStore())


def say(chat: Chat, text: str) -> str:
    turn = chat.begin(text)
    return "".join(e.text for e in chat.stream(turn))


def test_turn_appends_messages_and_reuses_the_cached_prefix(store):
    llm = FakeLLM(reply="ok", chunk=1)  # one character per token, so the cache holds the text exactly
    chat = chat_with(llm, store)
    assert say(chat, "first") == "ok"
    assert say(chat, "second") == "ok"
    roles = [(m.role, m.content) for m in chat.conversation.messages]
    assert roles == [("user", "first"), ("assistant", "ok"), ("user", "second"), ("assistant", "ok")]
    session = llm.sessions[0]
    second_prompt = llm.prompts[1]
    # only what follows the first turn's prompt and answer was prefilled the second time
    assert session.prefilled == [len(llm.prompts[0]), len(second_prompt) - len(llm.prompts[0]) - len("ok")]


def test_conversation_is_saved_after_each_answer_and_resumes(store):
    chat = chat_with(store=store, temperature=0.5)
    say(chat, "remember me")
    data = json.loads(store.path(chat.conversation.name).read_text())
    assert [m["content"] for m in data["messages"]] == ["remember me", "Hello! I am a **fake** model."]
    conv, notice = open_conversation(store, resume=True, system=None, model="FakeLM-1M")
    assert conv.name == chat.conversation.name and len(conv.messages) == 2
    assert "Resumed" in notice


def test_resume_without_saved_conversations_starts_new(store):
    conv, notice = open_conversation(store, resume=True, system="be brief", model="m")
    assert conv.messages == [] and conv.system == "be brief" and "No saved conversation" in notice


def test_overflow_drops_oldest_turns_but_keeps_system_prompt(store):
    llm = FakeLLM(reply="x" * 40, max_context=400)
    chat = chat_with(llm, store, max_tokens=50)
    chat.command("/system you are terse")
    turns = []
    for i in range(5):
        turns.append(chat.begin(f"question number {i} " + "q" * 20))
        list(chat.stream(turns[-1]))
    turn = chat.begin("the last question")
    # 5 turns of ~90 tokens outgrow 400 - 50: turns are dropped whole, to 3/4 of the budget
    dropping = [t for t in turns + [turn] if t.dropped_messages]
    assert turns[0].dropped_messages == 0 and len(dropping) >= 1
    assert all(t.dropped_messages % 2 == 0 for t in dropping)
    assert len(dropping) < 4  # dropping leaves headroom: not once per turn
    assert "dropped the" in dropping[0].notice and "system prompt stays" in dropping[0].notice
    budget = llm.max_context - chat.answer_room()
    assert len(turn.prompt_ids) <= budget
    rendered = llm.tokenizer.decode(turn.prompt_ids)
    assert rendered.startswith("<system>you are terse")
    assert "question number 0" not in rendered and "the last question" in rendered
    # all messages stay in the conversation (shown and saved), only the context start moved
    assert len(chat.conversation.messages) == 11
    assert chat.conversation.context_start == sum(t.dropped_messages for t in dropping)


def test_message_longer_than_the_context_is_refused_and_rolled_back(store):
    chat = chat_with(FakeLLM(max_context=200), store, max_tokens=20)
    with pytest.raises(ChatError, match="needs .* tokens"):
        chat.begin("y" * 500)
    assert chat.conversation.messages == []


def test_stop_keeps_what_came(store):
    import threading

    llm = FakeLLM(reply="one two three four five")
    chat = chat_with(llm, store)
    cancel = threading.Event()
    events = []
    turn = chat.begin("count")
    for event in chat.stream(turn, cancel):
        events.append(event)
        if len(events) == 2:
            cancel.set()
    assert events[-1].finish_reason == "cancelled"
    assert chat.conversation.messages[-1].content == "one two "
    assert llm.sessions[0].tokens[-2:] == [ord("o"), ord("t")]


def test_failure_before_any_text_removes_the_turn(store):
    def broken(prompt):
        raise RuntimeError("out of memory on the device")

    chat = chat_with(FakeLLM(reply=broken), store)
    turn = chat.begin("hello")
    with pytest.raises(RuntimeError, match="out of memory"):
        list(chat.stream(turn))
    assert turn.rolled_back and chat.conversation.messages == []


def test_set_changes_sampling_and_rejects_bad_values(store):
    chat = chat_with(store=store)
    assert chat.command("/set temp 0.7").text == "temperature = 0.7"
    assert chat.params.temperature == 0.7
    assert chat.command("/set top_k 5").level == "info" and chat.params.top_k == 5
    assert chat.command("/set seed none").text == "seed = None"
    bad = chat.command("/set temp -2")
    assert bad.level == "error" and "temperature must be >= 0" in bad.text
    assert chat.params.temperature == 0.7
    assert chat.command("/set warmth 3").level == "error"
    assert "temperature=0.7" in chat.command("/set").text


def test_doc_goes_with_the_next_message(store, tmp_path):
    doc = tmp_path / "notes.md"
    doc.write_text("# Notes\nThe launch code is 4242.\n")
    llm = FakeLLM(reply="4242")
    chat = chat_with(llm, store)
    result = chat.command(f"/doc {doc}")
    tokens = len('<document name="notes.md">\n# Notes\nThe launch code is 4242.\n</document>')
    assert result.level == "info" and f"{tokens} tokens" in result.text
    assert f"KV {tokens * 1000 / 2**20:.2f} MiB" in result.text
    say(chat, "what is the code?")
    prompt = llm.tokenizer.decode(llm.prompts[0])
    assert "The launch code is 4242." in prompt and prompt.index("4242") < prompt.index("what is the code?")
    assert chat.conversation.pending == []
    assert chat.conversation.messages[0].documents[0].name == "notes.md"


def test_doc_errors_are_messages(store, tmp_path):
    chat = chat_with(FakeLLM(max_context=100), store, max_tokens=10)
    assert "is not a file" in chat.command(f"/doc {tmp_path / 'missing.txt'}").text
    (tmp_path / "big.txt").write_text("z" * 1000)
    assert "1,0" in chat.command(f"/doc {tmp_path / 'big.txt'}").text
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe\x00\x81")
    assert "not a UTF-8 text file" in chat.command(f"/doc {tmp_path / 'bin.dat'}").text


def test_save_load_reset_new(store):
    chat = chat_with(store=store)
    say(chat, "keep this")
    auto = chat.conversation.name
    assert "Saved as trip" in chat.command("/save trip").text
    assert store.names() == ["trip"]  # the automatic file was replaced by the named one
    assert chat.command("/reset").reload and chat.conversation.messages == []
    assert chat.session.tokens == [] and chat.status().context_used == 0
    loaded = chat.command("/load trip")
    assert loaded.level == "info" and loaded.reload
    assert chat.conversation.messages == []  # /reset saved the cleared conversation
    say(chat, "again")
    chat.command("/new")
    assert chat.conversation.name != "trip" and chat.conversation.messages == []
    chat.command("/load trip")
    assert [m.content for m in chat.conversation.messages][0] == "again"
    assert chat.command("/load nope").level == "error"
    assert chat.command("/save ../evil").level == "error"
    assert "trip" in chat.command("/load").text and auto not in store.names()


def test_system_and_unknown_commands(store):
    chat = chat_with(store=store)
    assert chat.command("/system").text == "No system prompt is set."
    chat.command("/system Answer in French.")
    assert chat.conversation.model_messages()[0] == {"role": "system", "content": "Answer in French."}
    assert chat.command("/system").text == "System prompt: Answer in French."
    chat.command("/system -")
    assert chat.conversation.system is None
    assert chat.command("/frobnicate").level == "error"
    assert chat.command("/quit").quit
    assert "/doc PATH" in chat.command("/help").text


def test_store_rejects_broken_files(store):
    store.root.mkdir(parents=True)
    (store.root / "broken.json").write_text("{not json")
    with pytest.raises(ConversationError, match="not a readable conversation"):
        store.load("broken")
    conv, notice = open_conversation(store, resume=True, system=None, model=None)
    assert conv.messages == [] and "Could not resume" in notice


def test_conversation_round_trips_through_json():
    conv = Conversation.new(system="s")
    conv.context_start = 0
    assert Conversation.from_json(json.loads(json.dumps(conv.to_json()))) == conv
