"""Conversations and their storage: messages, attached documents, JSON files under the XDG data dir."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class ConversationError(ValueError):
    """A conversation cannot be named, found or read; the message says why."""


@dataclass
class Document:
    """A text file put into the context with /doc; it travels with the next user message."""

    name: str
    path: str
    text: str
    tokens: int = 0


@dataclass
class Message:
    role: str  # "user" or "assistant"
    content: str
    documents: list[Document] = field(default_factory=list)

    def model_content(self) -> str:
        """The content as the model sees it: attached documents first, then what the user typed."""
        parts = [document_block(d) for d in self.documents]
        return "\n\n".join(parts + [self.content]) if parts else self.content


def document_block(doc: Document) -> str:
    return f'<document name="{doc.name}">\n{doc.text.rstrip()}\n</document>'


@dataclass
class Conversation:
    """One chat: system prompt, all messages (also those dropped from the context) and pending documents.

    context_start: index of the first message still in the model's context; older ones were dropped
    when the conversation outgrew it, but stay here to be shown and saved."""

    name: str
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    context_start: int = 0
    pending: list[Document] = field(default_factory=list)
    model: str | None = None
    named: bool = False  # named by the user (/save NAME); otherwise an automatic timestamp name
    created: str = ""
    updated: str = ""

    @classmethod
    def new(cls, system: str | None = None, model: str | None = None) -> Conversation:
        now = datetime.now()
        return cls(name=now.strftime("chat-%Y%m%d-%H%M%S"), system=system or None, model=model,
                   created=now.isoformat(timespec="seconds"))

    def model_messages(self) -> list[dict]:
        """The messages that go to the chat template: the system prompt and the turns in context."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        out += [{"role": m.role, "content": m.model_content()} for m in self.messages[self.context_start:]]
        return out

    def turn_starts(self) -> list[int]:
        """Indices of the user messages in context: where a turn begins."""
        return [i for i in range(self.context_start, len(self.messages)) if self.messages[i].role == "user"]

    def to_json(self) -> dict:
        return {"version": 1, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> Conversation:
        def docs(items):
            return [Document(**d) for d in items or []]

        messages = [Message(role=m["role"], content=m["content"], documents=docs(m.get("documents")))
                    for m in data.get("messages", [])]
        return cls(name=data["name"], system=data.get("system"), messages=messages,
                   context_start=min(int(data.get("context_start", 0)), len(messages)),
                   pending=docs(data.get("pending")), model=data.get("model"),
                   named=bool(data.get("named", False)), created=data.get("created", ""),
                   updated=data.get("updated", ""))


def data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "tqinfer" / "conversations"


def check_name(name: str) -> str:
    if not _NAME.match(name) or name.endswith(".json"):
        raise ConversationError(
            f"{name!r} is not a usable conversation name: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, at most 100 characters)")
    return name


class ConversationStore:
    """Conversations as NAME.json files in one folder (created on the first save)."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else data_dir()

    def path(self, name: str) -> Path:
        return self.root / f"{check_name(name)}.json"

    def save(self, conv: Conversation) -> Path:
        conv.updated = datetime.now().isoformat(timespec="seconds")
        path = self.path(conv.name)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(conv.to_json(), ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, path)  # a crash mid-write never leaves a half-written conversation
        return path

    def load(self, name: str) -> Conversation:
        path = self.path(name)
        if not path.is_file():
            known = ", ".join(self.names()[:10]) or "none saved yet"
            raise ConversationError(f"no conversation named {name!r} in {self.root} (saved: {known})")
        try:
            return Conversation.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as e:
            raise ConversationError(f"{path} is not a readable conversation: {e}") from e

    def unused_name(self, name: str, taken: tuple[str, ...] = ()) -> str:
        """name, or name-2, name-3 … : the first that no saved conversation (nor one in taken) has."""
        candidate, n = name, 1
        while candidate in taken or self.path(candidate).exists():
            n += 1
            candidate = f"{name}-{n}"
        return candidate

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def names(self) -> list[str]:
        """Saved conversation names, most recently written first."""
        if not self.root.is_dir():
            return []
        files = sorted(self.root.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        return [p.stem for p in files]

    def last(self) -> Conversation | None:
        names = self.names()
        return self.load(names[0]) if names else None
