"""Tokenizers built from GGUF vocabularies, tokenizer.json / tokenizer.model backends, chat templates and
the streaming detokenizer, checked against transformers."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tqinfer.hub import ModelError
from tqinfer.tokenizer import load_tokenizer, render_chat_template

transformers = pytest.importorskip("transformers")

REAL_TEXT = """\
Apache License, Version 2.0, January 2004. TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION.
"License" shall mean the terms and conditions for use, reproduction, and distribution as defined by
Sections 1 through 9 of this document. Unless required by applicable law or agreed to in writing,
software distributed under the License is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR
CONDITIONS OF ANY KIND, either express or implied. See the License for the specific language governing
permissions and limitations under the License. Copyright (c) 2024-2026 The tqinfer authors; 3.14159 x 10^3.

def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    a, b = 0, 1
    out = []
    for _ in range(n):
        out.append(a)
        a, b = b, a + b  # 0, 1, 1, 2, 3, 5, 8, 13, 21, 34
    return out

if __name__ == "__main__":
\tprint({"key": [1, 2.5, None, True]}, end="\\n")   # tabs, escapes, trailing spaces   

#include <stdio.h>
int main(void) { printf("%d\\n", 42); return 0; }   // C code: x->y && z != 0 || w <= 1e-9

Le café déjà vu était naïf ; l'œuvre coûte 12 € — « très cher ». Ünïcödé: Straße, Æsir, Ωμέγα, Привет мир!
中文测试：你好，世界！今天天气很好，我们去公园散步吧。日本語のテキスト：こんにちは、カタカナ、漢字。한국어 문장입니다.
العربية: مرحبا بالعالم. हिन्दी: नमस्ते दुनिया। ไทย: สวัสดีชาวโลก
Emoji: 😀😃😄 👍🏽 🇫🇷🇯🇵 👨‍👩‍👧‍👦 ❤️ 🧑🏿‍💻 ✨🚀 — mixed with text😅and no spaces🎉!
Whitespace:  two  spaces,\tTab,\r\nCRLF line, trailing   
\n\n\nthree newlines above; don't, won't, I'll, they've, we'd, it's, you're, I'm.
URLs: https://example.com/path?q=1&r=%20#frag, emails: someone@example.org, hashes: b179c9523d0e6a0f98a3.
Math: ∑_{i=1}^{n} i² = n(n+1)(2n+1)/6, ∀x∈ℝ: x²≥0, ∞ ≠ −∞, ½ ¾ ⅞.
"""

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 日本の首都は？ 🗾"},
]


@pytest.fixture(scope="module")
def ours(default_model_files):
    return load_tokenizer(default_model_files.folder)


@pytest.fixture(scope="module")
def reference(default_gguf):
    """transformers' tokenizer built from the same GGUF file."""
    return transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


@pytest.fixture(scope="module")
def smollm_reference(reference):
    """transformers' GGUF tokenizer with SmolLM's own pre-tokenizer (Digits one by one, then GPT-2's)."""
    from tokenizers import pre_tokenizers

    smollm = copy.deepcopy(reference)
    smollm.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return smollm


def test_gguf_ids_match_transformers_on_real_text(ours, reference, smollm_reference):
    """Equal to transformers' GGUF tokenizer once it uses SmolLM's own pre-tokenizer.

    GGUF names SmolLM's pre-tokenizer `smollm`: llama.cpp (and SmolLM's tokenizer.json) isolate every
    \\p{N} character before GPT-2's split. transformers' GGUF loader ignores the name and uses GPT-2's
    split alone, which differs only around numerals (the whitespace before a digit, numerals after a
    space: "\\n\\n  0." or " ½")."""
    smollm = smollm_reference
    assert len(REAL_TEXT.encode()) > 2000
    got = ours.encode(REAL_TEXT)
    assert got == smollm.encode(REAL_TEXT)
    assert len(got) > 500
    for line in REAL_TEXT.splitlines(keepends=True):
        assert ours.encode(line) == smollm.encode(line), line
        if not any(c.isnumeric() for c in line):
            assert ours.encode(line) == reference.encode(line), line  # plain transformers agrees here
    # the one known difference, llama.cpp's behaviour: a numeral is never merged with the space before it
    assert [ours.decode([i]) for i in ours.encode("x ½")] == ["x", " ", "½"]
    assert ours.encode("x ½") != reference.encode("x ½")
    assert [ours.decode([i]) for i in ours.encode("S\n\n  0.")] == ["S", "\n\n  ", "0", "."]


def test_ids_match_transformers_on_the_license_corpus(ours, smollm_reference):
    """The evaluation corpus (about 60 kB of license texts, ASCII apart from a few symbols)."""
    path = Path(__file__).parents[1] / "data" / "eval" / "license_texts.txt"
    if not path.is_file():
        pytest.skip("data/eval/license_texts.txt is not in this checkout")
    text = path.read_text(encoding="utf-8")
    ids = ours.encode(text)
    assert len(ids) > 10_000
    assert ids == smollm_reference.encode(text)
    assert ours.decode(ids) == text


def test_special_tokens_match_transformers(ours, reference):
    text = "<|im_start|>user\nhello<|im_end|>\n<|endoftext|>"
    assert ours.encode(text) == reference.encode(text)
    assert ours.encode(text)[0] == reference.convert_tokens_to_ids("<|im_start|>") == 1
    assert ours.bos_id == 1 and ours.eos_ids == [2] and ours.vocab_size == 49152
    assert ours.encode("hi")[0] != ours.bos_id  # SmolLM2's GGUF says add_bos_token = false
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == "user\nhello\n"
    assert ours.decode(ours.encode(text)) == reference.decode(reference.encode(text))


def test_round_trip_real_text(ours):
    for chunk in (REAL_TEXT, *REAL_TEXT.splitlines(keepends=True), "", " ", "\n", "  x  "):
        assert ours.decode(ours.encode(chunk)) == chunk


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Cn")), max_size=60))
def test_round_trip_any_text(ours, text):
    # (SmolLM's vocabulary lacks a few bytes -- some C0 controls and the UTF-8 lead bytes of the
    # unassigned planes 4-11 -- so those cannot round trip in any implementation)
    assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_ids_match_transformers_on_any_text(ours, smollm_reference, text):
    assert ours.encode(text) == smollm_reference.encode(text)


def _stream(tok, ids):
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    return pieces


def test_stream_decoder_equals_full_decode(ours):
    ids = ours.encode(REAL_TEXT)
    pieces = _stream(ours, ids)
    assert "".join(pieces) == ours.decode(ids)
    assert not any("\ufffd" in p for p in pieces)  # never a broken character
    # characters split over several byte tokens come out whole, each once, as soon as complete
    assert len(ours.encode("😅")) == 3
    assert _stream(ours, ours.encode("😅")) == ["", "", "😅", ""]
    assert [p for p in _stream(ours, ours.encode("🧑🏿‍💻")) if p] == ["🧑", "🏿", "\u200d", "💻"]
    assert [p for p in _stream(ours, ours.encode("中文测试")) if p] == ["中", "文", "测", "试"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(min_value=17, max_value=49151), max_size=40))
def test_stream_decoder_equals_full_decode_on_random_ids(ours, ids):
    # random ids include lone UTF-8 continuation bytes and cut multibyte sequences
    assert "".join(_stream(ours, ids)) == ours.decode(ids)


def test_chat_template_matches_transformers(ours, reference):
    for messages in (CONVERSATION, CONVERSATION[1:]):
        for gen in (True, False):
            expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
    text = ours.apply_chat_template(CONVERSATION)
    assert text.endswith("<|im_start|>assistant\n") and "You are a terse assistant" in text
    assert "SmolLM" in ours.apply_chat_template(CONVERSATION[1:])  # the template's default system prompt
    assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)


FANCY_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set rest = messages[1:] %}
{%- else %}{% set sys = 'default' %}{% set rest = messages %}{% endif %}
<<{{ sys }}>>
{% for m in rest %}
  {% if m['role'] == 'tool' %}{% continue %}{% endif %}
  {% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}
  [{{ m['role'] | upper }}] {{ m['content'] | trim }} {{ m | tojson }}
  {% if loop.index > 5 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}[ASSISTANT]{{ bos_token }}{% endif %}
"""


def test_jinja_environment_matches_transformers(tiny_hf_folder):
    folder = tiny_hf_folder("llama", tokenizer="bytes")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = FANCY_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = load_tokenizer(folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    messages = [{"role": "system", "content": "Be <b>kind</b> & brief"},
                {"role": "user", "content": "  héllo \"quoted\" 😀  "}, {"role": "tool", "content": "x"},
                {"role": "assistant", "content": "ok"}]
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected
    assert '"content": "  héllo \\"quoted\\" 😀  "' in expected  # tojson keeps unicode, no HTML escaping
    with pytest.raises(ModelError, match="bad role robot"):
        ours.apply_chat_template([{"role": "robot", "content": "x"}])


def test_strftime_now_and_sandbox():
    out = render_chat_template("{{ strftime_now('%Y') }}", [], True)
    assert out.isdigit() and len(out) == 4
    with pytest.raises(ModelError):  # the sandbox refuses attribute access to internals
        render_chat_template("{{ messages.__class__.__mro__[1].__subclasses__() }}", [], True)


def test_bos_eos_from_configs(tiny_hf_folder):
    folder = tiny_hf_folder("llama", tokenizer="bytes")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert tok.eos_ids == [2, 0]
    assert tok.bos_id == 1
    assert tok.encode("hi") == [1] + tok.encode("hi", add_special_tokens=False)
    assert tok.encode("hi", add_special_tokens=False) == ref.encode("hi", add_special_tokens=False)


def test_missing_tokenizer_is_a_clear_error(tmp_path, tiny_hf_folder):
    folder = tiny_hf_folder("llama", tokenizer=None)
    with pytest.raises(ModelError, match="has no tokenizer: expected tokenizer.json or tokenizer.model"):
        load_tokenizer(folder)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="not a readable tokenizer.json"):
        load_tokenizer(folder)


# ---------------------------------------------------------------------------- sentencepiece (llama SPM)

SPM_CORPUS = (REAL_TEXT.replace("\t", " ") + "\n") * 3


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A small sentencepiece BPE model with byte fallback, trained on the text above."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text(SPM_CORPUS)
    spm.SentencePieceTrainer.Train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=700, model_type="bpe", hard_vocab_limit=False,
        byte_fallback=True, character_coverage=0.98, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, minloglevel=2)
    return folder / "tokenizer.model"


def test_sentencepiece_backend(spm_model, tmp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    folder = tmp_path / "spm-folder"
    folder.mkdir()
    shutil.copy(spm_model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}"}))
    tok = load_tokenizer(folder)
    text = "The License 2024 — 中文 😀 ok"
    assert tok.encode(text) == [1] + sp.encode(text)  # BOS by sentencepiece convention
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    ids = tok.encode(REAL_TEXT, add_special_tokens=False)
    assert "".join(_stream(tok, ids)) == tok.decode(ids) == sp.decode(ids)
    assert tok.encode("</s>x", add_special_tokens=False)[0] == 2  # special tokens in text stay whole


def test_gguf_llama_spm_vocab_matches_sentencepiece(spm_model, tmp_path):
    """A llama-style (SPM) GGUF vocabulary turned into a tokenizers BPE gives sentencepiece's ids."""
    import sentencepiece as spm
    from tokenizers import Tokenizer as HFTokenizer

    from tqinfer.gguf_vocab import gguf_tokenizer_files

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    n = sp.get_piece_size()
    types = []
    for i in range(n):
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    meta = {
        "general.architecture": "llama", "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
    }
    files = gguf_tokenizer_files(meta)
    tok = HFTokenizer.from_str(files["tokenizer.json"])
    assert json.loads(files["tokenizer_config.json"])["add_bos_token"] is True
    texts = [*REAL_TEXT.splitlines(), "The License 2024 — 中文 😀 ok", "hello world", "  two leading spaces"]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text
    assert tok.encode("hi").ids[0] == 1


def test_converted_folder_loads_in_transformers(default_model_files, ours):
    """The tokenizer.json / tokenizer_config.json written from the GGUF are a valid HF tokenizer."""
    hf = transformers.AutoTokenizer.from_pretrained(str(default_model_files.folder))
    assert hf.encode(REAL_TEXT) == ours.encode(REAL_TEXT)
    assert hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(CONVERSATION)
    assert hf.eos_token == "<|im_end|>" and hf.bos_token_id == ours.bos_id


def test_tiny_folder_with_default_tokenizer(tiny_hf_folder, ours):
    folder = tiny_hf_folder("qwen2")
    tok = load_tokenizer(folder)
    assert tok.encode(REAL_TEXT) == ours.encode(REAL_TEXT)
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == tok.vocab_size == 49152
