"""Sessions over the compressed cache: save -> load continues exactly, refusals, chunk boundaries."""

from __future__ import annotations

import pytest
import torch

from tqinfer.cache.config import CacheConfig
from tqinfer.cache.store import CacheFileError, CacheMismatch
from tqinfer.llm import LLM
from tqinfer.sampling import SamplingParams


@pytest.fixture
def folder(tiny_hf_folder):
    return tiny_hf_folder("llama", tokenizer="bytes")


def make(folder, **cache):
    cfg = CacheConfig(**{"k_type": "tq3.5", "v_type": "tq3", "sinks": 2, "window": 8, "block_size": 16, **cache})
    return LLM(str(folder), device="cpu", dtype="float32", cache=cfg, max_context=256, prefill_chunk=32)


def test_saved_session_continues_exactly_like_the_uninterrupted_one(folder, tmp_path):
    llm = make(folder)
    ids = list(range(3, 90))
    with llm.session() as s:
        s.append(ids)
        s.save(tmp_path / "s.safetensors")
        cont = s.append([5, 6, 7], all_logits=True)
    with llm.load_session(tmp_path / "s.safetensors") as r:
        assert r.tokens == ids
        again = r.append([5, 6, 7], all_logits=True)
    assert torch.equal(cont, again)
    # and into a fresh LLM (a new process would do the same)
    with make(folder).load_session(tmp_path / "s.safetensors") as r2:
        assert torch.equal(r2.append([5, 6, 7], all_logits=True), cont)


def test_a_key_centered_session_saves_its_centers_and_continues_exactly(folder, tmp_path):
    llm = make(folder, center_keys=True)
    ids = list(range(3, 90))
    with llm.session() as s:
        s.append(ids)
        s.save(tmp_path / "c.safetensors")
        cont = s.append([5, 6, 7], all_logits=True)
    centers = [c.clone() for c in llm.cache.k_center]
    assert all(c is not None and bool(c.abs().sum() > 0) for c in centers)
    fresh = make(folder, center_keys=True)
    with fresh.load_session(tmp_path / "c.safetensors") as r:
        assert torch.equal(r.append([5, 6, 7], all_logits=True), cont)
    assert all(torch.equal(a, b) for a, b in zip(centers, fresh.cache.k_center))
    with pytest.raises(CacheMismatch, match="center_keys"):
        make(folder).load_session(tmp_path / "c.safetensors")


def test_greedy_generation_after_load_equals_uncached(folder, tmp_path):
    llm = make(folder, k_type="tq4", v_type="tq4")
    prompt = list(range(10, 70))
    with llm.session() as s:
        s.append(prompt)
        s.save(tmp_path / "p.safetensors")
    with llm.load_session(tmp_path / "p.safetensors") as s:
        loaded = [ev.token for ev in s.stream(prompt + [71], SamplingParams.greedy(max_tokens=8, ignore_eos=True))]
    with llm.session() as s:
        s.append(prompt)  # same chunk boundary at the end of the prompt
        uncached = [ev.token for ev in s.stream(prompt + [71], SamplingParams.greedy(max_tokens=8, ignore_eos=True))]
    assert loaded == uncached


def _as_format1(llm, path, out):
    """A copy of a saved session as the previous format wrote it: every 3-bit TurboQuant part's 1-bit
    plane with code j at bit j % 8 (now at bit (0, 1, 4, 5, 2, 3, 6, 7)[j % 8]), bit by bit."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from tqinfer.cache.store import payload_checksum
    from tqinfer.quant.turboquant import mse_parts

    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["tqinfer"])
    tensors = load_file(str(path))
    at = (0, 1, 4, 5, 2, 3, 6, 7)
    for name in [n for n in tensors if n.endswith((".k", ".v"))]:
        layer, which = name.split(".")
        codec = (llm.cache.k_codec if which == "k" else llm.cache.v_codec)[int(layer)]
        rec = tensors[name].clone()
        for p in mse_parts(codec):
            if p.quantizer.bits == 3:
                lo, n = p.planes + (2 * p.quantizer.dim + 7) // 8, (p.quantizer.dim + 7) // 8
                plane = rec[..., lo:lo + n].int()
                rec[..., lo:lo + n] = sum(((plane >> at[j]) & 1) << j for j in range(8)).to(torch.uint8)
        tensors[name] = rec
    header.update(format="tqinfer-session-1", checksum=payload_checksum(tensors))
    save_file(tensors, str(out), metadata={"tqinfer": json.dumps(header, sort_keys=True)})


def test_a_session_of_the_previous_format_loads_and_continues_exactly(folder, tmp_path):
    llm = make(folder)  # tq3.5 keys (a 3-bit part), tq3 values
    ids = list(range(3, 90))
    with llm.session() as s:
        s.append(ids)
        s.save(tmp_path / "s.safetensors")
        cont = s.append([5, 6, 7], all_logits=True)
    _as_format1(llm, tmp_path / "s.safetensors", tmp_path / "old.safetensors")
    from safetensors.torch import load_file
    new, old = load_file(str(tmp_path / "s.safetensors")), load_file(str(tmp_path / "old.safetensors"))
    assert not torch.equal(new["0.k"], old["0.k"]) and not torch.equal(new["0.v"], old["0.v"])
    with make(folder).load_session(tmp_path / "old.safetensors") as r:
        assert torch.equal(r.append([5, 6, 7], all_logits=True), cont)


@pytest.mark.parametrize("kind,d", [("tq3", 64), ("tq3.5", 128), ("tq2.5", 64), ("tqp4", 128), ("tq2.5-paper", 40),
                                    ("tq3.5-paper", 72), ("tq3.5-paper", 40), ("tq4", 64)])
def test_format1_records_convert_every_3bit_part(kind, d):
    """store._format1_records turns a record whose 3-bit parts' 1-bit planes are in plain order (the old
    format, written here code by code) into this format's record, for part widths that are not a multiple
    of 8 too (tq2.5-paper at d 40: 10 codes, the 2-bit plane 3 bytes); other bytes and types untouched."""
    from tqinfer.cache.store import _format1_records
    from tqinfer.quant.packing import packed_bytes, unpack
    from tqinfer.quant.registry import make_codec
    from tqinfer.quant.turboquant import mse_parts

    codec = make_codec(kind, d, 2, seed=3)
    new = codec.encode(torch.randn(5, 2, d, generator=torch.Generator().manual_seed(4)))
    old = new.clone()
    for p in mse_parts(codec):
        n = p.quantizer.dim
        if p.quantizer.bits != 3:
            continue
        codes = unpack(new[..., p.planes:p.planes + packed_bytes(n, 3)], 3, n).long()
        lo = p.planes + (2 * n + 7) // 8
        plain = torch.zeros(*new.shape[:-1], (n + 7) // 8, dtype=torch.long)
        for j in range(n):
            plain[..., j // 8] |= ((codes[..., j] >> 2) & 1) << (j % 8)
        old[..., lo:lo + (n + 7) // 8] = plain.to(torch.uint8)
    assert torch.equal(_format1_records(codec, old), new)
    assert kind == "tq4" or not torch.equal(old, new)  # the formats differ where there are 3-bit codes


def test_mismatched_cache_type_or_model_is_refused(folder, tiny_hf_folder, tmp_path):
    llm = make(folder)
    with llm.session() as s:
        s.append(list(range(3, 40)))
        s.save(tmp_path / "s.safetensors")
    with pytest.raises(CacheMismatch, match="k_type: file has 'tq3.5', this run has 'tq4'"):
        make(folder, k_type="tq4").load_session(tmp_path / "s.safetensors")
    other = tiny_hf_folder("llama", tokenizer="bytes", seed=1)
    with pytest.raises(CacheMismatch, match="weights_id"):
        make(other).load_session(tmp_path / "s.safetensors")


def test_corrupt_or_truncated_file_is_detected(folder, tmp_path):
    llm = make(folder)
    with llm.session() as s:
        s.append(list(range(3, 60)))
        s.save(tmp_path / "s.safetensors")
    data = bytearray((tmp_path / "s.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(CacheFileError, match="checksum"):
        llm.load_session(tmp_path / "bad.safetensors")
    (tmp_path / "short.safetensors").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CacheFileError):
        llm.load_session(tmp_path / "short.safetensors")
    assert len(llm._free_slots) == llm.max_seqs  # failed loads give their slot back


def test_rollback_then_continue_matches_the_window_restored_from_records(folder):
    llm = make(folder)
    with llm.session() as s:
        s.append(list(range(3, 50)))
        s.truncate(40)
        assert s.tokens == list(range(3, 43))
        out = s.append([1, 2], all_logits=True)
        assert torch.isfinite(out).all()
        assert llm.cache.lens[s.slot] == 42


def test_engine_chunked_prefill_equals_reference_with_same_boundaries(folder):
    """The engine's chunked prefill over compressed types equals the torch twin run chunk by chunk
    (on CPU both are the twin, so this pins chunk scheduling: boundaries decide what is compressed)."""
    llm = make(folder, k_type="tq3", v_type="tq3")
    ids = list(range(3, 100))
    a = llm.logits(ids, chunk=32)
    with llm.session() as s:
        parts = [s.append(ids[i:i + 32], all_logits=True) for i in range(0, len(ids), 32)]
    assert torch.equal(a, torch.cat(parts))
    b = llm.logits(ids, chunk=16)
    assert not torch.equal(a, b)  # other boundaries compress other tokens before they are attended
