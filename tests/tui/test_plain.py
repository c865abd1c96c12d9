"""The plain REPL: through a pipe (a real subprocess, chosen automatically), and with string streams."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from fakes import FakeLLM, sampling_params

from tqinfer.tui.chat import Chat
from tqinfer.tui.conversation import Conversation, ConversationStore, Message
from tqinfer.tui.repl import run_repl

TESTS = Path(__file__).parent

# run_chat in a child process with the fake engine in place of the real one; stdin and stdout are pipes
CHILD = textwrap.dedent("""
    import argparse, sys
    sys.path.insert(0, {tests!r})
    from fakes import FakeLLM, sampling_params
    import tqinfer.tui.app as app

    def build_engine(args, progress=None):
        progress("loading weights", 0.5)
        if {fail!r}:
            raise FileNotFoundError("model 'nope' not found")
        # the answer says how many user messages the model saw
        return FakeLLM(reply=lambda prompt: f"{{prompt.count('<user>')}} messages seen"), sampling_params()

    app.build_engine = build_engine
    args = argparse.Namespace(model=None, plain=False, resume={resume!r}, system=None)
    sys.exit(app.run_chat(args))
""")


def run_child(stdin: str, data_home: Path, *, resume=False, fail=False) -> subprocess.CompletedProcess:
    code = CHILD.format(tests=str(TESTS), resume=resume, fail=fail)
    env = {**os.environ, "XDG_DATA_HOME": str(data_home)}
    return subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True,
                          env=env, timeout=60)


def test_plain_mode_through_a_pipe(data_home):
    out = run_child("hello\n/set temp 0.1\nand again\n", data_home)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "1 messages seen\n2 messages seen\n"  # only answers on stdout
    assert "loading: loading weights" in out.stderr and "temperature = 0.1" in out.stderr
    saved = ConversationStore().last()
    assert [m.content for m in saved.messages] == ["hello", "1 messages seen", "and again", "2 messages seen"]


def test_plain_mode_resume_goes_on_with_the_last_conversation(store, data_home):
    conv = Conversation.new()
    conv.name = "earlier"
    conv.messages = [Message("user", "one"), Message("assistant", "two")]
    store.save(conv)
    out = run_child("three\n", data_home, resume=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "2 messages seen\n" and "Resumed earlier: 2 messages." in out.stderr
    assert len(store.load("earlier").messages) == 4


def test_plain_mode_load_error_is_one_line(data_home):
    out = run_child("hello\n", data_home, fail=True)
    assert out.returncode == 1 and out.stdout == ""
    assert "error: model 'nope' not found" in out.stderr and "Traceback" not in out.stderr


def test_repl_commands_continuation_and_errors(store, tmp_path):
    doc = tmp_path / "a.txt"
    doc.write_text("alpha beta")
    llm = FakeLLM(reply=lambda prompt: "doc seen" if "alpha beta" in prompt else "no doc")
    chat = Chat(llm, sampling_params(), store)
    stdin = io.StringIO(f"/doc {doc}\nfirst line\\\nsecond line\n/nonsense\n//slash text\n/quit\nnever read\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    code = run_repl(chat, stdin, stdout, stderr)
    assert stdout.getvalue() == "doc seen\ndoc seen\n"
    assert chat.conversation.messages[0].content == "first line\nsecond line"
    assert chat.conversation.messages[2].content == "/slash text"
    assert "Attached a.txt" in stderr.getvalue() and "error: Unknown command /nonsense" in stderr.getvalue()
    assert code == 1  # a failed command in a script is a failure


def test_repl_reports_dropped_turns_and_limits(store):
    llm = FakeLLM(reply="z" * 80, max_context=300)
    chat = Chat(llm, sampling_params(max_tokens=10), store)
    stdin = io.StringIO("".join(f"turn {i} {'t' * 40}\n" for i in range(6)))
    stdout, stderr = io.StringIO(), io.StringIO()
    assert run_repl(chat, stdin, stdout, stderr) == 0
    err = stderr.getvalue()
    assert "outgrew the 300-token context" in err
    assert "reached the limit of 10 tokens" in err
    assert stdout.getvalue().splitlines() == ["z" * 40] * 6  # 10 events of 4 characters
