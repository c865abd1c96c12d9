"""GGUF vocabularies -> `tokenizers` tokenizers (gpt2-style byte-level BPE, llama SPM) and tokenizer_config.

A GGUF stores only a pre-tokenizer *name* (`tokenizer.ggml.pre`); the table below maps the names to
the split rules llama.cpp applies for them.
"""

from __future__ import annotations

import json
import warnings

from tqinfer.hub import ModelError


# Pre-tokenizer split regexes by `tokenizer.ggml.pre` (llama.cpp's llama-vocab.cpp names).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# name -> (split regex or None for GPT-2's built-in ByteLevel regex, digits one by one first,
#          ignore_merges: whole words in the vocabulary are taken as is, as llama.cpp does for llama3)
PRE_TOKENIZERS: dict[str, tuple[str | None, bool, bool]] = {
    "default": (None, False, False),
    "gpt2": (None, False, False),
    "smollm": (None, True, False),  # SmolLM's tokenizer.json: Digits(individual) + ByteLevel
    "starcoder": (None, True, False),
    "refact": (None, True, False),
    "llama3": (_LLAMA3_SPLIT, False, True),
    "llama-v3": (_LLAMA3_SPLIT, False, True),
    "llama-bpe": (_LLAMA3_SPLIT, False, True),
    "smaug-bpe": (_LLAMA3_SPLIT, False, False),
    "falcon3": (_LLAMA3_SPLIT, False, False),
    "pixtral": (_LLAMA3_SPLIT, False, False),
    "dbrx": (_LLAMA3_SPLIT, False, False),
    "qwen2": (_QWEN2_SPLIT, False, False),
    "deepseek-r1-qwen": (_QWEN2_SPLIT, False, False),
    "megrez": (_QWEN2_SPLIT, False, False),
    "tekken": (_TEKKEN_SPLIT, False, False),
    "gpt-4o": (_GPT4O_SPLIT, False, False),
    "llama4": (_GPT4O_SPLIT, False, False),
}

_CONTROL, _USER_DEFINED = 3, 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_gguf_tokenizer(meta: dict):
    """A `tokenizers.Tokenizer` equivalent to the GGUF's vocabulary (gpt2 BPE or llama SPM)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelError("GGUF has no tokenizer (no tokenizer.ggml.tokens in its metadata)")
    if kind == "gpt2":
        tok = _byte_level_bpe(meta, tokens)
    elif kind == "llama":
        tok = _sentencepiece_bpe(meta, tokens)
    else:
        raise ModelError(f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2 (BPE), llama (SPM)")
    _add_special_tokens(tok, meta, tokens, byte_level=kind == "gpt2")
    _set_post_processor(tok, meta, tokens, add_bos_default=kind == "llama")
    return tok


def _byte_level_bpe(meta: dict, tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, t in enumerate(tokens):
        t = t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
        vocab.setdefault(t, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        warnings.warn(
            f"GGUF pre-tokenizer {pre!r} is unknown to tqinfer; using GPT-2's, token ids may differ", stacklevel=3
        )
    split, digits, ignore_merges = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
    steps = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(tokens: list[str], scores: list[float], normal: set[str]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two tokens,
    ranked by the merged token's score (best first), as sentencepiece's BPE applies them."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece in normal:
        score = scores[vocab[piece]]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_bpe(meta: dict, tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    normal = {t for t, ty in zip(tokens, types) if ty == 1}
    merges = spm_merges(tokens, scores, normal)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=True)
    )
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Replace(" ", "▁")]
    if add_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def _add_special_tokens(tok, meta: dict, tokens: list[str], byte_level: bool) -> None:
    from tokenizers import AddedToken

    types = meta.get("tokenizer.ggml.token_type") or []
    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    special = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types)
        if ty == _CONTROL and (alphabet is None or set(t) <= alphabet) and t
    ]
    if special:
        tok.add_special_tokens(special)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if user:
        tok.add_tokens(user)


def _set_post_processor(tok, meta: dict, tokens: list[str], add_bos_default: bool) -> None:
    from tokenizers import processors

    add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos_default)
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    pieces, specials = [], []
    if add_bos and bos is not None:
        pieces.append(tokens[bos])
        specials.append((tokens[bos], int(bos)))
    single = pieces + ["$A"]
    pair = pieces + ["$A"] + pieces + ["$B"]
    if add_eos and eos is not None:
        single.append(tokens[eos])
        pair.insert(pair.index("$B"), tokens[eos])
        pair.append(tokens[eos])
        specials.append((tokens[eos], int(eos)))
    if specials:
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair), special_tokens=list(dict.fromkeys(specials))
        )


def gguf_tokenizer_files(meta: dict) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json contents for a GGUF's metadata."""
    hf_json = meta.get("tokenizer.huggingface.json")
    tok_json = hf_json if hf_json else build_gguf_tokenizer(meta).to_str(pretty=False)
    tokens = meta.get("tokenizer.ggml.tokens") or []
    kind = meta.get("tokenizer.ggml.model")
    cfg: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    arch = meta.get("general.architecture")
    ctx = meta.get(f"{arch}.context_length")
    if ctx:
        cfg["model_max_length"] = int(ctx)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        idx = meta.get(f"tokenizer.ggml.{key}")
        if idx is not None and 0 <= idx < len(tokens):
            cfg[name] = tokens[idx]
    template = meta.get("tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return {"tokenizer.json": tok_json, "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"}
