"""`tqinfer chat`: the Textual chat app, or the plain REPL when asked or when not on a terminal."""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable

from textual.app import App
from textual.binding import Binding
from textual.message import Message as TextualMessage

from tqinfer.tui.chat import Chat, open_conversation
from tqinfer.tui.conversation import ConversationStore
from tqinfer.tui.engine_thread import EngineThread
from tqinfer.tui.screens import ChatScreen, LoadingScreen, describe

Progress = Callable[[str, "float | None"], None]
# load(progress) -> (llm, sampling params); the app calls it in a thread
Loader = Callable[[Progress], tuple]


def build_engine(args: argparse.Namespace, progress: Progress | None = None) -> tuple:
    """The LLM and sampling settings the command line asks for (tests replace this with a fake)."""
    from tqinfer.cli import llm_from_args, sampling_from_args

    if progress is not None and "progress" in inspect.signature(llm_from_args).parameters:
        llm = llm_from_args(args, progress=progress)
    else:
        llm = llm_from_args(args)
    return llm, sampling_from_args(args)


class Loaded(TextualMessage):
    def __init__(self, chat: Chat, notice: str | None):
        super().__init__()
        self.chat = chat
        self.notice = notice


class LoadProgress(TextualMessage):
    def __init__(self, stage: str, fraction: float | None):
        super().__init__()
        self.stage = stage
        self.fraction = fraction


class LoadFailed(TextualMessage):
    def __init__(self, error: str):
        super().__init__()
        self.error = error


class ChatApp(App):
    """Shows the loading screen while `load` runs on the engine thread, then the chat."""

    CSS_PATH = "chat.tcss"
    TITLE = "tqinfer chat"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True)]

    def __init__(self, load: Loader, store: ConversationStore, *, model_label: str = "the default model",
                 system: str | None = None, resume: bool = False):
        super().__init__()
        self.load = load
        self.store = store
        self.model_label = model_label
        self.system = system
        self.resume = resume
        self.failed = False
        self.engine = EngineThread()  # loads the model, then runs every turn and command

    def on_mount(self) -> None:
        self.push_screen(LoadingScreen(self.model_label))
        self.engine.submit(self._load_in_thread)

    def _load_in_thread(self) -> None:
        try:
            llm, params = self.load(lambda stage, fraction=None: self.post_message(LoadProgress(stage, fraction)))
            conv, notice = open_conversation(self.store, resume=self.resume, system=self.system,
                                             model=llm.model_name)
            chat = Chat(llm, params, self.store, conv)
        except BaseException as e:  # shown on the loading screen, never as a traceback
            self.post_message(LoadFailed(describe(e)))
            return
        self.post_message(Loaded(chat, notice))

    def on_load_progress(self, message: LoadProgress) -> None:
        if isinstance(self.screen, LoadingScreen):
            self.screen.set_progress(message.stage, message.fraction)

    def on_load_failed(self, message: LoadFailed) -> None:
        self.failed = True
        if isinstance(self.screen, LoadingScreen):
            self.screen.show_error(message.error)

    async def on_loaded(self, message: Loaded) -> None:
        self.title = message.chat.llm.model_name
        await self.switch_screen(ChatScreen(message.chat, message.notice))

    async def action_quit(self) -> None:
        if isinstance(self.screen, ChatScreen):
            self.screen.cancel.set()  # a running answer stops at its next token
        self.engine.close()
        self.exit(return_code=1 if self.failed else 0)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def run_plain(args: argparse.Namespace, load: Loader, store: ConversationStore, stdin=None, stdout=None,
              stderr=None) -> int:
    """Load the model with progress on stderr, then run the line REPL."""
    from tqinfer.tui.repl import run_repl

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = _is_terminal(stdin)
    shown: set[str] = set()

    def progress(stage: str, fraction: float | None = None) -> None:
        if interactive and _is_terminal(stderr):
            pct = f" {fraction * 100:3.0f}%" if fraction is not None else ""
            stderr.write(f"\r\x1b[Kloading: {stage}{pct}")
            stderr.flush()
        elif stage not in shown:  # a log, not a progress bar, when stderr is a file
            shown.add(stage)
            stderr.write(f"loading: {stage}\n")

    try:
        llm, params = load(progress)
        conv, notice = open_conversation(store, resume=bool(getattr(args, "resume", False)),
                                         system=getattr(args, "system", None), model=llm.model_name)
        chat = Chat(llm, params, store, conv)
    except KeyboardInterrupt:
        stderr.write("\ninterrupted\n")
        return 130
    except Exception as e:
        stderr.write(f"\nerror: {describe(e)}\n" if interactive else f"error: {describe(e)}\n")
        return 1
    if interactive and _is_terminal(stderr):
        stderr.write("\r\x1b[K")
    if notice:
        stderr.write(f"[{notice}]\n")
    return run_repl(chat, stdin, stdout, stderr, interactive=interactive)


def run_chat(args: argparse.Namespace) -> int:
    """Entry point of `tqinfer chat`; returns the exit code."""
    store = ConversationStore()

    def load(progress: Progress) -> tuple:
        return build_engine(args, progress)

    if getattr(args, "plain", False) or not (_is_terminal(sys.stdin) and _is_terminal(sys.stdout)):
        return run_plain(args, load, store)
    model = getattr(args, "model_opt", None) or getattr(args, "model", None)
    app = ChatApp(load, store, model_label=model or "the default model",
                  system=getattr(args, "system", None), resume=bool(getattr(args, "resume", False)))
    app.run()
    return app.return_code or 0
