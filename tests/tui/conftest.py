"""Helpers for the chat tests: a fake engine behind the app, waiting for the app to settle."""

from __future__ import annotations

import asyncio
import inspect
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fakes import FakeLLM, sampling_params  # noqa: E402

from tqinfer.tui.app import ChatApp  # noqa: E402
from tqinfer.tui.conversation import ConversationStore  # noqa: E402
from tqinfer.tui.screens import ChatScreen  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run `async def` tests here with asyncio.run (no async plugin needed for App.run_test)."""
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
        asyncio.run(pyfuncitem.obj(**args))
        return True
    return None


@pytest.fixture(autouse=True)
def data_home(tmp_path, monkeypatch):
    """Conversations never land in the real home."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture
def store(data_home):
    return ConversationStore()


def make_app(llm: FakeLLM | None = None, store: ConversationStore | None = None, params=None, **kw) -> ChatApp:
    llm = llm or FakeLLM()
    params = params or sampling_params()
    return ChatApp(lambda progress: (llm, params), store or ConversationStore(), model_label="FakeLM-1M", **kw)


async def wait_for(pilot, condition, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await pilot.pause(0.01)
    raise AssertionError("the app did not get there in time")


async def ready(pilot) -> ChatScreen:
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ChatScreen))
    await pilot.pause()
    return pilot.app.screen


async def idle(pilot) -> None:
    await wait_for(pilot, lambda: not pilot.app.screen.busy)
    await pilot.pause()


async def submit(pilot, text: str) -> None:
    """Type text into the input and press Enter."""
    pilot.app.screen.query_one("#prompt").load_text(text)
    await pilot.press("enter")


async def send(pilot, text: str) -> None:
    """submit, then wait until the answer or command is done."""
    await submit(pilot, text)
    await idle(pilot)


async def send_until_paused(pilot, llm, text: str) -> None:
    """submit, then wait until the fake engine holds its answer at its pause point."""
    await submit(pilot, text)
    await wait_for(pilot, llm.paused.is_set)
