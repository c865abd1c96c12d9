"""The chat logic shared by the Textual app and the plain REPL: turns that fit the context, slash commands."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqinfer.llm import Stats, StreamEvent
from tqinfer.tui.conversation import (Conversation, ConversationError, ConversationStore, Document,
                                      Message, check_name, document_block)


class ChatError(ValueError):
    """Something the user asked for cannot be done; the message says why and what to do."""


HELP = """\
Commands:
  /system TEXT     set the system prompt (alone: show it; /system - removes it)
  /reset           clear this conversation (the system prompt stays)
  /new             start a new conversation (this one stays saved)
  /doc PATH        put a text or markdown file into the context with the next message
  /save NAME       save this conversation as NAME (it is saved after every answer)
  /load [NAME]     open a saved conversation (alone: list them)
  /set NAME VALUE  sampling: temp, top_k, top_p, min_p, repeat_penalty, seed,
                   presence_penalty, frequency_penalty, max_tokens (alone: show)
  /stats           context, KV cache memory and speed of the last answer
  /help            this text
  /quit            leave
Start a message with // to send text that begins with /."""

# /set NAME -> (SamplingParams field, parser)
def _optional_int(value: str) -> int | None:
    return None if value.lower() in ("none", "-", "off") else int(value)


SETTINGS: dict[str, tuple[str, Callable[[str], object]]] = {
    "temp": ("temperature", float), "temperature": ("temperature", float),
    "top_k": ("top_k", int), "top_p": ("top_p", float), "min_p": ("min_p", float),
    "repeat_penalty": ("repetition_penalty", float), "repetition_penalty": ("repetition_penalty", float),
    "presence_penalty": ("presence_penalty", float), "frequency_penalty": ("frequency_penalty", float),
    "seed": ("seed", _optional_int), "max_tokens": ("max_tokens", _optional_int),
    "n_predict": ("max_tokens", _optional_int),
}
_SHOWN_SETTINGS = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed", "max_tokens"]


@dataclass
class CommandResult:
    text: str = ""
    level: str = "info"  # "info", "warning" or "error"
    reload: bool = False  # the conversation was replaced or cleared: redraw the view
    quit: bool = False
    attached: bool = False  # a document now waits for the next message


@dataclass
class Turn:
    """A user message added to the conversation and the prompt that goes to the model for it."""

    prompt_ids: list[int]
    dropped_messages: int = 0
    notice: str | None = None
    rolled_back: bool = False  # the turn failed before any answer and was removed again


@dataclass
class Status:
    model: str
    cache: str
    conversation: str
    context_used: int
    context_max: int
    kv_bytes: int
    kv_bytes_bf16: int
    prompt_tps: float
    generation_tps: float

    def context_text(self) -> str:
        return f"context {self.context_used:,} / {self.context_max:,}"

    def memory_text(self) -> str:
        return f"KV {mib(self.kv_bytes)} (bf16 {mib(self.kv_bytes_bf16)})"

    def speed_text(self) -> str:
        return f"prompt {tps(self.prompt_tps)} tok/s · gen {tps(self.generation_tps)} tok/s"

    def numbers(self) -> str:
        return f"{self.context_text()} · {self.memory_text()} · {self.speed_text()}"


def tps(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def mib(n: int) -> str:
    v = n / 2**20
    return f"{v:.2f} MiB" if v < 10 else f"{v:.1f} MiB" if v < 100 else f"{v:,.0f} MiB"


STOPPED_EARLY = "Stopped before the answer began: the message was taken back."


def finish_notice(reason: str | None, params) -> str | None:
    """What to tell the user about how an answer ended (nothing for a normal stop)."""
    if reason == "length":
        return (f"The answer reached the limit of {getattr(params, 'max_tokens', '?')} tokens "
                "(/set max_tokens N changes it).")
    if reason == "context":
        return "The context is full, so the answer stopped; the oldest turns are dropped with your next message."
    if reason == "cancelled":
        return "Stopped; what came so far is kept."
    return None


class Chat:
    """One conversation with one model: the LLM session, the sampling settings and the saved file."""

    def __init__(self, llm, params, store: ConversationStore, conversation: Conversation | None = None):
        self.llm = llm
        self.params = params
        self.store = store
        self.conversation = conversation or Conversation.new(model=llm.model_name)
        self.session = llm.session()
        self.stats = Stats(context_max=llm.max_context)
        self._lock = threading.Lock()  # one turn or command at a time, whichever thread runs it

    # ---- turns -------------------------------------------------------------------------------
    def answer_room(self) -> int:
        """Tokens kept free for the answer when fitting the conversation into the context."""
        limit = getattr(self.params, "max_tokens", None)
        ctx = self.llm.max_context
        return min(limit, ctx // 2) if limit and limit > 0 else min(1024, ctx // 4)

    def begin(self, text: str) -> Turn:
        """Add the user's message (with pending documents) and fit the conversation into the context.

        Raises ChatError, with the conversation unchanged, when the message cannot fit at all."""
        conv = self.conversation
        if not text.strip() and not conv.pending:
            raise ChatError("Nothing to send: type a message.")
        conv.messages.append(Message("user", text, documents=conv.pending))
        conv.pending = []
        try:
            return self._fit()
        except Exception:
            conv.pending = conv.messages.pop().documents
            raise

    def _fit(self) -> Turn:
        conv = self.conversation
        room = self.answer_room()
        budget = self.llm.max_context - room
        ids = self.llm.chat_ids(conv.model_messages())
        if len(ids) <= budget:
            return Turn(ids)
        before_tokens, before_start = len(ids), conv.context_start
        # Drop to a quarter below the budget, so the next turns do not each drop one more turn and
        # prefill the whole conversation again (dropping from the front invalidates the cached prefix).
        target = budget - budget // 4
        starts = conv.turn_starts()[1:]  # never the turn being sent
        for start in starts:
            conv.context_start = start
            ids = self.llm.chat_ids(conv.model_messages())
            if len(ids) <= target:
                break
        if len(ids) > budget:
            conv.context_start = before_start
            what = "This message" + (" with the system prompt" if conv.system else "")
            raise ChatError(
                f"{what} needs {len(ids):,} tokens, but the context holds {self.llm.max_context:,} "
                f"with {room:,} kept for the answer. Shorten it, attach a smaller document, or "
                "start with a larger context (-c).")
        dropped = conv.context_start - before_start
        notice = (f"The conversation outgrew the {self.llm.max_context:,}-token context: dropped the "
                  f"{dropped} oldest message{'s' if dropped != 1 else ''} ({before_tokens - len(ids):,} tokens)"
                  f"{'; the system prompt stays' if conv.system else ''}.")
        return Turn(ids, dropped_messages=dropped, notice=notice)

    def stream(self, turn: Turn, cancel: threading.Event | None = None) -> Iterator[StreamEvent]:
        """Generate the answer to the turn, appending it to the conversation as it comes; saves at the end.
        Stopped (cancel) before its first token, while the prompt was read, the turn never happened:
        the stream ends without a final event and turn.rolled_back says so."""
        conv = self.conversation
        answer = Message("assistant", "")
        conv.messages.append(answer)
        try:
            with self._lock:
                for event in self.session.stream(turn.prompt_ids, self.params, cancel):
                    if event.finish_reason == "cancelled" and not (answer.content or event.text):
                        self._roll_back(turn)
                        return
                    answer.content += event.text
                    self.stats = event.stats
                    yield event
        except BaseException:
            if not answer.content:  # nothing came: the turn never happened
                self._roll_back(turn)
            raise
        finally:
            self._autosave()

    def _roll_back(self, turn: Turn) -> None:
        """Take back the turn's empty answer and its user message (documents return to pending), and
        the older messages the turn had dropped from the context to fit."""
        conv = self.conversation
        conv.messages.pop()
        conv.pending = conv.messages.pop().documents + conv.pending
        conv.context_start -= turn.dropped_messages
        turn.rolled_back = True

    # ---- status ------------------------------------------------------------------------------
    def status(self) -> Status:
        s = self.stats
        used = s.context_tokens
        kv, kv16 = s.kv_bytes, s.kv_bytes_bf16
        if used and not kv:  # an engine that does not fill the memory figures
            per_token, per_token_bf16 = self.llm.bytes_per_token()
            kv, kv16 = used * per_token, used * per_token_bf16
        return Status(model=self.llm.model_name, cache=self.llm.cache_label, conversation=self.conversation.name,
                      context_used=used, context_max=self.llm.max_context, kv_bytes=kv, kv_bytes_bf16=kv16,
                      prompt_tps=s.prompt_tps, generation_tps=s.generation_tps)

    def _forget_cache(self) -> None:
        self.session.truncate(0)
        self.stats = Stats(context_max=self.llm.max_context)

    def _autosave(self) -> None:
        conv = self.conversation
        if conv.messages or conv.pending or conv.named or self.store.path(conv.name).exists():
            conv.model = self.llm.model_name
            self.store.save(conv)

    # ---- slash commands ----------------------------------------------------------------------
    def command(self, line: str) -> CommandResult:
        """Run one slash command; errors come back as a result with level "error", never raised."""
        name, _, arg = line.strip().partition(" ")
        handler = getattr(self, f"_cmd_{name[1:].lower()}", None) if name.startswith("/") else None
        if handler is None:
            return CommandResult(f"Unknown command {name}: /help lists them.", "error")
        try:
            with self._lock:
                return handler(arg.strip())
        except (ChatError, ConversationError) as e:
            return CommandResult(str(e), "error")
        except OSError as e:
            return CommandResult(f"{e.strerror or e}: {e.filename}" if e.filename else str(e), "error")

    def _cmd_help(self, arg: str) -> CommandResult:
        return CommandResult(HELP)

    def _cmd_quit(self, arg: str) -> CommandResult:
        return CommandResult(quit=True)

    _cmd_exit = _cmd_quit

    def _cmd_system(self, arg: str) -> CommandResult:
        conv = self.conversation
        if not arg:
            return CommandResult(f"System prompt: {conv.system}" if conv.system else "No system prompt is set.")
        conv.system = None if arg == "-" else arg
        self._autosave()
        return CommandResult("System prompt removed." if conv.system is None else "System prompt set.")

    def _cmd_reset(self, arg: str) -> CommandResult:
        conv = self.conversation
        conv.messages, conv.pending, conv.context_start = [], [], 0
        self._forget_cache()
        self._autosave()
        return CommandResult("Conversation cleared" + (" (the system prompt stays)." if conv.system else "."),
                             reload=True)

    def _cmd_new(self, arg: str) -> CommandResult:
        self._autosave()
        old = self.conversation.name
        self.conversation = Conversation.new(system=self.conversation.system, model=self.llm.model_name)
        self.conversation.name = self.store.unused_name(self.conversation.name, taken=(old,))
        self._forget_cache()
        return CommandResult(f"New conversation {self.conversation.name}.", reload=True)

    def _cmd_doc(self, arg: str) -> CommandResult:
        if not arg:
            raise ChatError("Usage: /doc PATH (a text or markdown file).")
        path = Path(arg).expanduser()
        if not path.is_file():
            raise ChatError(f"{path} is not a file.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ChatError(f"{path} is not a UTF-8 text file; /doc takes text or markdown.") from None
        doc = Document(name=path.name, path=str(path.resolve()), text=text)
        doc.tokens = len(self.llm.tokenizer.encode(document_block(doc), add_special_tokens=False))
        budget = self.llm.max_context - self.answer_room()
        if doc.tokens > budget:
            raise ChatError(f"{path.name} is {doc.tokens:,} tokens; the context holds {budget:,} besides the "
                            "room kept for the answer. Use a larger context (-c) or a part of the file.")
        self.conversation.pending.append(doc)
        self._autosave()
        per_token, per_token_bf16 = self.llm.bytes_per_token()
        return CommandResult(
            f"Attached {path.name}: {doc.tokens:,} tokens, KV {mib(doc.tokens * per_token)} "
            f"(bf16 {mib(doc.tokens * per_token_bf16)}). It goes into the context with your next message.",
            attached=True)

    def _cmd_save(self, arg: str) -> CommandResult:
        conv = self.conversation
        if arg and arg != conv.name:
            check_name(arg)
            old, was_named = conv.name, conv.named
            conv.name, conv.named = arg, True
            path = self.store.save(conv)
            if not was_named:  # the automatic file is replaced by the named one
                self.store.delete(old)
        else:
            conv.named = conv.named or bool(arg)
            path = self.store.save(conv)
        return CommandResult(f"Saved as {conv.name} ({path}).")

    def _cmd_load(self, arg: str) -> CommandResult:
        if not arg:
            names = self.store.names()
            if not names:
                return CommandResult(f"No saved conversations in {self.store.root}.")
            return CommandResult("Saved conversations, newest first:\n" + "\n".join(f"  {n}" for n in names))
        conv = self.store.load(arg)
        self._autosave()
        self.conversation = conv
        self._forget_cache()
        note = ""
        if conv.model and conv.model != self.llm.model_name:
            note = f" It was written with {conv.model}; this model is {self.llm.model_name}."
        return CommandResult(f"Loaded {conv.name}: {len(conv.messages)} messages.{note}", reload=True)

    def _cmd_set(self, arg: str) -> CommandResult:
        if not arg:
            unset = {"seed": "random", "max_tokens": "until the context is full"}
            values = [f"{f}={unset.get(f, 'model default') if getattr(self.params, f) is None else getattr(self.params, f)}"
                      for f in _SHOWN_SETTINGS if hasattr(self.params, f)]
            return CommandResult("Sampling: " + ", ".join(values))
        key, _, value = arg.partition(" ")
        if key.lower() not in SETTINGS or not value.strip():
            raise ChatError(f"Usage: /set NAME VALUE with NAME one of {', '.join(sorted(SETTINGS))}.")
        field_name, parse = SETTINGS[key.lower()]
        try:
            parsed = parse(value.strip())
            self.params = dataclasses.replace(self.params, **{field_name: parsed})
        except (ValueError, TypeError) as e:
            raise ChatError(f"/set {key} {value.strip()}: {e}") from None
        return CommandResult(f"{field_name} = {parsed}")

    def _cmd_stats(self, arg: str) -> CommandResult:
        s, st = self.status(), self.stats
        return CommandResult(
            f"{s.model} · {s.cache} · conversation {s.conversation}\n{s.context_text()} · {s.memory_text()}\n"
            f"last answer: prefilled {st.prompt_tokens:,} tokens ({st.reused_tokens:,} reused from the cache) "
            f"at {tps(s.prompt_tps)} tok/s, generated {st.generation_tokens:,} at {tps(s.generation_tps)} tok/s")


def open_conversation(store: ConversationStore, *, resume: bool, system: str | None,
                      model: str | None) -> tuple[Conversation, str | None]:
    """The conversation a chat starts with, and a notice for the user (or None)."""
    def new() -> Conversation:
        conv = Conversation.new(system=system, model=model)
        conv.name = store.unused_name(conv.name)
        return conv

    if not resume:
        return new(), None
    try:
        conv = store.last()
    except ConversationError as e:
        return new(), f"Could not resume: {e}"
    if conv is None:
        return new(), "No saved conversation to resume; this is a new one."
    if system:
        conv.system = system
    return conv, f"Resumed {conv.name}: {len(conv.messages)} messages."
