"""Questions over long documents: the documents' compressed cache is prefilled once, saved to disk,
and every question continues from it (loaded in a fraction of the prefill time)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqinfer.cache.store import CacheFileError, read_header
from tqinfer.errors import ContextError
from tqinfer.llm import LLM, StreamEvent
from tqinfer.sampling import SamplingParams

PLACEHOLDER = "\x00QUESTION\x00"
INSTRUCTION = "Answer the question using the documents below.\n\n"


def prompt_cache_dir() -> Path:
    from tqinfer.hub import cache_dir

    return cache_dir() / "prompts"


@dataclass
class Document:
    name: str
    text: str


def read_documents(paths: list[str], stdin=None) -> list[Document]:
    docs = []
    for p in paths:
        if p == "-":
            docs.append(Document("stdin", (stdin.read() if stdin else "")))
            continue
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"document {p} not found")
        try:
            docs.append(Document(path.name, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError as e:
            raise ValueError(f"{p} is not UTF-8 text ({e}); tqinfer ask reads text and markdown files") from e
    if not docs:
        raise ValueError("no documents: give --doc FILE (or --doc - for stdin)")
    return docs


def truncate_ids(ids: list[int], keep: int, mode: str) -> list[int]:
    if len(ids) <= keep:
        return ids
    if mode == "head":  # keep the beginning
        return ids[:keep]
    if mode == "tail":
        return ids[len(ids) - keep:]
    if mode == "middle":  # keep both ends, drop the middle
        return ids[: keep // 2] + ids[len(ids) - (keep - keep // 2):]
    raise ValueError(f"--truncate must be head, tail or middle, got {mode!r}")


class DocumentQA:
    """LLM + documents -> answers; the documents' session is cached on disk keyed by everything
    that shapes it (weights, cache setup, token ids, tqinfer version)."""

    def __init__(self, llm: LLM, documents: list[Document], *, use_cache: bool = True,
                 truncate: str | None = None, answer_room: int = 512):
        self.llm, self.use_cache = llm, use_cache
        body = "".join(f"<document name=\"{d.name}\">\n{d.text.strip()}\n</document>\n\n" for d in documents)
        rendered = llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": INSTRUCTION + body + "Question: " + PLACEHOLDER}], add_generation_prompt=True)
        head, tail = rendered.split(PLACEHOLDER)
        ids = llm.tokenizer.encode(head, add_special_tokens=False)
        bos = llm.tokenizer.bos_id
        if bos is not None and llm.tokenizer.encode("x")[:1] == [bos] and ids[:1] != [bos]:
            ids = [bos] + ids
        self.tail = tail
        answer_room = min(answer_room, llm.max_context // 4)
        room = llm.max_context - answer_room - min(64, llm.max_context // 16)  # room for question + answer
        if len(ids) > room:
            if truncate is None:
                raise ContextError(self._too_long(len(ids), room))
            ids = truncate_ids(ids, room, truncate)
        self.prefix_ids = ids
        self._scratch: Path | None = None

    def _too_long(self, n: int, room: int) -> str:
        limit = self.llm.args.max_position_embeddings
        msg = (f"the documents take {n} tokens but the context of {self.llm.max_context} leaves room for "
               f"{room} (the model's maximum context is {limit})")
        if n + self.llm.max_context - room <= limit:
            msg += f"; run with -c {min(limit, n + self.llm.max_context - room + 64)} to fit them"
            msg += " (tqinfer estimate -c N shows the memory; a smaller -ctk/-ctv type fits more when memory is the limit)"
        else:
            msg += "; that is more than the model can read: use --truncate head|tail|middle or fewer documents"
        return msg

    @property
    def cache_path(self) -> Path:
        """The prompt cache file; with use_cache=False a private snapshot removed by close()."""
        key = json.dumps({**self.llm.cache_identity(), "ids": self.prefix_ids}, sort_keys=True)
        name = hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors"
        if self.use_cache:
            return prompt_cache_dir() / name
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="tqinfer-ask-"))
        return self._scratch / name

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def open_session(self, on_progress: Callable[[int, int, float], None] | None = None,
                     on_notice: Callable[[str], None] | None = None):
        """A session holding the documents: loaded from the prompt cache when valid, else prefilled
        (and saved). Returns (session, how: "loaded" | "prefilled")."""
        path = self.cache_path
        if path.is_file():
            try:
                return self.llm.load_session(path), "loaded"
            except CacheFileError as e:
                if on_notice:
                    on_notice(f"prompt cache {path.name} is unusable ({e}); rebuilding it")
                path.unlink(missing_ok=True)
        s = self.llm.session()
        t0 = time.perf_counter()
        try:
            s.append(self.prefix_ids,
                     on_chunk=(lambda done, total: on_progress(done, total, time.perf_counter() - t0)) if on_progress else None)
            s.save(path, kind="documents")  # each question starts again from exactly this state
        except BaseException:
            s.close()
            raise
        return s, "prefilled"

    def question_ids(self, question: str) -> list[int]:
        return self.prefix_ids + self.llm.tokenizer.encode(question.strip() + self.tail, add_special_tokens=False)

    def ask(self, session, question: str, params: SamplingParams | None = None, cancel=None) -> Iterator[StreamEvent]:
        """Stream the answer to one question, continuing the documents' session."""
        ids = self.question_ids(question)
        if len(ids) >= self.llm.max_context:
            raise ContextError(f"the question does not fit: {len(ids)} tokens with the documents, context "
                               f"{self.llm.max_context}")
        return session.stream(ids, params or SamplingParams(), cancel)


def list_prompt_caches() -> list[tuple[Path, dict]]:
    rows = []
    for p in sorted(prompt_cache_dir().glob("*.safetensors")):
        try:
            rows.append((p, read_header(p)))
        except CacheFileError as e:
            rows.append((p, {"error": str(e)}))
    return rows


def clear_prompt_caches() -> int:
    n = 0
    for p in prompt_cache_dir().glob("*.safetensors*"):
        p.unlink()
        n += 1
    return n
