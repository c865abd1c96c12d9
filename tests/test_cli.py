"""The CLI at its boundary: bad input gives one clear message, no traceback, a non-zero exit."""

from __future__ import annotations

import json
import shutil

import pytest

from tqinfer.cli import main


def run(capsys, *argv):
    capsys.readouterr()  # drop what building the fixtures printed
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_clear(code, err, *needles):
    assert code == 1
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)


def test_run_streams_a_completion(tiny_hf_folder, capsys):
    folder = tiny_hf_folder("llama", tokenizer="bytes")
    code, out, err = run(capsys, "run", str(folder), "-p", "hello", "-n", "5", "--temp", "0", "-v")
    assert code == 0 and len(out) > 0
    assert "eval count:           5 token(s)" in err and "prompt eval rate" in err


def test_missing_config(tiny_hf_folder, capsys):
    folder = tiny_hf_folder("llama", tokenizer="bytes")
    (folder / "config.json").unlink()
    code, _, err = run(capsys, "run", str(folder), "-p", "hi")
    assert_clear(code, err, "config.json")


def test_truncated_safetensors(tiny_hf_folder, capsys):
    folder = tiny_hf_folder("llama", tokenizer="bytes")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "run", str(folder), "-p", "hi")
    assert_clear(code, err, "truncated")


def test_gguf_with_bad_magic_and_truncated(tiny_gguf, isolated_cache, tmp_path, capsys):
    path, _ = tiny_gguf("llama")
    bad = tmp_path / "bad.gguf"
    data = bytearray(path.read_bytes())
    bad.write_bytes(b"NOPE" + bytes(data[4:]))
    code, _, err = run(capsys, "run", str(bad), "-p", "hi")
    assert_clear(code, err, "bad.gguf")
    short = tmp_path / "short.gguf"
    short.write_bytes(bytes(data[: len(data) // 3]))
    code, _, err = run(capsys, "run", str(short), "-p", "hi")
    assert_clear(code, err, "short.gguf")


def test_unknown_architecture(tiny_hf_folder, capsys):
    folder = tiny_hf_folder("llama", tokenizer="bytes")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "run", str(folder), "-p", "hi")
    assert_clear(code, err, "mamba", "llama, mistral, qwen2, qwen3")


def test_missing_tokenizer(tiny_hf_folder, capsys):
    folder = tiny_hf_folder("llama", tokenizer=None)
    code, _, err = run(capsys, "run", str(folder), "-p", "hi")
    assert_clear(code, err, "tokenizer")


def test_prompt_longer_than_the_context(tiny_hf_folder, capsys):
    folder = tiny_hf_folder("llama", tokenizer="bytes")
    code, _, err = run(capsys, "run", str(folder), "-p", "x" * 300, "-c", "128")
    assert_clear(code, err, "context holds 128")


def test_unknown_cache_type_names_the_valid_ones(tiny_hf_folder, capsys):
    folder = tiny_hf_folder("llama", tokenizer="bytes")
    code, _, err = run(capsys, "run", str(folder), "-p", "hi", "-ctk", "tq9")
    assert_clear(code, err, "tq9", "tq3.5", "bf16")


def test_batch_size_sets_the_prefill_chunk(tiny_hf_folder, capsys):
    from tqinfer.cli import build_parser, llm_from_args

    folder = tiny_hf_folder("llama", tokenizer="bytes")
    args = build_parser().parse_args(["run", str(folder), "-b", "16", "--device", "cpu", "-c", "64"])
    assert llm_from_args(args).prefill_chunk == 16
    args = build_parser().parse_args(["run", str(folder), "--device", "cpu", "-c", "64"])
    assert llm_from_args(args).prefill_chunk == 512  # the CPU's default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", str(folder), "-b", "0"])
    assert "must be at least 1" in capsys.readouterr().err
    # the memory plan follows it: a larger chunk needs more activation memory
    acts = []
    for b in ("64", "4096"):
        code, out, _ = run(capsys, "estimate", str(folder), "-c", "256", "--device", "cpu", "--memory", "4", "-b", b)
        assert code == 0
        line = next(line for line in out.splitlines() if line.startswith("activations"))
        acts.append(float(line.split()[1].replace(",", "")))
    assert acts[0] < acts[1]
