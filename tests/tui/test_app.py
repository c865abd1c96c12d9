"""The Textual app driven by Pilot over a fake engine: sending, streaming, stopping, commands, status."""

from __future__ import annotations

import threading

from conftest import idle, make_app, ready, send, send_until_paused, wait_for
from fakes import FakeLLM, sampling_params
from textual.widgets import Label

from tqinfer.tui.app import ChatApp
from tqinfer.tui.conversation import Conversation, Message
from tqinfer.tui.screens import LoadingScreen
from tqinfer.tui.widgets import AssistantMessage, Notice, PromptInput, StatusBar, UserMessage


def notices(screen) -> list[str]:
    return [str(n.render()) for n in screen.query(Notice)]


def status_text(screen) -> str:
    return str(screen.query_one(StatusBar).render())


async def test_send_streams_the_answer_and_updates_the_status():
    llm = FakeLLM(reply="Sure: `x = 1` and\n\n```python\nprint(x)\n```\n")
    async with make_app(llm).run_test() as pilot:
        screen = await ready(pilot)
        assert "context 0 / 4,096" in status_text(screen)
        await pilot.press(*"hi there")
        await pilot.press("enter")
        await idle(pilot)
        assert [str(w.render()) for w in screen.query(UserMessage)] == ["hi there"]
        answer = screen.query_one(AssistantMessage)
        assert answer.source == llm.reply
        assert screen.query_one(PromptInput).text == ""
        used = len(llm.sessions[0].tokens)
        status = status_text(screen)
        assert f"context {used} / 4,096" in status
        assert f"KV {used * 1000 / 2**20:.2f} MiB (bf16 {used * 4608 / 2**20:.2f} MiB)" in status
        assert "prompt 1,000 tok/s · gen 50.0 tok/s" in status
        assert "FakeLM-1M · K tq3.5 / V tq3.5" in status


async def test_answer_is_visible_while_streaming_and_escape_keeps_what_came():
    llm = FakeLLM(reply="one two three four five six", pause_after=3)
    async with make_app(llm).run_test() as pilot:
        screen = await ready(pilot)
        await send_until_paused(pilot, llm, "count")
        answer = screen.query_one(AssistantMessage)
        await wait_for(pilot, lambda: answer.source == "one two thre")  # 3 chunks of 4 so far
        assert screen.busy and screen.query_one(PromptInput).border_subtitle == "generating…"
        await pilot.press("escape")
        assert screen.cancel.is_set()
        llm.gate.set()
        await idle(pilot)
        assert answer.source == "one two thre"
        assert screen.chat.conversation.messages[-1].content == "one two thre"
        assert any("Stopped" in n for n in notices(screen))
        # the next turn goes on from the kept answer
        llm.pause_after = None
        await send(pilot, "go on")
        assert len(screen.query(AssistantMessage)) == 2


async def test_escape_before_the_first_token_takes_the_message_back():
    """Stopped while the prompt is read (nothing generated yet): no empty answer stays behind; the
    message returns to the input and the conversation is as it was."""
    llm = FakeLLM(reply="one two", pause_after=0)
    async with make_app(llm).run_test() as pilot:
        screen = await ready(pilot)
        await send_until_paused(pilot, llm, "read this long document")
        await pilot.press("escape")
        llm.gate.set()
        await idle(pilot)
        assert not screen.query(UserMessage) and not screen.query(AssistantMessage)
        assert screen.query_one(PromptInput).text == "read this long document"
        assert screen.chat.conversation.messages == []
        assert any("Stopped before the answer began" in n for n in notices(screen))
        assert not screen.busy


async def test_ctrl_c_stops_too():
    llm = FakeLLM(reply="a b c d e f g h", pause_after=1)
    async with make_app(llm).run_test() as pilot:
        screen = await ready(pilot)
        await send_until_paused(pilot, llm, "go")
        await pilot.press("ctrl+c")
        llm.gate.set()
        await idle(pilot)
        assert screen.chat.conversation.messages[-1].content == "a b "


async def test_sending_while_answering_is_refused_and_the_text_kept():
    llm = FakeLLM(reply="slow answer", pause_after=1)
    async with make_app(llm).run_test() as pilot:
        screen = await ready(pilot)
        await send_until_paused(pilot, llm, "first")
        screen.query_one(PromptInput).load_text("second")
        await pilot.press("enter")
        await pilot.pause()
        assert screen.query_one(PromptInput).text == "second"
        llm.gate.set()
        await idle(pilot)
        assert [m.content for m in screen.chat.conversation.messages] == ["first", "slow answer"]


async def test_slash_commands_in_the_app(tmp_path):
    doc = tmp_path / "readme.md"
    doc.write_text("tqinfer keeps the KV cache in 3.5 bits.")
    params = sampling_params()
    async with make_app(FakeLLM(reply="noted"), params=params).run_test() as pilot:
        screen = await ready(pilot)
        await send(pilot, "/help")
        assert "/doc PATH" in notices(screen)[-1]
        await send(pilot, "/set temp 0.7")
        assert screen.chat.params.temperature == 0.7 and notices(screen)[-1] == "temperature = 0.7"
        await send(pilot, "/set temp hot")
        assert "error" in screen.query(Notice).last().classes
        await send(pilot, "/system Be brief.")
        assert screen.chat.conversation.system == "Be brief."
        await send(pilot, f"/doc {doc}")
        assert notices(screen)[-1].startswith("Attached readme.md:")
        await send(pilot, "summarize")
        user = screen.query(UserMessage).last()
        assert "📎 readme.md" in str(user.render()) and "summarize" in str(user.render())
        assert all("pending" not in n.classes for n in screen.query(Notice))
        await send(pilot, "/save mine")
        assert "Saved as mine" in notices(screen)[-1]
        assert screen.query_one(PromptInput).border_title == "mine"
        await send(pilot, "/reset")
        assert len(screen.query(UserMessage)) == 0 and len(screen.query(AssistantMessage)) == 0
        assert "context 0 / 4,096" in status_text(screen)
        await send(pilot, "/load mine")
        assert len(screen.query(UserMessage)) == 0  # /reset emptied the saved "mine" too
        await send(pilot, "/frob")
        assert "Unknown command /frob" in notices(screen)[-1]


async def test_ctrl_n_starts_a_new_chat_and_load_brings_the_old_back(store):
    async with make_app(FakeLLM(reply="ok"), store).run_test() as pilot:
        screen = await ready(pilot)
        await send(pilot, "remember")
        old = screen.chat.conversation.name
        await pilot.press("ctrl+n")
        await idle(pilot)
        assert len(screen.query(UserMessage)) == 0 and screen.chat.conversation.name != old
        await send(pilot, f"/load {old}")
        assert [str(w.render()) for w in screen.query(UserMessage)] == ["remember"]
        assert [w.source for w in screen.query(AssistantMessage)] == ["ok"]


async def test_overflow_drops_oldest_turns_with_a_visible_notice():
    llm = FakeLLM(reply="y" * 60, max_context=300)
    async with make_app(llm, params=sampling_params(max_tokens=40)).run_test() as pilot:
        screen = await ready(pilot)
        for i in range(4):
            await send(pilot, f"message {i} " + "m" * 30)
        dropped = [n for n in notices(screen) if "outgrew the 300-token context" in n]
        assert 1 <= len(dropped) < 3  # headroom: not a drop (and a full prefill) on every turn
        start = screen.chat.conversation.context_start
        assert start > 0
        assert all(w.has_class("dropped") == (w.index < start) for w in screen.query(".message"))


async def test_error_during_a_turn_is_a_message_and_the_input_comes_back():
    def fail(prompt):
        raise RuntimeError("CUDA out of memory: tried to allocate 2 GiB")

    async with make_app(FakeLLM(reply=fail)).run_test() as pilot:
        screen = await ready(pilot)
        await send(pilot, "hello")
        assert notices(screen)[1:] == ["CUDA out of memory: tried to allocate 2 GiB"]
        assert len(screen.query(UserMessage)) == 0
        assert screen.query_one(PromptInput).text == "hello"


async def test_loading_screen_shows_progress_then_the_chat():
    release = threading.Event()

    def load(progress):
        progress("loading weights", 0.5)
        release.wait(5)
        return FakeLLM(), sampling_params()

    app = ChatApp(load, store=None or __import__("tqinfer.tui.conversation").tui.conversation.ConversationStore())
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, LoadingScreen)
                       and str(app.screen.query_one("#loading-stage", Label).render()) == "loading weights")
        from textual.widgets import ProgressBar

        assert app.screen.query_one(ProgressBar).percentage == 0.5
        release.set()
        await ready(pilot)


async def test_loading_error_is_shown_without_a_traceback_and_quits_nonzero(store):
    def load(progress):
        raise FileNotFoundError("model 'nope' not found: not a folder, .gguf file, alias or HF hub id")

    app = ChatApp(load, store)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.failed)
        await pilot.pause()
        error = str(app.screen.query_one("#loading-error", Label).render())
        assert "model 'nope' not found" in error and "Traceback" not in error
        await pilot.press("ctrl+q")
    assert app.return_code == 1


async def test_input_newline_and_history():
    async with make_app(FakeLLM(reply="ok")).run_test() as pilot:
        screen = await ready(pilot)
        prompt = screen.query_one(PromptInput)
        await pilot.press("a", "ctrl+j", "b")
        assert prompt.text == "a\nb"
        await pilot.press("enter")
        await idle(pilot)
        assert screen.chat.conversation.messages[0].content == "a\nb"
        await send(pilot, "second")
        await pilot.press("d", "r", "a", "f", "t")
        await pilot.press("up")
        assert prompt.text == "second"
        await pilot.press("up")
        assert prompt.text == "a\nb"
        await pilot.press("down", "down")
        assert prompt.text == "draft"


async def test_resume_shows_the_last_conversation(store):
    conv = Conversation.new(system="sys")
    conv.messages = [Message("user", "old question"), Message("assistant", "old **answer**")]
    store.save(conv)
    async with make_app(FakeLLM(), store, resume=True).run_test() as pilot:
        screen = await ready(pilot)
        assert [str(w.render()) for w in screen.query(UserMessage)] == ["old question"]
        assert screen.query_one(AssistantMessage).source == "old **answer**"
        assert any(n.startswith(f"Resumed {conv.name}") for n in notices(screen))


async def test_view_follows_the_answer_until_the_user_scrolls_up():
    reply = "".join(f"line {i}\n\n" for i in range(80))
    llm = FakeLLM(reply=reply, chunk=16, pause_after=12)
    async with make_app(llm).run_test(size=(80, 24)) as pilot:
        screen = await ready(pilot)
        view = screen.query_one("#messages")
        await send_until_paused(pilot, llm, "count to eighty")
        await pilot.pause(0.1)
        assert view.max_scroll_y > 10 and view.scroll_y == view.max_scroll_y  # following
        for _ in range(5):
            view.scroll_up(animate=False)  # what the mouse wheel does
        await pilot.pause()
        reading = view.scroll_y
        assert reading < view.max_scroll_y
        llm.gate.set()
        await idle(pilot)
        await pilot.pause(0.1)
        assert view.scroll_y == reading and view.max_scroll_y > reading + 10  # left where the user reads
        view.scroll_end(animate=False)  # back at the bottom: following again
        await pilot.pause()
        await send(pilot, "again")
        await pilot.pause(0.1)
        assert view.scroll_y == view.max_scroll_y
