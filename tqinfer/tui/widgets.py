"""Widgets of the chat view: the prompt input with history, the messages, notices and the status bar."""

from __future__ import annotations

from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.message import Message as TextualMessage
from textual.widgets import Markdown, Static, TextArea

from tqinfer.tui.chat import Status
from tqinfer.tui.conversation import Message


class PromptInput(TextArea):
    """Multi-line input: Enter sends, Ctrl+J (or Shift/Alt+Enter) inserts a newline, Up/Down at the
    first/last line walk through the messages sent before."""

    BINDINGS = [
        # Shown in the footer; Enter itself is handled in _on_key before TextArea would insert a newline.
        Binding("enter", "submit", "Send"),
        Binding("ctrl+j", "newline", "Newline"),
    ]

    class Submitted(TextualMessage):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, **kwargs):
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)
        self.sent: list[str] = []
        self._history_index: int | None = None  # None: editing a draft, not walking the history
        self._draft = ""

    async def _on_key(self, event: events.Key) -> None:
        key = event.key
        if key == "enter":
            event.stop()
            event.prevent_default()
            self.action_submit()
        elif key in ("ctrl+j", "shift+enter", "alt+enter"):
            event.stop()
            event.prevent_default()
            self.action_newline()
        elif key == "up" and self.cursor_location[0] == 0 and self.sent:
            event.stop()
            event.prevent_default()
            self._walk_history(-1)
        elif key == "down" and self.cursor_location[0] == self.document.line_count - 1 \
                and self._history_index is not None:
            event.stop()
            event.prevent_default()
            self._walk_history(1)

    def action_submit(self) -> None:
        text = self.text
        if not text.strip():
            return
        if not self.sent or self.sent[-1] != text:
            self.sent.append(text)
        self._history_index = None
        self.clear()
        self.post_message(self.Submitted(text))

    def restore(self, text: str) -> None:
        """Put a message that was not sent back into the input, the cursor at its end."""
        self.load_text(text)
        self.move_cursor(self.document.end)

    def action_newline(self) -> None:
        self.insert("\n")

    def _walk_history(self, step: int) -> None:
        if self._history_index is None:
            if step > 0:
                return
            self._draft = self.text
            index = len(self.sent) - 1
        else:
            index = self._history_index + step
        if index < 0:
            return
        if index >= len(self.sent):
            self._history_index = None
            self.load_text(self._draft)
        else:
            self._history_index = index
            self.load_text(self.sent[index])
        self.move_cursor(self.document.end)


class UserMessage(Static):
    def __init__(self, message: Message, index: int):
        text = Text(message.content)
        if message.documents:
            attached = ", ".join(f"{d.name} ({d.tokens:,} tokens)" for d in message.documents)
            text = Text.assemble((f"📎 {attached}\n", "italic"), text) if message.content else \
                Text(f"📎 {attached}", "italic")
        super().__init__(text, classes="message user")
        self.index = index


class AssistantMessage(Markdown):
    """An answer; while it streams, text arrives through Markdown.get_stream (appends, no re-render)."""

    def __init__(self, content: str = "", index: int = -1):
        super().__init__(content, classes="message assistant")
        self.index = index


class Notice(Static):
    """A line from the app itself: command output, dropped turns, errors."""

    def __init__(self, text: str, level: str = "info"):
        super().__init__(Text(text), classes=f"notice {level}")


class StatusBar(Static):
    """Two lines: model · cache types · context used / max, then KV memory next to bf16 and speed."""

    def show(self, status: Status) -> None:
        first = Text.assemble((status.model, "bold"), f" · {status.cache} · {status.context_text()}")
        self.update(Text.assemble(first, "\n", f"{status.memory_text()} · {status.speed_text()}"))
