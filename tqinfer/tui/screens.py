"""The two screens of the chat app: loading the model, and the conversation itself."""

from __future__ import annotations

import threading

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Center, Vertical, VerticalScroll
from textual.message import Message as TextualMessage
from textual.screen import Screen
from textual.widgets import Footer, Label, Markdown, ProgressBar

from tqinfer.tui.chat import STOPPED_EARLY, Chat, CommandResult, Turn, finish_notice
from tqinfer.tui.conversation import Message
from tqinfer.tui.widgets import AssistantMessage, Notice, PromptInput, StatusBar, UserMessage


def describe(error: BaseException) -> str:
    """An exception as a message for the user (the class name only when it says nothing)."""
    return str(error) or type(error).__name__


class LoadingScreen(Screen):
    """A progress bar fed by LLM(progress=...) while the model is fetched, converted and loaded."""

    BINDINGS = [Binding("ctrl+q", "app.quit", "Quit", priority=True)]

    def __init__(self, model: str):
        super().__init__()
        self.model = model

    def compose(self) -> ComposeResult:
        with Center(id="loading"):
            with Vertical(id="loading-box"):
                yield Label(f"Loading {self.model}", id="loading-title")
                yield Label("starting…", id="loading-stage")
                yield ProgressBar(total=None, show_eta=False, id="loading-bar")
                yield Label("", id="loading-error")
        yield Footer()

    def set_progress(self, stage: str, fraction: float | None) -> None:
        self.query_one("#loading-stage", Label).update(stage)
        bar = self.query_one(ProgressBar)
        bar.set_class(fraction is None, "indeterminate")  # no "--%" next to a bar that only moves
        if fraction is None:
            bar.update(total=None)
        else:
            bar.update(total=100, progress=max(0.0, min(1.0, fraction)) * 100)

    def show_error(self, text: str) -> None:
        self.query_one("#loading-stage", Label).update("Could not load the model.")
        self.query_one(ProgressBar).display = False
        self.query_one("#loading-error", Label).update(f"{text}\n\nCtrl+Q quits.")
        self.add_class("failed")


class TurnStarted(TextualMessage):
    def __init__(self, turn: Turn):
        super().__init__()
        self.turn = turn


class AnswerDelta(TextualMessage):
    def __init__(self, text: str, finish_reason: str | None):
        super().__init__()
        self.text = text
        self.finish_reason = finish_reason


class TurnFailed(TextualMessage):
    def __init__(self, error: str, text: str, rolled_back: bool, level: str = "error"):
        super().__init__()
        self.error = error
        self.text = text
        self.rolled_back = rolled_back
        self.level = level


class CommandDone(TextualMessage):
    def __init__(self, result: CommandResult):
        super().__init__()
        self.result = result


class ChatScreen(Screen):
    """Messages above, the input below, the status bar and the keys at the bottom.

    Turns and commands run on the app's engine thread (one at a time) and post messages back; the
    answer streams into its Markdown widget through a MarkdownStream."""

    BINDINGS = [
        Binding("escape", "stop", "Stop", priority=True),
        Binding("ctrl+c", "stop_or_copy", "Stop", show=False, priority=True),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+q", "app.quit", "Quit", priority=True),
    ]

    def __init__(self, chat: Chat, notice: str | None = None):
        super().__init__()
        self.chat = chat
        self.busy = False
        self.state = ""
        self.cancel = threading.Event()
        self._notice = notice
        self._stream = None  # MarkdownStream of the answer being written
        self._answer: AssistantMessage | None = None
        self._user: UserMessage | None = None

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="messages")
        yield PromptInput(id="prompt")
        yield StatusBar(id="status")
        yield Footer()

    async def on_mount(self) -> None:
        prompt = self.query_one(PromptInput)
        prompt.sent = [m.content for m in self.chat.conversation.messages if m.role == "user"]
        await self._rebuild()
        s = self.chat.status()
        await self._add_notice(f"{s.model} is ready: {s.cache} cache, {s.context_max:,} tokens of context. "
                               "Enter sends, Ctrl+J adds a line, /help lists the commands.",
                               before=0 if self.query_one("#messages").children else None)
        if self._notice:
            await self._add_notice(self._notice)
        self.query_one("#messages").anchor()  # follow the answer until the user scrolls up
        prompt.focus()
        self._refresh_status()

    # ---- view --------------------------------------------------------------------------------
    async def _rebuild(self) -> None:
        view = self.query_one("#messages", VerticalScroll)
        await view.remove_children()
        conv = self.chat.conversation
        widgets = [UserMessage(m, i) if m.role == "user" else AssistantMessage(m.content, i)
                   for i, m in enumerate(conv.messages)]
        for w in widgets:
            w.set_class(w.index < conv.context_start, "dropped")
        if conv.pending:
            names = ", ".join(f"{d.name} ({d.tokens:,} tokens)" for d in conv.pending)
            pending = Notice(f"Attached, goes with your next message: {names}")
            pending.add_class("pending")
            widgets.append(pending)
        await view.mount_all(widgets)

    async def _add_notice(self, text: str, level: str = "info", before=None) -> None:
        await self.query_one("#messages").mount(Notice(text, level), before=before)

    def _refresh_status(self) -> None:
        self.query_one(StatusBar).show(self.chat.status())
        prompt = self.query_one(PromptInput)
        prompt.border_title = self.chat.conversation.name
        prompt.border_subtitle = self.state

    def _set_state(self, state: str) -> None:
        self.state = state
        self._refresh_status()

    # ---- sending -----------------------------------------------------------------------------
    @on(PromptInput.Submitted)
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text
        if self.busy:
            self.query_one(PromptInput).restore(text)
            self.notify("Still answering: Esc stops the answer.", severity="warning")
            return
        if text.startswith("/") and not text.startswith("//"):
            self._run_command(text.strip())
            return
        if text.startswith("//"):
            text = text[1:]
        conv = self.chat.conversation
        view = self.query_one("#messages", VerticalScroll)
        for notice in view.query(Notice).filter(".pending"):
            await notice.remove()
        index = len(conv.messages)
        self._user = UserMessage(Message("user", text, documents=list(conv.pending)), index)
        self._answer = AssistantMessage("", index + 1)
        await view.mount_all([self._user, self._answer])
        view.anchor()
        self._stream = Markdown.get_stream(self._answer)
        self.busy = True
        self.cancel = cancel = threading.Event()
        self._set_state("thinking…")
        self.app.engine.submit(lambda: self._answer_in_thread(text, cancel))

    def _answer_in_thread(self, text: str, cancel: threading.Event) -> None:
        try:
            turn = self.chat.begin(text)
        except Exception as e:
            self.post_message(TurnFailed(describe(e), text, rolled_back=True))
            return
        self.post_message(TurnStarted(turn))
        try:
            for event in self.chat.stream(turn, cancel):
                self.post_message(AnswerDelta(event.text, event.finish_reason))
        except Exception as e:
            self.post_message(TurnFailed(describe(e), text, rolled_back=turn.rolled_back))
            return
        if turn.rolled_back:  # stopped while the prompt was read
            self.post_message(TurnFailed(STOPPED_EARLY, text, rolled_back=True, level="info"))

    async def on_turn_started(self, message: TurnStarted) -> None:
        turn = message.turn
        if turn.notice:
            start = self.chat.conversation.context_start
            for w in self.query(".message"):
                w.set_class(w.index < start, "dropped")
            await self._add_notice(turn.notice, "warning", before=self._user)

    async def on_answer_delta(self, message: AnswerDelta) -> None:
        if message.text:
            if self.state != "generating…" and not self.cancel.is_set():
                self.state = "generating…"
            await self._stream.write(message.text)
        if message.finish_reason is not None:
            await self._end_answer()
            notice = finish_notice(message.finish_reason, self.chat.params)
            if notice:
                await self._add_notice(notice, "warning" if message.finish_reason != "cancelled" else "info")
        self._refresh_status()

    async def on_turn_failed(self, message: TurnFailed) -> None:
        await self._end_answer()
        if message.rolled_back:
            for w in (self._user, self._answer):
                if w is not None:
                    await w.remove()
            prompt = self.query_one(PromptInput)
            if not prompt.text:
                prompt.restore(message.text)
        await self._add_notice(message.error, message.level)
        self._refresh_status()

    async def _end_answer(self) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.busy = False
        self.state = ""

    # ---- commands and keys -------------------------------------------------------------------
    def _run_command(self, line: str) -> None:
        self.busy = True
        self._set_state("working…")
        self.app.engine.submit(lambda: self.post_message(CommandDone(self.chat.command(line))))

    async def on_command_done(self, message: CommandDone) -> None:
        result = message.result
        self.busy = False
        self.state = ""
        if result.quit:
            self.app.exit()
            return
        if result.reload:
            await self._rebuild()
            self.query_one(PromptInput).sent = [
                m.content for m in self.chat.conversation.messages if m.role == "user"]
        if result.text:
            await self._add_notice(result.text, result.level)
        if result.attached:  # removed when the message it goes with is sent
            self.query(Notice).last().add_class("pending")
        self._refresh_status()

    def action_stop(self) -> None:
        if self.busy and not self.cancel.is_set():
            self.cancel.set()
            self._set_state("stopping…")

    def action_stop_or_copy(self) -> None:
        if self.busy:
            self.action_stop()
            return
        prompt = self.query_one(PromptInput)
        if prompt.selected_text:
            prompt.action_copy()
        else:
            self.notify("Ctrl+Q quits.")

    def action_new_chat(self) -> None:
        if self.busy:
            self.notify("Still answering: Esc stops the answer.", severity="warning")
            return
        self._run_command("/new")
