"""tqinfer ask: prompt caches on disk, answers equal to uncached ones, refusals, the stdin loop."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tqinfer.ask import DocumentQA, Document, truncate_ids
from tqinfer.cache.config import CacheConfig
from tqinfer.errors import ContextError
from tqinfer.llm import LLM
from tqinfer.sampling import SamplingParams

DOC = "The launch code of the blue rocket is 4417. " * 12


@pytest.fixture
def llm(tiny_hf_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TQINFER_CACHE", str(tmp_path / "cache"))
    folder = tiny_hf_folder("llama", tokenizer="bytes", max_position_embeddings=4096)
    cfg = CacheConfig(k_type="tq3.5", v_type="tq3", sinks=2, window=16, block_size=16)
    return LLM(str(folder), device="cpu", dtype="float32", cache=cfg, max_context=2048, prefill_chunk=64)


def answer(qa, question, how_expected):
    session, how = qa.open_session()
    assert how == how_expected
    with session:
        return "".join(ev.text for ev in qa.ask(session, question, SamplingParams.greedy(max_tokens=12, ignore_eos=True)))


def test_saved_documents_answer_like_an_uncached_run(llm):
    qa = DocumentQA(llm, [Document("a.txt", DOC)])
    first = answer(qa, "What is the code?", "prefilled")
    assert qa.cache_path.is_file()
    again = answer(qa, "What is the code?", "loaded")
    other = answer(qa, "Which rocket?", "loaded")  # a second question continues the same documents
    uncached = DocumentQA(llm, [Document("a.txt", DOC)], use_cache=False)
    assert answer(uncached, "What is the code?", "prefilled") == first == again
    assert answer(uncached, "Which rocket?", "loaded") == other  # private snapshot, removed on close
    uncached.close()


def test_another_key_centering_mode_has_its_own_prompt_cache(llm):
    """The centering mode is part of the cache identity: a run with another mode prefills its own
    file instead of finding (and refusing) the first one."""
    qa = DocumentQA(llm, [Document("a.txt", DOC)])
    auto_answer = answer(qa, "What is the code?", "prefilled")
    auto_path = qa.cache_path
    llm.set_cache(CacheConfig(k_type="tq3.5", v_type="tq3", sinks=2, window=16, block_size=16, center_keys="on"))
    on = DocumentQA(llm, [Document("a.txt", DOC)])
    assert on.cache_path != auto_path
    answer(on, "What is the code?", "prefilled")
    assert answer(on, "What is the code?", "loaded") and auto_path.is_file()
    llm.set_cache(CacheConfig(k_type="tq3.5", v_type="tq3", sinks=2, window=16, block_size=16))
    assert answer(DocumentQA(llm, [Document("a.txt", DOC)]), "What is the code?", "loaded") == auto_answer


def test_corrupt_prompt_cache_is_rebuilt_with_a_notice(llm):
    qa = DocumentQA(llm, [Document("a.txt", DOC)])
    expected = answer(qa, "What is the code?", "prefilled")
    data = bytearray(qa.cache_path.read_bytes())
    data[len(data) // 2] ^= 0x55
    qa.cache_path.write_bytes(bytes(data))
    notices = []
    session, how = qa.open_session(on_notice=notices.append)
    session.close()
    assert how == "prefilled" and "rebuilding" in notices[0]
    assert answer(qa, "What is the code?", "loaded") == expected


def test_too_long_document_names_its_tokens_the_context_and_the_flags(llm):
    long_doc = "lorem ipsum dolor sit amet " * 200  # ~5400 byte-level tokens
    with pytest.raises(ContextError) as e:
        DocumentQA(llm, [Document("long.txt", long_doc)])
    msg = str(e.value)
    assert "take" in msg and "context of 2048" in msg and "maximum context is 4096" in msg
    assert "--truncate" in msg
    qa = DocumentQA(llm, [Document("long.txt", long_doc)], truncate="middle")
    assert len(qa.prefix_ids) <= 2048 - 512 - 64


def test_truncate_modes():
    ids = list(range(10))
    assert truncate_ids(ids, 4, "head") == [0, 1, 2, 3]
    assert truncate_ids(ids, 4, "tail") == [6, 7, 8, 9]
    assert truncate_ids(ids, 4, "middle") == [0, 1, 8, 9]


def test_interactive_loop_through_a_pipe(tiny_hf_folder, tmp_path):
    folder = tiny_hf_folder("llama", tokenizer="bytes", max_position_embeddings=4096)
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    env = {"TQINFER_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tqinfer.cli", "ask", str(folder), "--doc", str(doc), "-n", "5", "--temp", "0",
         "--kv-cache", "tq4", "-c", "1024"],
        input="What is the code?\n\nWhich rocket?\n", capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("documents:") == 2
    assert "prefilled" in proc.stderr and "loaded" in proc.stderr  # the second question reuses the cache
    assert proc.stdout.count("\n") == 2
