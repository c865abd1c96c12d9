"""Save and load one sequence's cache: safetensors tensors + JSON metadata with a payload checksum.

Per layer: the sequence's records (or dense K/V) in token order, its full-precision sinks + window
buffer, and the data-dependent state chosen from the first prefill chunk: the codecs' outlier channels
and, with key centering, the center the stored keys are relative to (`{layer}.k_center`); rotations
are rebuilt from the seed. A file saved with one centering mode (auto / on / off) is refused by a
cache with another (header field "center_keys"; files from before it existed count as off).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tqinfer.cache.config import center_mode
from tqinfer.cache.paged import flat_slots, read_tokens, write_dense
from tqinfer.errors import TqinferError
from tqinfer.quant.packing import plane_bytes, swap3
from tqinfer.quant.turboquant import mse_parts

FORMAT = "tqinfer-session-2"
FORMAT_1 = "tqinfer-session-1"  # the 1-bit plane of 3-bit codes in plain bit order (code j at bit j % 8): converted
READS = (FORMAT, FORMAT_1)


class CacheFileError(TqinferError):
    """A saved cache that is corrupt, truncated or of another format."""


class CacheMismatch(TqinferError):
    """A saved cache made by another model or cache configuration."""


def payload_checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_sequence(cache, slot: int, tokens: list[int], path: str | Path, meta: dict) -> None:
    """Write sequence `slot` of a PagedCache or DenseCache to `path` atomically."""
    n = len(tokens)
    tensors: dict[str, torch.Tensor] = {"tokens": torch.tensor(tokens, dtype=torch.int64)}
    if cache.kind == "dense":
        for layer, (k, v) in enumerate(zip(cache.k, cache.v)):
            tensors[f"{layer}.k"] = k[slot, :, :n].cpu().contiguous()
            tensors[f"{layer}.v"] = v[slot, :, :n].cpu().contiguous()
        compressed = 0
    else:
        flat = flat_slots(cache.block_table[slot], torch.arange(n, device=cache.device), cache.block_size)
        for layer in range(cache.args.num_hidden_layers):
            tensors[f"{layer}.k"] = read_tokens(cache.k_pool[layer], flat, cache.block_size).cpu().contiguous()
            tensors[f"{layer}.v"] = read_tokens(cache.v_pool[layer], flat, cache.block_size).cpu().contiguous()
            if cache.k_hot[layer] is not None:
                tensors[f"{layer}.k_hot"] = cache.k_hot[layer][slot].cpu().contiguous()
                tensors[f"{layer}.v_hot"] = cache.v_hot[layer][slot].cpu().contiguous()
            for which, codec in (("k", cache.k_codec[layer]), ("v", cache.v_codec[layer])):
                for key, value in (codec.state_dict() if codec is not None else {}).items():
                    tensors[f"{layer}.{which}_codec.{key}"] = value.cpu().contiguous()
            if cache.k_center[layer] is not None:
                tensors[f"{layer}.k_center"] = cache.k_center[layer].cpu().contiguous()
        compressed = cache.compressed[slot]
        meta = {**meta, "center_keys": cache.config.center_keys}
    header = {"format": FORMAT, "compressed": compressed, "tokens": n, **meta,
              "checksum": payload_checksum(tensors)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"tqinfer": json.dumps(header, sort_keys=True)})
    os.replace(tmp, path)


def read_header(path: str | Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CacheFileError(f"{path} is not a readable tqinfer cache file ({e})") from e
    if "tqinfer" not in meta:
        raise CacheFileError(f"{path} has no tqinfer metadata")
    header = json.loads(meta["tqinfer"])
    if header.get("format") not in READS:
        raise CacheFileError(f"{path} is format {header.get('format')!r}, this tqinfer reads "
                             + " and ".join(repr(f) for f in READS))
    return header


def _format1_records(codec, rec: torch.Tensor) -> torch.Tensor:
    """Records [..., record_bytes] of a format-1 file in this format: the 1-bit plane of each 3-bit
    TurboQuant part had its bits in plain order, now in packing.PERM3's (swap3 is its own inverse)."""
    try:
        parts = mse_parts(codec)
    except NotImplementedError:  # not TurboQuant: the registry's other types have no 3-bit codes (polar: 4/2/2/2)
        return rec
    rec = rec.clone()
    for p in parts:
        if p.quantizer.bits == 3:
            lo = p.planes + plane_bytes(p.quantizer.dim, 2)  # after the 2-bit plane (a part of 10 codes: 3 bytes)
            hi = lo + plane_bytes(p.quantizer.dim, 1)
            rec[..., lo:hi] = swap3(rec[..., lo:hi].int()).to(torch.uint8)
    return rec


def check_header(header: dict, expected: dict, path) -> None:
    """Refuse a file whose model or cache configuration differs, naming what differs."""
    diffs = [f"{k}: file has {header.get(k)!r}, this run has {v!r}" for k, v in expected.items() if header.get(k) != v]
    if diffs:
        raise CacheMismatch(f"{path} was saved with another setup; " + "; ".join(diffs))


def _check_key_centers(cache, slot: int, tensors: dict, header: dict, path) -> None:
    """Before anything is loaded: the file and the cache agree on key centering, the file holds a key
    center per centered layer, and where other sequences share the cache, it is the center they use."""
    saved_mode = center_mode(header.get("center_keys", "off"))  # (absent: saved before centering existed)
    check_header({"center_keys": saved_mode}, {"center_keys": cache.config.center_keys}, path)
    others = any(cache.lens[s] for s in range(cache.max_seqs) if s != slot)
    for layer, center in enumerate(cache.k_center):
        if center is None:
            continue
        saved = tensors.get(f"{layer}.k_center")
        if saved is None or saved.shape != center.shape or saved.dtype != center.dtype:
            raise CacheFileError(f"{path}: layer {layer} lacks its key center (float32 "
                                 f"{list(center.shape)}) though it was saved with key centering")
        if others and cache.calibrated[layer] and not torch.equal(center.cpu(), saved):
            raise CacheMismatch(
                f"{path}: layer {layer}'s keys are centered on another point than the sequences now in "
                "the cache; close the other sessions first")


def load_sequence(cache, slot: int, path: str | Path, expected: dict) -> list[int]:
    """Load a saved sequence into slot (emptied first); returns its token ids."""
    header = read_header(path)
    check_header(header, expected, path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CacheFileError(f"{path} is corrupt or truncated ({e})") from e
    if payload_checksum(tensors) != header["checksum"]:
        raise CacheFileError(f"{path} failed its checksum: the file is corrupt")
    tokens = tensors["tokens"].tolist()
    n = len(tokens)
    if cache.kind != "dense":
        _check_key_centers(cache, slot, tensors, header, path)
    cache.set_len(slot, 0)
    if cache.kind == "dense":
        for layer, (k, v) in enumerate(zip(cache.k, cache.v)):
            k[slot, :, :n] = tensors[f"{layer}.k"].to(k.device)
            v[slot, :, :n] = tensors[f"{layer}.v"].to(v.device)
        cache.set_len(slot, n)
        return tokens
    for layer in range(cache.args.num_hidden_layers):
        for which, codec in (("k", cache.k_codec[layer]), ("v", cache.v_codec[layer])):
            prefix = f"{layer}.{which}_codec."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if codec is not None and state:
                others = any(cache.lens[s] for s in range(cache.max_seqs) if s != slot)
                current = codec.state_dict()
                same = current.keys() == state.keys() and all(torch.equal(current[k].cpu(), state[k]) for k in state)
                if others and cache.calibrated[layer] and not same:
                    raise CacheMismatch(
                        f"{path}: layer {layer} was calibrated on other data than the sequences now in "
                        "the cache; close the other sessions first")
                codec.load_state_dict({k: v.to(cache.device) for k, v in state.items()})
        if cache.k_center[layer] is not None:
            cache.set_center(layer, tensors[f"{layer}.k_center"].to(cache.device))
        cache.calibrated[layer] = True
    cache.reserve(slot, n)
    flat = flat_slots(cache.block_table[slot], torch.arange(n, device=cache.device), cache.block_size)
    for layer in range(cache.args.num_hidden_layers):
        for which, codec, pool in (("k", cache.k_codec[layer], cache.k_pool[layer]),
                                   ("v", cache.v_codec[layer], cache.v_pool[layer])):
            rec = tensors[f"{layer}.{which}"]
            if header["format"] == FORMAT_1 and codec is not None:
                rec = _format1_records(codec, rec)
            write_dense(pool, rec.to(cache.device), flat, cache.block_size)
        if cache.k_hot[layer] is not None:
            cache.k_hot[layer][slot] = tensors[f"{layer}.k_hot"].to(cache.device)
            cache.v_hot[layer][slot] = tensors[f"{layer}.v_hot"].to(cache.device)
    cache.compressed[slot] = header["compressed"]
    cache.set_len(slot, n)
    return tokens
