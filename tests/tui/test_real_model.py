"""The chat app over the real default model on CPU: one short greedy reply."""

from __future__ import annotations

import pytest
from conftest import ready, wait_for

from tqinfer.tui.app import ChatApp, build_engine
from tqinfer.tui.conversation import ConversationStore
from tqinfer.tui.screens import ChatScreen, LoadingScreen
from tqinfer.tui.widgets import AssistantMessage, PromptInput, StatusBar


@pytest.mark.slow
async def test_real_default_model_answers_in_the_app():
    cli = pytest.importorskip("tqinfer.cli")
    if not hasattr(cli, "llm_from_args"):
        pytest.skip("tqinfer.cli.llm_from_args is not there yet")
    args = cli.build_parser().parse_args(["chat", "--device", "cpu", "-c", "1024", "-n", "12", "--temp", "0"])
    app = ChatApp(lambda progress: build_engine(args, progress), ConversationStore(), model_label="smollm2")
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) or app.failed, timeout=600)
        if app.failed:
            error = str(app.screen.query_one("#loading-error").render())
            if isinstance(app.screen, LoadingScreen) and "NotImplementedError" in error:
                pytest.skip(f"the engine is not implemented yet: {error}")
            pytest.fail(f"loading failed: {error}")
        screen = await ready(pilot)
        screen.query_one(PromptInput).load_text("What is the capital of France?")
        await pilot.press("enter")
        await wait_for(pilot, lambda: not screen.busy, timeout=300)
        answer = screen.query_one(AssistantMessage).source
        assert answer.strip(), "the model said nothing"
        assert screen.chat.conversation.messages[-1].content == answer
        stats = screen.chat.stats
        assert 0 < stats.generation_tokens <= 12 and stats.prompt_tokens > 10
        assert stats.context_tokens == len(screen.chat.session.tokens)
        status = str(screen.query_one(StatusBar).render())
        assert f"context {stats.context_tokens:,} / 1,024" in status
        # the second turn prefills only what is new: the cached conversation is reused
        before = stats.context_tokens
        screen.query_one(PromptInput).load_text("And of Italy?")
        await pilot.press("enter")
        await wait_for(pilot, lambda: not screen.busy, timeout=300)
        second = screen.chat.stats
        assert second.reused_tokens >= before - 2 and second.prompt_tokens < 20
        print(f"\n{answer!r}\n{screen.chat.conversation.messages[-1].content!r}\n{status}")
