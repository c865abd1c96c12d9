"""Text <-> token ids (tokenizer.json or tokenizer.model), chat templates, and streaming detokenization."""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from tqinfer.hub import ModelError


class StreamDecoder:
    """Turns a stream of token ids into text deltas that never end in a broken UTF-8 sequence.

    Decodes a short window of ids (the previous emitted tokens plus the new ones) so that
    context-dependent decoders (sentencepiece's leading space, byte fallback) see what they need.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window whose text was already emitted
        self._read = 0  # end of that window

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix :], self._skip)
        if text.endswith("\ufffd") or len(text) <= len(prefix_text) or not text.startswith(prefix_text):
            return ""  # an incomplete character (or nothing new): wait for more tokens
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back (e.g. invalid bytes at the end), as text."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix :], self._skip)
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text) :] if text.startswith(prefix_text) else text


class Tokenizer:
    """One model's tokenizer: ids, special tokens, chat template."""

    def __init__(self, backend, *, config: dict, bos_id: int | None, eos_ids: list[int],
                 chat_template: str | None, add_bos: bool, add_eos: bool):
        self._backend = backend
        self.config = config
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.vocab_size = backend.vocab_size
        self.bos_token = backend.id_to_token(bos_id) if bos_id is not None else None
        self.eos_token = backend.id_to_token(eos_ids[0]) if eos_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._backend.encode(text)
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids = [self.bos_id] + ids
            if self.add_eos and self.eos_ids:
                ids = ids + [self.eos_ids[0]]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            raise ModelError("this model has no chat template (tokenizer_config.json has no chat_template); "
                             "give a plain prompt instead of a chat")
        context = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            **{k: v for k, v in self.config.items() if k.endswith("_token") and isinstance(v, str)},
            **kwargs,
        }
        return render_chat_template(self.chat_template, messages, add_generation_prompt, **context)


# --------------------------------------------------------------------------------------------- backends


class _TokenizersBackend:
    """tokenizer.json through the `tokenizers` library; BOS/EOS are added by Tokenizer, not here."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ModelError(f"{path} is not a readable tokenizer.json ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_to_id(self, t: str) -> int | None:
        return self._tok.token_to_id(t)

    def prefix_suffix(self) -> tuple[list[int], list[int]]:
        """Ids the tokenizer.json's post-processor puts around a single sequence."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], full[start + len(plain) :]
        return [], []


class _SentencePieceBackend:
    """tokenizer.model through `sentencepiece`; special tokens in the text are matched whole."""

    def __init__(self, path: Path, added: dict[str, int]):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except Exception as e:
            raise ModelError(f"{path} is not a readable sentencepiece model ({e})") from None
        n = self._sp.GetPieceSize()
        specials = {self._sp.IdToPiece(i): i for i in range(n) if self._sp.IsControl(i) or self._sp.IsUnknown(i)}
        specials = {t: i for t, i in specials.items() if t}
        self._added = {**specials, **added}
        self._id_to_added = {i: t for t, i in self._added.items()}
        self.vocab_size = max([n - 1, *self._added.values()]) + 1
        pattern = "|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True))
        self._split = re.compile(f"({pattern})") if pattern else None

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return list(self._sp.EncodeAsIds(text))
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self._added[part])
            elif part:
                ids.extend(self._sp.EncodeAsIds(part))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out, run = [], []
        n = self._sp.GetPieceSize()
        for i in ids:
            if i in self._id_to_added and (i >= n or not self._sp.IsUnknown(i)):
                if run:
                    out.append(self._sp.DecodeIds(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self._id_to_added[i])
            else:
                run.append(i)
        if run:
            out.append(self._sp.DecodeIds(run))
        return "".join(out)

    def id_to_token(self, i: int) -> str | None:
        if i in self._id_to_added:
            return self._id_to_added[i]
        return self._sp.IdToPiece(i) if 0 <= i < self._sp.GetPieceSize() else None

    def token_to_id(self, t: str) -> int | None:
        if t in self._added:
            return self._added[t]
        i = self._sp.PieceToId(t)
        return None if i == self._sp.unk_id() and t != self._sp.IdToPiece(i) else i


# --------------------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path} is not valid JSON ({e})") from None


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _chat_template(folder: Path, tok_config: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def load_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer of an HF-style folder: tokenizer.json, else tokenizer.model."""
    folder = Path(folder)
    tok_config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    config = _read_json(folder / "config.json")
    gen_config = _read_json(folder / "generation_config.json")
    for key, value in special_map.items():
        tok_config.setdefault(key, value)
    tok_config = {k: (_token_text(v) if k.endswith("_token") and not k.startswith("add_") else v)
                  for k, v in tok_config.items()}

    if (folder / "tokenizer.json").is_file():
        backend = _TokenizersBackend(folder / "tokenizer.json")
        prefix, suffix = backend.prefix_suffix()
    elif (folder / "tokenizer.model").is_file():
        added = {
            _token_text(v): int(k)
            for k, v in (tok_config.get("added_tokens_decoder") or {}).items()
            if _token_text(v)
        }
        backend = _SentencePieceBackend(folder / "tokenizer.model", added)
        prefix, suffix = [], []
    else:
        raise ModelError(
            f"{folder} has no tokenizer: expected tokenizer.json or tokenizer.model next to config.json"
        )

    def token_id(name: str) -> int | None:
        text = tok_config.get(name)
        return backend.token_to_id(text) if text else None

    bos_id = gen_config.get("bos_token_id", config.get("bos_token_id"))
    if bos_id is None:
        bos_id = token_id("bos_token")
    if isinstance(bos_id, list):
        bos_id = bos_id[0] if bos_id else None
    eos_ids = _as_list(gen_config.get("eos_token_id")) + _as_list(config.get("eos_token_id"))
    eos_tok = token_id("eos_token")
    if eos_tok is not None:
        eos_ids.append(eos_tok)
    eos_ids = list(dict.fromkeys(eos_ids))

    # BOS/EOS: the explicit flags of tokenizer_config.json win, else what tokenizer.json's
    # post-processor does, else sentencepiece's convention (BOS yes, EOS no).
    if "add_bos_token" in tok_config:
        add_bos = bool(tok_config["add_bos_token"])
    elif isinstance(backend, _TokenizersBackend):
        add_bos = bos_id is not None and bos_id in prefix
    else:
        add_bos = True
    if "add_eos_token" in tok_config:
        add_eos = bool(tok_config["add_eos_token"])
    else:
        add_eos = bool(suffix) and bool(eos_ids) and eos_ids[0] in suffix
    return Tokenizer(backend, config=tok_config, bos_id=None if bos_id is None else int(bos_id),
                     eos_ids=eos_ids, chat_template=_chat_template(folder, tok_config),
                     add_bos=add_bos, add_eos=add_eos)


# ---------------------------------------------------------------------------------------- chat template


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: unlike jinja2's built-in, no HTML escaping and unicode kept as is
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_template(source: str):
    from jinja2 import ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **context) -> str:
    """Render a chat template the way transformers does (sandboxed jinja2, same globals and filters)."""
    from jinja2.exceptions import TemplateError

    try:
        return _compile_template(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **context
        )
    except TemplateError as e:
        raise ModelError(f"the model's chat template rejected the conversation: {e}") from None
