"""Snapshots of the chat app (pytest-textual-snapshot); update with `pytest --snapshot-update` after
looking at the new SVGs under __snapshots__/ in a browser."""

from __future__ import annotations

import threading

from conftest import make_app, ready, send, wait_for
from fakes import FakeLLM, sampling_params

from tqinfer.tui.app import ChatApp
from tqinfer.tui.conversation import Conversation

ANSWER = """Here is a loop in **Python**:

```python
for i in range(3):
    print(i)
```

It prints `0`, `1` and `2`."""


def named(store, name: str, **kw) -> None:
    """A saved conversation with a fixed name, resumed by the app (the names are otherwise timestamps)."""
    conv = Conversation.new(**kw)
    conv.name = name
    store.save(conv)


async def steady(pilot):
    """The chat screen with a cursor that does not blink, so every screenshot is the same."""
    screen = await ready(pilot)
    screen.query_one("#prompt").cursor_blink = False
    return screen


def test_answer_with_code_block(snap_compare, store):
    named(store, "demo")

    async def run_before(pilot):
        await steady(pilot)
        await send(pilot, "Show me a loop")

    app = make_app(FakeLLM(reply=ANSWER), store, resume=True)
    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_dropped_turns_and_help(snap_compare, store):
    named(store, "long", system="Be brief.")

    async def run_before(pilot):
        await steady(pilot)
        for i in range(3):
            await send(pilot, f"question {i}: " + "q" * 30)
        await send(pilot, "/help")
        view = pilot.app.screen.query_one("#messages")
        assert view.max_scroll_y == 0  # all of it on screen: no scroll position to differ between runs

    app = make_app(FakeLLM(reply="a" * 60, max_context=300), store, params=sampling_params(max_tokens=40),
                   resume=True)
    assert snap_compare(app, terminal_size=(90, 52), run_before=run_before)


def test_loading_progress(snap_compare, store):
    release = threading.Event()

    def load(progress):
        progress("loading weights", 0.4)
        release.wait(10)
        raise RuntimeError("stopped by the test")

    async def run_before(pilot):
        await wait_for(pilot, lambda: pilot.app.screen.query("#loading-stage")
                       and "weights" in str(pilot.app.screen.query_one("#loading-stage").render()))
        await pilot.pause()

    app = ChatApp(load, store, model_label="smollm2")
    try:
        assert snap_compare(app, terminal_size=(80, 16), run_before=run_before)
    finally:
        release.set()


def test_loading_error(snap_compare, store):
    def load(progress):
        raise FileNotFoundError("model 'nope' not found: not a local folder, .gguf file, alias or HF hub id")

    async def run_before(pilot):
        await wait_for(pilot, lambda: pilot.app.failed)
        await pilot.pause()

    assert snap_compare(ChatApp(load, store, model_label="nope"), terminal_size=(80, 16), run_before=run_before)
