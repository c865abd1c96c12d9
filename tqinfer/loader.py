"""Weights -> tensors: the safetensors (single or sharded) of an HF-style folder, with HF parameter names."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tqinfer.hub import ModelError, ModelFiles, format_bytes, progress_steps


@dataclass
class LoadedWeights:
    config: dict  # HF config.json
    tensors: dict[str, torch.Tensor]  # HF parameter names, on CPU, in the requested dtype
    generation_config: dict = field(default_factory=dict)


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelError(
            f"{folder} has no config.json: a model folder needs config.json, *.safetensors and tokenizer files"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelError(f"{path} is not valid JSON ({e})") from None
    if "text_config" in config and "hidden_size" not in config:
        # multimodal wrappers (e.g. Gemma3ForConditionalGeneration): the language model's config
        config = {**config["text_config"], "architectures": config.get("architectures", [])}
    return config


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder, in index order for sharded checkpoints."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelError(f"{index} is not a valid safetensors index ({e})") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise ModelError(f"{folder} is missing shard(s) listed in its index: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} has no *.safetensors weights")
    return files


def check_safetensors(path: Path) -> dict:
    """The header of a safetensors file; ModelError if it is corrupt or shorter than its header says."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{path.name} is truncated: expected at least 8 bytes, found {size} ({path})")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000 or 8 + n > size:
            if n > 100_000_000:
                raise ModelError(f"{path} is not a safetensors file (header length {n} is implausible)")
            raise ModelError(
                f"{path.name} is truncated: expected at least {format_bytes(8 + n)} for its header, "
                f"found {format_bytes(size)} ({path}); download it again"
            )
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ModelError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise ModelError(
            f"{path.name} is truncated: expected {format_bytes(expected)}, found {format_bytes(size)} "
            f"({path}); download it again"
        )
    return header


def load_weights(files: ModelFiles, dtype: torch.dtype, progress: bool = True) -> LoadedWeights:
    """All parameters of the model in `files.folder` as CPU tensors of `dtype` (floating ones only)."""
    from safetensors import safe_open

    folder = Path(files.folder)
    config = read_config(folder)
    gen_path = folder / "generation_config.json"
    generation_config = {}
    if gen_path.is_file():
        try:
            generation_config = json.loads(gen_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ModelError(f"{gen_path} is not valid JSON ({e})") from None
    paths = safetensors_files(folder)
    headers = {p: check_safetensors(p) for p in paths}
    total = sum(len([k for k in h if k != "__metadata__"]) for h in headers.values())
    tensors: dict[str, torch.Tensor] = {}
    with progress_steps(f"Loading {files.name}", total=total, enabled=progress) as advance:
        for path in paths:
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in f.keys():
                        t = f.get_tensor(name)
                        if t.is_floating_point() and t.dtype != dtype:
                            t = t.to(dtype)
                        tensors[_strip_prefix(name)] = t
                        advance()
            except ModelError:
                raise
            except Exception as e:
                raise ModelError(f"{path} cannot be read as safetensors ({e})") from None
    _tie_embeddings(config, tensors, folder)
    return LoadedWeights(config=config, tensors=tensors, generation_config=generation_config)


def _strip_prefix(name: str) -> str:
    # multimodal checkpoints keep the language model under a prefix
    for prefix in ("model.language_model.", "language_model.model.", "language_model."):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return rest if rest.startswith(("model.", "lm_head.")) else "model." + rest
    return name


def _tie_embeddings(config: dict, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    if "lm_head.weight" in tensors:
        return
    if "model.embed_tokens.weight" not in tensors:
        raise ModelError(f"{folder}: the weights have no model.embed_tokens.weight")
    if config.get("tie_word_embeddings") is False:
        raise ModelError(f"{folder}: config says tie_word_embeddings=false but the weights have no lm_head.weight")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
