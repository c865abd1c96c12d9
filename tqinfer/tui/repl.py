"""The plain chat: a line REPL for pipes, scripts and dumb terminals, with the same slash commands.

Answers go to stdout, one after another; everything else (prompts, notices, command output, stats)
goes to stderr, so `printf 'hi\\n' | tqinfer chat > answers.txt` keeps only the answers."""

from __future__ import annotations

import queue
import sys
import threading
from typing import TextIO

from tqinfer.tui.chat import STOPPED_EARLY, Chat, finish_notice

_DONE = object()


def read_line(stdin: TextIO, stderr: TextIO, prompt: str, interactive: bool) -> str:
    """One line with its newline, "" at end of input; line editing and history on a terminal."""
    if interactive and stdin is sys.stdin and sys.stdout.isatty():
        try:
            import readline  # noqa: F401  (gives input() editing and history)
        except ImportError:
            pass
        try:
            return input(prompt) + "\n"
        except EOFError:
            return ""
    if interactive:
        stderr.write(prompt)
        stderr.flush()
    return stdin.readline()


def read_message(stdin: TextIO, stderr: TextIO, interactive: bool) -> str | None:
    """One message; a line ending in a backslash continues on the next line. None at end of input."""
    lines: list[str] = []
    while True:
        line = read_line(stdin, stderr, "> " if not lines else ". ", interactive)
        if not line:
            return "\n".join(lines) if lines else None
        line = line.rstrip("\r\n")
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def stream_answer(chat: Chat, text: str, stdout: TextIO, stderr: TextIO) -> None:
    """Send one message and print the answer as it streams; Ctrl+C stops it and keeps what came."""
    turn = chat.begin(text)
    if turn.notice:
        stderr.write(f"[{turn.notice}]\n")
    cancel = threading.Event()
    events: queue.Queue = queue.Queue()

    def produce():  # in a thread, so that Ctrl+C reaches the main thread and never tears the session
        try:
            for event in chat.stream(turn, cancel):
                events.put(event)
            events.put(_DONE)
        except BaseException as e:
            events.put(e)

    worker = threading.Thread(target=produce, name="tqinfer-answer", daemon=True)
    worker.start()
    finish = None
    while True:
        try:
            item = events.get(timeout=0.1)
        except queue.Empty:
            continue
        except KeyboardInterrupt:
            cancel.set()
            continue
        if item is _DONE:
            break
        if isinstance(item, BaseException):
            stdout.write("\n")
            raise item
        stdout.write(item.text)
        stdout.flush()
        finish = item.finish_reason or finish
    worker.join()
    stdout.write("\n")
    stdout.flush()
    notice = STOPPED_EARLY if turn.rolled_back else finish_notice(finish, chat.params)
    if notice:
        stderr.write(f"[{notice}]\n")


def run_repl(chat: Chat, stdin: TextIO, stdout: TextIO, stderr: TextIO, *, interactive: bool = False) -> int:
    """Read messages and commands until end of input or /quit; returns the exit code."""
    if interactive:
        s = chat.status()
        stderr.write(f"{s.model} · {s.cache} · context {s.context_max:,} tokens. "
                     "/help lists the commands, Ctrl+D quits.\n")
    failed = False
    while True:
        try:
            text = read_message(stdin, stderr, interactive)
        except KeyboardInterrupt:
            stderr.write("\n")
            continue
        if text is None:
            return 1 if failed else 0
        if not text.strip():
            continue
        if text.startswith("/") and not text.startswith("//"):
            result = chat.command(text)
            if result.text:
                prefix = "error: " if result.level == "error" else ""
                stderr.write(f"{prefix}{result.text}\n")
                stderr.flush()
            failed |= result.level == "error" and not interactive
            if result.quit:
                return 1 if failed else 0
            continue
        try:
            stream_answer(chat, text[1:] if text.startswith("//") else text, stdout, stderr)
        except Exception as e:  # shown as a message, never a traceback
            stderr.write(f"error: {e or type(e).__name__}\n")
            failed |= not interactive
        if interactive:
            stderr.write(f"[{chat.status().numbers()}]\n")
